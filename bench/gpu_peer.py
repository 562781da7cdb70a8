"""The Hugging Face transformers side of bench/gpu.sh: greedy decode tok/s at the shapes verdict
runs there (random weights, bf16), eager and with a static cache + torch.compile (CUDA graphs, the
gpt-fast recipe). One JSON line per measurement on stdout.

    python3 bench/gpu_peer.py MODE:SHAPE [MODE:SHAPE ...]    MODE = eager | compiled
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# The dimensions of the GGUFs that `verdict bench synth` fills (the real Qwen2.5-Coder layouts and
# Llama-3.1-8B's).
SHAPES = {
    "qwen2.5-coder-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-coder-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)),
    "llama-3.1-8b": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
}


def measure(mode, shape, tokens=128, prompt_len=32):
    config_cls, model_cls, dims = SHAPES[shape]
    config = config_cls(max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_cls(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device="cuda")
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if mode == "compiled":
        gen["cache_implementation"] = "static"
        warmups, runs = 3, 3  # the first calls compile and capture
    else:
        tokens, warmups, runs = 32, 1, 1  # ~15 tok/s: enough to time
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(warmups):
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **gen)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t
        rates = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **gen)
            torch.cuda.synchronize()
            rates.append(tokens / (time.perf_counter() - t))
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return dict(engine="transformers", mode=mode, shape=shape, tok_s=round(sorted(rates)[len(rates) // 2], 1),
                tokens=tokens, warmup_s=round(warm, 1), weight_bytes=2 * params)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        mode, shape = arg.split(":")
        try:
            print(json.dumps(measure(mode, shape)), flush=True)
        except Exception as e:  # one failed shape must not lose the others
            print(json.dumps(dict(engine="transformers", mode=mode, shape=shape, error=repr(e)[:300])), flush=True)
