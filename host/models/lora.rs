//! LoRA adapters: a fine-tune stored as low-rank updates `W + s * B A` of a model's projections,
//! applied at run time beside each projection it names (the base weights stay as stored,
//! quantized or not), as llama.cpp's `--lora` does. Two file forms:
//!
//! - llama.cpp's GGUF adapters (`convert_lora_to_gguf.py`): `general.type = "adapter"`,
//!   `adapter.type = "lora"`, `adapter.lora.alpha`, and per projection `NAME.weight.lora_a`
//!   (`[rank, in]`) and `NAME.weight.lora_b` (`[out, rank]`) under the base model's GGUF names;
//!   `s = scale * alpha / rank` (`scale` where alpha is 0).
//! - PEFT's directories (`adapter_config.json` + `adapter_model.safetensors`): the same pairs
//!   as `...q_proj.lora_A.weight` / `lora_B.weight` under Hugging Face names;
//!   `s = scale * lora_alpha / rank` (`/ sqrt(rank)` with `use_rslora`). On a GGUF llama, whose
//!   q and k rows llama.cpp's converter permuted, B's rows of q and k are permuted the same way
//!   (and a GGUF adapter's put back in Hugging Face's order on a Hugging Face checkpoint).
//!
//! Every pair must name a projection the model has, with its shape: an adapter for another
//! model is refused, never half applied. Adapters stack (their updates add up).

use super::error::{ModelError, Result, candle_msg};
use super::gguf::{Arch, GgufFile, ModelConfig};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One projection's update, ready to run: `y += scale * (x A^T) B^T`.
#[derive(Debug, Clone)]
pub(crate) struct LoraDelta {
    /// `[rank, in]`, f32, contiguous, on the model's device.
    a: Tensor,
    /// `[out, rank]`.
    b: Tensor,
    /// For the CPU's loops: A row-major (`[rank, in]`) and B transposed (`[rank, out]`).
    host: Arc<(Vec<f32>, Vec<f32>)>,
    scale: f32,
}

/// Output columns per work item of the CPU's update: that block of B^T's rows stays in L1
/// while every row of the forward reads it.
const COLS: usize = 256;

impl LoraDelta {
    /// `a` `[rank, in]` and `b` `[out, rank]`, f32 on the CPU, the update's tensors put on
    /// `device` (the CPU's loops read the host copies).
    fn new(a: &Tensor, b: &Tensor, scale: f64, device: &Device) -> candle_core::Result<LoraDelta> {
        let host = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        );
        Ok(LoraDelta {
            a: a.contiguous()?.to_device(device)?,
            b: b.contiguous()?.to_device(device)?,
            host: Arc::new(host),
            scale: scale as f32,
        })
    }

    /// `y + scale * (x A^T) B^T` for `x`: `[rows, in]`, `y`: `[rows, out]` (a bias comes after,
    /// as in llama.cpp).
    ///
    /// On the CPU every output is summed in one fixed order whatever the number of rows (a dot
    /// product over `in` for each of the rank values, then B's columns added in rank order): a
    /// k-row verification forward then equals k one-row forwards bit for bit, as verdict's
    /// matmuls and attention do (candle's f32 matmul picks other kernels for one row and for
    /// several, and the next layer's int8 rounding of its input would show that).
    pub(crate) fn add_to(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            let ab = x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?;
            return y + (ab * self.scale as f64)?;
        }
        let (rows, input) = x.dims2()?;
        let (out, rank) = self.b.dims2()?;
        let (a, bt) = (&self.host.0, &self.host.1);
        if a.len() != rank * input || bt.len() != rank * out || y.dims() != [rows, out] {
            candle_core::bail!(
                "LoRA update [{out}, {}] for an input of {input} and an output of {:?}",
                a.len() / rank.max(1),
                y.dims()
            );
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        // Small updates are not worth waking the pool (a rank-16 adapter's one decoding row
        // ran as fast alone; rank 64's ran ~10% faster on the pool: BENCHMARKS.md).
        let pool = rows * rank * (input + out) >= 1 << 18;
        let run = |items: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)| match pool {
            true => candle_core::utils::barrier_pool().execute_chunked(items, f),
            false => f(0..items),
        };
        // t = scale * A x, per row (work item: one A row, read once for all rows).
        let mut t = vec![0f32; rows * rank];
        let t_at = t.as_mut_ptr() as usize;
        run(rank, &|js| {
            for j in js {
                let aj = &a[j * input..(j + 1) * input];
                for (r, xr) in xs.chunks_exact(input).enumerate() {
                    // SAFETY: item j writes only column j of `t`.
                    unsafe { *(t_at as *mut f32).add(r * rank + j) = dot(aj, xr) * self.scale };
                }
            }
        });
        // delta = B t (work item: a block of outputs, B^T's rows for it in L1 for every row).
        let mut delta = vec![0f32; rows * out];
        let d_at = delta.as_mut_ptr() as usize;
        run(out.div_ceil(COLS), &|blocks| {
            for blk in blocks {
                let cols = blk * COLS..out.min((blk + 1) * COLS);
                for r in 0..rows {
                    // SAFETY: item blk writes only its columns of each row.
                    let dr = unsafe {
                        std::slice::from_raw_parts_mut(
                            (d_at as *mut f32).add(r * out + cols.start),
                            cols.len(),
                        )
                    };
                    add_columns(dr, &t[r * rank..(r + 1) * rank], bt, out, cols.start);
                }
            }
        });
        y + Tensor::from_vec(delta, (rows, out), x.device())?
    }
}

