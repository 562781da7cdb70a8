//! Random weights at a real model's layout: what GPU benchmarks run on when the real weights
//! cannot travel (the lent GPU machine takes 64 MiB per call; the 1.5B GGUF is 1.1 GB).
//!
//! Only a GGUF's header travels ([`write_header`]: metadata, tokenizer, tensor infos, a few MB);
//! [`synthesize`] writes a full GGUF from it with every tensor filled at random, same names,
//! shapes and quant types, so the kernels and byte counts are the real ones. Quantized blocks
//! get small fixed scales (random scale bytes would give NaN and infinities in f16), norms get
//! ones, so the forward stays finite. Speed only: the outputs are noise, and acceptance rates
//! must come from the real weights (`verdict bench spec --synthetic-acceptance`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Shape};

use anyhow::{Context, Result, bail};

/// A layout other than the header's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// The header's tensors, as they are.
    Like,
    /// Llama-3.1-8B's dimensions (32 layers, 4096 wide, 32 query / 8 kv heads, MLP 14336) as
    /// `llama`, every matrix Q4_K and the output Q6_K, with the header's tokenizer (so the
    /// vocabulary is the header's).
    Llama8b,
}

impl SynthShape {
    pub fn parse(s: &str) -> Option<SynthShape> {
        match s {
            "like" => Some(SynthShape::Like),
            "llama-3.1-8b" => Some(SynthShape::Llama8b),
            _ => None,
        }
    }
}

/// What [`synthesize`] wrote.
#[derive(Debug)]
pub struct SynthReport {
    pub tensors: usize,
    /// Bytes of tensor data (what a decode step reads, roughly).
    pub tensor_bytes: u64,
}

fn read_content(path: &Path) -> Result<gguf_file::Content> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    gguf_file::Content::read(&mut f)
        .with_context(|| format!("{}: not a GGUF header", path.display()))
}

/// Copies the header of GGUF `src` (everything before the tensor data) to `out`; returns its
/// length. [`synthesize`] reads such a file as it reads a whole GGUF.
pub fn write_header(src: &Path, out: &Path) -> Result<u64> {
    let content = read_content(src)?;
    let mut f =
        std::fs::File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    f.rewind()?;
    let mut head = Vec::new();
    f.take(content.tensor_data_offset)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", src.display()))?;
    std::fs::write(out, &head).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(head.len() as u64)
}

/// splitmix64: fast, seedable, plenty for noise.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
}

/// Where each quant type keeps its f16 scales in a block, and values that give weights of
/// roughly ±0.02 with the block's random quants (centred where the type has a minimum).
fn scale_fields(dtype: GgmlDType) -> &'static [(usize, f32)] {
    use GgmlDType::*;
    match dtype {
        Q4_0 => &[(0, 3e-3)],
        Q4_1 => &[(0, 3e-3), (2, -2.25e-2)],
        Q5_0 => &[(0, 1.5e-3)],
        Q5_1 => &[(0, 1.5e-3), (2, -2.3e-2)],
        Q8_0 | Q8_1 => &[(0, 2e-4)],
        Q2K => &[(80, 2e-3), (82, 3e-3)],
        Q3K => &[(108, 1e-4)],
        Q4K => &[(0, 1e-4), (2, 7.5e-4)],
        Q5K => &[(0, 5e-5), (2, 7.75e-4)],
        Q6K => &[(208, 1e-5)],
        _ => &[],
    }
}

