//! The llama / qwen2 decoder on candle-core with quantized weights, and per-sequence sessions.
//!
//! [`Model`] holds the weights (shared, `Arc`'d, read-only); a [`Session`] holds one sequence's
//! KV cache and runs `forward` over new tokens appended at its current length. Sessions over the
//! same model are independent, so a drafter and a verifier (or several requests) share weights.
//!
//! Weights stay in their GGUF quantization (`QMatMul`): the CPU kernels dot quantized rows against
//! the activations directly. GQA never copies K/V: the query heads of one group are stacked as
//! extra rows of one matmul against their shared K/V head.

use super::error::{CandleContext, ModelError, Result, candle_msg};
use super::gguf::{GgufFile, ModelConfig, RopeStyle};
use super::kv_cache::KvCache;
use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A projection: quantized (or f32) weight `[out, in]` plus an optional bias `[out]`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) w: QMatMul,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.w.forward(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

#[derive(Debug)]
pub(crate) struct Weights {
    pub(crate) cfg: ModelConfig,
    pub(crate) embed: QMatMul,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: QMatMul,
    /// 1 / theta^(2i/d) for i in 0..d/2: the rotary angle per position of each pair.
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) device: Device,
    pub(crate) gguf: Option<gguf_file::Content>,
    pub(crate) source: PathBuf,
}

/// Which rows of logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Only the last new position (the lm_head runs on one row: the cheap case for drafting).
    Last,
    /// Every new position (verification).
    All,
}

/// Output of [`Session::forward`].
#[derive(Debug, Clone)]
pub struct Forward {
    /// `[rows, vocab]`, f32.
    pub logits: Tensor,
    /// `[rows, hidden]`, f32: the last hidden state after the final norm (the judge's input).
    pub hidden: Tensor,
}

/// A loaded decoder. Cheap to clone (weights are shared); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Model {
    w: Arc<Weights>,
}

/// Where a weight comes from: GGUF tensors or safetensors, behind one interface so that both
/// loaders build the same [`Weights`].
pub(crate) trait WeightSource {
    fn path(&self) -> &Path;
    fn has(&self, name: &str) -> bool;
    /// Shape in candle order (`[out, in]`).
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A matrix kept in its stored quantization.
    fn matrix(&self, name: &str, device: &Device) -> Result<QMatMul>;
    /// A small tensor (norm weight, bias) as f32.
    fn vector(&self, name: &str, device: &Device) -> Result<Tensor>;
}

/// Tensor names of one checkpoint family.
pub(crate) struct Names {
    pub(crate) embed: &'static str,
    pub(crate) norm: &'static str,
    pub(crate) lm_head: &'static str,
    pub(crate) layer: fn(usize, &str) -> String,
}

pub(crate) fn check_shape(src: &dyn WeightSource, name: &str, expect: &[usize]) -> Result<()> {
    match src.shape(name) {
        None => Err(ModelError::Tensor {
            path: src.path().to_path_buf(),
            tensor: name.to_string(),
            reason: "missing from the file".into(),
        }),
        Some(s) if s == expect => Ok(()),
        Some(s) => Err(ModelError::Tensor {
            path: src.path().to_path_buf(),
            tensor: name.to_string(),
            reason: format!("shape {s:?}, the config implies {expect:?}"),
        }),
    }
}

impl Weights {
    /// Builds the weights of `cfg` from `src`, checking every shape against the config.
    pub(crate) fn build(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        names: &Names,
        device: &Device,
        gguf: Option<gguf_file::Content>,
    ) -> Result<Weights> {
        let c = &cfg;
        let (h, d, q_out, kv_out) = (
            c.hidden_size,
            c.head_dim,
            c.n_heads * c.head_dim,
            c.n_kv_heads * c.head_dim,
        );
        check_shape(src, names.embed, &[c.vocab_size, h])?;
        let embed = src.matrix(names.embed, device)?;
        let lm_head = if c.tied_embeddings {
            embed.clone()
        } else {
            check_shape(src, names.lm_head, &[c.vocab_size, h])?;
            src.matrix(names.lm_head, device)?
        };
        check_shape(src, names.norm, &[h])?;
        let norm = src.vector(names.norm, device)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| (names.layer)(i, s);
            let lin = |w: &str, b: Option<&str>, shape: [usize; 2]| -> Result<Linear> {
                let wn = n(w);
                check_shape(src, &wn, &shape)?;
                let bias = match b.map(&n) {
                    Some(bn) if src.has(&bn) => {
                        check_shape(src, &bn, &shape[..1])?;
                        Some(src.vector(&bn, device)?)
                    }
                    _ => None,
                };
                Ok(Linear {
                    w: src.matrix(&wn, device)?,
                    b: bias,
                })
            };
            let vec = |s: &str| -> Result<Tensor> {
                let name = n(s);
                check_shape(src, &name, &[h])?;
                src.vector(&name, device)
            };
            layers.push(Layer {
                attn_norm: vec("attn_norm")?,
                q: lin("attn_q", Some("attn_q.bias"), [q_out, h])?,
                k: lin("attn_k", Some("attn_k.bias"), [kv_out, h])?,
                v: lin("attn_v", Some("attn_v.bias"), [kv_out, h])?,
                o: lin("attn_output", None, [h, q_out])?,
                ffn_norm: vec("ffn_norm")?,
                gate: lin("ffn_gate", None, [c.intermediate, h])?,
                up: lin("ffn_up", None, [c.intermediate, h])?,
                down: lin("ffn_down", None, [h, c.intermediate])?,
            });
        }
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / d as f32))
            .collect();
        Ok(Weights {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            gguf,
            source: src.path().to_path_buf(),
        })
    }
}