/// `d[c] = sum_j t[j] * bt[j][from + c]` over `j` in ascending order, a multiply-add each: the
/// same order for every row, whatever else a forward computes. Sixteen outputs at a time stay
/// in registers while the rank runs.
fn add_columns(d: &mut [f32], t: &[f32], bt: &[f32], out: usize, from: usize) {
    const W: usize = 16;
    let mut chunks = d.chunks_exact_mut(W);
    let mut c0 = from;
    for dc in chunks.by_ref() {
        let mut acc = [0f32; W];
        for (j, &tj) in t.iter().enumerate() {
            let b = &bt[j * out + c0..j * out + c0 + W];
            for i in 0..W {
                acc[i] = tj.mul_add(b[i], acc[i]);
            }
        }
        dc.copy_from_slice(&acc);
        c0 += W;
    }
    for (i, dc) in chunks.into_remainder().iter_mut().enumerate() {
        let mut acc = 0f32;
        for (j, &tj) in t.iter().enumerate() {
            acc = tj.mul_add(bt[j * out + c0 + i], acc);
        }
        *dc = acc;
    }
}

/// A dot product in one fixed order (32 running multiply-adds, summed as a fixed tree, then
/// the tail), which the compiler turns into vector FMAs.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Which file form an adapter came from: its pairs' names are GGUF names, or Hugging Face ones.
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// `general.architecture` of the adapter.
    Gguf {
        arch: String,
    },
    Peft,
}

/// One pair as read: `a` `[rank, in]`, `b` `[out, rank]`, f32 on the CPU, and its scale.
#[derive(Debug, Clone)]
struct Pair {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// A LoRA adapter read from a file, not yet tied to a model ([`super::Model::with_lora`]).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    path: PathBuf,
    form: Form,
    /// By the base tensor's name without `.weight` (`blk.0.attn_q`, `model.layers.0.self_attn.q_proj`).
    pairs: BTreeMap<String, Pair>,
}

