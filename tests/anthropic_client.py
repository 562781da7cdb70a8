"""Drives a running `verdict serve` with the official `anthropic` package (run by
tests/http_openai.rs, against the same server as the `openai` checks).

    python tests/anthropic_client.py BASE_URL MODEL_ID API_KEY [basic|tools]

`basic` (the tiny models): Anthropic's Messages API gives the same greedy text as OpenAI's chat
route, whole and streamed through the client's own accumulator; stop sequences and max_tokens as
stop reasons; usage with prompt-cache reads apart; count_tokens; the models route; a message batch (created,
polled, its results read, deleted); `parse` with a pydantic model;
a reasoning model's thinking block; errors as the client's exception classes (wrong key,
unknown model, unknown policy).
`tools` (a real model whose template reads tools): a forced tool call, streamed too, and its
result sent back. Exits non-zero (AssertionError) on the first mismatch.
"""

import sys
import time
from typing import Literal

import anthropic
import openai
import pydantic

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "basic"
# The client has no sampling parameters (newer Claude models fix them); verdict reads
# `temperature`, `top_p`, `top_k` and the rest as body fields.
greedy = {"temperature": 0}
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=300)
oai = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=300)


def tools_checks():
    """A forced tool call: a tool_use block whose input fits the schema, whole and through the
    client's stream accumulator; its result goes back in a user turn and the model reads it."""
    tools = [
        {
            "name": "get_time",
            "description": "The time in a zone.",
            "input_schema": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        }
    ]
    ask = {"role": "user", "content": "What time is it in Berlin?"}
    forced = dict(
        model=model,
        messages=[ask],
        tools=tools,
        tool_choice={"type": "any"},
        max_tokens=60,
        extra_body=greedy,
    )
    call = client.messages.create(**forced)
    assert call.stop_reason == "tool_use", call
    use = [b for b in call.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_time" and use[0].input["zone"] in ("utc", "cet"), call
    with client.messages.stream(**forced) as s:
        final = s.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed[0].input == use[0].input, final
    after = client.messages.create(
        model=model,
        messages=[
            ask,
            {"role": "assistant", "content": call.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "12:34"}],
            },
        ],
        tools=tools,
        tool_choice={"type": "none"},
        max_tokens=30,
        extra_body=greedy,
    )
    assert after.content[0].type == "text" and "12:34" in after.content[0].text, after


if mode == "tools":
    tools_checks()
    print("all checks passed")
    sys.exit(0)

# The key travels as `x-api-key`.
try:
    anthropic.Anthropic(base_url=base_url, api_key=key + "x", max_retries=0).messages.create(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    raise AssertionError("a wrong API key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body

system = "You answer briefly."
messages = [{"role": "user", "content": "the cat sat on the"}]
extra = {"policy": "strict", "speculation": {"draft": "model", "k": 3}}

# The same conversation through OpenAI's chat route gives the same greedy text.
chat = oai.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": system}] + messages,
    max_tokens=16,
    temperature=0,
    extra_body=extra,
)
m = client.messages.create(
    model=model, system=system, messages=messages, max_tokens=16, extra_body={**extra, **greedy}
)
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
assert m.content[0].type == "text", m
text = m.content[0].text
assert text == chat.choices[0].message.content, (text, chat)
assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason], m
assert m.usage.output_tokens == chat.usage.completion_tokens, (m.usage, chat.usage)
# The chat request left the prompt in the cache: reads count apart from input tokens.
assert m.usage.cache_read_input_tokens > 0, m.usage
assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat.usage.prompt_tokens, m.usage
assert m.model_extra["speculation"]["policy"] == "strict@0.1.0", m.model_extra

# Streamed through the client's own accumulator: the same message.
with client.messages.stream(
    model=model, system=system, messages=messages, max_tokens=16, extra_body={**extra, **greedy}
) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
assert streamed == text, (streamed, text)
assert final.content[0].text == text and final.stop_reason == m.stop_reason, final
assert final.usage.output_tokens == m.usage.output_tokens, final.usage
assert final.usage.input_tokens + final.usage.cache_read_input_tokens == chat.usage.prompt_tokens

