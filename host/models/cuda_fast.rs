//! The decoder forward on a CUDA device without candle's per-op overhead (kernels/decode.cu).
//!
//! On an H200, decoding through candle's ops was bound by the host queueing ~35 kernels per layer
//! (5-8 ms per token at every model size, BENCHMARKS.md). Here a session owns every buffer a
//! forward touches (activations, its KV cache, the token ids and position in device memory), a
//! layer is 10 launches (norm, q, k, v, rotary + cache write, attention, output, norm, gate/up/silu,
//! down) that read the weights in their GGUF quantization, and a forward of a given shape is
//! captured once as a CUDA graph and replayed: one launch per step. Weights are multiplied in
//! f32 with f32 activations (dequantized in registers), so logits match the CPU forward of the
//! dequantized weights to ~1e-6 relative (tests/kernels.rs).
//!
//! Scope: unsharded llama / qwen2 GGUF models whose matrices are F32, F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q8_0, Q4_K, Q5_K or Q6_K, head size <= 256. [`FastWeights::load`] says why it does not
//! apply otherwise, and the model keeps candle's path. Sessions on this path are not batched
//! across requests (each runs on its own stream). `VERDICT_CUDA_FAST=0` turns the path off,
//! `VERDICT_CUDA_GRAPHS=0` keeps it but launches each kernel (to measure what graphs save);
//! `VERDICT_CUDA_ROWS` and `VERDICT_CUDA_SPLIT_K` pick matvec kernel variants, for comparing
//! them on a device (`MultiRow`, `SPLIT_K`).
//!
//! The weights are uploaded a second time beside candle's copy (the candle model still serves
//! batching, sharding and the dequantized f32 copy), regrouped so that the kernels read each
//! block's quants with wide loads (`regroup`).

#[cfg(feature = "cuda")]
pub(crate) use imp::{FastSession, FastWeights};
#[cfg(not(feature = "cuda"))]
pub(crate) use stub::{FastSession, FastWeights};

/// Rows one pass of the kernels takes; longer inputs (prompts) run in passes of this many.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const MAX_ROWS: usize = 32;

#[cfg(not(feature = "cuda"))]
mod stub {
    //! Without the `cuda` feature the path cannot exist: uninhabited types, so the code that
    //! holds them compiles the same and every use is statically dead.
    use super::super::error::Result;
    use super::super::gguf::{GgufFile, ModelConfig};
    use super::super::rope::Rotary;
    use super::super::transformer::{Forward, Rows};
    use candle_core::Device;
    use std::sync::Arc;

    #[derive(Debug)]
    pub(crate) enum FastWeights {}
    #[derive(Debug)]
    pub(crate) enum FastSession {}

    impl FastWeights {
        pub(crate) fn load(
            _: &GgufFile,
            _: &ModelConfig,
            _: &Rotary,
            _: &Device,
        ) -> Result<Option<Arc<FastWeights>>> {
            Ok(None)
        }
    }

    impl FastSession {
        pub(crate) fn new(w: &Arc<FastWeights>, _: usize, _: usize) -> Result<FastSession> {
            match **w {}
        }
        pub(crate) fn len(&self) -> usize {
            match *self {}
        }
        pub(crate) fn truncate(&mut self, _: usize) -> Result<()> {
            match *self {}
        }
        pub(crate) fn fork(&self) -> Result<FastSession> {
            match *self {}
        }
        pub(crate) fn forward(&mut self, _: &[u32], _: Rows) -> Result<Forward> {
            match *self {}
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::error::{ModelError, Result};
    use super::super::gguf::{Arch, GgufFile, ModelConfig, NormKind, RopeStyle};
    use super::super::rope::Rotary;
    use super::super::transformer::{Forward, Rows};
    use super::MAX_ROWS;
    use candle_core::op::BackpropOp;
    use candle_core::quantized::GgmlDType;
    use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};
    use cudarc::driver::{
        CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
        result, sys,
    };
    use std::collections::HashMap;
    use std::sync::Arc;

    /// kernels/decode.cu as PTX (build.rs).
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
    const MODULE: &str = "verdict_decode";
    /// `MV_WARPS`, `MVS_WARPS` and `THREADS` in kernels/decode.cu.
    const MV_WARPS: usize = 4;
    const MVS_WARPS: usize = 8;
    const THREADS: u32 = 128;
    /// Graphs kept per session (one per forward shape: rows, and which rows give logits).
    const MAX_GRAPHS: usize = 16;

    fn dev_err(what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Device(format!("{what}: {e}"))
    }

    /// The kernel name suffix of a stored type, or `None` where decode.cu has no kernel.
    fn kind(t: GgmlDType) -> Option<&'static str> {
        Some(match t {
            GgmlDType::F32 => "f32",
            GgmlDType::F16 => "f16",
            GgmlDType::BF16 => "bf16",
            GgmlDType::Q4_0 => "q4_0",
            GgmlDType::Q4_1 => "q4_1",
            GgmlDType::Q5_0 => "q5_0",
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q4K => "q4_k",
            GgmlDType::Q5K => "q5_k",
            GgmlDType::Q6K => "q6_k",
            _ => return None,
        })
    }

