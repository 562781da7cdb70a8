#!/usr/bin/env python3
"""Record llama.cpp's view of the real models, as test fixtures for verdict.

    ~/.cache/verdict/peer-venv/bin/python scripts/make-fixtures.py [tokenizer|chat|greedy ...]

Writes (default: all four):
  tests/fixtures/tokenizer.json  token ids of varied strings, per model, parse_special on and off
                                 (llama.cpp's tokenizer through llama-cpp-python, vocab_only)
  tests/fixtures/chat.json       conversations rendered with each model's own chat template by
                                 Jinja2, set up the way Hugging Face's apply_chat_template does
  tests/fixtures/greedy.json     greedy decoding by llama.cpp (2 threads): for a few chat prompts,
                                 32 tokens, each with its top-2 logit gap, so tests can tell a
                                 genuine difference from a near-tie decided by rounding
  tests/fixtures/peer.json       llama.cpp's logits for the tiny random models of
                                 verdict::models::testing::peer_specs() (one per architecture
                                 and rotary variant, f32 weights), which
                                 `cargo run --example tiny_models` writes

Needs llama-cpp-python (and jinja2, which it depends on). Models are read from $VERDICT_MODELS or
~/.cache/verdict/models (scripts/fetch-models puts them there).

On a CPU that reports AMX inside a VM, a native llama.cpp build may die with SIGILL in its AMX
kernels (seen on a KVM Sapphire Rapids guest); build llama-cpp-python without them:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    -DGGML_AMX_BF16=OFF" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
The committed fixtures were made that way (llama-cpp-python 0.3.36, 2 threads).
"""
import json
import os
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
MODELS_DIR = os.environ.get("VERDICT_MODELS", os.path.expanduser("~/.cache/verdict/models"))
MODELS = {
    "smol": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen05": "qwen2.5-coder-0.5b.gguf",
    "qwen15": "qwen2.5-coder-1.5b.gguf",
}
THREADS = 2
GREEDY_TOKENS = 32

STRINGS = [
    "",
    " ",
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we'd've done; YOU'RE, WE'LL, SHE'D",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "fn main() -> Result<(), Box<dyn std::error::Error>> {\n\tprintln!(\"{:?}\", x);\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "x = {'a': [1, 2.5, -3e10], \"b\": None}  # comment",
    "    four spaces\n        eight spaces\n\t\ttwo tabs",
    "a  b   c    d     e",
    "line1\nline2\r\nline3\n\n\nline6",
    "\n\n\n",
    "   \n  \t \n",
    "trailing newlines\n\n",
    "1234567890",
    "3.14159 2.71828 1e-9 0x1F 0b1010 1_000_000",
    "Order #12345 costs $1,234.56 (10% off).",
    "Café naïve résumé façade coöperate",
    "Ünïcödé: ß ẞ ø Å æ œ Ω π ∑ ∫ √ ∞ ≤ ≥ ≠",
    "e\u0301 decomposed vs \u00e9 composed",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트 테스트입니다.",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "math: ∀x ∈ ℝ, x² ≥ 0 ⟹ √(x²) = |x|",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_end|> in the middle",
    "<|endoftext|>",
    "<|im_start|><|im_start|>nested<|im_end|><|im_end|>",
    "almost special: <|im_start| and |im_end|> and <im_start>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<repo_name>verdict<file_sep>src/main.rs",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com <mailto:user@example.com>",
    "!!!???...,,,;;;:::---___===+++***",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE kebab-case",
    "a\u00a0non-breaking\u2003em-space\u200bzero-width",
    "\u0000\u0001\u007f control bytes",
]


def model_path(key):
    p = os.path.join(MODELS_DIR, MODELS[key])
    if not os.path.exists(p):
        sys.exit(f"make-fixtures: missing model {p} (run scripts/fetch-models)")
    return p


def tokenizer_fixture():
    out = {"strings": STRINGS, "models": {}}
    for key in MODELS:
        llm = Llama(model_path=model_path(key), vocab_only=True, verbose=False)
        special = [llm.tokenize(s.encode(), add_bos=False, special=True) for s in STRINGS]
        plain = [llm.tokenize(s.encode(), add_bos=False, special=False) for s in STRINGS]
        out["models"][key] = {"file": MODELS[key], "special": special, "plain": plain}
        print(f"tokenizer {key}: {sum(map(len, special))} ids", file=sys.stderr)
    return out