struct GgufSource<'a> {
    file: &'a GgufFile,
}

impl WeightSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn has(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.tensor_shape(name).map(|s| s.to_vec())
    }
    fn matrix(&self, name: &str, device: &Device) -> Result<QMatMul> {
        let t = self.file.tensor(name, device)?;
        QMatMul::from_arc(Arc::new(t)).map_err(|e| ModelError::Tensor {
            path: self.path().to_path_buf(),
            tensor: name.to_string(),
            reason: candle_msg(&e),
        })
    }
    fn vector(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t: QTensor = self.file.tensor(name, device)?;
        t.dequantize(device).map_err(|e| ModelError::Tensor {
            path: self.path().to_path_buf(),
            tensor: name.to_string(),
            reason: candle_msg(&e),
        })
    }
}

/// GGUF names: `blk.N.attn_q.weight`, biases `blk.N.attn_q.bias`.
fn gguf_layer_name(i: usize, s: &str) -> String {
    if s.ends_with(".bias") {
        format!("blk.{i}.{s}")
    } else {
        format!("blk.{i}.{s}.weight")
    }
}

impl Model {
    /// Loads a llama or qwen2 GGUF, keeping each matrix in its stored quantization.
    pub fn load_gguf(path: &Path, device: &Device) -> Result<Model> {
        let file = GgufFile::open(path)?;
        let cfg = file.config()?;
        let names = Names {
            embed: "token_embd.weight",
            norm: "output_norm.weight",
            lm_head: "output.weight",
            layer: gguf_layer_name,
        };
        let w = Weights::build(cfg, &GgufSource { file: &file }, &names, device, None)?;
        let content = file.into_content();
        Ok(Model {
            w: Arc::new(Weights {
                gguf: Some(content),
                ..w
            }),
        })
    }

    /// Loads a Hugging Face checkpoint directory (`config.json` + `*.safetensors`, llama or
    /// qwen2 tensor names). Weights are converted to f32.
    pub fn load_safetensors(dir: &Path, device: &Device) -> Result<Model> {
        let w = super::safetensors::load(dir, device)?;
        Ok(Model { w: Arc::new(w) })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.w.cfg
    }

    pub fn device(&self) -> &Device {
        &self.w.device
    }

    /// The file or directory the weights came from.
    pub fn source(&self) -> &Path {
        &self.w.source
    }

    /// GGUF metadata (tokenizer, chat template); `None` for safetensors models.
    pub fn gguf_metadata(&self) -> Option<&gguf_file::Content> {
        self.w.gguf.as_ref()
    }

    /// A new sequence over all layers.
    pub fn session(&self) -> Session {
        Session {
            w: self.w.clone(),
            n_layers: self.w.cfg.n_layers,
            cache: KvCache::new(
                self.w.cfg.n_layers,
                self.w.cfg.n_kv_heads,
                self.w.cfg.head_dim,
                self.w.cfg.context_length,
                &self.w.device,
            ),
        }
    }

    /// A sequence that runs only the first `n` layers, then the final norm and lm_head (the
    /// layer-skip self-draft). `n` must be in `1..=n_layers`.
    pub fn session_layers(&self, n: usize) -> Result<Session> {
        let total = self.w.cfg.n_layers;
        if n == 0 || n > total {
            return Err(ModelError::Invalid(format!(
                "session_layers({n}): the model has {total} layers, choose 1..={total}"
            )));
        }
        let mut s = self.session();
        s.n_layers = n;
        s.cache = KvCache::new(
            n,
            self.w.cfg.n_kv_heads,
            self.w.cfg.head_dim,
            self.w.cfg.context_length,
            &self.w.device,
        );
        Ok(s)
    }
}

/// One sequence: its KV cache and position. `Send + Sync`; use from one thread at a time.
#[derive(Debug)]
pub struct Session {
    w: Arc<Weights>,
    n_layers: usize,
    cache: KvCache,
}