impl LoraAdapter {
    /// Reads the adapter at `path` (a GGUF file, or a PEFT directory) with its updates
    /// multiplied by `scale` (1: as trained; 0: off).
    pub fn load(path: &Path, scale: f32) -> Result<LoraAdapter> {
        if !scale.is_finite() {
            return Err(ModelError::Invalid(format!(
                "LoRA adapter {}: the scale {scale} is not a finite number",
                path.display()
            )));
        }
        if !path.exists() {
            return Err(ModelError::Invalid(format!(
                "LoRA adapter {}: no such file or directory (a GGUF adapter, or a PEFT directory)",
                path.display()
            )));
        }
        if path.is_dir() {
            load_peft(path, scale as f64)
        } else {
            load_gguf(path, scale as f64)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The projections it updates.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn tensor_err(&self, tensor: &str, reason: String) -> ModelError {
        ModelError::Tensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            reason,
        }
    }
}

fn load_gguf(path: &Path, scale: f64) -> Result<LoraAdapter> {
    let file = GgufFile::open(path)?;
    let meta = |key: &str, reason: String| ModelError::Metadata {
        path: path.to_path_buf(),
        key: key.into(),
        reason,
    };
    let kind = file.get_str("general.type").unwrap_or("model");
    if kind != "adapter" {
        return Err(meta(
            "general.type",
            format!("\"{kind}\": not a LoRA adapter (a model file? pass the base with --model)"),
        ));
    }
    let ty = file.get_str("adapter.type")?;
    if ty != "lora" {
        return Err(meta(
            "adapter.type",
            format!("\"{ty}\": only \"lora\" adapters are supported"),
        ));
    }
    let arch = file.get_str("general.architecture")?.to_string();
    let alpha = match file.content().metadata.contains_key("adapter.lora.alpha") {
        true => file.get_f32("adapter.lora.alpha")? as f64,
        false => 0.0,
    };
    if !alpha.is_finite() {
        return Err(meta("adapter.lora.alpha", format!("{alpha} is not finite")));
    }
    // Halves by base name, each its tensor's name in the file.
    let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    let mut names: Vec<&String> = file.content().tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let (base, half) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, 0),
            (_, Some(b)) => (b, 1),
            // llama.cpp skips norm vectors in adapters, and so does verdict.
            _ if name.ends_with("_norm.weight") => continue,
            _ => {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    reason: "neither .lora_a nor .lora_b: not a LoRA tensor".into(),
                });
            }
        };
        let base = base.strip_suffix(".weight").unwrap_or(base);
        halves.entry(base.to_string()).or_default()[half] = Some(name.clone());
    }
    let read = |name: &str| -> Result<Tensor> {
        file.tensor(name, &Device::Cpu)?
            .dequantize(&Device::Cpu)
            .map_err(|e| ModelError::Tensor {
                path: path.to_path_buf(),
                tensor: name.into(),
                reason: candle_msg(&e),
            })
    };
    let mut pairs = BTreeMap::new();
    for (base, [a, b]) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                tensor: format!("{base}.weight"),
                reason: "has only one of lora_a and lora_b".into(),
            });
        };
        let (a, b) = (read(&a)?, read(&b)?);
        let pair = pair(path, &format!("{base}.weight"), a, b, |rank| match alpha {
            0.0 => scale,
            _ => scale * alpha / rank as f64,
        })?;
        pairs.insert(base, pair);
    }
    Ok(LoraAdapter {
        path: path.to_path_buf(),
        form: Form::Gguf { arch },
        pairs,
    })
}

/// Checks that `a` (`[rank, in]`) and `b` (`[out, rank]`) make a pair.
fn pair(
    path: &Path,
    tensor: &str,
    a: Tensor,
    b: Tensor,
    scale_of_rank: impl Fn(usize) -> f64,
) -> Result<Pair> {
    let err = |reason: String| ModelError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        reason,
    };
    let (Ok((ra, _)), Ok((_, rb))) = (a.dims2(), b.dims2()) else {
        return Err(err(format!(
            "lora_a {:?} and lora_b {:?} must be matrices",
            a.dims(),
            b.dims()
        )));
    };
    if ra != rb || ra == 0 {
        return Err(err(format!(
            "lora_a {:?} and lora_b {:?} do not share a rank (lora_a is [rank, in], lora_b [out, rank])",
            a.dims(),
            b.dims()
        )));
    }
    let to_f32 = |t: Tensor| t.to_dtype(DType::F32).map_err(|e| err(candle_msg(&e)));
    let (a, b) = (to_f32(a)?, to_f32(b)?);
    for (t, what) in [(&a, "lora_a"), (&b, "lora_b")] {
        let finite = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| err(candle_msg(&e)))?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            return Err(err(format!("{what} holds a value that is not finite")));
        }
    }
    Ok(Pair {
        a,
        b,
        scale: scale_of_rank(ra),
    })
}

