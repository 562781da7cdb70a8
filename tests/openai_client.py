"""Drives a running `verdict serve` with the official `openai` package (run by tests/http_openai.rs).

    python tests/openai_client.py BASE_URL MODEL_ID API_KEY [LORA_MODULE]

Checks completions and chat, streamed and not, with verdict's extra fields passed through
`extra_body` (vLLM's sampling extensions too), logprobs, logit_bias and penalties, structured outputs (`parse` with a pydantic
model, `guided_choice`), the Responses API (whole, streamed through the client's own event
accumulator, `parse`, `previous_response_id`, `input_items` and `input_tokens`, retrieve and delete, in the
background: polled, its stream read again, cancelled), the Conversations API (items paged, added,
deleted; responses that read and extend a conversation), stored chat completions (listed by
metadata, read with their messages, updated, deleted), predicted outputs (usage counts), that a wrong API key is an
AuthenticationError, a reasoning model's `reasoning_content` (whole and streamed), and that
an unknown policy is a 400 the client raises as BadRequestError, and embeddings (the client asks
for base64 and decodes it; floats on request; `dimensions`), the Batch API (a file uploaded,
a batch run, its output and error files read back, each answer the direct one), and, given a LoRA module's name,
that it is listed beside the model and answers chat and completions as itself.
Exits non-zero (AssertionError) on the first mismatch.
"""

import json
import sys
import time

import openai

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def refused(error, what, call, **fields):
    """`call()` must fail with `error` whose body holds `fields` (the field at fault, a code);
    `what` says what happened if it did not."""
    try:
        call()
    except error as e:
        for k, v in fields.items():
            assert e.body[k] == v, e.body
        return
    raise AssertionError(what)


refused(
    openai.AuthenticationError,
    "a wrong API key was accepted",
    lambda: openai.OpenAI(base_url=base_url + "/v1", api_key=key + "x", max_retries=0).models.list(),
    code="invalid_api_key",
)

assert model in [m.id for m in client.models.list().data], "model not listed"
assert client.models.retrieve(model).id == model
refused(
    openai.NotFoundError,
    "an unknown model was found",
    lambda: client.models.retrieve("gpt-4"),
    code="model_not_found",
)

extra = {"policy": "strict", "speculation": {"draft": "model", "k": 3}}

# Embeddings: the client's default is base64, which it decodes to floats itself.
emb = client.embeddings.create(model=model, input=["def add(a, b):", "hello"])
assert [d.index for d in emb.data] == [0, 1], emb
first = emb.data[0].embedding
assert len(first) > 0 and abs(sum(x * x for x in first) - 1.0) < 1e-4, first[:4]
assert emb.usage.prompt_tokens == emb.usage.total_tokens > 0, emb.usage
floats = client.embeddings.create(model=model, input="def add(a, b):", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, first)) < 1e-6
cut = client.embeddings.create(model=model, input="def add(a, b):", dimensions=8)
assert len(cut.data[0].embedding) == 8
refused(
    openai.BadRequestError,
    "an empty input was embedded",
    lambda: client.embeddings.create(model=model, input=""),
    param="input",
)

# Completions, non-streamed and streamed: same greedy text.
c = client.completions.create(
    model=model, prompt="the cat sat", max_tokens=12, temperature=0, extra_body=extra
)
text = c.choices[0].text
assert isinstance(text, str)
assert c.usage.completion_tokens >= 1
assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
assert c.usage.prompt_tokens_details.cached_tokens < c.usage.prompt_tokens, c.usage
spec = c.model_extra["speculation"]
assert spec["policy"] == "strict@0.1.0", spec
assert spec["drafter"] == "model", spec
assert spec["steps"] >= 1, spec

streamed = ""
finish = None
for chunk in client.completions.create(
    model=model, prompt="the cat sat", max_tokens=12, temperature=0, stream=True, extra_body=extra
):
    streamed += chunk.choices[0].text
    finish = chunk.choices[0].finish_reason or finish
assert streamed == text, (streamed, text)
assert finish in ("length", "stop"), finish

# The same prompt again: all but its last token come from the prompt cache, same text.
again = client.completions.create(
    model=model, prompt="the cat sat", max_tokens=12, temperature=0, extra_body=extra
)
assert again.choices[0].text == text
assert again.usage.prompt_tokens_details.cached_tokens == c.usage.prompt_tokens - 1, again.usage

# Chat, non-streamed and streamed, with another policy and parameters.
extra_chat = {"policy": "threshold", "policy_params": {"eps": 0.2}, "speculation": {"draft": "model", "k": 2}}
messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=10, temperature=0, extra_body=extra_chat
)
reply = r.choices[0].message.content
assert r.choices[0].message.role == "assistant"
assert r.model_extra["speculation"]["policy"] == "threshold@0.1.0", r.model_extra