    /// A matrix's rows in the device layout (`chunk` in kernels/decode.cu): each row starts
    /// 16-byte aligned, and for block types whose size is not a multiple of 16 a row holds one
    /// field of all its blocks after another (quants first, scales after), so that the kernels
    /// read a block's quants with 16-byte loads. Returns the bytes and the row stride.
    fn regroup(t: GgmlDType, raw: &[u8], rows: usize, k: usize) -> (Vec<u8>, usize) {
        let (bs, ts) = (t.block_size(), t.type_size());
        let nb = k / bs;
        let raw_row = nb * ts;
        // (offset, length) of each field in a block, in the order the row lays them out.
        let fields: &[(usize, usize)] = match t {
            GgmlDType::Q8_0 => &[(2, 32), (0, 2)],
            GgmlDType::Q5_0 => &[(6, 16), (2, 4), (0, 2)],
            GgmlDType::Q4_0 => &[(2, 16), (0, 2)],
            GgmlDType::Q4_1 => &[(4, 16), (0, 4)],
            GgmlDType::Q6K => &[(0, 208), (208, 2)],
            _ if raw_row.is_multiple_of(16) => return (raw.to_vec(), raw_row),
            _ => &[],
        };
        let fields = if fields.is_empty() {
            &[(0, ts)][..]
        } else {
            fields
        };
        let row_bytes = raw_row.next_multiple_of(16);
        let mut out = vec![0u8; rows * row_bytes];
        for (src, dst) in raw
            .chunks_exact(raw_row)
            .zip(out.chunks_exact_mut(row_bytes))
        {
            let mut at = 0;
            for &(off, len) in fields {
                for (b, block) in src.chunks_exact(ts).enumerate() {
                    dst[at + b * len..at + (b + 1) * len].copy_from_slice(&block[off..off + len]);
                }
                at += nb * len;
            }
        }
        (out, row_bytes)
    }

    /// A matrix from the GGUF in the device layout, with the kernels for its type.
    #[derive(Clone)]
    struct Matrix {
        _data: Arc<CudaSlice<u8>>,
        ptr: u64,
        n_out: usize,
        k: usize,
        row_bytes: u64,
        mv1: CudaFunction,
        mv1s: CudaFunction,
        mvn: CudaFunction,
        glu1: CudaFunction,
        glun: CudaFunction,
        mvs: CudaFunction,
        mvs2: CudaFunction,
        glus: CudaFunction,
        embed: CudaFunction,
        kind: &'static str,
    }

    /// An f32 vector on the device (norm weights, biases, rotary frequencies).
    struct Vector {
        _data: CudaSlice<f32>,
        ptr: u64,
    }

    struct Layer {
        attn_norm: Vector,
        q: Matrix,
        k: Matrix,
        v: Matrix,
        q_bias: Option<Vector>,
        k_bias: Option<Vector>,
        v_bias: Option<Vector>,
        o: Matrix,
        ffn_norm: Vector,
        gate: Matrix,
        up: Matrix,
        down: Matrix,
    }

    /// A model's weights for this path.
    pub(crate) struct FastWeights {
        dev: CudaDevice,
        cfg: ModelConfig,
        embed: Matrix,
        lm_head: Matrix,
        norm: Vector,
        layers: Vec<Layer>,
        inv_freq: Vector,
        rms_norm: CudaFunction,
        rope_kv: CudaFunction,
        attention: CudaFunction,
        silu_mul: CudaFunction,
    }