fn load_peft(dir: &Path, scale: f64) -> Result<LoraAdapter> {
    use serde_json::Value;
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|cause| ModelError::Open {
        path: cfg_path.clone(),
        cause,
    })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
        path: cfg_path.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let meta = |key: &str, reason: String| ModelError::Metadata {
        path: cfg_path.clone(),
        key: key.into(),
        reason,
    };
    if let Some(t) = cfg.get("peft_type").and_then(Value::as_str)
        && t != "LORA"
    {
        return Err(meta(
            "peft_type",
            format!("\"{t}\": only LORA adapters are supported"),
        ));
    }
    // What this reader does not apply is refused, not ignored.
    let set = |key: &str| match cfg.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !(s.is_empty() || s == "none"),
        Some(_) => true,
    };
    for (key, why) in [
        ("use_dora", "DoRA's magnitude vectors are not supported"),
        (
            "modules_to_save",
            "whole replaced modules are not supported",
        ),
        ("alpha_pattern", "an alpha per module is not supported"),
        (
            "fan_in_fan_out",
            "Conv1D (fan_in_fan_out) layouts are not supported",
        ),
        ("bias", "trained biases are not supported"),
        ("layers_pattern", "layers_pattern is not supported"),
    ] {
        if set(key) {
            return Err(meta(key, format!("{}: {why}", cfg[key])));
        }
    }
    let alpha = cfg
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| meta("lora_alpha", "missing or not a number".into()))?;
    if !alpha.is_finite() {
        return Err(meta("lora_alpha", format!("{alpha} is not finite")));
    }
    let rslora = cfg.get("use_rslora").and_then(Value::as_bool) == Some(true);
    let st = dir.join("adapter_model.safetensors");
    if !st.exists() && dir.join("adapter_model.bin").exists() {
        return Err(ModelError::Open {
            path: dir.join("adapter_model.bin"),
            cause: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "PyTorch pickles are not read; save the adapter as safetensors",
            ),
        });
    }
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).map_err(|e| match e {
        candle_core::Error::Io(cause) => ModelError::Open {
            path: st.clone(),
            cause,
        },
        e => ModelError::Corrupt {
            path: st.clone(),
            reason: format!("cannot read safetensors: {}", candle_msg(&e)),
        },
    })?;
    let mut halves: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let module = name.strip_prefix("base_model.model.").unwrap_or(name);
        let (base, half) = match (
            module.strip_suffix(".lora_A.weight"),
            module.strip_suffix(".lora_B.weight"),
        ) {
            (Some(b), _) => (b, 0),
            (_, Some(b)) => (b, 1),
            _ if module.contains("lora_embedding_") => {
                return Err(ModelError::Tensor {
                    path: st.clone(),
                    tensor: name.clone(),
                    reason: "LoRA on the token embeddings is not supported".into(),
                });
            }
            _ => {
                return Err(ModelError::Tensor {
                    path: st.clone(),
                    tensor: name.clone(),
                    reason: "neither lora_A nor lora_B: not a LoRA weight".into(),
                });
            }
        };
        halves.entry(base.to_string()).or_default()[half] = Some(tensors[name].clone());
    }
    let mut pairs = BTreeMap::new();
    for (base, [a, b]) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(ModelError::Tensor {
                path: st.clone(),
                tensor: base,
                reason: "has only one of lora_A and lora_B".into(),
            });
        };
        let pair = pair(&st, &base, a, b, |rank| match rslora {
            true => scale * alpha / (rank as f64).sqrt(),
            false => scale * alpha / rank as f64,
        })?;
        pairs.insert(base, pair);
    }
    Ok(LoraAdapter {
        path: dir.to_path_buf(),
        form: Form::Peft,
        pairs,
    })
}

/// What a model offers adapters: its config, and whether it came from a GGUF (its names, and
/// llama's permuted q / k rows).
pub(crate) struct Base<'a> {
    pub(crate) cfg: &'a ModelConfig,
    pub(crate) from_gguf: bool,
    pub(crate) device: &'a Device,
}

/// A projection an adapter may update: verdict's name for it (`blk.N.attn_q`, `output`, the
/// GGUF name without `.weight`), its `[out, in]`, and the parts it splits into where the model
/// stores it fused (phi3's `attn_qkv`, `ffn_up`): each part's name and rows.
struct Slot {
    parts: Vec<(String, usize)>,
    input: usize,
    /// Hugging Face's module name, where the adapter is PEFT's.
    hf: String,
    /// llama's q or k (heads), whose rows a GGUF permutes.
    permuted_heads: Option<usize>,
}

