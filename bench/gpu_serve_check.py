"""bench/gpu.sh's server check: waits for `verdict serve` at URL to be ready, sends N chat
requests at once (greedy, 64 tokens each), and prints one JSON line: answers, tokens, tok/s and
the batching counters from /metrics. Standard library only (the GPU machine has no openai)."""

import json
import sys
import threading
import time
import urllib.request

base, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
deadline = time.time() + 60
while True:
    try:
        urllib.request.urlopen(base + "/ready", timeout=2)
        break
    except Exception:
        if time.time() > deadline:
            print(json.dumps({"error": "not ready after 60 s"}))
            sys.exit(1)
        time.sleep(0.3)

model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))["data"][0]["id"]
answers, errors = {}, []


def ask(i):
    body = {"model": model, "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write Python function number {i}: add {i} to x."}]}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answers[i] = json.load(r)
    except Exception as e:  # reported, not raised: the summary says how many answered
        errors.append(repr(e)[:200])


t = time.time()
threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
for th in threads:
    th.start()
for th in threads:
    th.join()
dt = time.time() - t
tokens = sum(a["usage"]["completion_tokens"] for a in answers.values())
texts = [a["choices"][0]["message"]["content"] for a in answers.values()]
metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
batched = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines() if l.startswith("verdict_batched_")}
fw = sum(v for k, v in batched.items() if k.startswith("verdict_batched_forwards_total"))
seqs = sum(v for k, v in batched.items() if k.startswith("verdict_batched_sequences_total"))
print(json.dumps({"mean_batch": round(seqs / fw, 2) if fw else 0, "answered": len(answers), "of": n, "nonempty": sum(bool(x.strip()) for x in texts),
                  "tokens": tokens, "seconds": round(dt, 2), "tok_s": round(tokens / dt, 1),
                  "batched": batched, "errors": errors, "sample": texts[0][:120] if texts else ""}))
sys.exit(0 if len(answers) == n and all(x.strip() for x in texts) else 1)