streamed = ""
usage = None
for chunk in client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=10,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body=extra_chat,
):
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
assert streamed == reply, (streamed, reply)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

# Per-token logprobs in OpenAI's chat shape, parsed by the client's own types.
r = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
    extra_body=extra,  # strict: lossless, so at T = 0 every token is the target's argmax
)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
for t in content:
    assert isinstance(t.token, str) and t.logprob <= 0.0 and isinstance(t.bytes, list), t
    assert len(t.top_logprobs) == 2, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob, t
    # Greedy: the chosen token is the most likely one.
    assert t.top_logprobs[0].bytes == t.bytes and t.top_logprobs[0].logprob == t.logprob, t

# The client's own penalty and bias fields: a +100 bias forces one token at every position
# (the tokens as logprobs name them), with speculation on; penalties are accepted.
forced = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=5,
    temperature=0,
    logprobs=True,
    logit_bias={"42": 100},
    frequency_penalty=0.5,
    presence_penalty=0.5,
    extra_body=extra,
)
toks = [t.token for t in forced.choices[0].logprobs.content]
assert len(toks) == 5 and len(set(toks)) == 1, toks

# vLLM's sampling extensions through extra_body: the tokens named by id, one of them as a stop
# token (the reply's `stop_reason`, an extra field the client keeps), a bad word, a streamed
# usage per chunk.
ids = client.completions.create(
    model=model,
    prompt="the cat sat",
    max_tokens=8,
    temperature=0,
    logprobs=0,
    extra_body={"return_tokens_as_token_ids": True, "speculation": "off"},
)
named = [int(t.removeprefix("token_id:")) for t in ids.choices[0].logprobs.tokens]
cut = next(i for i in range(1, len(named)) if named[i] not in named[:i])
stopped = client.completions.create(
    model=model,
    prompt="the cat sat",
    max_tokens=8,
    temperature=0,
    extra_body={"stop_token_ids": [named[cut]], "bad_words": ["zzz"], **extra},
)
assert stopped.usage.completion_tokens == cut, (stopped, named)
assert stopped.choices[0].stop_reason == named[cut], stopped.choices[0]
seen = [
    c.usage.completion_tokens
    for c in client.completions.create(
        model=model,
        prompt="the cat sat",
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    if c.usage is not None
]
assert seen and seen == sorted(seen) and seen[-1] == 6, seen

# Several prompts in one request: a choice per prompt, in order, each the prompt's own answer.
pair = ["the cat sat", "a dog ran"]
batch = client.completions.create(model=model, prompt=pair, max_tokens=6, temperature=0)
singles = [
    client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text
    for p in pair
]
assert [c.index for c in batch.choices] == [0, 1], batch.choices
assert [c.text for c in batch.choices] == singles, (batch.choices, singles)

# echo with max_tokens 0 scores the prompt: its first token has no logprob, the rest do.
e = client.completions.create(
    model=model, prompt="the cat sat on the mat", max_tokens=0, echo=True, logprobs=1
)
lp = e.choices[0].logprobs
assert e.choices[0].text == "the cat sat on the mat", e.choices[0].text
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
assert len(lp.tokens) >= 2 and all(x <= 0.0 for x in lp.token_logprobs[1:]), lp

# vLLM's prompt_logprobs and return_token_ids, extra fields the client keeps: the prompt's
# ids, a score per prompt token after the first (keyed by token id), the output's ids.
scored = client.completions.create(
    model=model,
    prompt="the cat sat on the mat",
    max_tokens=3,
    temperature=0,
    extra_body={"prompt_logprobs": 2, "return_token_ids": True},
)
c = scored.choices[0]
assert len(c.prompt_logprobs) == len(c.prompt_token_ids) >= 2, c
assert c.prompt_logprobs[0] is None, c.prompt_logprobs
for tok, entry in zip(c.prompt_token_ids[1:], c.prompt_logprobs[1:]):
    assert entry[str(tok)]["rank"] >= 1 and entry[str(tok)]["logprob"] <= 0.0, entry
# The stop token that ended the output comes last (not a completion token), as in vLLM.
assert len(c.token_ids) == scored.usage.completion_tokens + (c.finish_reason == "stop"), c

# best_of, a named argument of the client's: one choice back, usage for all three generations.
best = client.completions.create(
    model=model, prompt="the cat sat", max_tokens=5, temperature=1, seed=3, best_of=3
)
three = client.completions.create(
    model=model, prompt="the cat sat", max_tokens=5, temperature=1, seed=3, n=3
)
assert len(best.choices) == 1, best.choices
assert best.choices[0].text in [c.text for c in three.choices], (best, three)
assert best.usage.completion_tokens == three.usage.completion_tokens, (best.usage, three.usage)

# n choices, whole and streamed (chunks name their choice's index).
two = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, n=2, extra_body=extra
)
assert [c.index for c in two.choices] == [0, 1], two.choices
assert two.choices[0].message.content == two.choices[1].message.content, two.choices
parts = ["", ""]
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, n=2, stream=True
):
    for c in chunk.choices:
        parts[c.index] += c.delta.content or ""