impl Session {
    /// Number of positions in the KV cache (the next token goes at this position).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The model's context length: `len() + new tokens` may not exceed it.
    pub fn max_len(&self) -> usize {
        self.cache.max_len()
    }

    /// Layers this session runs (all, or the first n for a self-draft).
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn config(&self) -> &ModelConfig {
        &self.w.cfg
    }

    /// An independent copy of this session (deep-copies the KV cache): e.g. a shared prompt
    /// prefix continued two ways.
    pub fn fork(&self) -> Result<Session> {
        Ok(Session {
            w: self.w.clone(),
            n_layers: self.n_layers,
            cache: self.cache.fork()?,
        })
    }

    /// Rolls the KV cache back to `len` positions (speculation rejected the rest).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)
    }

    /// Runs `tokens` at positions `len()..len() + tokens.len()` and appends them to the cache.
    pub fn forward(&mut self, tokens: &[u32], rows: Rows) -> Result<Forward> {
        let cfg = &self.w.cfg;
        if tokens.is_empty() {
            return Err(ModelError::Invalid("forward over zero tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let n = tokens.len();
        let pos = self.cache.len();
        self.cache.reserve(n)?;
        let out = self
            .run(tokens, pos, rows)
            .ctx(|| format!("forward of {n} tokens at position {pos}"))?;
        self.cache.commit(n);
        Ok(out)
    }

    fn run(&mut self, tokens: &[u32], pos: usize, rows: Rows) -> candle_core::Result<Forward> {
        let w = self.w.clone();
        let cfg = &w.cfg;
        let dev = &w.device;
        let n = tokens.len();
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let group = nh / nkv;

        let ids = Tensor::new(tokens, dev)?;
        let mut x = w.embed.embedding(&ids)?; // [n, hidden]
        let (cos, sin) = rope_tables(&w.inv_freq, pos, n, dev)?;
        let mask = if n > 1 {
            Some(causal_mask(n, pos, dev)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();

        for (li, layer) in w.layers.iter().take(self.n_layers).enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let q = layer.q.forward(&h)?;
            let k = layer.k.forward(&h)?;
            let v = layer.v.forward(&h)?;
            // [n, heads*hd] -> [1, heads, n, hd]
            let q = q
                .reshape((n, nh, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let k = k
                .reshape((n, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let v = v.reshape((n, nkv, hd))?.transpose(0, 1)?.contiguous()?;
            let (q, k) = match cfg.rope {
                RopeStyle::Interleaved => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                RopeStyle::Neox => (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                ),
            };
            let k = k.squeeze(0)?;
            let (k_all, v_all) = self
                .cache
                .append(li, &k, &v)
                .map_err(candle_core::Error::wrap)?;
            // The `group` query heads sharing one kv head become rows of one matmul.
            let q = (q.reshape((nkv, group * n, hd))? * scale)?;
            let att = q.matmul(&k_all.t()?)?; // [nkv, group*n, L]
            let att = match &mask {
                Some(m) => {
                    let l = att.dim(D::Minus1)?;
                    att.reshape((nkv, group, n, l))?
                        .broadcast_add(m)?
                        .reshape((nkv, group * n, l))?
                }
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v_all)?; // [nkv, group*n, hd]
            let y = y
                .reshape((nh, n, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, nh * hd))?;
            x = (x + layer.o.forward(&y)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let g = layer.gate.forward(&h)?;
            let u = layer.up.forward(&h)?;
            let m = (g.silu()? * u)?;
            x = (x + layer.down.forward(&m)?)?;
        }
        let x = match rows {
            Rows::Last if n > 1 => x.narrow(0, n - 1, 1)?.contiguous()?,
            _ => x,
        };
        let hidden = candle_nn::ops::rms_norm(&x, &w.norm, cfg.rms_eps)?;
        let logits = w.lm_head.forward(&hidden)?.to_dtype(DType::F32)?;
        Ok(Forward { logits, hidden })
    }
}

/// cos/sin `[n, head_dim/2]` for positions `pos..pos+n`.
fn rope_tables(
    inv_freq: &[f32],
    pos: usize,
    n: usize,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in pos..pos + n {
        for &f in inv_freq {
            // f64 angle: positions in the tens of thousands lose precision in f32.
            let a = p as f64 * f as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), dev)?,
        Tensor::from_vec(sin, (n, half), dev)?,
    ))
}

/// `[n, pos+n]`: 0 where new row i may attend key j (j <= pos + i), -inf after.
fn causal_mask(n: usize, pos: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let l = pos + n;
    let mut m = vec![0f32; n * l];
    for i in 0..n {
        for v in &mut m[i * l + pos + i + 1..(i + 1) * l] {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (n, l), dev)
}