/// The projections of `base`, by the name each adapter form uses.
fn slots(base: &Base) -> BTreeMap<String, Slot> {
    let c = base.cfg;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q_out, kv_out, i) = (c.n_heads * hd, c.n_kv_heads * hd, c.intermediate);
    let hf_name = super::safetensors::hf_layer_names(c.arch, c.experts.is_some());
    let hf = |l: usize, s: &str| {
        let n = hf_name(l, s);
        n.strip_suffix(".weight").unwrap_or(&n).to_string()
    };
    // llama.cpp's converter permutes these families' q / k rows (and so an adapter's B rows).
    let permutes = matches!(c.arch, Arch::Llama | Arch::Granite | Arch::Smollm3);
    let mut out = BTreeMap::new();
    let one = |name: String, o: usize, input: usize, hf: String| Slot {
        parts: vec![(name, o)],
        input,
        hf,
        permuted_heads: None,
    };
    if !c.tied_embeddings {
        out.insert(
            "output".into(),
            one("output".into(), c.vocab_size, h, "lm_head".into()),
        );
    }
    for l in 0..c.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        let mut add = |s: &str, slot: Slot| {
            out.insert(n(s), slot);
        };
        if c.arch == Arch::Phi3 {
            add(
                "attn_qkv",
                Slot {
                    parts: vec![
                        (n("attn_q"), q_out),
                        (n("attn_k"), kv_out),
                        (n("attn_v"), kv_out),
                    ],
                    input: h,
                    hf: hf(l, "attn_qkv"),
                    permuted_heads: None,
                },
            );
        } else {
            for (s, o, heads) in [
                ("attn_q", q_out, c.n_heads),
                ("attn_k", kv_out, c.n_kv_heads),
                ("attn_v", kv_out, 0),
            ] {
                let mut slot = one(n(s), o, h, hf(l, s));
                slot.permuted_heads = (permutes && heads > 0).then_some(heads);
                add(s, slot);
            }
        }
        add(
            "attn_output",
            one(n("attn_output"), h, q_out, hf(l, "attn_output")),
        );
        match c.experts {
            Some(e) => {
                add(
                    "ffn_gate_inp",
                    one(n("ffn_gate_inp"), e.count, h, hf(l, "ffn_gate_inp")),
                );
                if let Some(si) = e.shared {
                    for (s, o, input) in [
                        ("ffn_gate_shexp", si, h),
                        ("ffn_up_shexp", si, h),
                        ("ffn_down_shexp", h, si),
                    ] {
                        add(s, one(n(s), o, input, hf(l, s)));
                    }
                }
            }
            None if c.arch == Arch::Phi3 => {
                add(
                    "ffn_up",
                    Slot {
                        parts: vec![(n("ffn_gate"), i), (n("ffn_up"), i)],
                        input: h,
                        hf: hf(l, super::transformer::FFN_GATE_UP),
                        permuted_heads: None,
                    },
                );
                add("ffn_down", one(n("ffn_down"), h, i, hf(l, "ffn_down")));
            }
            None => {
                let mut mlp = vec![("ffn_up", i, h), ("ffn_down", h, i)];
                if c.gated_mlp {
                    mlp.push(("ffn_gate", i, h));
                }
                for (s, o, input) in mlp {
                    add(s, one(n(s), o, input, hf(l, s)));
                }
            }
        }
    }
    out
}

