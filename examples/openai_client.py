"""verdict through the official OpenAI Python client (`pip install openai`).

    python examples/openai_client.py [BASE_URL]      (default http://127.0.0.1:8080)

verdict's own request fields (policy, policy_params, speculation) go in `extra_body`; its
per-response speculation statistics come back in the `speculation` field (`model_extra`).
"""

import sys

import openai

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed")
model = client.models.list().data[0].id
print("model:", model)

# A chat completion with the lossless strict policy and the draft model, k = 8.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a Python function that checks for palindromes."}],
    max_tokens=128,
    temperature=0,
    extra_body={"policy": "strict", "speculation": {"draft": "model", "k": 8}},
)
print(r.choices[0].message.content)
s = r.model_extra["speculation"]
print(f"\n[{s['policy']} via {s['drafter']}: {s['tokens_per_step']:.2f} tokens/step, "
      f"{s['accepted']}/{s['drafted']} drafted tokens accepted]")

# Streaming a completion with the judge policy and a stricter threshold.
stream = client.completions.create(
    model=model,
    prompt="def fibonacci(n):",
    max_tokens=96,
    temperature=0,
    stream=True,
    stop=["\n\n\n"],
    extra_body={"policy": "judge", "policy_params": {"threshold": 0.7}},
)
for chunk in stream:
    print(chunk.choices[0].text, end="", flush=True)
    if chunk.choices[0].finish_reason:
        print(f"\n[finish: {chunk.choices[0].finish_reason}; {chunk.model_extra.get('speculation')}]")

# Errors are the client's usual exceptions, naming the field.
try:
    client.completions.create(model=model, prompt="x", extra_body={"policy": "no-such-policy"})
except openai.BadRequestError as e:
    print("rejected:", e.body["param"], "-", e.body["message"])
