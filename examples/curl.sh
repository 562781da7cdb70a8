#!/usr/bin/env bash
# verdict's HTTP API with curl. Start a server first (scripts/serve, or
# `verdict serve --model FILE.gguf --draft prompt-lookup`), then run this script or copy lines.
#   VERDICT_URL (default http://127.0.0.1:8080), VERDICT_API_KEY (if the server has API keys),
#   VERDICT_ADMIN_TOKEN (if --admin-token-file).
set -euo pipefail
URL=${VERDICT_URL:-http://127.0.0.1:8080}
# With API keys every route but /health, /ready and /metrics needs one: each curl below sends it.
KEY=()
[ -n "${VERDICT_API_KEY:-}" ] && KEY=(-H "Authorization: Bearer $VERDICT_API_KEY")
curl() { command curl "${KEY[@]}" "$@"; }
# Policy uploads and deletes take the admin token when the server has one (else the API key).
ADMIN=("${KEY[@]}")
[ -n "${VERDICT_ADMIN_TOKEN:-}" ] && ADMIN=(-H "Authorization: Bearer $VERDICT_ADMIN_TOKEN")
MODEL=$(curl -s "$URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

echo "== liveness, readiness, models"
curl -s "$URL/health"; echo
curl -s "$URL/ready"; echo
curl -s "$URL/v1/models"; echo

echo "== a completion (default policy and drafter); the response's \"speculation\" has the stats"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"def is_prime(n):\", \"max_tokens\": 48, \"temperature\": 0,
  \"stop\": [\"\\n\\n\"]
}"; echo

echo "== chat, streamed (server-sent events ending in data: [DONE]), judge policy, k = 8"
curl -sN "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 64, \"temperature\": 0,
  \"messages\": [{\"role\": \"user\", \"content\": \"Write a Python function that reverses a string.\"}],
  \"policy\": \"judge\", \"policy_params\": {\"threshold\": 0.5},
  \"speculation\": {\"draft\": \"model\", \"k\": 8}
}"; echo

echo "== the Responses API: instructions and input, then a second turn by previous_response_id"
ID=$(curl -s "$URL/v1/responses" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"instructions\": \"Answer with code only.\", \"temperature\": 0,
  \"input\": \"A Python expression that reverses a string s.\", \"max_output_tokens\": 32
}" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["output"][0]["content"][0]["text"], file=sys.stderr); print(r["id"])')
curl -s "$URL/v1/responses" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"previous_response_id\": \"$ID\", \"temperature\": 0,
  \"input\": \"Now as a function named rev.\", \"max_output_tokens\": 48
}" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["output"][0]["content"][0]["text"]); print(r["usage"])'
echo "== ...streamed: typed events (event: response.output_text.delta ...), no [DONE]"
curl -sN "$URL/v1/responses" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"input\": \"Say hello in French.\", \"stream\": true,
  \"max_output_tokens\": 8, \"temperature\": 0
}" | grep '^event:' | sort | uniq -c

echo "== Anthropic's Messages API: a system prompt, and the start of the reply to continue (a prefill)"
curl -s "$URL/v1/messages" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 48, \"temperature\": 0, \"system\": \"Answer with code only.\",
  \"messages\": [{\"role\": \"user\", \"content\": \"A Python function that reverses a string.\"},
                 {\"role\": \"assistant\", \"content\": \"def rev(s):\"}],
  \"stop_sequences\": [\"\\n\\n\"]
}" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(repr(r["content"][0]["text"]), r["stop_reason"], r["usage"])'
curl -s "$URL/v1/messages/count_tokens" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"How long is this prompt?\"}]
}"; echo

echo "== the lossy threshold policy with prompt lookup, and plain decoding for comparison"
for spec in '{"draft": "prompt-lookup", "k": 6}' '"off"'; do
  curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"$MODEL\", \"prompt\": \"for i in range(10):\", \"max_tokens\": 32, \"temperature\": 0,
    \"policy\": \"threshold\", \"speculation\": $spec
  }" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["speculation"])'
done

echo "== fill in the middle (a suffix): the code between the prompt and the suffix"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"def calc(a, b):\\n    return\",
  \"suffix\": \"\\n\\nassert calc(2, 3) == 5\\n\", \"max_tokens\": 16, \"temperature\": 0
}" | python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))'

echo "== three sampled choices (one prefill for all), a bias against token 198 (a newline in Qwen's vocabulary), a frequency penalty"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"# three names for a cat:\\n\", \"max_tokens\": 16,
  \"n\": 3, \"temperature\": 0.9, \"seed\": 7, \"frequency_penalty\": 0.5,
  \"logit_bias\": {\"198\": -5}
}" | python3 -c 'import json,sys; r=json.load(sys.stdin); [print(c["index"], repr(c["text"])) for c in r["choices"]]; print(r["usage"])'

echo "== structured output: a reply that must fit a JSON schema, and one of two words"
curl -s "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 80, \"temperature\": 0,
  \"messages\": [{\"role\": \"user\", \"content\": \"Describe a fictional programmer.\"}],
  \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"person\",
    \"schema\": {\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"},
      \"age\": {\"type\": \"integer\"}, \"languages\": {\"type\": \"array\", \"items\": {\"type\": \"string\"}, \"maxItems\": 4}},
      \"required\": [\"name\", \"age\", \"languages\"], \"additionalProperties\": false}}}
}" | python3 -c 'import json,sys; print(json.loads(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"Is Python dynamically typed? Answer:\", \"max_tokens\": 4,
  \"temperature\": 0, \"guided_choice\": [\" yes\", \" no\"]
}" | python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))'

echo "== the log-likelihood of a text under the target (echo, max_tokens 0), and its tokens"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"def add(a, b):\\n    return a + b\\n\",
  \"echo\": true, \"max_tokens\": 0, \"logprobs\": 1
}" | python3 -c 'import json,sys; lp=json.load(sys.stdin)["choices"][0]["logprobs"]["token_logprobs"]; print(len(lp), "tokens, sum of logprobs", round(sum(x for x in lp if x is not None), 3))'
curl -s "$URL/tokenize" -H 'Content-Type: application/json' -d '{"prompt": "def add(a, b):"}'; echo

echo "== a bad request: a 400 naming the field"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "x", "policy": "threshold", "policy_params": {"epsilon": 1}}'; echo

echo "== policies: list, upload a component as a new version (no restart), delete"
curl -s "$URL/v1/policies" | python3 -m json.tool | head -30
WASM=${POLICY_WASM:-examples/custom-policy/target/wasm32-wasip2/release/custom_policy.wasm}
if [ -f "$WASM" ]; then
  command curl -s -X PUT "$URL/v1/policies/custom" "${ADMIN[@]}" -H 'Content-Type: application/wasm' \
    --data-binary @"$WASM"; echo
  command curl -s -X DELETE "$URL/v1/policies/custom" "${ADMIN[@]}"; echo
else
  echo "(build examples/custom-policy or set POLICY_WASM to try PUT /v1/policies/NAME)"
fi

echo "== Prometheus metrics (excerpt)"
curl -s "$URL/metrics" | grep -E '^verdict_(requests|accepted_tokens|speculation_steps|queue_depth)' | head -20