/// Random contents for one tensor of `elems` elements.
fn fill(name: &str, dtype: GgmlDType, elems: usize, noise: &mut Noise) -> Vec<u8> {
    let value = |noise: &mut Noise| {
        // Norms, and Llama 3.1's rotary factors (divisors, so they must stay positive).
        if name.ends_with("norm.weight") || name == "rope_freqs.weight" {
            1.0
        } else {
            noise.uniform(0.035) // ~0.02 standard deviation
        }
    };
    match dtype {
        GgmlDType::F32 => (0..elems)
            .flat_map(|_| value(noise).to_le_bytes())
            .collect(),
        GgmlDType::F16 => (0..elems)
            .flat_map(|_| half::f16::from_f32(value(noise)).to_le_bytes())
            .collect(),
        GgmlDType::BF16 => (0..elems)
            .flat_map(|_| half::bf16::from_f32(value(noise)).to_le_bytes())
            .collect(),
        q => {
            let (bs, ts) = (q.block_size(), q.type_size());
            let mut buf = vec![0u8; elems / bs * ts];
            noise.fill(&mut buf);
            let fields = scale_fields(q);
            for block in buf.chunks_exact_mut(ts) {
                for &(off, v) in fields {
                    block[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
            buf
        }
    }
}

/// Name, type and dims (candle's order: rows, columns) of one tensor to write.
type TensorSpec = (String, GgmlDType, Vec<usize>);

/// The Llama-3.1-8B tensor list (candle's dims order: rows, columns).
fn llama8b_tensors(vocab: usize) -> Vec<TensorSpec> {
    let (h, ffn, kv) = (4096, 14336, 8 * 128);
    let mut t = vec![
        (
            "token_embd.weight".to_string(),
            GgmlDType::Q4K,
            vec![vocab, h],
        ),
        ("output_norm.weight".into(), GgmlDType::F32, vec![h]),
        ("output.weight".into(), GgmlDType::Q6K, vec![vocab, h]),
    ];
    for i in 0..32 {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        t.push((b("attn_norm"), GgmlDType::F32, vec![h]));
        t.push((b("attn_q"), GgmlDType::Q4K, vec![h, h]));
        t.push((b("attn_k"), GgmlDType::Q4K, vec![kv, h]));
        t.push((b("attn_v"), GgmlDType::Q4K, vec![kv, h]));
        t.push((b("attn_output"), GgmlDType::Q4K, vec![h, h]));
        t.push((b("ffn_norm"), GgmlDType::F32, vec![h]));
        t.push((b("ffn_gate"), GgmlDType::Q4K, vec![ffn, h]));
        t.push((b("ffn_up"), GgmlDType::Q4K, vec![ffn, h]));
        t.push((b("ffn_down"), GgmlDType::Q4K, vec![h, ffn]));
    }
    t
}

fn llama8b_metadata(src: &HashMap<String, Value>, vocab: usize) -> Vec<(String, Value)> {
    let arch = match src.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => String::new(),
    };
    let mut meta: Vec<(String, Value)> = src
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "general.architecture"
                && k.as_str() != "general.alignment"
                && !k.starts_with(&format!("{arch}."))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let u = |n: usize| Value::U32(n as u32);
    meta.extend([
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.context_length".into(), u(8192)),
        ("llama.embedding_length".into(), u(4096)),
        ("llama.block_count".into(), u(32)),
        ("llama.feed_forward_length".into(), u(14336)),
        ("llama.attention.head_count".into(), u(32)),
        ("llama.attention.head_count_kv".into(), u(8)),
        ("llama.rope.dimension_count".into(), u(128)),
        ("llama.rope.freq_base".into(), Value::F32(500_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u(vocab)),
    ]);
    meta
}

/// A tensor type by its llama.cpp name (`q4_k`, `bf16`, ...).
pub fn parse_dtype(s: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match s.to_ascii_lowercase().as_str() {
        "f32" => F32,
        "f16" => F16,
        "bf16" => BF16,
        "q4_0" => Q4_0,
        "q4_1" => Q4_1,
        "q5_0" => Q5_0,
        "q5_1" => Q5_1,
        "q8_0" => Q8_0,
        "q2_k" => Q2K,
        "q3_k" => Q3K,
        "q4_k" => Q4K,
        "q5_k" => Q5K,
        "q6_k" => Q6K,
        _ => return None,
    })
}

/// Writes `out`: a GGUF with the metadata of `header` (a whole GGUF or [`write_header`]'s
/// output) and random tensors, in `header`'s layout or `shape`'s; `matrices`, when given, is
/// the type of every 2-D tensor (e.g. bf16 for a dense model of the same shape).
pub fn synthesize(
    header: &Path,
    out: &Path,
    shape: SynthShape,
    matrices: Option<GgmlDType>,
    seed: u64,
) -> Result<SynthReport> {
    let content = read_content(header)?;
    let (meta, infos): (Vec<(String, Value)>, Vec<TensorSpec>) = match shape {
        SynthShape::Like => {
            let mut infos: Vec<_> = content.tensor_infos.iter().collect();
            infos.sort_by_key(|(_, i)| i.offset);
            (
                content
                    .metadata
                    .iter()
                    // candle's writer aligns the tensor data to 32 bytes whatever this says.
                    .filter(|(k, _)| k.as_str() != "general.alignment")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                infos
                    .into_iter()
                    .map(|(n, i)| (n.clone(), i.ggml_dtype, i.shape.dims().to_vec()))
                    .collect(),
            )
        }
        SynthShape::Llama8b => {
            let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) if !t.is_empty() => t.len(),
                _ => bail!(
                    "{}: no tokenizer.ggml.tokens to take the vocabulary from",
                    header.display()
                ),
            };
            (
                llama8b_metadata(&content.metadata, vocab),
                llama8b_tensors(vocab),
            )
        }
    };
    let infos: Vec<_> = infos
        .into_iter()
        .map(|(n, d, dims)| match matrices {
            Some(m) if dims.len() == 2 => (n, m, dims),
            _ => (n, d, dims),
        })
        .collect();
    let mut noise = Noise(seed ^ 0x5EED);
    let mut tensors = Vec::with_capacity(infos.len());
    let mut tensor_bytes = 0u64;
    for (name, dtype, dims) in &infos {
        let elems: usize = dims.iter().product();
        if !elems.is_multiple_of(dtype.block_size()) {
            bail!("tensor {name}: {elems} elements do not fill {dtype:?} blocks");
        }
        let data = fill(name, *dtype, elems, &mut noise);
        tensor_bytes += data.len() as u64;
        let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, *dtype)
            .with_context(|| format!("tensor {name}"))?;
        let qt = QTensor::new(storage, Shape::from_dims(dims))
            .with_context(|| format!("tensor {name}"))?;
        tensors.push((name.as_str(), qt));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs)
        .and_then(|()| w.flush().map_err(Into::into))
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(SynthReport {
        tensors: tensors.len(),
        tensor_bytes,
    })
}