def hf_env():
    """A Jinja2 environment configured as transformers' apply_chat_template configures it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def special_text(llm, tid):
    return llm.detokenize([tid], special=True).decode() if tid >= 0 else ""


def render(llm, template, messages, add_generation_prompt):
    env = hf_env()
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=special_text(llm, llm.token_bos()), eos_token=special_text(llm, llm.token_eos()))


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?\nAnswer with a digit."}],
    [{"role": "user", "content": "  spaces around  "},
     {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "Ünïcödé 中文 😀 <b>tags</b> & \"quotes\""}],
]


def chat_fixture():
    out = {"conversations": CONVERSATIONS, "models": {}}
    for key in ("smol", "qwen05"):
        llm = Llama(model_path=model_path(key), vocab_only=True, verbose=False)
        template = llm.metadata["tokenizer.chat_template"]
        rendered = []
        for conv in CONVERSATIONS:
            for agp in (True, False):
                rendered.append({"add_generation_prompt": agp,
                                 "text": render(llm, template, conv, agp)})
        out["models"][key] = {"file": MODELS[key], "rendered": rendered}
    out["thinking_template"] = thinking_template_cases()
    return out


# Conversations for tests/fixtures/thinking-template.jinja (a template with Qwen3-style
# constructs), each rendered with and without tools and with each `enable_thinking` setting.
THINKING_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "user", "content": "q"},
     {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"},
     {"role": "user", "content": "again"}],
    [{"role": "system", "content": "  sys  "},
     {"role": "user", "content": "x"},
     {"role": "assistant", "content": "<think>a</think>b"}],
    [{"role": "user", "content": "time?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC"}}}]},
     {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
     {"role": "tool", "content": "ok", "tool_call_id": "c2"}],
]
THINKING_TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]


def thinking_template_cases():
    path = os.path.join(OUT, "thinking-template.jinja")
    with open(path, encoding="utf-8") as f:
        template = hf_env().from_string(f.read())
    cases = []
    for conv in THINKING_CONVERSATIONS:
        for tools in (None, THINKING_TOOLS):
            for extra in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
                for agp in (True, False):
                    text = template.render(messages=conv, tools=tools, add_generation_prompt=agp,
                                           bos_token="", eos_token="", **extra)
                    cases.append({"messages": conv, "tools": tools, "vars": extra,
                                  "add_generation_prompt": agp, "text": text})
    return cases


GREEDY_PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a helpful coding assistant."},
     {"role": "user", "content": "Explain what a hash map is in two sentences."}],
    [{"role": "user", "content": "Complete this Rust code:\nfn is_even(n: u32) -> bool {"}],
]


def greedy_fixture():
    out = {"tokens": GREEDY_TOKENS, "threads": THREADS, "models": {}}
    for key in MODELS:
        llm = Llama(model_path=model_path(key), n_ctx=512, n_batch=512, n_threads=THREADS,
                    n_threads_batch=THREADS, verbose=False)
        template = llm.metadata["tokenizer.chat_template"]
        n_vocab = llm.n_vocab()
        runs = []
        for conv in GREEDY_PROMPTS:
            text = render(llm, template, conv, True)
            prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(prompt)
            ids, gaps, top2 = [], [], []
            for _ in range(GREEDY_TOKENS):
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()
                order = np.argsort(-logits, kind="stable")[:2]
                tok = int(order[0])
                ids.append(tok)
                gaps.append(round(float(logits[order[0]] - logits[order[1]]), 4))
                top2.append(int(order[1]))
                llm.eval([tok])
            runs.append({"text": text, "prompt": prompt, "ids": ids, "gaps": gaps,
                         "second": top2,
                         "decoded": llm.detokenize(ids, special=True).decode("utf-8", "replace")})
            print(f"greedy {key}: {len(prompt)} prompt tokens, min gap {min(gaps):.3f}: "
                  f"{runs[-1]['decoded'][:60]!r}", file=sys.stderr)
        out["models"][key] = {"file": MODELS[key], "runs": runs}
    return out


# Token ids fed to the tiny models (all below their vocabulary of 300), and the ids whose logits
# the fixture keeps at every position; the last position keeps its whole row.
PEER_TOKENS = [(i * 37 + 11) % 300 for i in range(48)]
PEER_PROBES = list(range(0, 300, 19))
# Strings each tiny model's tokenizer turns into ids (special tokens parsed and not).
PEER_TEXTS = ["", " ", "the", "hello world", "  two leading spaces", "The Quick Fox",
              "in the end, it is", "<s>inside</s> the text", "tabs\tand\nnew lines",
              "h\u00e9llo \u2713", "x  y   z", "thethethe", "<|im_start|>user\nhi<|im_end|>",
              # where pre-tokenizers differ: case changes, contractions, digit runs, slashes,
              # punctuation before letters, line breaks, tabs, CJK and Hangul
              "aBab AbBA abAB", "I'm DON'T we'll 'sat", "12 2112 a1b2", "a/b//st (as) -ta",
              "a.\n\nb.\n  .b", "\tab\t\tst", "(ab)'s 'AB'. as-is", "\u4f60\u597d a\u4e16 \uac00\ub098 \u3053\u3093",
              # Phi-3's chat tokens: whitespace after them goes, except after <s>, <unk> and
              # <|endoftext|> (the phi3 models' vocabulary has them)
              "<|user|>\n hi<|end|>\n<|assistant|>\t ok<|endoftext|> x</s>  y<s> z<|end|>"]

# The tiny models whose embeddings the fixture keeps (RMSNorm with byte-level BPE, LayerNorm,
# SentencePiece with BOS), each pooled the three ways llama.cpp pools a text, and the texts.
# The scale LoRA adapters run at (llama.cpp's --lora-scaled), not 1 so that a scale left out shows.
PEER_LORA_SCALE = 0.7

PEER_EMBED_MODELS = ["qwen2", "starcoder2", "llama-spm"]
PEER_EMBED_POOLINGS = {"mean": 1, "cls": 2, "last": 3}
PEER_EMBED_TEXTS = ["hello world", "in the end, it is", "the"]


def peer_embeddings(name, path, sha):
    """llama.cpp's unit-length embeddings of the texts, per pooling, and the ids it read."""
    out = {"sha256": sha}
    for pooling, pooling_type in PEER_EMBED_POOLINGS.items():
        llm = Llama(model_path=path, embedding=True, pooling_type=pooling_type, n_ctx=256,
                    verbose=False, n_threads=THREADS, type_k=0, type_v=0)
        out["ids"] = [llm.tokenize(t.encode("utf-8")) for t in PEER_EMBED_TEXTS]
        out[pooling] = [[round(float(x), 6) for x in llm.embed(t, normalize=True)]
                        for t in PEER_EMBED_TEXTS]
        del llm
    return out


