//! Tiny random models for tests and benches: a GGUF with every key llama.cpp expects (including a
//! small byte-level BPE tokenizer and a ChatML template), and the same weights as a Hugging Face
//! safetensors checkpoint.
//!
//! Weights are drawn from a seeded ChaCha RNG, so one [`TinySpec`] always gives the same model.
//! Magnitudes are scaled by 1/sqrt(fan_in) so activations stay O(1) through the layers.

use super::error::{ModelError, Result, candle_msg};
use super::gguf::Arch;
use super::rope::RopeScaling;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Shape and storage of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Arch,
    /// Total token count: 256 byte tokens + merges + 3 specials. Between
    /// [`TinySpec::MIN_VOCAB`] and [`TinySpec::MAX_VOCAB`].
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// A head size of its own (`attention.key_length`, as qwen3 has); `None`: hidden / heads.
    pub head_dim: Option<usize>,
    /// The leading dimensions of a head that rotate (`rope.dimension_count`, Hugging Face's
    /// `partial_rotary_factor`); `None`: the whole head.
    pub rope_dims: Option<usize>,
    /// Gemma 3's sliding window (`attention.sliding_window`; one global layer in six, the
    /// local ones at rotary base 10000). Required for gemma3.
    pub sliding_window: Option<usize>,
    /// Gemma 2's soft caps on the attention scores and the logits (written as its keys).
    pub softcaps: Option<(f32, f32)>,
    /// Granite's multipliers: embeddings, residual, attention (q.k) and the logits' divisor.
    pub granite: Option<[f32; 4]>,
    /// A mixture of experts in every layer: (count, used, width).
    pub experts: Option<(usize, usize, usize)>,
    /// The width of Qwen2-MoE's shared expert (with `experts`).
    pub shared_expert: Option<usize>,
    /// Command R+'s q / k LayerNorms, a weight per head (command-r only).
    pub qk_norms: bool,
    /// `general.name`; `None`: `verdict-tiny-{arch}`. (llama.cpp reads Phi-3's tokenizer
    /// rules from the name.)
    pub name: Option<&'static str>,
    pub intermediate: usize,
    /// Storage type of every matrix (norms and biases are always F32, as in llama.cpp files).
    /// K-quants need `hidden`, `intermediate` multiples of 256; Q4_0/Q8_0 ... multiples of 32.
    pub dtype: GgmlDType,
    pub seed: u64,
    pub context_length: usize,
    /// No `output.weight`: the lm_head reuses the token embedding.
    pub tied: bool,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Written as llama.cpp's converter writes it: `rope.scaling.*` keys for linear and YaRN,
    /// a `rope_freqs.weight` tensor of per-pair factors for Llama 3.1's scheme; and as
    /// `rope_scaling` in the safetensors config.
    pub rope_scaling: RopeScaling,
    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`, [`tiny_spm_vocab`])
    /// instead of the byte-level BPE one; `vocab` between [`TinySpec::MIN_SPM_VOCAB`] and
    /// [`TinySpec::MAX_SPM_VOCAB`].
    pub spm: bool,
    /// This `tokenizer.ggml.pre` over a vocabulary whose merges join every pair of 16
    /// characters of different classes ([`tiny_cross_vocab`]: letters of both cases, digits,
    /// punctuation, space, line break), so where a pre-tokenizer splits shows in the ids;
    /// `vocab` must be [`TinySpec::CROSS_VOCAB`]. `None`: the usual vocabulary, `qwen2`.
    pub pre: Option<&'static str>,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: Arch::Qwen2,
            vocab: 320,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            rope_dims: None,
            sliding_window: None,
            softcaps: None,
            granite: None,
            experts: None,
            shared_expert: None,
            qk_norms: false,
            name: None,
            intermediate: 128,
            dtype: GgmlDType::F32,
            seed: 0,
            context_length: 256,
            tied: false,
            rope_theta: 10_000.0,
            rms_eps: 1e-6,
            rope_scaling: RopeScaling::None,
            spm: false,
            pre: None,
        }
    }
}

/// Special tokens of the tiny tokenizer, in id order after the merges.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen2.5 ships it minus the tool-calling branches, with a Qwen3-style switch: an
/// empty thinking block after the generation prompt when the request's `chat_template_kwargs`
/// say `enable_thinking: false`, an opened one (as newer Qwen templates write) when they say
/// `true`, and neither when they say nothing.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% elif enable_thinking is defined and enable_thinking %}{{ '<think>\\n' }}{% endif %}{% endif %}";

/// The logit multiplier of tiny cohere2 models (Command R7B's).
pub const COHERE2_LOGIT_SCALE: f32 = 0.25;

/// Phi-3's chat tokens, the last ids of a phi3 spec's SentencePiece vocabulary.
pub const PHI3_SPECIALS: [&str; 4] = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"];

/// Merges every tiny tokenizer starts with (each uses only tokens that exist before it).
const BASE_MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("Ċ", "Ċ"),
    ("Ġ", "Ġ"),
    ("ĠĠ", "ĠĠ"),
];

impl TinySpec {
    pub const MIN_VOCAB: usize = 256 + BASE_MERGES.len() + SPECIALS.len();
    pub const MAX_VOCAB: usize = Self::MIN_VOCAB + 26 * 26 - 4;
    pub const MIN_SPM_VOCAB: usize = 3 + 256 + 27;
    pub const CROSS_VOCAB: usize = 256 + CROSS.len() * CROSS.len() + SPECIALS.len();
    pub const MAX_SPM_VOCAB: usize = Self::MIN_SPM_VOCAB + SPM_PIECES.len();

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    pub fn rope_dims(&self) -> usize {
        self.rope_dims.unwrap_or_else(|| self.head_dim())
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(format!("TinySpec: {m}")));
        let (lo, hi) = match (self.spm, self.pre) {
            (true, _) => (Self::MIN_SPM_VOCAB, Self::MAX_SPM_VOCAB),
            (false, Some(_)) => (Self::CROSS_VOCAB, Self::CROSS_VOCAB),
            (false, None) => (Self::MIN_VOCAB, Self::MAX_VOCAB),
        };
        if !(lo..=hi).contains(&self.vocab) {
            return bad(format!("vocab {} outside {lo}..={hi}", self.vocab));
        }
        if self.heads == 0 || self.kv_heads == 0 || self.layers == 0 {
            return bad("heads, kv_heads and layers must be positive".into());
        }
        let heads_split_hidden = self.head_dim.is_some() || self.hidden.is_multiple_of(self.heads);
        if !heads_split_hidden || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "hidden {} / heads {} / kv_heads {} do not divide",
                self.hidden, self.heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} is odd", self.head_dim()));
        }
        let block = self.dtype.block_size();
        if !self.hidden.is_multiple_of(block) || !self.intermediate.is_multiple_of(block) {
            return bad(format!(
                "{:?} needs hidden ({}) and intermediate ({}) to be multiples of {block}",
                self.dtype, self.hidden, self.intermediate
            ));
        }
        Ok(())
    }
}

/// GPT-2's byte -> printable char map: printable Latin-1 bytes map to themselves, the rest to
/// U+0100 upwards. Returned in GPT-2's vocabulary order (token id = index).
pub fn byte_level_alphabet() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out: Vec<(u8, char)> = bs
        .iter()
        .filter_map(|&b| Some((b as u8, char::from_u32(b)?)))
        .collect();
    let mut n = 0u32;
    for b in 0u32..256 {
        if !bs.contains(&b) {
            bs.push(b);
            if let Some(c) = char::from_u32(256 + n) {
                out.push((b as u8, c));
            }
            n += 1;
        }
    }
    out
}

/// The tiny tokenizer: tokens (in id order), their types, and merges ("a b").
pub fn tiny_vocab(vocab: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_level_alphabet()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut merges: Vec<String> = Vec::new();
    let n_merges = vocab.saturating_sub(256 + SPECIALS.len());
    let push = |a: &str, b: &str, tokens: &mut Vec<String>, merges: &mut Vec<String>| {
        let t = format!("{a}{b}");
        if merges.len() < n_merges && !tokens.contains(&t) {
            merges.push(format!("{a} {b}"));
            tokens.push(t);
        }
    };
    for (a, b) in BASE_MERGES {
        push(a, b, &mut tokens, &mut merges);
    }
    for a in 'a'..='z' {
        for b in 'a'..='z' {
            push(&a.to_string(), &b.to_string(), &mut tokens, &mut merges);
        }
    }
    let mut types = vec![1i32; tokens.len()];
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types, merges)
}

/// The characters [`tiny_cross_vocab`] pairs (byte-level: `Ġ` is a space, `Ċ` a line break).
const CROSS: [&str; 16] = [
    "a", "b", "A", "B", "1", "2", "Ġ", "Ċ", "'", ".", "(", "/", "s", "t", "-", "ĉ",
];

/// Every byte, a merge for every ordered pair of 16 characters of different classes, then the
/// specials: tokens, types and merges.
pub fn tiny_cross_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_level_alphabet()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut merges = Vec::new();
    for a in CROSS {
        for b in CROSS {
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
        }
    }
    let mut types = vec![1i32; tokens.len()];
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types, merges)
}

/// The pre-tokenizers verdict implements, each on a tiny model of its own (1 layer,
/// [`tiny_cross_vocab`]): `scripts/make-fixtures.py peer` records llama.cpp's ids for them.
pub fn pre_tokenizer_specs() -> Vec<(&'static str, TinySpec)> {
    [
        "qwen2",
        "qwen35",
        "llama3",
        "tekken",
        "gpt-4o",
        "deepseek-v3",
        "deepseek-coder",
        "seed-coder",
        "glm4",
        "smollm",
        "gpt-2",
        "default",
    ]
    .into_iter()
    .map(|pre| {
        let spec = TinySpec {
            vocab: TinySpec::CROSS_VOCAB,
            layers: 1,
            tied: true,
            pre: Some(pre),
            ..TinySpec::default()
        };
        (pre, spec)
    })
    .collect()
}

/// The tiny SentencePiece vocabulary's pieces after `▁` and the letters, best first.
const SPM_PIECES: [&str; 40] = [
    "he", "▁t", "th", "▁the", "in", "▁a", "er", "on", "▁th", "re", "an", "▁s", "nd", "▁w", "at",
    "ou", "ll", "▁o", "▁b", "en", "ed", "▁c", "▁f", "es", "or", "▁m", "ing", "▁p", "ar", "▁in",
    "▁he", "is", "▁is", "it", "▁it", "le", "▁l", "ro", "ve", "▁d",
];

/// A SentencePiece vocabulary as llama.cpp's converter writes one: `<unk>`, `<s>`, `</s>`,
/// the 256 byte tokens `<0xXX>`, `▁`, the letters, then 40 common pieces, scored best first.
/// Returns tokens, token types and scores.
pub fn tiny_spm_vocab(vocab: usize) -> (Vec<String>, Vec<i32>, Vec<f32>) {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let normal = std::iter::once("▁".to_string())
        .chain(('a'..='z').map(String::from))
        .chain(SPM_PIECES.iter().map(|p| p.to_string()));
    for t in normal.take(vocab.saturating_sub(tokens.len())) {
        tokens.push(t);
        types.push(1);
    }
    let scores = (0..tokens.len())
        .map(|i| if types[i] == 1 { -(i as f32) } else { 0.0 })
        .collect();
    (tokens, types, scores)
}

/// Random f32 weights in Hugging Face layout, keyed by GGUF tensor name.
/// Each tensor has its own stream (seed, name), so models that differ only in layer count share
/// the weights they have in common.
fn tiny_weights(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let stream = |name: &str| {
        // FNV-1a of the name, mixed with the seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        ChaCha8Rng::seed_from_u64(h ^ spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    };
    // A matrix with uniform(-a, a) entries, variance 1/cols.
    let mat = |name: String, rows: usize, cols: usize| -> Result<(String, Tensor)> {
        let rng = &mut stream(&name);
        let a = (3.0 / cols as f32).sqrt();
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
        Ok((name, Tensor::from_vec(data, (rows, cols), &Device::Cpu)?))
    };
    // A vector of center +- spread (norm weights near 1, biases near 0).
    let vector = |name: String, center: f32, spread: f32, n: usize| -> Result<(String, Tensor)> {
        let rng = &mut stream(&name);
        let data: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-spread..spread))
            .collect();
        Ok((name, Tensor::from_vec(data, n, &Device::Cpu)?))
    };
    let hd = spec.head_dim();
    let (h, q_out, kv_out) = (spec.hidden, spec.heads * hd, spec.kv_heads * hd);
    let mut out = vec![mat("token_embd.weight".into(), spec.vocab, h)?];
    // StarCoder 2's LayerNorms have biases, and so does each of its projections.
    let starcoder2 = spec.arch == Arch::Starcoder2;
    let gpt_oss = spec.arch == Arch::GptOss;
    let norm = |name: String| -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![vector(format!("{name}.weight"), 1.0, 0.2, h)?];
        if starcoder2 {
            v.push(vector(format!("{name}.bias"), 0.0, 0.5, h)?);
        }
        Ok(v)
    };
    for i in 0..spec.layers {
        let b = format!("blk.{i}");
        // OLMo 2 normalises no block's input.
        if spec.arch != Arch::Olmo2 {
            out.extend(norm(format!("{b}.attn_norm"))?);
        }
        let q = mat(format!("{b}.attn_q.weight"), q_out, h)?;
        let k = mat(format!("{b}.attn_k.weight"), kv_out, h)?;
        let v = mat(format!("{b}.attn_v.weight"), kv_out, h)?;
        if spec.arch == Arch::Phi3 {
            // One matrix, q's rows then k's then v's, as phi3 files store it.
            let qkv = Tensor::cat(&[&q.1, &k.1, &v.1], 0)?;
            out.push((format!("{b}.attn_qkv.weight"), qkv));
        } else {
            out.extend([q, k, v]);
        }
        if matches!(
            spec.arch,
            Arch::Qwen2 | Arch::Qwen2Moe | Arch::Starcoder2 | Arch::GptOss
        ) {
            out.push(vector(format!("{b}.attn_q.bias"), 0.0, 0.5, q_out)?);
            out.push(vector(format!("{b}.attn_k.bias"), 0.0, 0.5, kv_out)?);
            out.push(vector(format!("{b}.attn_v.bias"), 0.0, 0.5, kv_out)?);
        }
        if matches!(spec.arch, Arch::Olmo2 | Arch::Olmoe) {
            out.push(vector(format!("{b}.attn_q_norm.weight"), 1.0, 0.5, q_out)?);
            out.push(vector(format!("{b}.attn_k_norm.weight"), 1.0, 0.5, kv_out)?);
        }
        if matches!(spec.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3) {
            out.push(vector(format!("{b}.attn_q_norm.weight"), 1.0, 0.5, hd)?);
            out.push(vector(format!("{b}.attn_k_norm.weight"), 1.0, 0.5, hd)?);
        }
        if spec.qk_norms {
            // A weight per head: `[heads, head_dim]`.
            for (what, heads) in [("q", spec.heads), ("k", spec.kv_heads)] {
                let (name, t) =
                    vector(format!("{b}.attn_{what}_norm.weight"), 1.0, 0.5, heads * hd)?;
                out.push((name, t.reshape((heads, hd))?));
            }
        }
        if matches!(spec.arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Olmo2) {
            out.push(vector(
                format!("{b}.post_attention_norm.weight"),
                1.0,
                0.2,
                h,
            )?);
            out.push(vector(format!("{b}.post_ffw_norm.weight"), 1.0, 0.2, h)?);
        }
        out.push(mat(format!("{b}.attn_output.weight"), h, q_out)?);
        if starcoder2 || gpt_oss {
            out.push(vector(format!("{b}.attn_output.bias"), 0.0, 0.5, h)?);
        }
        if gpt_oss {
            // Sinks around the scores' size, and the MLP's norm under its gpt-oss name.
            out.push(vector(
                format!("{b}.attn_sinks.weight"),
                0.0,
                2.0,
                spec.heads,
            )?);
            out.push(vector(
                format!("{b}.post_attention_norm.weight"),
                1.0,
                0.2,
                h,
            )?);
        }
        if spec.arch == Arch::Granite {
            // llama.cpp's optional biases on the output and MLP projections.
            out.push(vector(format!("{b}.attn_output.bias"), 0.0, 0.5, h)?);
            out.push(vector(
                format!("{b}.ffn_gate.bias"),
                0.0,
                0.5,
                spec.intermediate,
            )?);
            out.push(vector(
                format!("{b}.ffn_up.bias"),
                0.0,
                0.5,
                spec.intermediate,
            )?);
            out.push(vector(format!("{b}.ffn_down.bias"), 0.0, 0.5, h)?);
        }
        // OLMo 2 normalises no block's input; Cohere's MLP reads the attention's; gpt-oss's
        // is `post_attention_norm` (above).
        if !matches!(
            spec.arch,
            Arch::Olmo2 | Arch::Cohere2 | Arch::CommandR | Arch::GptOss
        ) {
            out.extend(norm(format!("{b}.ffn_norm"))?);
        }
        if let Some((count, _, ff)) = spec.experts {
            // The router, and each projection's experts stacked as llama.cpp stores them.
            out.push(mat(format!("{b}.ffn_gate_inp.weight"), count, h)?);
            for (what, rows, cols) in [("gate", ff, h), ("up", ff, h), ("down", h, ff)] {
                let each = (0..count)
                    .map(|e| Ok(mat(format!("{b}.ffn_{what}.{e}.weight"), rows, cols)?.1))
                    .collect::<Result<Vec<_>>>()?;
                out.push((
                    format!("{b}.ffn_{what}_exps.weight"),
                    Tensor::stack(&each, 0)?,
                ));
                if gpt_oss {
                    // Biases wide enough that some gate and up values pass the clamp at 7.
                    let spread = if what == "down" { 0.5 } else { 10.0 };
                    let bias = vector(
                        format!("{b}.ffn_{what}_exps.bias"),
                        0.0,
                        spread,
                        count * rows,
                    )?;
                    out.push((bias.0, bias.1.reshape((count, rows))?));
                }
            }
            if gpt_oss {
                out.push(vector(format!("{b}.ffn_gate_inp.bias"), 0.0, 0.5, count)?);
            }
            if let Some(sh) = spec.shared_expert {
                out.push(vector(
                    format!("{b}.ffn_gate_inp_shexp.weight"),
                    0.0,
                    0.2,
                    h,
                )?);
                out.push(mat(format!("{b}.ffn_gate_shexp.weight"), sh, h)?);
                out.push(mat(format!("{b}.ffn_up_shexp.weight"), sh, h)?);
                out.push(mat(format!("{b}.ffn_down_shexp.weight"), h, sh)?);
            }
            continue;
        }
        if starcoder2 {
            // No gate: down(gelu(up(x))), both with biases.
            let ff = spec.intermediate;
            out.push(mat(format!("{b}.ffn_up.weight"), ff, h)?);
            out.push(vector(format!("{b}.ffn_up.bias"), 0.0, 0.5, ff)?);
            out.push(mat(format!("{b}.ffn_down.weight"), h, ff)?);
            out.push(vector(format!("{b}.ffn_down.bias"), 0.0, 0.5, h)?);
            continue;
        }
        let gate = mat(format!("{b}.ffn_gate.weight"), spec.intermediate, h)?;
        let up = mat(format!("{b}.ffn_up.weight"), spec.intermediate, h)?;
        if spec.arch == Arch::Phi3 {
            // phi3's `ffn_up` holds the gate's rows, then the up projection's.
            out.push((
                format!("{b}.ffn_up.weight"),
                Tensor::cat(&[&gate.1, &up.1], 0)?,
            ));
        } else {
            out.extend([gate, up]);
        }
        out.push(mat(format!("{b}.ffn_down.weight"), h, spec.intermediate)?);
    }
    if let Some(ff) = llama3_factors(spec) {
        let n = ff.len();
        out.push((
            "rope_freqs.weight".into(),
            Tensor::from_vec(ff, n, &Device::Cpu)?,
        ));
    }
    if let Some((short, long)) = longrope_factors(spec) {
        let n = short.len();
        out.push((
            "rope_factors_long.weight".into(),
            Tensor::from_vec(long, n, &Device::Cpu)?,
        ));
        out.push((
            "rope_factors_short.weight".into(),
            Tensor::from_vec(short, n, &Device::Cpu)?,
        ));
    }
    out.extend(norm("output_norm".into())?);
    if !spec.tied {
        out.push(mat("output.weight".into(), spec.vocab, h)?);
    }
    Ok(out)
}

/// Llama 3.1's per-pair frequency factors, computed as llama.cpp's converter computes the
/// `rope_freqs` tensor from a Hugging Face config (each a divisor of the pair's frequency).
fn llama3_factors(spec: &TinySpec) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor: lo,
        high_freq_factor: hi,
        original_context,
    } = spec.rope_scaling
    else {
        return None;
    };
    let d = spec.rope_dims() as f64;
    let ctx = original_context as f64;
    let out = (0..spec.rope_dims() / 2)
        .map(|i| {
            let freq = 1.0 / (spec.rope_theta as f64).powf(2.0 * i as f64 / d);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < ctx / hi as f64 {
                1.0
            } else if wavelen > ctx / lo as f64 {
                factor
            } else {
                let smooth = (ctx / wavelen - lo as f64) / (hi as f64 - lo as f64);
                (1.0 / ((1.0 - smooth) / factor as f64 + smooth)) as f32
            }
        })
        .collect();
    Some(out)
}

/// LongRoPE's factor sets (short, long) for a [`RopeScaling::LongRope`] spec, shaped as
/// Phi-3's are: the short ones near 1, the long ones growing with the pair's wavelength.
pub fn longrope_factors(spec: &TinySpec) -> Option<(Vec<f32>, Vec<f32>)> {
    let RopeScaling::LongRope { .. } = spec.rope_scaling else {
        return None;
    };
    let n = spec.rope_dims() / 2;
    let at = |i: usize| i as f32 / (n - 1).max(1) as f32;
    let short = (0..n).map(|i| 1.0 + 0.25 * at(i) * at(i)).collect();
    let long = (0..n).map(|i| 1.0 + 11.0 * at(i).powf(1.5)).collect();
    Some((short, long))
}

/// The attention factor Hugging Face (and llama.cpp's converter) derive for LongRoPE from the
/// context and the original context.
pub fn longrope_attn_factor(context: usize, original: usize) -> f32 {
    let scale = context as f64 / original as f64;
    if scale <= 1.0 {
        1.0
    } else {
        (1.0 + scale.ln() / (original as f64).ln()).sqrt() as f32
    }
}

use super::lora::permute_for_interleaved;

/// Writes a random-weight GGUF for `spec` at `path`, with llama.cpp's metadata keys and the tiny
/// tokenizer (`tokenizer.ggml.model = "gpt2"`, `pre = "qwen2"`, ChatML template).
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    write_tiny_gguf_as(path, spec, false)
}

/// [`write_tiny_gguf`] with the matrices (`spec.dtype` aside) stored as llama.cpp's IQ4_XS files
/// store them: IQ4_XS where a row is whole 256-value blocks, IQ4_NL otherwise
/// ([`iq4_nl_blocks`], [`iq4_xs_blocks`]).
pub fn write_tiny_gguf_iq4(path: &Path, spec: &TinySpec) -> Result<()> {
    write_tiny_gguf_as(path, spec, true)
}

fn write_tiny_gguf_as(path: &Path, spec: &TinySpec, iq4: bool) -> Result<()> {
    spec.check()?;
    let a = spec.arch.name();
    let (tokens, types, merges) = match spec.pre {
        Some(_) => tiny_cross_vocab(),
        None => tiny_vocab(spec.vocab),
    };
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap_or(0) as u32;
    let (eot, im_end) = (id("<|endoftext|>"), id("<|im_end|>"));
    use gguf_file::Value as V;
    let strs = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.into())),
        (
            "general.name".into(),
            V::String(
                spec.name
                    .map_or_else(|| format!("verdict-tiny-{a}"), String::from),
            ),
        ),
        ("general.alignment".into(), V::U32(32)),
        (
            format!("{a}.context_length"),
            V::U32(spec.context_length as u32),
        ),
        (format!("{a}.embedding_length"), V::U32(spec.hidden as u32)),
        (format!("{a}.block_count"), V::U32(spec.layers as u32)),
        (
            format!("{a}.feed_forward_length"),
            V::U32(spec.intermediate as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            V::U32(spec.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(spec.kv_heads as u32),
        ),
        (format!("{a}.rope.freq_base"), V::F32(spec.rope_theta)),
        (
            format!("{a}.rope.dimension_count"),
            V::U32(spec.rope_dims() as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            V::U32(spec.head_dim() as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            V::U32(spec.head_dim() as u32),
        ),
        (
            match spec.arch {
                Arch::Starcoder2 | Arch::Cohere2 | Arch::CommandR => {
                    format!("{a}.attention.layer_norm_epsilon")
                }
                _ => format!("{a}.attention.layer_norm_rms_epsilon"),
            },
            V::F32(spec.rms_eps),
        ),
        (format!("{a}.vocab_size"), V::U32(spec.vocab as u32)),
    ];
    if let Some(w) = spec.sliding_window {
        meta.push((format!("{a}.attention.sliding_window"), V::U32(w as u32)));
    }
    if spec.arch == Arch::CommandR {
        meta.push((format!("{a}.logit_scale"), V::F32(COHERE2_LOGIT_SCALE)));
    }
    if matches!(spec.arch, Arch::Cohere2 | Arch::GptOss) {
        if spec.arch == Arch::Cohere2 {
            meta.push((format!("{a}.logit_scale"), V::F32(COHERE2_LOGIT_SCALE)));
        }
        // Required there: a window past these tests' sequences where the spec names none.
        if spec.sliding_window.is_none() {
            meta.push((format!("{a}.attention.sliding_window"), V::U32(4096)));
        }
    }
    if let Some([embedding, residual, attention, logit]) = spec.granite {
        meta.push((format!("{a}.embedding_scale"), V::F32(embedding)));
        meta.push((format!("{a}.residual_scale"), V::F32(residual)));
        meta.push((format!("{a}.attention.scale"), V::F32(attention)));
        meta.push((format!("{a}.logit_scale"), V::F32(logit)));
    }
    if let Some((count, used, ff)) = spec.experts {
        meta.push((format!("{a}.expert_count"), V::U32(count as u32)));
        meta.push((format!("{a}.expert_used_count"), V::U32(used as u32)));
        meta.push((format!("{a}.expert_feed_forward_length"), V::U32(ff as u32)));
    }
    if let Some(sh) = spec.shared_expert {
        meta.push((
            format!("{a}.expert_shared_feed_forward_length"),
            V::U32(sh as u32),
        ));
    }
    if let Some((attn, last)) = spec.softcaps {
        meta.push((format!("{a}.attn_logit_softcapping"), V::F32(attn)));
        meta.push((format!("{a}.final_logit_softcapping"), V::F32(last)));
    }
    match spec.rope_scaling {
        RopeScaling::None | RopeScaling::Llama3 { .. } => {}
        RopeScaling::LongRope {
            original_context,
            attn_factor,
        } => {
            meta.push((format!("{a}.rope.scaling.attn_factor"), V::F32(attn_factor)));
            meta.push((
                format!("{a}.rope.scaling.original_context_length"),
                V::U32(original_context as u32),
            ));
        }
        RopeScaling::Linear { factor } => {
            meta.push((format!("{a}.rope.scaling.type"), V::String("linear".into())));
            meta.push((format!("{a}.rope.scaling.factor"), V::F32(factor)));
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            ..
        } => {
            meta.push((format!("{a}.rope.scaling.type"), V::String("yarn".into())));
            meta.push((format!("{a}.rope.scaling.factor"), V::F32(factor)));
            meta.push((
                format!("{a}.rope.scaling.original_context_length"),
                V::U32(original_context as u32),
            ));
        }
    }
    if spec.spm {
        let (mut tokens, mut types, mut scores) = tiny_spm_vocab(spec.vocab);
        if spec.arch == Arch::Phi3 {
            // Phi-3's chat tokens in place of the last pieces (control tokens, as its
            // converter writes them).
            let n = tokens.len();
            for (i, t) in PHI3_SPECIALS.iter().enumerate() {
                tokens[n - PHI3_SPECIALS.len() + i] = t.to_string();
                types[n - PHI3_SPECIALS.len() + i] = 3;
                scores[n - PHI3_SPECIALS.len() + i] = 0.0;
            }
        }
        meta.extend([
            ("tokenizer.ggml.model".into(), V::String("llama".into())),
            ("tokenizer.ggml.tokens".into(), strs(&tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                V::Array(types.iter().map(|&t| V::I32(t)).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                V::Array(scores.iter().map(|&x| V::F32(x)).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id".into(), V::U32(0)),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), V::Bool(true)),
            // Gemma's SentencePiece puts no space in front of the text.
            (
                "tokenizer.ggml.add_space_prefix".into(),
                V::Bool(!spec.arch.is_gemma()),
            ),
        ]);
    } else {
        meta.extend([
            ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                V::String(spec.pre.unwrap_or("qwen2").into()),
            ),
            ("tokenizer.ggml.tokens".into(), strs(&tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                V::Array(types.iter().map(|&t| V::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".into(), strs(&merges)),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(eot)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(im_end)),
            ("tokenizer.ggml.padding_token_id".into(), V::U32(eot)),
            ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        ]);
    }
    meta.push((
        "tokenizer.chat_template".into(),
        V::String(CHATML_TEMPLATE.into()),
    ));
    let mut tensors: Vec<RawTensor> = Vec::new();
    for (name, t) in tiny_weights(spec)? {
        let llama_rows = matches!(spec.arch, Arch::Llama | Arch::Granite | Arch::Smollm3);
        let t = if llama_rows && name.ends_with("attn_q.weight") {
            permute_for_interleaved(&t, spec.heads)?
        } else if llama_rows && name.ends_with("attn_k.weight") {
            permute_for_interleaved(&t, spec.kv_heads)?
        } else {
            t
        };
        let dims = t.dims().to_vec();
        // gpt-oss's experts as llama.cpp's converter stores them.
        if spec.arch == Arch::GptOss && name.ends_with("_exps.weight") {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            tensors.push(RawTensor {
                name,
                ggml_type: MXFP4_ID,
                dims,
                data: mxfp4_blocks(&data),
            });
            continue;
        }
        // Norms and biases are f32, as in llama.cpp's files.
        let vector = t.rank() == 1 || name.ends_with(".bias") || name.ends_with("_norm.weight");
        if iq4 && !vector {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            let xs = dims[dims.len() - 1].is_multiple_of(256);
            tensors.push(RawTensor {
                name,
                ggml_type: if xs { IQ4_XS_ID } else { IQ4_NL_ID },
                dims,
                data: if xs {
                    iq4_xs_blocks(&data)
                } else {
                    iq4_nl_blocks(&data)
                },
            });
            continue;
        }
        let dtype = if vector { GgmlDType::F32 } else { spec.dtype };
        let q = QTensor::quantize(&t, dtype).map_err(|e| ModelError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason: format!("cannot quantize to {dtype:?}: {}", candle_msg(&e)),
        })?;
        tensors.push(RawTensor {
            name,
            ggml_type: super::gguf::ggml_type_id(dtype),
            dims,
            data: q.data()?.into_owned(),
        });
    }
    write_gguf_file(path, &meta, &tensors)
}

use super::gguf::{IQ4_NL as IQ4_NL_ID, IQ4_XS as IQ4_XS_ID, MXFP4 as MXFP4_ID};

/// Up to 32 weights (the rest zero) as the nearest codes of a 16-entry `values` table at scale
/// `d` (16 bytes: weight j in byte j's low nibble, 16 + j in its high one): MXFP4's and IQ4's.
fn table_codes(block: &[f32], values: &[i8; 16], d: f32, out: &mut Vec<u8>) {
    let code = |v: f32| -> u8 {
        (0..16u8)
            .min_by(|&a, &b| {
                let err = |i: u8| (f32::from(values[i as usize]) * d - v).abs();
                err(a).total_cmp(&err(b))
            })
            .unwrap_or(0)
    };
    let at = |i: usize| block.get(i).copied().unwrap_or(0.0);
    for j in 0..16 {
        out.push(code(at(j)) | (code(at(j + 16)) << 4));
    }
}

/// f32 weights (whole blocks of 32) as IQ4_NL blocks: per 32, an f16 scale `max |x| / 127` and
/// each weight's nearest table code (a valid encoding, not llama.cpp's searched one).
pub fn iq4_nl_blocks(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 18);
    for block in x.chunks_exact(32) {
        let d = half::f16::from_f32(block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
        out.extend_from_slice(&d.to_bits().to_le_bytes());
        table_codes(block, &super::gguf::IQ4_VALUES, d.to_f32(), &mut out);
    }
    out
}

/// f32 weights (whole blocks of 256) as IQ4_XS blocks: per 256 an f16 `d`, per 32 a multiplier
/// `ls - 32` (1..=31 here) nearest to its `max |x| / 127 / d`, and the codes at `d·(ls - 32)`.
pub fn iq4_xs_blocks(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 256 * 136);
    for block in x.chunks_exact(256) {
        let want: Vec<f32> = block
            .chunks_exact(32)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
            .collect();
        let d = half::f16::from_f32(want.iter().fold(0f32, |m, &v| m.max(v)) / 31.0);
        let ls: Vec<u8> = want
            .iter()
            .map(|&w| match d.to_f32() > 0.0 {
                true => (w / d.to_f32()).round().clamp(1.0, 31.0) as u8 + 32,
                false => 33,
            })
            .collect();
        out.extend_from_slice(&d.to_bits().to_le_bytes());
        let high = (0..8).fold(0u16, |h, ib| h | (u16::from(ls[ib] >> 4) << (2 * ib)));
        out.extend_from_slice(&high.to_le_bytes());
        out.extend((0..4).map(|i| (ls[2 * i] & 15) | ((ls[2 * i + 1] & 15) << 4)));
        for (ib, b) in block.chunks_exact(32).enumerate() {
            let scale = d.to_f32() * (f32::from(ls[ib]) - 32.0);
            table_codes(b, &super::gguf::IQ4_VALUES, scale, &mut out);
        }
    }
    out
}

/// A tensor to write: ggml type id, dimensions in candle order, the stored bytes.
struct RawTensor {
    name: String,
    ggml_type: u32,
    dims: Vec<usize>,
    data: Vec<u8>,
}

/// f32 weights as MXFP4 blocks, as ggml quantizes them: per 32, the exponent byte
/// `floor(log2(max |x|)) - 2 + 127` and each weight's nearest code value times 2^(e - 128).
pub fn mxfp4_blocks(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 17);
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = match amax > 0.0 {
            true => (amax.log2().floor() as i32 - 2 + 127).clamp(0, 255) as u8,
            false => 0,
        };
        let d = 2f32.powi(e as i32 - 128);
        out.push(e);
        table_codes(block, &super::gguf::MXFP4_VALUES, d, &mut out);
    }
    out
}

/// [`write_gguf`] into the file at `path`.
fn write_gguf_file(
    path: &Path,
    meta: &[(String, gguf_file::Value)],
    tensors: &[RawTensor],
) -> Result<()> {
    let mut bytes = Vec::new();
    write_gguf(&mut bytes, meta, tensors);
    std::fs::write(path, bytes).map_err(|source| ModelError::Open {
        path: path.to_path_buf(),
        cause: source,
    })
}

/// A GGUF (version 2, 32-byte alignment) as candle's writer lays it out, with tensors of any
/// ggml type (candle's writer takes only the types it can quantize to).
fn write_gguf(w: &mut Vec<u8>, meta: &[(String, gguf_file::Value)], tensors: &[RawTensor]) {
    fn string(w: &mut Vec<u8>, s: &str) {
        w.extend_from_slice(&(s.len() as u64).to_le_bytes());
        w.extend_from_slice(s.as_bytes());
    }
    fn type_id(v: &gguf_file::Value) -> u32 {
        use gguf_file::Value as V;
        match v {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::String(_) => 8,
            V::Array(_) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }
    fn value(w: &mut Vec<u8>, v: &gguf_file::Value) {
        use gguf_file::Value as V;
        match v {
            V::U8(x) => w.push(*x),
            V::I8(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
            V::Bool(x) => w.push(u8::from(*x)),
            V::String(s) => string(w, s),
            V::Array(items) => {
                // An empty array's element type does not matter (candle writes U32's).
                w.extend_from_slice(&items.first().map_or(4, type_id).to_le_bytes());
                w.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    value(w, item);
                }
            }
        }
    }
    let pad = |n: usize| (32 - n % 32) % 32;
    w.extend_from_slice(&0x4655_4747u32.to_le_bytes());
    w.extend_from_slice(&2u32.to_le_bytes());
    w.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    w.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(w, k);
        w.extend_from_slice(&type_id(v).to_le_bytes());
        value(w, v);
    }
    let mut offset = 0;
    for t in tensors {
        string(w, &t.name);
        w.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            w.extend_from_slice(&(d as u64).to_le_bytes());
        }
        w.extend_from_slice(&t.ggml_type.to_le_bytes());
        w.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len() + pad(t.data.len());
    }
    w.resize(w.len() + pad(w.len()), 0);
    for t in tensors {
        w.extend_from_slice(&t.data);
        w.resize(w.len() + pad(t.data.len()), 0);
    }
}

/// Writes the same f32 weights as [`write_tiny_gguf`] (before quantization) as a Hugging Face
/// checkpoint: `dir/config.json` + `dir/model.safetensors`.
pub fn write_tiny_safetensors(dir: &Path, spec: &TinySpec) -> Result<()> {
    write_safetensors_of(dir, spec, tiny_weights(spec)?)
}

/// A LoRA adapter for a tiny model: random A (`[rank, in]`) and B (`[out, rank]`) for each
/// projection `targets` names (GGUF names without the layer: `attn_q`, phi3's fused `attn_qkv`
/// and `ffn_up`; `output` for the lm_head), in every layer.
#[derive(Debug, Clone)]
pub struct TinyLora {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<&'static str>,
    pub seed: u64,
}

impl TinyLora {
    /// A rank-4 adapter of q, v, the MLP's up projection and the lm_head, from `seed`: what
    /// the command-line and server tests apply to `TinySpec::default()`'s model.
    pub fn small(seed: u64) -> TinyLora {
        TinyLora {
            rank: 4,
            alpha: 8.0,
            targets: vec!["attn_q", "attn_v", "ffn_up", "output"],
            seed,
        }
    }

    /// The alpha whose `alpha / rank` is the update's factor (0 stands for 1, as in llama.cpp).
    fn effective_alpha(&self) -> f32 {
        match self.alpha {
            0.0 => self.rank as f32,
            a => a,
        }
    }

    /// Each updated matrix's name (`blk.0.attn_q.weight`) with its A and B, rows in Hugging
    /// Face's order.
    fn pairs(&self, spec: &TinySpec) -> Result<Vec<(String, Tensor, Tensor)>> {
        let shapes = tiny_weights(spec)?
            .into_iter()
            .filter_map(|(name, t)| t.dims2().ok().map(|(r, c)| (name, r, c)));
        let out = self.pairs_of(shapes)?;
        if out.is_empty() {
            return Err(ModelError::Invalid(format!(
                "TinyLora: none of {:?} is a matrix of the tiny {}",
                self.targets,
                spec.arch.name()
            )));
        }
        Ok(out)
    }

    /// A and B for each `(name, rows, cols)` matrix whose name `targets` names.
    fn pairs_of(
        &self,
        shapes: impl Iterator<Item = (String, usize, usize)>,
    ) -> Result<Vec<(String, Tensor, Tensor)>> {
        let mut out = Vec::new();
        for (name, rows, cols) in shapes {
            let short = match name.as_str() {
                "output.weight" => "output",
                n => match n.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
                    Some((_, s)) => s.strip_suffix(".weight").unwrap_or(s),
                    None => continue,
                },
            };
            if !self.targets.contains(&short) {
                continue;
            }
            let rng = &mut ChaCha8Rng::seed_from_u64(
                self.seed
                    ^ name
                        .bytes()
                        .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64),
            );
            let mut mat = |r: usize, c: usize| -> Result<Tensor> {
                let a = (3.0 / c as f32).sqrt();
                let v: Vec<f32> = (0..r * c).map(|_| rng.random_range(-a..a)).collect();
                Ok(Tensor::from_vec(v, (r, c), &Device::Cpu)?)
            };
            let a = mat(self.rank, cols)?;
            let b = mat(rows, self.rank)?;
            out.push((name, a, b));
        }
        Ok(out)
    }
}

/// Writes a random LoRA adapter (llama.cpp's GGUF form) for the GGUF model at `model`: A and B
/// for every matrix `lora.targets` names, at the model's shapes (for speed measurements: the
/// adapter's cost does not depend on its values).
pub fn write_random_lora_for(model: &Path, out: &Path, lora: &TinyLora) -> Result<()> {
    let file = super::gguf::GgufFile::open(model)?;
    let arch = file.get_str("general.architecture")?.to_string();
    let mut names: Vec<&String> = file.content().tensor_infos.keys().collect();
    names.sort();
    let shapes = names
        .into_iter()
        .filter_map(|n| match file.tensor_shape(n) {
            Some(&[rows, cols]) => Some((n.clone(), rows, cols)),
            _ => None,
        });
    let pairs = lora.pairs_of(shapes)?;
    if pairs.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{}: none of {:?} is a matrix of this model",
            model.display(),
            lora.targets
        )));
    }
    write_lora_gguf(out, &arch, lora.alpha, pairs, GgmlDType::F32)
}

/// Writes `lora` for `spec` as llama.cpp's converter writes adapters (`convert_lora_to_gguf.py`):
/// f32 `NAME.weight.lora_a` / `lora_b`, llama's q / k rows of B permuted as the base's are.
pub fn write_tiny_lora_gguf(path: &Path, spec: &TinySpec, lora: &TinyLora) -> Result<()> {
    write_tiny_lora_gguf_as(path, spec, lora, GgmlDType::F32)
}

/// [`write_tiny_lora_gguf`] with A and B stored as `dtype` (`convert_lora_to_gguf.py`'s
/// `--outtype`: f32, f16, bf16, q8_0).
pub fn write_tiny_lora_gguf_as(
    path: &Path,
    spec: &TinySpec,
    lora: &TinyLora,
    dtype: GgmlDType,
) -> Result<()> {
    let llama_rows = matches!(spec.arch, Arch::Llama | Arch::Granite | Arch::Smollm3);
    let pairs = lora
        .pairs(spec)?
        .into_iter()
        .map(|(name, a, b)| {
            let b = match name.rsplit('.').nth(1) {
                Some("attn_q") if llama_rows => permute_for_interleaved(&b, spec.heads)?,
                Some("attn_k") if llama_rows => permute_for_interleaved(&b, spec.kv_heads)?,
                _ => b,
            };
            Ok((name, a, b))
        })
        .collect::<Result<Vec<_>>>()?;
    write_lora_gguf(path, spec.arch.name(), lora.alpha, pairs, dtype)
}

/// An adapter file: `pairs` as `NAME.lora_a` / `NAME.lora_b` of `dtype` for a model of `arch`.
fn write_lora_gguf(
    path: &Path,
    arch: &str,
    alpha: f32,
    pairs: Vec<(String, Tensor, Tensor)>,
    dtype: GgmlDType,
) -> Result<()> {
    use gguf_file::Value as V;
    let meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.type".into(), V::String("adapter".into())),
        ("general.alignment".into(), V::U32(32)),
        ("adapter.type".into(), V::String("lora".into())),
        ("adapter.lora.alpha".into(), V::F32(alpha)),
    ];
    let mut tensors = Vec::new();
    for (name, a, b) in pairs {
        for (half, t) in [("lora_a", a), ("lora_b", b)] {
            let q = QTensor::quantize(&t, dtype)?;
            tensors.push(RawTensor {
                name: format!("{name}.{half}"),
                ggml_type: super::gguf::ggml_type_id(dtype),
                dims: t.dims().to_vec(),
                data: q.data()?.into_owned(),
            });
        }
    }
    write_gguf_file(path, &meta, &tensors)
}

/// The Hugging Face name of a tiny model's matrix (`blk.0.attn_q.weight` ->
/// `model.layers.0.self_attn.q_proj.weight`), or `None` for what a checkpoint does not keep.
fn hf_name(spec: &TinySpec, name: &str) -> Option<String> {
    let layer_name = super::safetensors::hf_layer_names(spec.arch, spec.experts.is_some());
    Some(match name {
        // Hugging Face keeps the scheme in config.json, not the factors.
        "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight" => {
            return None;
        }
        "token_embd.weight" => "model.embed_tokens.weight".to_string(),
        "output_norm.weight" => "model.norm.weight".to_string(),
        "output_norm.bias" => "model.norm.bias".to_string(),
        "output.weight" => "lm_head.weight".to_string(),
        n => {
            let rest = n.strip_prefix("blk.").unwrap_or(n);
            let (i, s) = rest.split_once('.').unwrap_or(("0", rest));
            let i: usize = i.parse().unwrap_or(0);
            let s = s.strip_suffix(".weight").unwrap_or(s);
            let s = match (spec.arch, s) {
                (Arch::Phi3, "ffn_up") => super::transformer::FFN_GATE_UP,
                _ => s,
            };
            layer_name(i, s)
        }
    })
}

/// Writes `lora` for `spec` as PEFT saves an adapter: `dir/adapter_config.json` and
/// `dir/adapter_model.safetensors` (`base_model.model.NAME.lora_A.weight`, Hugging Face names).
pub fn write_tiny_peft(dir: &Path, spec: &TinySpec, lora: &TinyLora) -> Result<()> {
    let io = |source| ModelError::Open {
        path: dir.to_path_buf(),
        cause: source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for (name, a, b) in lora.pairs(spec)? {
        let hf = hf_name(spec, &name).unwrap_or(name);
        let module = hf.strip_suffix(".weight").unwrap_or(&hf).to_string();
        modules.insert(module.rsplit('.').next().unwrap_or("").to_string());
        map.insert(format!("base_model.model.{module}.lora_A.weight"), a);
        map.insert(format!("base_model.model.{module}.lora_B.weight"), b);
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": lora.rank,
        // GGUF's alpha 0 means the scale alone; PEFT's would mean nothing: alpha = rank is that.
        "lora_alpha": lora.effective_alpha(),
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).map_err(io)?;
    let st = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&map, &st).map_err(|e| ModelError::Corrupt {
        path: st.clone(),
        reason: format!("writing safetensors failed: {}", candle_msg(&e)),
    })
}

/// [`write_tiny_safetensors`] with `lora`'s update merged into the weights:
/// `W + scale * alpha / rank * B A` (what applying the adapter at `scale` must equal).
pub fn write_tiny_safetensors_merged(
    dir: &Path,
    spec: &TinySpec,
    lora: &TinyLora,
    scale: f32,
) -> Result<()> {
    let s = (scale * lora.effective_alpha() / lora.rank as f32) as f64;
    let updates: HashMap<String, Tensor> = lora
        .pairs(spec)?
        .into_iter()
        .map(|(name, a, b)| Ok((name, (b.matmul(&a)? * s)?)))
        .collect::<Result<_>>()?;
    let weights = tiny_weights(spec)?
        .into_iter()
        .map(|(name, t)| match updates.get(&name) {
            Some(u) => Ok((name, (t + u)?)),
            None => Ok((name, t)),
        })
        .collect::<Result<Vec<_>>>()?;
    write_safetensors_of(dir, spec, weights)
}

fn write_safetensors_of(dir: &Path, spec: &TinySpec, weights: Vec<(String, Tensor)>) -> Result<()> {
    spec.check()?;
    if spec.arch == Arch::GptOss {
        // verdict reads gpt-oss from GGUF only (its checkpoints store MXFP4 blocks).
        return Err(ModelError::Invalid(
            "TinySpec: gpt-oss has no Hugging Face form here".into(),
        ));
    }
    let io = |source| ModelError::Open {
        path: dir.to_path_buf(),
        cause: source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let layer_name = super::safetensors::hf_layer_names(spec.arch, spec.experts.is_some());
    for (name, t) in weights {
        // Gemma stores norms as w of 1 + w.
        let t = match spec.arch.is_gemma() && name.ends_with("norm.weight") {
            true => (t - 1.0)?,
            false => t,
        };
        // Stacked experts: one matrix each, as Hugging Face stores them.
        if let Some(rest) = name.strip_suffix("_exps.weight")
            && let Some((layer, what)) = rest.strip_prefix("blk.").and_then(|r| r.split_once('.'))
        {
            let i: usize = layer.parse().unwrap_or(0);
            for e in 0..t.dim(0)? {
                map.insert(
                    layer_name(i, &format!("{what}.{e}")),
                    t.get(e)?.contiguous()?,
                );
            }
            continue;
        }
        // Hugging Face's shared-expert gate is a one-row matrix.
        let t = match name.ends_with("ffn_gate_inp_shexp.weight") {
            true => t.unsqueeze(0)?,
            false => t,
        };
        let Some(hf) = hf_name(spec, &name) else {
            continue;
        };
        map.insert(hf, t);
    }
    let (tokens, _, _) = tiny_vocab(spec.vocab);
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap_or(0);
    let config = serde_json::json!({
        "architectures": [match spec.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Granite => "GraniteForCausalLM",
            Arch::Smollm3 => "SmolLM3ForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Olmo2 => "Olmo2ForCausalLM",
            Arch::Starcoder2 => "Starcoder2ForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
            Arch::Cohere2 => "Cohere2ForCausalLM",
            Arch::CommandR => "CohereForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
        }],
        "head_dim": spec.head_dim(),
        "model_type": spec.arch.name(),
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "intermediate_size": spec.intermediate,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_eps,
        "max_position_embeddings": spec.context_length,
        "tie_word_embeddings": spec.tied,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "torch_dtype": "float32",
        "rope_scaling": match spec.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Yarn { factor, original_context, .. } => serde_json::json!({
                "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original_context,
            }),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_context,
            }),
            // As Phi-3 128k writes it: the factor sets in the object, the original context
            // beside it, the attention factor left to the formula unless it differs.
            RopeScaling::LongRope { attn_factor, original_context } => {
                let (short, long) = longrope_factors(spec).unwrap_or_default();
                let mut o = serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
                if attn_factor != longrope_attn_factor(spec.context_length, original_context) {
                    o["attention_factor"] = attn_factor.into();
                }
                o
            }
        },
    });
    let mut config = config;
    if spec.arch == Arch::Gemma3 {
        config["model_type"] = "gemma3_text".into();
        config["sliding_window"] = spec.sliding_window.unwrap_or(0).into();
        config["sliding_window_pattern"] = 6.into();
        config["rope_local_base_freq"] = 10_000.0.into();
        config["query_pre_attn_scalar"] = spec.head_dim().into();
        config["hidden_activation"] = "gelu_pytorch_tanh".into();
    }
    if let Some([embedding, residual, attention, logit]) = spec.granite {
        config["embedding_multiplier"] = embedding.into();
        config["residual_multiplier"] = residual.into();
        config["attention_multiplier"] = attention.into();
        config["logits_scaling"] = logit.into();
    }
    match (spec.experts, spec.arch) {
        (Some((count, used, ff)), Arch::Llama) => {
            config["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
            config["model_type"] = "mixtral".into();
            config["num_local_experts"] = count.into();
            config["num_experts_per_tok"] = used.into();
            config["intermediate_size"] = ff.into();
        }
        (Some((count, used, ff)), Arch::Olmoe) => {
            config["num_experts"] = count.into();
            config["num_experts_per_tok"] = used.into();
            config["intermediate_size"] = ff.into();
            config["norm_topk_prob"] = false.into();
        }
        (Some((count, used, ff)), _) => {
            let qwen2 = spec.arch == Arch::Qwen2Moe;
            config["model_type"] = if qwen2 { "qwen2_moe" } else { "qwen3_moe" }.into();
            config["num_experts"] = count.into();
            config["num_experts_per_tok"] = used.into();
            config["moe_intermediate_size"] = ff.into();
            config["norm_topk_prob"] = (!qwen2).into();
            if let Some(sh) = spec.shared_expert {
                config["shared_expert_intermediate_size"] = sh.into();
                config["decoder_sparse_step"] = 1.into();
                config["mlp_only_layers"] = serde_json::json!([]);
            }
        }
        (None, _) => {}
    }
    if spec.arch == Arch::CommandR {
        config["model_type"] = "cohere".into();
        config["layer_norm_eps"] = spec.rms_eps.into();
        config["logit_scale"] = COHERE2_LOGIT_SCALE.into();
        config["use_qk_norm"] = spec.qk_norms.into();
    }
    if spec.arch == Arch::Cohere2 {
        config["layer_norm_eps"] = spec.rms_eps.into();
        config["logit_scale"] = COHERE2_LOGIT_SCALE.into();
        config["sliding_window"] = spec.sliding_window.unwrap_or(4096).into();
        config["sliding_window_pattern"] = 4.into();
        config["use_qk_norm"] = false.into();
    }
    if spec.arch == Arch::Starcoder2 {
        // As StarCoder 2's configs: a window far past these tests' sequences.
        config["norm_epsilon"] = spec.rms_eps.into();
        config["use_bias"] = true.into();
        config["hidden_act"] = "gelu_pytorch_tanh".into();
        config["sliding_window"] = spec.sliding_window.unwrap_or(4096).into();
    }
    if spec.arch == Arch::Smollm3 {
        let rotates: Vec<u32> = (0..spec.layers)
            .map(|i| ((i + 1) % 4 != 0) as u32)
            .collect();
        config["no_rope_layers"] = rotates.into();
    }
    if spec.arch == Arch::Gemma2 {
        config["sliding_window"] = spec.sliding_window.unwrap_or(4096).into();
        config["query_pre_attn_scalar"] = spec.head_dim().into();
        config["hidden_activation"] = "gelu_pytorch_tanh".into();
        let (attn, last) = spec.softcaps.unwrap_or((50.0, 30.0));
        config["attn_logit_softcapping"] = attn.into();
        config["final_logit_softcapping"] = last.into();
    }
    if spec.rope_dims() != spec.head_dim() {
        config["partial_rotary_factor"] = (spec.rope_dims() as f64 / spec.head_dim() as f64).into();
    }
    if let RopeScaling::LongRope {
        original_context, ..
    } = spec.rope_scaling
    {
        config["original_max_position_embeddings"] = original_context.into();
    }
    let cfg_text = serde_json::to_string_pretty(&config)
        .map_err(|e| ModelError::Invalid(format!("config.json: {e}")))?;
    std::fs::write(dir.join("config.json"), cfg_text).map_err(io)?;
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&map, &st).map_err(|e| ModelError::Corrupt {
        path: st.clone(),
        reason: format!("writing safetensors failed: {}", candle_msg(&e)),
    })
}

/// gpt-oss's layout at a small scale, for CPU speed comparisons with llama.cpp on the same file
/// (`bench/cpu-vs-llamacpp --gguf`): 8 layers 768 wide, 12 query and 4 kv heads of 64, every
/// other layer local (128 positions), 32 experts of width 768 with 4 per token, stored as MXFP4
/// (453M expert weights, 57M of them read per token), the other matrices Q8_0.
pub fn gpt_oss_bench_spec() -> TinySpec {
    TinySpec {
        arch: Arch::GptOss,
        vocab: 900,
        hidden: 768,
        layers: 8,
        heads: 12,
        kv_heads: 4,
        head_dim: Some(64),
        sliding_window: Some(128),
        experts: Some((32, 4, 768)),
        intermediate: 768,
        dtype: GgmlDType::Q8_0,
        context_length: 4096,
        rms_eps: 1e-5,
        seed: 11,
        ..TinySpec::default()
    }
}

/// The spec of [`peer_specs`] named `name`.
pub fn peer_spec(name: &str) -> Option<TinySpec> {
    peer_specs()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
}

/// Tiny models that llama.cpp runs too, one per architecture and rotary variant:
/// `scripts/make-fixtures.py peer` records llama.cpp's logits for them (`examples/tiny_models.rs`
/// writes the files), and `tests/models.rs` checks verdict's against those. f32 weights, so the
/// two engines differ only by f32 rounding.
/// LoRA adapters on peer models (by the base's name in [`peer_specs`]) that
/// `scripts/make-fixtures.py peer` runs llama.cpp with (`lora-BASE.gguf`): every projection
/// and the lm_head of llama; q and v of qwen2 (a common PEFT choice, beside its biases); phi3's
/// fused q/k/v and gate/up, with alpha 0 (the scale alone).
pub fn peer_loras() -> Vec<(&'static str, TinyLora)> {
    vec![
        (
            "llama",
            TinyLora {
                rank: 4,
                alpha: 8.0,
                targets: vec![
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                    "output",
                ],
                seed: 1,
            },
        ),
        (
            "qwen2",
            TinyLora {
                rank: 8,
                alpha: 16.0,
                targets: vec!["attn_q", "attn_v"],
                seed: 2,
            },
        ),
        (
            "phi3",
            TinyLora {
                rank: 4,
                alpha: 0.0,
                targets: vec!["attn_qkv", "ffn_up", "attn_output", "ffn_down"],
                seed: 3,
            },
        ),
    ]
}

pub fn peer_specs() -> Vec<(&'static str, TinySpec)> {
    // YaRN over an original context of 64 (gpt-oss and qwen2-yarn).
    let yarn_64 = RopeScaling::Yarn {
        factor: 4.0,
        original_context: 64,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attn_factor: 1.0,
    };
    let base = TinySpec {
        vocab: 300,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 96,
        context_length: 512,
        seed: 7,
        ..TinySpec::default()
    };
    vec![
        (
            "llama",
            TinySpec {
                arch: Arch::Llama,
                ..base.clone()
            },
        ),
        (
            "qwen2",
            TinySpec {
                arch: Arch::Qwen2,
                ..base.clone()
            },
        ),
        (
            "qwen3",
            TinySpec {
                arch: Arch::Qwen3,
                // Wider than hidden / heads (16), as Qwen3-0.6B's 128 against 1024 / 16.
                head_dim: Some(32),
                tied: true,
                ..base.clone()
            },
        ),
        // Llama 3.1's scheme on 16-dimension heads: wavelengths 6 .. 19869 positions, so with
        // an original context of 256 three pairs keep their frequency, one is mixed and four
        // are divided by 8.
        (
            "llama3-rope",
            TinySpec {
                arch: Arch::Llama,
                rope_scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_context: 256,
                },
                ..base.clone()
            },
        ),
        (
            "llama-linear-rope",
            TinySpec {
                arch: Arch::Llama,
                rope_scaling: RopeScaling::Linear { factor: 4.0 },
                ..base.clone()
            },
        ),
        // A SentencePiece vocabulary (Llama 2, Mistral 7B): the fixture keeps llama.cpp's ids
        // for a set of strings too.
        (
            "llama-spm",
            TinySpec {
                arch: Arch::Llama,
                spm: true,
                ..base.clone()
            },
        ),
        // Phi-3 mini: q/k/v in one matrix, gate and up in one, a SentencePiece vocabulary
        // with Phi-3's chat tokens (which, by the model's name, drop the whitespace after them).
        (
            "phi3",
            TinySpec {
                arch: Arch::Phi3,
                spm: true,
                ..base.clone()
            },
        ),
        // Phi-3 128k: LongRoPE over an original context of 64. The context (512 here, 256 in
        // llama.cpp's run) is past it, so both engines rotate by the long factors.
        (
            "phi3-longrope",
            TinySpec {
                arch: Arch::Phi3,
                spm: true,
                rope_scaling: RopeScaling::LongRope {
                    original_context: 64,
                    attn_factor: longrope_attn_factor(512, 64),
                },
                ..base.clone()
            },
        ),
        // Phi-4-mini: 3/4 of each head rotates (12 of 16 dimensions here), by LongRoPE's
        // factors; a byte-level BPE vocabulary, tied embeddings, and a name without "phi3"
        // (Phi-4's keep their whitespace after special tokens).
        (
            "phi4-mini",
            TinySpec {
                arch: Arch::Phi3,
                name: Some("verdict tiny phi 4 mini"),
                rope_dims: Some(12),
                tied: true,
                rope_scaling: RopeScaling::LongRope {
                    original_context: 64,
                    attn_factor: longrope_attn_factor(512, 64),
                },
                ..base.clone()
            },
        ),
        // Gemma 3: six layers, so that the last is global (1 in 6); the five local ones see
        // 8 positions at base 10000, the global one all of them at base 1e6 stretched by
        // linear scaling (as Gemma 3 4B's global layers). Heads wider than hidden / heads, tied
        // embeddings, a SentencePiece vocabulary without the leading space.
        (
            "gemma3",
            TinySpec {
                arch: Arch::Gemma3,
                layers: 6,
                head_dim: Some(32),
                sliding_window: Some(8),
                rope_theta: 1_000_000.0,
                rope_scaling: RopeScaling::Linear { factor: 8.0 },
                tied: true,
                spm: true,
                ..base.clone()
            },
        ),
        // Gemma 2: layers 0 and 2 see 8 positions, 1 and 3 all; soft caps low enough to bite
        // (the attention scores here reach about 2, the logits about 4).
        (
            "gemma2",
            TinySpec {
                arch: Arch::Gemma2,
                layers: 4,
                head_dim: Some(32),
                sliding_window: Some(8),
                softcaps: Some((1.5, 3.0)),
                tied: true,
                spm: true,
                ..base.clone()
            },
        ),
        // Granite 3: llama with its four multipliers (values that move these logits), and the
        // biases llama.cpp takes on the output and MLP projections.
        (
            "granite",
            TinySpec {
                arch: Arch::Granite,
                granite: Some([4.0, 0.5, 0.15, 2.0]),
                ..base.clone()
            },
        ),
        // SmolLM3: llama whose fourth layer does not rotate (5 layers: the fourth is NoPE).
        (
            "smollm3",
            TinySpec {
                arch: Arch::Smollm3,
                layers: 5,
                tied: true,
                ..base.clone()
            },
        ),
        // Mixtral: llama with experts as wide as `feed_forward_length`.
        (
            "llama-moe",
            TinySpec {
                arch: Arch::Llama,
                intermediate: 48,
                experts: Some((4, 2, 48)),
                ..base.clone()
            },
        ),
        // Qwen3-MoE: qwen3 with 4 experts of width 48 per layer, 2 chosen per row.
        (
            "qwen3moe",
            TinySpec {
                arch: Arch::Qwen3Moe,
                head_dim: Some(32),
                experts: Some((4, 2, 48)),
                tied: true,
                ..base.clone()
            },
        ),
        // OLMo 2: post-norms only, q and k normalised over whole rows.
        (
            "olmo2",
            TinySpec {
                arch: Arch::Olmo2,
                ..base.clone()
            },
        ),
        // StarCoder 2: LayerNorms with biases, a plain GELU MLP, biases everywhere, tied
        // embeddings.
        (
            "starcoder2",
            TinySpec {
                arch: Arch::Starcoder2,
                rms_eps: 1e-5,
                tied: true,
                ..base.clone()
            },
        ),
        // OLMoE: q and k normalised over whole rows, 4 experts of width 32 (2 per row, their
        // weights not renormalised), as many kv heads as heads (as OLMoE-1B-7B).
        (
            "olmoe",
            TinySpec {
                arch: Arch::Olmoe,
                kv_heads: 4,
                intermediate: 32,
                experts: Some((4, 2, 32)),
                ..base.clone()
            },
        ),
        // Command R7B: attention and MLP in parallel off one LayerNorm; layers 0-2 and 4-6 see
        // 8 positions, rotated, 3 and 7 everything, unrotated; logits times 0.25.
        (
            "cohere2",
            TinySpec {
                arch: Arch::Cohere2,
                layers: 8,
                sliding_window: Some(8),
                rms_eps: 1e-5,
                tied: true,
                ..base.clone()
            },
        ),
        // Command R: cohere2's blocks, every layer global and rotated.
        (
            "command-r",
            TinySpec {
                arch: Arch::CommandR,
                rms_eps: 1e-5,
                tied: true,
                ..base.clone()
            },
        ),
        // Command R+: command-r with each head's q and k LayerNormed, a weight per head (64
        // layers: llama.cpp reads the norms from models that deep, as Command R+ is).
        (
            "command-r-plus",
            TinySpec {
                arch: Arch::CommandR,
                qk_norms: true,
                layers: 64,
                rms_eps: 1e-5,
                tied: true,
                ..base.clone()
            },
        ),
        // Qwen2-MoE: qwen2 with 4 experts of width 32 (2 per row, their weights not
        // renormalised) and a shared expert of width 64 behind a sigmoid gate.
        (
            "qwen2moe",
            TinySpec {
                arch: Arch::Qwen2Moe,
                experts: Some((4, 2, 32)),
                shared_expert: Some(64),
                ..base.clone()
            },
        ),
        // gpt-oss: biases on q, k, v and the output, a sink per head, layers 0 and 2 local
        // (8 positions), 1 and 3 global, a head size of its own, 4 experts of width 64 (2 per
        // row) stored as MXFP4, with biases that push some gate and up values past the clamp,
        // a router bias, and YaRN over an original context of 64.
        (
            "gpt-oss",
            TinySpec {
                arch: Arch::GptOss,
                layers: 4,
                head_dim: Some(32),
                sliding_window: Some(8),
                experts: Some((4, 2, 64)),
                rms_eps: 1e-5,
                rope_scaling: yarn_64,
                ..base.clone()
            },
        ),
        // YaRN over an original context of 64: pairs 0-2 ramp, the rest are interpolated.
        (
            "qwen2-yarn",
            TinySpec {
                arch: Arch::Qwen2,
                rope_scaling: yarn_64,
                ..base.clone()
            },
        ),
    ]
}