/// The updates of `adapters` on `base`, by verdict's name of each projection (a fused one's
/// split into its parts). Errors name the adapter and the tensor that does not fit.
pub(crate) fn resolve(
    adapters: &[LoraAdapter],
    base: &Base,
) -> Result<HashMap<String, Vec<LoraDelta>>> {
    let slots = slots(base);
    let by_hf: HashMap<&str, &str> = slots
        .iter()
        .map(|(k, s)| (s.hf.as_str(), k.as_str()))
        .collect();
    let mut out: HashMap<String, Vec<LoraDelta>> = HashMap::new();
    for ad in adapters {
        if let Form::Gguf { arch } = &ad.form
            && arch != base.cfg.arch.name()
        {
            return Err(ModelError::Metadata {
                path: ad.path.clone(),
                key: "general.architecture".into(),
                reason: format!(
                    "the adapter is for a {arch} model, the model is {}",
                    base.cfg.arch.name()
                ),
            });
        }
        for (name, p) in &ad.pairs {
            let key = match ad.form {
                Form::Gguf { .. } => Some(name.as_str()),
                Form::Peft => by_hf.get(name.as_str()).copied(),
            };
            let shown = match ad.form {
                Form::Gguf { .. } => format!("{name}.weight"),
                Form::Peft => name.clone(),
            };
            let Some(slot) = key.and_then(|k| slots.get(k)) else {
                let why = if name.contains("token_embd") || name.contains("embed_tokens") {
                    "LoRA on the token embeddings is not supported".to_string()
                } else if name.contains("_exps") || name.contains(".experts.") {
                    "LoRA on a mixture's experts is not supported".to_string()
                } else if name == "output" && base.cfg.tied_embeddings {
                    "the model has no output matrix of its own (tied embeddings)".to_string()
                } else {
                    format!(
                        "the {} model has no such projection (an adapter for another model?)",
                        base.cfg.arch.name()
                    )
                };
                return Err(ad.tensor_err(&shown, why));
            };
            let (_, input) =
                p.a.dims2()
                    .map_err(|e| ad.tensor_err(&shown, e.to_string()))?;
            let (out_rows, _) =
                p.b.dims2()
                    .map_err(|e| ad.tensor_err(&shown, e.to_string()))?;
            let slot_out: usize = slot.parts.iter().map(|(_, rows)| rows).sum();
            if input != slot.input || out_rows != slot_out {
                return Err(ad.tensor_err(
                    &shown,
                    format!(
                        "updates [{out_rows}, {input}], the model's projection is [{}, {}] (an adapter for another model?)",
                        slot_out, slot.input
                    ),
                ));
            }
            let fail = |e: candle_core::Error| ad.tensor_err(&shown, candle_msg(&e));
            // B's q / k rows in the model's order: a PEFT adapter's (Hugging Face's order) on
            // a GGUF model permuted, a GGUF adapter's on a Hugging Face checkpoint put back.
            let b = match (&ad.form, slot.permuted_heads) {
                (Form::Peft, Some(heads)) if base.from_gguf => {
                    permute_for_interleaved(&p.b, heads).map_err(fail)?
                }
                (Form::Gguf { .. }, Some(heads)) if !base.from_gguf => {
                    unpermute_for_interleaved(&p.b, heads).map_err(fail)?
                }
                _ => p.b.clone(),
            };
            let mut at = 0;
            for (part, rows) in &slot.parts {
                let b = b.narrow(0, at, *rows).map_err(fail)?;
                at += rows;
                out.entry(part.clone())
                    .or_default()
                    .push(LoraDelta::new(&p.a, &b, p.scale, base.device).map_err(fail)?);
            }
        }
    }
    Ok(out)
}

/// Hugging Face's q / k rows in llama.cpp's order for llama (adjacent pairs rotate together):
/// within each head, row `j * d/2 + i` moves to `2 i + j`.
pub(crate) fn permute_for_interleaved(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let d = rows / heads;
    t.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The inverse of [`permute_for_interleaved`]: llama.cpp's q / k rows back in Hugging Face's
/// order.
pub(crate) fn unpermute_for_interleaved(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let d = rows / heads;
    t.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's loops (one row, and several on the pool) give the tensor ops' update within
    /// f32 rounding, on shapes with tails (inputs not a multiple of 32, outputs not of 16).
    #[test]
    fn cpu_update_equals_the_matmuls() {
        let dev = Device::Cpu;
        let (rank, input, out, rows) = (12, 333, 1000, 9);
        let rand = |n: usize, seed: u64| -> Vec<f32> {
            (0..n as u64)
                .map(|i| {
                    let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        let a = Tensor::from_vec(rand(rank * input, 1), (rank, input), &dev).unwrap();
        let b = Tensor::from_vec(rand(out * rank, 2), (out, rank), &dev).unwrap();
        let d = LoraDelta::new(&a, &b, 0.75, &dev).unwrap();
        for n in [1, rows] {
            let x = Tensor::from_vec(rand(n * input, 3), (n, input), &dev).unwrap();
            let y = Tensor::from_vec(rand(n * out, 4), (n, out), &dev).unwrap();
            let got = d.add_to(&x, y.clone()).unwrap();
            let want = (y
                + (x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap())).unwrap() * 0.75)
                .unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{n} rows: {diff}");
        }
    }
}