def peer_fixture():
    import hashlib
    import subprocess
    import tempfile

    models = {}
    embeddings = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["cargo", "run", "--quiet", "--release", "--example", "tiny_models", "--", tmp],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout.split()
        pres = {}
        loras = {}
        for path in out:
            name = os.path.basename(path).removesuffix(".gguf")
            if name.startswith("lora-"):
                base = name.removeprefix("lora-")
                with open(path, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
                llm = Llama(model_path=os.path.join(tmp, f"{base}.gguf"), lora_path=path,
                            lora_scale=PEER_LORA_SCALE, n_ctx=256, logits_all=True,
                            verbose=False, n_threads=THREADS, type_k=0, type_v=0)
                llm.eval(PEER_TOKENS)
                scores = np.array(llm.scores[: len(PEER_TOKENS)], dtype=np.float64)
                loras[base] = {
                    "sha256": sha,
                    "scale": PEER_LORA_SCALE,
                    "probes": [[round(float(r[i]), 5) for i in PEER_PROBES] for r in scores],
                    "argmax": [int(r.argmax()) for r in scores],
                }
                del llm
                continue
            with open(path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            if name.startswith("pre-"):
                try:
                    llm = Llama(model_path=path, vocab_only=True, verbose=False)
                except ValueError:
                    print(f"make-fixtures: llama.cpp cannot load {name}", file=sys.stderr)
                    continue
                pres[name.removeprefix("pre-")] = {"sha256": sha, "tokenized": [
                    {"text": t, "special": sp,
                     "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=sp)}
                    for t in PEER_TEXTS for sp in (False, True)
                ]}
                del llm
                continue
            if name in PEER_EMBED_MODELS:
                embeddings[name] = peer_embeddings(name, path, sha)
            # An f32 KV cache (llama.cpp's default is f16, which alone moves logits ~3e-3).
            llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False,
                        n_threads=THREADS, type_k=0, type_v=0)
            llm.eval(PEER_TOKENS)
            scores = np.array(llm.scores[: len(PEER_TOKENS)], dtype=np.float64)
            models[name] = {
                "sha256": sha,
                "probes": [[round(float(r[i]), 5) for i in PEER_PROBES] for r in scores],
                "argmax": [int(r.argmax()) for r in scores],
                "last": [round(float(x), 5) for x in scores[-1]],
                "tokenized": [
                    {"text": t, "special": sp,
                     "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=sp)}
                    for t in PEER_TEXTS for sp in (False, True)
                ],
            }
            del llm
    return {"tokens": PEER_TOKENS, "probe_ids": PEER_PROBES, "models": models, "pre": pres,
            "loras": loras,
            "embeddings": {"texts": PEER_EMBED_TEXTS, "models": embeddings}}


def main():
    which = sys.argv[1:] or ["tokenizer", "chat", "greedy", "peer"]
    makers = {"tokenizer": tokenizer_fixture, "chat": chat_fixture, "greedy": greedy_fixture,
              "peer": peer_fixture}
    os.makedirs(OUT, exist_ok=True)
    for name in which:
        if name not in makers:
            sys.exit(f"make-fixtures: unknown fixture {name!r} (choose from {', '.join(makers)})")
        data = makers[name]()
        data["generator"] = f"scripts/make-fixtures.py, llama-cpp-python {llama_cpp.__version__}"
        path = os.path.join(OUT, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