assert parts == [c.message.content for c in two.choices], (parts, two.choices)

# Structured outputs: the client's own `parse` sends a pydantic model as a strict JSON schema
# and reads the reply back into it; vLLM's guided_choice goes through extra_body.
from typing import Literal

import pydantic


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    score: int = pydantic.Field(ge=0, le=9)


parsed = client.chat.completions.parse(
    model=model, messages=messages, max_tokens=200, temperature=0, response_format=Verdict
)
v = parsed.choices[0].message.parsed
assert isinstance(v, Verdict) and 0 <= v.score <= 9, parsed
choice = client.completions.create(
    model=model, prompt="x", max_tokens=8, temperature=0, extra_body={"guided_choice": ["up", "down"]}
)
assert choice.choices[0].text in ("up", "down"), choice

# The Responses API: the same greedy text as the chat request it stands for.
want = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    max_tokens=10,
    temperature=0,
)
r = client.responses.create(
    model=model, instructions="Be brief.", input="Hello", max_output_tokens=10, temperature=0
)
assert r.output_text == want.choices[0].message.content, (r, want)
assert r.usage.input_tokens == want.usage.prompt_tokens, r.usage
assert r.status == ("incomplete" if want.choices[0].finish_reason == "length" else "completed"), r
# Streamed: the client's accumulator folds the events into the same response.
with client.responses.stream(
    model=model,
    instructions="Be brief.",
    input="Hello",
    max_output_tokens=10,
    temperature=0,
    extra_body={"speculation": {"draft": "model", "k": 3}},
) as stream:
    deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    if r.status == "completed":
        final = stream.get_final_response()
        assert final.output_text == r.output_text, final
assert deltas == r.output_text, (deltas, r.output_text)
# Logprobs by `include`, in the client's own types.
lp = client.responses.create(
    model=model,
    input="Hello",
    max_output_tokens=5,
    temperature=0,
    include=["message.output_text.logprobs"],
    top_logprobs=2,
)
entries = lp.output[0].content[0].logprobs
assert len(entries) == lp.usage.output_tokens, lp
assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries), entries
# A conversation continued by id, then retrieved and deleted.
r2 = client.responses.create(
    model=model, input="More", previous_response_id=r.id, max_output_tokens=6, temperature=0
)
assert r2.previous_response_id == r.id
counted = client.responses.input_tokens.count(model=model, input="More", previous_response_id=r.id)
assert counted.input_tokens == r2.usage.input_tokens, (counted, r2.usage)
assert client.responses.retrieve(r.id).output_text == r.output_text
# What r2 was generated from: r's input and output, then its own (newest first).
listed = [i.id for i in client.responses.input_items.list(r2.id)]
assert listed[0].startswith("msg_") and listed[1] == r.output[0].id and len(listed) == 3, listed
# Predicted outputs: the same text, the predicted tokens counted in the usage.
plain = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
)
predicted = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0,
    prediction={"type": "content", "content": plain.choices[0].message.content},
)
assert predicted.choices[0].message.content == plain.choices[0].message.content, predicted
details = predicted.usage.completion_tokens_details
assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens == 0, details
# Stored chat completions: kept with `store`, listed by metadata, read, updated, deleted.
kept = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
    store=True, metadata={"run": "client"},
)
listed = [c.id for c in client.chat.completions.list(metadata={"run": "client"})]
assert listed == [kept.id], listed
got = client.chat.completions.retrieve(kept.id)
assert got.choices[0].message.content == kept.choices[0].message.content, got
assert [m.content for m in client.chat.completions.messages.list(kept.id)] == ["Hello"]
assert client.chat.completions.update(kept.id, metadata={"run": "done"}).metadata == {"run": "done"}
assert client.chat.completions.delete(kept.id).deleted
refused(openai.NotFoundError, "a deleted completion was found", lambda: client.chat.completions.retrieve(kept.id))
# A conversation: each response reads it and adds its turn; the client pages its items.
conv = client.conversations.create(
    items=[{"type": "message", "role": "user", "content": "Hello"}], metadata={"topic": "t"}
)
assert conv.metadata == {"topic": "t"} and client.conversations.retrieve(conv.id).id == conv.id
c1 = client.responses.create(model=model, input="More", conversation=conv.id, max_output_tokens=6, temperature=0)
assert c1.conversation.id == conv.id, c1
c2 = client.responses.create(model=model, input="Again", conversation=conv.id, max_output_tokens=6, temperature=0)
items = list(client.conversations.items.list(conv.id, limit=2, order="asc"))
assert [i.type for i in items] == ["message"] * 5, items
assert items[2].id == c1.output[0].id and items[2].content[0].text == c1.output_text, items
assert items[4].content[0].text == c2.output_text and items[4].role == "assistant", items
added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Noted"}])
assert client.conversations.items.retrieve(added.first_id, conversation_id=conv.id).content[0].text == "Noted"
client.conversations.items.delete(added.first_id, conversation_id=conv.id)
assert client.conversations.update(conv.id, metadata={"topic": "u"}).metadata == {"topic": "u"}
assert client.conversations.delete(conv.id).deleted
refused(
    openai.NotFoundError,
    "a deleted conversation was continued",
    lambda: client.responses.create(model=model, input="x", conversation=conv.id),
    param="conversation",
)
# In the background: polled to the same text; a streamed one read again from a sequence number.
hello = dict(model=model, instructions="Be brief.", input="Hello", max_output_tokens=10, temperature=0)
bg = client.responses.create(**hello, background=True)
assert bg.background and bg.status in ("queued", "in_progress"), bg
deadline = time.time() + 120
while bg.status in ("queued", "in_progress"):
    assert time.time() < deadline, bg
    time.sleep(0.05)
    bg = client.responses.retrieve(bg.id)