    impl std::fmt::Debug for FastWeights {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FastWeights({} layers)", self.layers.len())
        }
    }

    /// Why the path does not apply to a model, or `None` when it does.
    fn unsupported(file: &GgufFile, cfg: &ModelConfig, device: &Device) -> Option<String> {
        if !device.is_cuda() {
            return Some("not a CUDA device".into());
        }
        if std::env::var("VERDICT_CUDA_FAST").as_deref() == Ok("0") {
            return Some("VERDICT_CUDA_FAST=0".into());
        }
        if cfg.arch == Arch::Qwen3 {
            // decode.cu has no per-head q/k norm; candle's ops run qwen3 on the GPU.
            return Some("per-head q/k norms (qwen3)".into());
        }
        if cfg.arch == Arch::Olmo2 {
            return Some("olmo2's post-norms and whole-row q/k norms".into());
        }
        if cfg.arch.is_gemma() {
            // decode.cu has no post-norms, GELU gate, sliding window or soft caps.
            return Some("gemma's post-norms, GELU gate and sliding windows".into());
        }
        if cfg.norm != NormKind::Rms || !cfg.gated_mlp || cfg.parallel_blocks {
            // decode.cu has RMSNorm, the SwiGLU MLP and sequential blocks only.
            return Some(
                "LayerNorm, a plain GELU MLP or parallel blocks (starcoder2, cohere2)".into(),
            );
        }
        if cfg.sliding_window.is_some() {
            return Some("sliding-window attention".into());
        }
        if cfg.embedding_scale.is_some()
            || cfg.residual_scale.is_some()
            || cfg.logit_scale.is_some()
            || cfg.attention_scale != 1.0 / (cfg.head_dim as f32).sqrt()
        {
            return Some("scaled embeddings, residuals, attention or logits (granite)".into());
        }
        if ["attn_output", "ffn_gate", "ffn_up", "ffn_down"]
            .iter()
            .any(|t| file.has_tensor(&format!("blk.0.{t}.bias")))
        {
            return Some("biases on the output or MLP projections".into());
        }
        if cfg.experts.is_some() {
            return Some("a mixture of experts".into());
        }
        if cfg.nope_every.is_some() {
            return Some("layers without rotary embeddings (smollm3)".into());
        }
        if cfg.rope_dims != cfg.head_dim {
            return Some(format!(
                "a partial rotation ({} of {} dimensions)",
                cfg.rope_dims, cfg.head_dim
            ));
        }
        if file.has_tensor("blk.0.attn_qkv.weight") || !file.has_tensor("blk.0.ffn_gate.weight") {
            // The decode path reads q/k/v and gate/up as separate matrices.
            return Some("fused q/k/v or gate/up matrices (phi3)".into());
        }
        let hd = cfg.head_dim;
        if hd > 256
            || !hd.is_multiple_of(4)
            || cfg.n_kv_heads == 0
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
        {
            return Some(format!(
                "head size {hd} with {} query and {} kv heads",
                cfg.n_heads, cfg.n_kv_heads
            ));
        }
        for (name, info) in &file.content().tensor_infos {
            if info.shape.dims().len() == 2 {
                let k = info.shape.dims()[1];
                if kind(info.ggml_dtype).is_none() || !k.is_multiple_of(32) {
                    return Some(format!(
                        "tensor {name}: {:?} with rows of {k}",
                        info.ggml_dtype
                    ));
                }
            }
        }
        None
    }

    impl FastWeights {
        /// The weights of `file` for this path, or `None` (and the reason in the log) where it
        /// does not apply. `rotary` gives the frequency of each dimension pair.
        pub(crate) fn load(
            file: &GgufFile,
            cfg: &ModelConfig,
            rotary: &Rotary,
            device: &Device,
        ) -> Result<Option<Arc<FastWeights>>> {
            // decode.cu's attention scale is 1 / sqrt(head size): no YaRN magnitude.
            let why = match rotary.mscale != 1.0 {
                true => Some(format!(
                    "rotary magnitude {} (YaRN, LongRoPE)",
                    rotary.mscale
                )),
                false => unsupported(file, cfg, device),
            };
            if let Some(why) = why {
                tracing::info!(model = %file.path().display(), "CUDA decode path off: {why}");
                return Ok(None);
            }
            let dev = device
                .as_cuda_device()
                .map_err(|e| dev_err("device", e))?
                .clone();
            let stream = dev.cuda_stream();
            let func = |name: &str| -> Result<CudaFunction> {
                dev.get_or_load_custom_func(name, MODULE, PTX)
                    .map(|f| f.into_cuda_function())
                    .map_err(|e| dev_err(&format!("loading kernel {name} of kernels/decode.cu"), e))
            };
            let matrix = |name: &str, shape: [usize; 2]| -> Result<Matrix> {
                let (bytes, t, dims) = file.tensor_bytes(name)?;
                if dims != shape {
                    return Err(ModelError::Tensor {
                        path: file.path().to_path_buf(),
                        tensor: name.into(),
                        reason: format!("shape {dims:?}, expected {shape:?}"),
                    });
                }
                let kd = kind(t).ok_or_else(|| ModelError::UnsupportedQuant {
                    path: file.path().to_path_buf(),
                    reason: format!("{t:?} in {name} (CUDA decode path)"),
                })?;
                let (bytes, row_bytes) = regroup(t, &bytes, shape[0], shape[1]);
                let data = stream
                    .clone_htod(&bytes)
                    .map_err(|e| dev_err(&format!("uploading {name}"), e))?;
                let ptr = data.device_ptr(&stream).0;
                Ok(Matrix {
                    _data: Arc::new(data),
                    ptr,
                    n_out: shape[0],
                    k: shape[1],
                    row_bytes: row_bytes as u64,
                    mv1: func(&format!("mv1_{kd}"))?,
                    mv1s: func(&format!("mv1s_{kd}"))?,
                    mvn: func(&format!("mvn_{kd}"))?,
                    glu1: func(&format!("glu1_{kd}"))?,
                    glun: func(&format!("glun_{kd}"))?,
                    mvs: func(&format!("mvs_{kd}"))?,
                    mvs2: func(&format!("mvs2_{kd}"))?,
                    glus: func(&format!("glus_{kd}"))?,
                    embed: func(&format!("embed_{kd}"))?,
                    kind: kd,
                })
            };
            let upload = |name: &str, v: &[f32]| -> Result<Vector> {
                let data = stream
                    .clone_htod(v)
                    .map_err(|e| dev_err(&format!("uploading {name}"), e))?;
                let ptr = data.device_ptr(&stream).0;
                Ok(Vector { _data: data, ptr })
            };
            let vector = |name: &str, n: usize| -> Result<Vector> {
                let v = file
                    .tensor(name, &Device::Cpu)?
                    .dequantize(&Device::Cpu)
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| ModelError::Tensor {
                        path: file.path().to_path_buf(),
                        tensor: name.into(),
                        reason: e.to_string(),
                    })?;
                if v.len() != n {
                    return Err(ModelError::Tensor {
                        path: file.path().to_path_buf(),
                        tensor: name.into(),
                        reason: format!("{} values, expected {n}", v.len()),
                    });
                }
                upload(name, &v)
            };
            let c = cfg;
            let (h, q_out, kv_out) = (
                c.hidden_size,
                c.n_heads * c.head_dim,
                c.n_kv_heads * c.head_dim,
            );
            let embed = matrix("token_embd.weight", [c.vocab_size, h])?;
            let lm_head = if file.has_tensor("output.weight") {
                matrix("output.weight", [c.vocab_size, h])?
            } else {
                embed.clone()
            };
            let mut layers = Vec::with_capacity(c.n_layers);
            for i in 0..c.n_layers {
                let n = |s: &str| format!("blk.{i}.{s}");
                let bias = |s: &str, len: usize| -> Result<Option<Vector>> {
                    let name = n(s);
                    if file.has_tensor(&name) {
                        Ok(Some(vector(&name, len)?))
                    } else {
                        Ok(None)
                    }
                };
                layers.push(Layer {
                    attn_norm: vector(&n("attn_norm.weight"), h)?,
                    q: matrix(&n("attn_q.weight"), [q_out, h])?,
                    k: matrix(&n("attn_k.weight"), [kv_out, h])?,
                    v: matrix(&n("attn_v.weight"), [kv_out, h])?,
                    q_bias: bias("attn_q.bias", q_out)?,
                    k_bias: bias("attn_k.bias", kv_out)?,
                    v_bias: bias("attn_v.bias", kv_out)?,
                    o: matrix(&n("attn_output.weight"), [h, q_out])?,
                    ffn_norm: vector(&n("ffn_norm.weight"), h)?,
                    gate: matrix(&n("ffn_gate.weight"), [c.intermediate, h])?,
                    up: matrix(&n("ffn_up.weight"), [c.intermediate, h])?,
                    down: matrix(&n("ffn_down.weight"), [h, c.intermediate])?,
                });
            }
            Ok(Some(Arc::new(FastWeights {
                embed,
                lm_head,
                norm: vector("output_norm.weight", h)?,
                layers,
                inv_freq: upload("rotary frequencies", &rotary.inv_freq)?,
                rms_norm: func("rms_norm")?,
                rope_kv: func("rope_kv")?,
                attention: func("attention")?,
                silu_mul: func("silu_mul")?,
                cfg: cfg.clone(),
                dev,
            })))
        }
    }

    /// A CUDA graph of one forward shape. The graph only holds launches with fixed arguments;
    /// it is used from the session's `&mut self` alone.
    struct Graph(CudaGraph);
    // SAFETY: a CUgraphExec may be launched from any thread as long as calls on it are
    // serialised; the session is used from one thread at a time (`&mut self`).
    unsafe impl Send for Graph {}
    unsafe impl Sync for Graph {}

    /// Which forward a graph replays: rows in, and the rows whose logits come out.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Shape {
        rows: usize,
        out_lo: usize,
        out_len: usize,
    }

    /// A buffer and its device address (taken once: no event bookkeeping inside a capture).
    struct Buf<T> {
        data: CudaSlice<T>,
        ptr: u64,
    }

    impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Buf<T> {
        fn new(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<Buf<T>> {
            let data = stream
                .alloc_zeros::<T>(len.max(1))
                .map_err(|e| dev_err(&format!("allocating {what}"), e))?;
            let ptr = data.device_ptr(stream).0;
            Ok(Buf { data, ptr })
        }
    }

    /// Kernel arguments: pointers and 64-bit sizes, ints, floats.
    enum A {
        P(u64),
        I(i32),
        F(f32),
    }

    fn int(n: usize) -> A {
        A::I(n as i32)
    }

    /// One sequence on this path: its KV cache and working buffers.
    pub(crate) struct FastSession {
        w: Arc<FastWeights>,
        n_layers: usize,
        max_len: usize,
        stream: Arc<CudaStream>,
        len: usize,
        cap: usize,
        /// Per layer `[cap, n_kv_heads * head_dim]`, keys and values.
        kc: Vec<Buf<f32>>,
        vc: Vec<Buf<f32>>,
        x: Buf<f32>,
        h: Buf<f32>,
        qkv: Buf<f32>,
        att: Buf<f32>,
        gu: Buf<f32>,
        m: Buf<f32>,
        logits: Buf<f32>,
        ids: Buf<u32>,
        pos: Buf<i32>,
        graphs: HashMap<Shape, Graph>,
        use_graphs: bool,
        multi: MultiRow,
        /// One-row matvecs with k at least this split each output over a block's warps
        /// (`VERDICT_CUDA_SPLIT_K`, 0 = never; unset or empty: `SPLIT_K`).
        split_k: usize,
    }

    /// The k from which a one-row matvec splits each output over MV_WARPS warps. Measured on the
    /// H200 (BENCHMARKS.md, session 10): from 4096 (the MLP's down projections) the 0.5B / 1.5B /
    /// 8B layouts decoded 1.14x / 1.08x / 1.09x faster than never; from 1024 (also the 1.5B's
    /// rows of hidden size 1536) the 1.5B gained another 1.08x, the others the same.
    const SPLIT_K: usize = 1024;

    fn split_k_from_env() -> Result<usize> {
        match std::env::var("VERDICT_CUDA_SPLIT_K")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("") => Ok(SPLIT_K),
            Ok(v) => v.parse().map_err(|_| {
                ModelError::Device(format!(
                    "VERDICT_CUDA_SPLIT_K={v:?}: expected a row length (0 = never split)"
                ))
            }),
        }
    }

    /// The kernels of forwards over several rows (`VERDICT_CUDA_ROWS`, to compare them on a
    /// device): activations staged in shared memory with one or two outputs per warp (`staged`,
    /// the default; `staged2`), or read from global memory by every output warp (`warp`, the
    /// kernels before staging).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum MultiRow {
        Staged,
        Staged2,
        Warp,
    }

    impl MultiRow {
        fn from_env() -> Result<Self> {
            match std::env::var("VERDICT_CUDA_ROWS").as_deref() {
                Err(_) | Ok("") | Ok("staged") => Ok(Self::Staged),
                Ok("staged2") => Ok(Self::Staged2),
                Ok("warp") => Ok(Self::Warp),
                Ok(other) => Err(ModelError::Device(format!(
                    "VERDICT_CUDA_ROWS={other:?}: expected staged, staged2 or warp"
                ))),
            }
        }
    }

    impl std::fmt::Debug for FastSession {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FastSession(len {}, capacity {})", self.len, self.cap)
        }
    }

    impl FastSession {
        /// An empty sequence over the first `n_layers` layers, at most `max_len` positions.
        pub(crate) fn new(
            w: &Arc<FastWeights>,
            n_layers: usize,
            max_len: usize,
        ) -> Result<FastSession> {
            let stream = w
                .dev
                .cuda_stream()
                .context()
                .new_stream()
                .map_err(|e| dev_err("creating a stream", e))?;
            let c = &w.cfg;
            let (h, v, ff) = (c.hidden_size, c.vocab_size, c.intermediate);
            let qkvw = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
            let r = MAX_ROWS;
            Ok(FastSession {
                x: Buf::new(&stream, r * h, "activations")?,
                h: Buf::new(&stream, r * h, "activations")?,
                qkv: Buf::new(&stream, r * qkvw, "activations")?,
                att: Buf::new(&stream, r * c.n_heads * c.head_dim, "activations")?,
                gu: Buf::new(&stream, r * 2 * ff, "activations")?,
                m: Buf::new(&stream, r * ff, "activations")?,
                logits: Buf::new(&stream, r * v, "logits")?,
                ids: Buf::new(&stream, r, "token ids")?,
                pos: Buf::new(&stream, 1, "position")?,
                kc: Vec::new(),
                vc: Vec::new(),
                w: w.clone(),
                n_layers,
                max_len,
                stream,
                len: 0,
                cap: 0,
                graphs: HashMap::new(),
                use_graphs: std::env::var("VERDICT_CUDA_GRAPHS").as_deref() != Ok("0"),
                multi: MultiRow::from_env()?,
                split_k: split_k_from_env()?,
            })
        }

        pub(crate) fn len(&self) -> usize {
            self.len
        }

        pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
            super::super::kv_cache::check_truncate(len, self.len)?;
            self.len = len;
            Ok(())
        }

        fn kv_width(&self) -> usize {
            self.w.cfg.n_kv_heads * self.w.cfg.head_dim
        }

        /// Copies the first `len` positions of every layer's cache into `kc` / `vc`.
        fn copy_cache(&self, kc: &[Buf<f32>], vc: &[Buf<f32>]) -> Result<()> {
            let bytes = self.len * self.kv_width() * 4;
            if bytes == 0 {
                return Ok(());
            }
            for (dst, src) in kc.iter().zip(&self.kc).chain(vc.iter().zip(&self.vc)) {
                // SAFETY: both buffers hold at least `len` rows of f32 and live on this stream.
                unsafe {
                    result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream())
                }
                .map_err(|e| dev_err("copying the KV cache", e))?;
            }
            Ok(())
        }

        fn alloc_cache(&self, stream: &Arc<CudaStream>, cap: usize) -> Result<Vec<Buf<f32>>> {
            (0..self.n_layers)
                .map(|_| Buf::new(stream, cap * self.kv_width(), "the KV cache"))
                .collect()
        }

        /// Room for `need` positions: the cache at least doubles when it grows (the graphs,
        /// which hold its addresses, are recaptured).
        fn reserve(&mut self, need: usize) -> Result<()> {
            if need <= self.cap {
                return Ok(());
            }
            let cap = need.max(self.cap * 2).max(1024).min(self.max_len);
            let kc = self.alloc_cache(&self.stream, cap)?;
            let vc = self.alloc_cache(&self.stream, cap)?;
            self.copy_cache(&kc, &vc)?;
            self.kc = kc;
            self.vc = vc;
            self.cap = cap;
            self.graphs.clear();
            Ok(())
        }

        pub(crate) fn fork(&self) -> Result<FastSession> {
            let mut s = FastSession::new(&self.w, self.n_layers, self.max_len)?;
            // The copy runs on this session's stream; wait for it before the new one reads.
            let kc = self.alloc_cache(&self.stream, self.cap)?;
            let vc = self.alloc_cache(&self.stream, self.cap)?;
            self.copy_cache(&kc, &vc)?;
            self.stream
                .synchronize()
                .map_err(|e| dev_err("copying the KV cache", e))?;
            s.kc = kc;
            s.vc = vc;
            s.cap = self.cap;
            s.len = self.len;
            Ok(s)
        }

        fn launch(
            &self,
            f: &CudaFunction,
            grid: (u32, u32, u32),
            block: u32,
            args: &[A],
        ) -> Result<()> {
            let mut b = self.stream.launch_builder(f);
            for a in args {
                match a {
                    A::P(p) => b.arg(p),
                    A::I(i) => b.arg(i),
                    A::F(x) => b.arg(x),
                };
            }
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every launch below passes the arguments of the kernel's signature in
            // kernels/decode.cu, and buffers sized for MAX_ROWS rows and `cap` positions.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("launching a decode kernel", e))?;
            Ok(())
        }

        /// y[r] = W x[r] (+ bias) (+ y[r] when `residual`), for `rows` rows.
        #[allow(clippy::too_many_arguments)]
        fn matvec(
            &self,
            m: &Matrix,
            x: u64,
            y: u64,
            ldy: usize,
            rows: usize,
            bias: Option<&Vector>,
            residual: bool,
        ) -> Result<()> {
            // (function, outputs per block, threads per block)
            let split = rows == 1 && self.split_k > 0 && m.k >= self.split_k;
            let (f, per_block, threads) = match (rows, self.multi) {
                (1, _) if split => (&m.mv1s, 1, MV_WARPS * 32),
                (1, _) => (&m.mv1, MV_WARPS, MV_WARPS * 32),
                (_, MultiRow::Staged) => (&m.mvs, MVS_WARPS, MVS_WARPS * 32),
                (_, MultiRow::Staged2) => (&m.mvs2, 2 * MVS_WARPS, MVS_WARPS * 32),
                (_, MultiRow::Warp) => (&m.mvn, MV_WARPS, MV_WARPS * 32),
            };
            self.launch(
                f,
                (m.n_out.div_ceil(per_block) as u32, 1, 1),
                threads as u32,
                &[
                    A::P(m.ptr),
                    A::P(m.row_bytes),
                    A::P(x),
                    int(m.k),
                    A::P(y),
                    int(ldy),
                    int(m.n_out),
                    int(m.k),
                    int(rows),
                    A::P(bias.map_or(0, |b| b.ptr)),
                    A::P(if residual { y } else { 0 }),
                    int(ldy),
                ],
            )
        }

        fn rms_norm(&self, x: u64, w: &Vector, y: u64, rows: usize) -> Result<()> {
            let c = &self.w.cfg;
            self.launch(
                &self.w.rms_norm,
                (rows as u32, 1, 1),
                THREADS,
                &[
                    A::P(x),
                    A::P(w.ptr),
                    A::P(y),
                    int(c.hidden_size),
                    A::F(c.norm_eps),
                ],
            )
        }

        /// Every launch of a forward of `rows` rows (token ids and position already in their
        /// device buffers), with the final norm and lm_head on rows `out_lo..out_lo + out_len`.
        fn enqueue(&self, s: Shape) -> Result<()> {
            let w = &*self.w;
            let c = &w.cfg;
            let (h, hd, nh, nkv, ff) = (
                c.hidden_size,
                c.head_dim,
                c.n_heads,
                c.n_kv_heads,
                c.intermediate,
            );
            let rows = s.rows;
            let qkvw = (nh + 2 * nkv) * hd;
            let f4 = |p: u64, floats: usize| p + 4 * floats as u64;
            let (x, hb, qkv, att, gu, m) = (
                self.x.ptr,
                self.h.ptr,
                self.qkv.ptr,
                self.att.ptr,
                self.gu.ptr,
                self.m.ptr,
            );
            self.launch(
                &w.embed.embed,
                (rows as u32, 1, 1),
                THREADS,
                &[
                    A::P(w.embed.ptr),
                    A::P(w.embed.row_bytes),
                    A::P(self.ids.ptr),
                    A::P(x),
                    int(h),
                ],
            )?;
            let neox = i32::from(c.rope == RopeStyle::Neox);
            let scale = 1.0 / (hd as f32).sqrt();
            for (li, l) in w.layers.iter().take(self.n_layers).enumerate() {
                self.rms_norm(x, &l.attn_norm, hb, rows)?;
                self.matvec(&l.q, hb, qkv, qkvw, rows, l.q_bias.as_ref(), false)?;
                self.matvec(
                    &l.k,
                    hb,
                    f4(qkv, nh * hd),
                    qkvw,
                    rows,
                    l.k_bias.as_ref(),
                    false,
                )?;
                self.matvec(
                    &l.v,
                    hb,
                    f4(qkv, (nh + nkv) * hd),
                    qkvw,
                    rows,
                    l.v_bias.as_ref(),
                    false,
                )?;
                self.launch(
                    &w.rope_kv,
                    (rows as u32, 1, 1),
                    THREADS,
                    &[
                        A::P(qkv),
                        int(qkvw),
                        A::P(self.pos.ptr),
                        A::P(w.inv_freq.ptr),
                        int(nh),
                        int(nkv),
                        int(hd),
                        A::I(neox),
                        A::P(self.kc[li].ptr),
                        A::P(self.vc[li].ptr),
                    ],
                )?;
                self.launch(
                    &w.attention,
                    (nh as u32, rows as u32, 1),
                    THREADS,
                    &[
                        A::P(qkv),
                        int(qkvw),
                        A::P(self.pos.ptr),
                        A::P(self.kc[li].ptr),
                        A::P(self.vc[li].ptr),
                        A::P(att),
                        int(nh),
                        int(nkv),
                        int(hd),
                        A::F(scale),
                    ],
                )?;
                self.matvec(&l.o, att, x, h, rows, None, true)?;
                self.rms_norm(x, &l.ffn_norm, hb, rows)?;
                if l.gate.kind == l.up.kind && l.gate.row_bytes == l.up.row_bytes {
                    // Gate, up and silu in one launch.
                    let g = &l.gate;
                    let (f, warps) = match (rows, self.multi) {
                        (1, _) => (&g.glu1, MV_WARPS),
                        (_, MultiRow::Warp) => (&g.glun, MV_WARPS),
                        _ => (&g.glus, MVS_WARPS),
                    };
                    self.launch(
                        f,
                        (ff.div_ceil(warps) as u32, 1, 1),
                        (warps * 32) as u32,
                        &[
                            A::P(g.ptr),
                            A::P(l.up.ptr),
                            A::P(g.row_bytes),
                            A::P(hb),
                            int(h),
                            A::P(m),
                            int(ff),
                            int(h),
                            int(rows),
                        ],
                    )?;
                } else {
                    self.matvec(&l.gate, hb, gu, 2 * ff, rows, None, false)?;
                    self.matvec(&l.up, hb, f4(gu, ff), 2 * ff, rows, None, false)?;
                    let blocks = (rows * ff).div_ceil(256).min(4096) as u32;
                    self.launch(
                        &w.silu_mul,
                        (blocks, 1, 1),
                        256,
                        &[A::P(gu), A::P(m), int(ff), int(rows)],
                    )?;
                }
                self.matvec(&l.down, m, x, h, rows, None, true)?;
            }
            if s.out_len > 0 {
                self.rms_norm(f4(x, s.out_lo * h), &w.norm, hb, s.out_len)?;
                self.matvec(
                    &w.lm_head,
                    hb,
                    self.logits.ptr,
                    c.vocab_size,
                    s.out_len,
                    None,
                    false,
                )?;
            }
            Ok(())
        }

        /// Runs one pass: replays (or first captures) its graph, or launches directly.
        fn run(&mut self, s: Shape) -> Result<()> {
            if !self.use_graphs {
                return self.enqueue(s);
            }
            if let Some(g) = self.graphs.get(&s) {
                return g
                    .0
                    .launch()
                    .map_err(|e| dev_err("launching a CUDA graph", e));
            }
            if self.graphs.len() >= MAX_GRAPHS {
                self.graphs.clear();
            }
            let st = &self.stream;
            st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| dev_err("starting a graph capture", e))?;
            let queued = self.enqueue(s);
            let captured = st.end_capture(sys::CUgraphInstantiate_flags(0));
            let graph = match (queued, captured) {
                (Ok(()), Ok(Some(g))) => g,
                (q, c) => {
                    // Keep decoding without graphs on this session, and say why once.
                    let why = match (q, c) {
                        (Err(e), _) => e.to_string(),
                        (_, Err(e)) => e.to_string(),
                        _ => "the capture was empty".into(),
                    };
                    tracing::warn!("CUDA graph capture failed ({why}); launching kernels directly");
                    self.use_graphs = false;
                    return self.enqueue(s);
                }
            };
            graph
                .launch()
                .map_err(|e| dev_err("launching a CUDA graph", e))?;
            self.graphs.insert(s, Graph(graph));
            Ok(())
        }

        /// Runs `tokens` at positions `len()..` and returns the logits and final hidden states of
        /// the rows `rows` asks for, as candle tensors on the device.
        pub(crate) fn forward(&mut self, tokens: &[u32], rows: Rows) -> Result<Forward> {
            let n = tokens.len();
            if n == 0 {
                return Err(ModelError::Invalid("forward over zero tokens".into()));
            }
            if self.len + n > self.max_len {
                return Err(ModelError::ContextOverflow {
                    len: self.len,
                    new: n,
                    max: self.max_len,
                });
            }
            self.reserve(self.len + n)?;
            let (h, v) = (self.w.cfg.hidden_size, self.w.cfg.vocab_size);
            let (ws, we) = match rows {
                Rows::Last => (n - 1, n),
                Rows::All | Rows::Hidden => (0, n),
            };
            let wanted = we - ws;
            let logits = Buf::<f32>::new(&self.stream, wanted * v, "logits")?;
            let hidden = Buf::<f32>::new(&self.stream, wanted * h, "hidden states")?;
            let start = self.len;
            let out = self.passes(tokens, ws, we, &logits, &hidden);
            let synced = self
                .stream
                .synchronize()
                .map_err(|e| dev_err("waiting for the forward", e));
            if let Err(e) = out.and(synced) {
                self.len = start;
                return Err(e);
            }
            let wrap = |b: Buf<f32>, cols: usize| {
                let st = CudaStorage::wrap_cuda_slice(b.data, self.w.dev.clone());
                Tensor::from_storage(Storage::Cuda(st), (wanted, cols), BackpropOp::none(), false)
            };
            Ok(Forward {
                logits: wrap(logits, v),
                hidden: wrap(hidden, h),
            })
        }

        /// The forward in passes of at most MAX_ROWS rows; rows `ws..we` are copied out.
        fn passes(
            &mut self,
            tokens: &[u32],
            ws: usize,
            we: usize,
            logits: &Buf<f32>,
            hidden: &Buf<f32>,
        ) -> Result<()> {
            let (h, v) = (self.w.cfg.hidden_size, self.w.cfg.vocab_size);
            let n = tokens.len();
            let mut at = 0;
            while at < n {
                let rows = (n - at).min(MAX_ROWS);
                let (lo, hi) = (ws.max(at), we.min(at + rows));
                let s = Shape {
                    rows,
                    out_lo: if hi > lo { lo - at } else { 0 },
                    out_len: hi.saturating_sub(lo),
                };
                let pos = [self.len as i32];
                // SAFETY: `ids` holds MAX_ROWS >= rows ids and `pos` one int; pageable copies
                // are staged before these calls return, so the host slices may go.
                unsafe {
                    result::memcpy_htod_async(
                        self.ids.ptr,
                        &tokens[at..at + rows],
                        self.stream.cu_stream(),
                    )
                    .and_then(|()| {
                        result::memcpy_htod_async(self.pos.ptr, &pos, self.stream.cu_stream())
                    })
                }
                .map_err(|e| dev_err("copying token ids", e))?;
                if rows == n {
                    self.run(s)?;
                } else {
                    self.enqueue(s)?;
                }
                if s.out_len > 0 {
                    let off = lo - ws;
                    let copy = |dst: u64, src: u64, bytes: usize| {
                        // SAFETY: the session buffers hold out_len rows; the outputs `wanted`.
                        unsafe {
                            result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
                        }
                        .map_err(|e| dev_err("copying logits", e))
                    };
                    copy(
                        logits.ptr + (4 * off * v) as u64,
                        self.logits.ptr,
                        4 * s.out_len * v,
                    )?;
                    copy(
                        hidden.ptr + (4 * off * h) as u64,
                        self.h.ptr,
                        4 * s.out_len * h,
                    )?;
                }
                self.len += rows;
                at += rows;
            }
            Ok(())
        }
    }
}