# count_tokens counts the prompt the message would read.
n = client.messages.count_tokens(model=model, system=system, messages=messages)
assert n.input_tokens == chat.usage.prompt_tokens, (n, chat.usage)

# The models route in the API's shape.
assert model in [m.id for m in client.models.list()], client.models.list()
info = client.models.retrieve(model)
assert (info.id, info.type, info.display_name) == (model, "model", model), info

# Message Batches: the requests run in the background, each result the message a direct
# request gives (or the error it gets); the client reads them from the batch's results_url,
# this server's own address.
batch = client.messages.batches.create(
    requests=[
        {
            "custom_id": "first",
            "params": dict(
                model=model, system=system, messages=messages, max_tokens=16, **extra, **greedy
            ),
        },
        {"custom_id": "no-max-tokens", "params": {"model": model, "messages": messages}},
    ]
)
assert batch.type == "message_batch" and batch.id.startswith("msgbatch_"), batch
deadline = time.time() + 120
while batch.processing_status != "ended":
    assert time.time() < deadline, batch
    time.sleep(0.1)
    batch = client.messages.batches.retrieve(batch.id)
counts = batch.request_counts
assert (counts.succeeded, counts.errored, counts.processing) == (1, 1, 0), batch
assert batch.ended_at >= batch.created_at and batch.results_url.startswith(base_url), batch
results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
first, refused = results["first"], results["no-max-tokens"]
assert first.type == "succeeded" and first.message.content[0].text == text, first
assert refused.type == "errored" and refused.error.error.type == "invalid_request_error", refused
assert batch.id in [b.id for b in client.messages.batches.list(limit=5)]
try:
    client.messages.batches.cancel(batch.id)
    raise AssertionError("an ended batch was cancelled")
except anthropic.ConflictError:
    pass
deleted = client.messages.batches.delete(batch.id)
assert deleted.type == "message_batch_deleted" and deleted.id == batch.id, deleted
try:
    client.messages.batches.retrieve(batch.id)
    raise AssertionError("a deleted batch was found")
except anthropic.NotFoundError:
    pass

# A stop sequence taken from the text ends it there, and is named.
long = client.messages.create(model=model, messages=messages, max_tokens=40, extra_body=greedy)
full = long.content[0].text
stop = next(
    (full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2]),
    None,
)
assert stop is not None, full
cut = client.messages.create(
    model=model, messages=messages, max_tokens=40, extra_body=greedy, stop_sequences=[stop]
)
assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, cut
assert cut.content[0].text == full[: full.index(stop)], (cut, full, stop)


# Structured outputs: the client's `parse` sends a pydantic model's schema as
# output_config.format and reads the reply back into it.
# (No bounded integer: the client moves `minimum`/`maximum` into the description, and a random
# model held to any integer writes digits until max_tokens.)
class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


parsed = client.messages.parse(
    model=model, messages=messages, max_tokens=150, extra_body=greedy, output_format=Verdict
)
assert isinstance(parsed.parsed_output, Verdict), parsed

# A reasoning model's thinking (the server runs --reasoning-parser qwen3; a grammar makes the
# tiny model write a block) is a thinking block before the text, whole and through the
# client's stream accumulator (thinking_delta, signature_delta).
think = {**greedy, "guided_regex": "<think>[a-z]{3,8}</think>[a-z]{2,6}"}
m = client.messages.create(model=model, messages=messages, max_tokens=48, extra_body=think)
assert [b.type for b in m.content] == ["thinking", "text"], m
assert m.content[0].thinking.isalpha() and m.content[1].text.isalpha(), m
with client.messages.stream(model=model, messages=messages, max_tokens=48, extra_body=think) as s:
    final = s.get_final_message()
assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
    ("thinking", m.content[0].thinking),
    ("text", m.content[1].text),
], final

# Errors are the API's: the client raises its own classes.
try:
    client.messages.create(model="claude-opus-4-5", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was served")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
try:
    client.messages.create(
        model=model, messages=messages, max_tokens=4, extra_body={"policy": "no-such-policy"}
    )
    raise AssertionError("an unknown policy was accepted")
except anthropic.BadRequestError as e:
    assert e.body["error"]["type"] == "invalid_request_error", e.body
    assert "no-such-policy" in e.body["error"]["message"], e.body

print("all checks passed")