assert bg.output_text == r.output_text and bg.status == r.status, (bg, r)
assert client.responses.cancel(bg.id).status == bg.status
events = list(client.responses.create(**hello, background=True, stream=True))
assert [e.sequence_number for e in events] == list(range(len(events))), events
sid = events[-1].response.id
again = list(client.responses.retrieve(sid, stream=True, starting_after=2))
assert [e.sequence_number for e in again] == [e.sequence_number for e in events[3:]], again
assert events[-1].response.output_text == r.output_text, events[-1]
refused(
    openai.BadRequestError,
    "a response not in the background was cancelled",
    lambda: client.responses.cancel(r.id),
)
client.responses.delete(r.id)
refused(openai.NotFoundError, "a deleted response was found", lambda: client.responses.retrieve(r.id))
# `parse` with a pydantic model sends a strict JSON schema as text.format.
parsed = client.responses.parse(
    model=model, input="Rate it", text_format=Verdict, max_output_tokens=200, temperature=0
)
assert isinstance(parsed.output_parsed, Verdict) and 0 <= parsed.output_parsed.score <= 9, parsed
# Streamed under the schema, the reply ends with the grammar: the accumulator's final response.
with client.responses.stream(
    model=model, input="Rate it", text_format=Verdict, max_output_tokens=200, temperature=0
) as stream:
    events = [e.type for e in stream]
    final = stream.get_final_response()
assert events[0] == "response.created" and events[-1] == "response.completed", events
assert final.output_parsed == parsed.output_parsed, (final, parsed)
refused(
    openai.BadRequestError,
    "a built-in tool was accepted",
    lambda: client.responses.create(model=model, input="x", tools=[{"type": "web_search"}]),
    param="tools[0].type",
)

# Errors arrive as the client's typed exceptions, naming the field.
refused(
    openai.BadRequestError,
    "a broken regex was accepted",
    lambda: client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, extra_body={"guided_regex": "(("}
    ),
    param="guided_regex",
)
refused(
    openai.BadRequestError,
    "tools were accepted by a template that reads none",
    lambda: client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=2,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    ),
    param="tools",
)
# The client's own `reasoning_effort` reaches the template (this one reads none); a level
# OpenAI has not is refused by name.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, reasoning_effort="low")
assert r.choices[0].message.role == "assistant"
refused(
    openai.BadRequestError,
    "an unknown effort was accepted",
    lambda: client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, extra_body={"reasoning_effort": "extreme"}
    ),
    param="reasoning_effort",
)
# A reasoning model's thinking (the server runs --reasoning-parser qwen3; a grammar makes the
# tiny model write a block): `reasoning_content` beside `content`, whole and streamed, as the
# client exposes fields it does not know (`model_extra`).
think = {"guided_regex": "<think>[a-z]{3,8}</think>[a-z]{2,6}"}
r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=48, temperature=0, extra_body=think
)
m = r.choices[0].message
thought = (m.model_extra or {}).get("reasoning_content")
assert thought and thought.isalpha() and m.content and m.content.isalpha(), m
parts = {"reasoning_content": "", "content": ""}
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=48, temperature=0, extra_body=think, stream=True
):
    if chunk.choices:
        d = chunk.choices[0].delta
        parts["content"] += d.content or ""
        parts["reasoning_content"] += (d.model_extra or {}).get("reasoning_content") or ""
assert parts == {"reasoning_content": thought, "content": m.content}, parts

refused(
    openai.BadRequestError,
    "an unknown policy was accepted",
    lambda: client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"policy": "nosuch"}),
    param="policy",
)
refused(
    openai.NotFoundError,
    "an unknown model was accepted",
    lambda: client.completions.create(model="gpt-4", prompt="x", max_tokens=2),
    code="model_not_found",
)
refused(
    openai.BadRequestError,
    "top_logprobs without logprobs was accepted",
    lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=2, top_logprobs=2),
    param="top_logprobs",
)
refused(
    openai.BadRequestError,
    "frequency_penalty 2.5 was accepted",
    lambda: client.completions.create(model=model, prompt="x", max_tokens=2, frequency_penalty=2.5),
    param="frequency_penalty",
)

# The Batch API: a JSONL file uploaded, run in the background, its answers read back; each
# the answer the same request gets directly.
jobs = [
    {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"count to {i}"}],
                 "max_tokens": 6, "temperature": 0},
    }
    for i in range(3)
]
jobs.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": messages, "max_tokens": -1}})
uploaded = client.files.create(
    file=("jobs.jsonl", "\n".join(json.dumps(j) for j in jobs).encode()), purpose="batch"
)
assert uploaded.purpose == "batch" and uploaded.filename == "jobs.jsonl" and uploaded.bytes > 0, uploaded
assert client.files.retrieve(uploaded.id).id == uploaded.id
batch = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"run": "nightly"},
)
deadline = time.time() + 120
while batch.status not in ("completed", "failed", "cancelled", "expired"):
    assert time.time() < deadline, batch
    time.sleep(0.1)
    batch = client.batches.retrieve(batch.id)
assert batch.status == "completed", batch
counts = batch.request_counts
assert (counts.total, counts.completed, counts.failed) == (4, 3, 1), counts
assert batch.metadata == {"run": "nightly"}, batch.metadata
answers = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
assert [a["custom_id"] for a in answers] == ["q0", "q1", "q2"], answers
for a, job in zip(answers, jobs):
    direct = client.chat.completions.create(**job["body"])
    assert a["response"]["status_code"] == 200, a
    got = a["response"]["body"]["choices"][0]["message"]["content"]
    assert got == direct.choices[0].message.content, (got, direct)
failures = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
assert [f["custom_id"] for f in failures] == ["bad"], failures
assert failures[0]["response"]["status_code"] == 400, failures
assert failures[0]["response"]["body"]["error"]["param"] == "max_tokens", failures
assert batch.id in [b.id for b in client.batches.list()]
assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
refused(openai.ConflictError, "a finished batch was cancelled", lambda: client.batches.cancel(batch.id))
refused(
    openai.BadRequestError,
    "a batch of an unbatchable endpoint was created",
    lambda: client.batches.create(input_file_id=uploaded.id, endpoint="/v1/models", completion_window="24h"),
    param="endpoint",
)
assert client.files.delete(uploaded.id).deleted
refused(openai.NotFoundError, "a deleted file was found", lambda: client.files.retrieve(uploaded.id))

# A LoRA module (serve --lora-modules): a model of its own to the client.
if len(sys.argv) > 4:
    module = sys.argv[4]
    listed = {m.id: m for m in client.models.list().data}
    assert module in listed and model in listed, listed
    assert client.models.retrieve(module).id == module
    ask = [{"role": "user", "content": "the cat sat"}]
    base = client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0)
    adapted = client.chat.completions.create(
        model=module, messages=ask, max_tokens=12, temperature=0, extra_body=extra
    )
    assert adapted.model == module and base.model == model, (adapted.model, base.model)
    assert adapted.choices[0].message.content != base.choices[0].message.content, adapted
    stream = client.completions.create(
        model=module, prompt="the cat sat", max_tokens=6, temperature=0, stream=True
    )
    assert all(chunk.model == module for chunk in stream)

print("openai client: all checks passed")
