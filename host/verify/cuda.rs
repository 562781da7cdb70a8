//! The step's features and draws on a CUDA device (kernels/step.cu, compiled to PTX by build.rs):
//! from the target's `[k + 1, V]` logit rows on the device to the few numbers per position a
//! policy sees, and the token after the accepted prefix, with one copy to the host per call.
//! The CPU twin is [`super::verify`] with [`crate::sample`]: the kernels compute the same values
//! (tests/kernels.rs compares them on random rows).
//!
//! Scope: the features' distribution is softmax at a temperature (what [`super::feature_params`]
//! gives without top-k / top-p truncation); [`StepKernels::supports`] says whether a request's
//! sampling parameters fit. The engine reaches them through [`super::StepDevice`]; a
//! [`DeviceRows`] is a verification whose rows never leave the device.

use anyhow::{Context, Result, bail, ensure};
use candle_core::{CudaDevice, DType, Device, Layout, Storage, Tensor};
use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use crate::decide::{Features, Step};
use crate::sample::SamplingParams;

/// kernels/step.cu as PTX for compute capability `CUDA_COMPUTE_CAP` (build time, default 90).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/step.ptx"));
const MODULE: &str = "verdict_step";
/// Threads per block: `BLOCK` in kernels/step.cu.
const BLOCK: u32 = 1024;

/// Whether a CUDA driver and device can be used here: `Ok(device 0)` or why not (no driver
/// library, no device, or the driver refused). Never panics, so tests and the CLI can skip.
pub fn device() -> std::result::Result<Device, String> {
    // cudarc loads libcuda lazily and panics when it is missing: look for it first.
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda.so.1) on this machine".into());
    }
    Device::new_cuda(0).map_err(|e| format!("no usable CUDA device 0: {e}"))
}

/// The step kernels, loaded on one candle CUDA device (they share its context and stream, so
/// they order with the model's own kernels without extra synchronisation).
pub struct StepKernels {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    features: CudaFunction,
    sample: CudaFunction,
}

/// One step's inputs, all on the kernels' device.
pub struct StepInput<'a> {
    /// `[rows, V]` f32: the target's logits; row i scores drafted position i, the last row is the
    /// bonus position (rows = k + 1 in a speculation step).
    pub logits: &'a Tensor,
    /// The features' temperature (> 0; [`super::feature_params`] gives 1 at greedy).
    pub temperature: f32,
    /// The drafted tokens x_i (at most rows).
    pub tokens: &'a [u32],
    /// Top-K entries per row (>= 1; capped at V).
    pub top_k: usize,
    /// `[>= tokens.len(), V]` f32: the draft's distributions q_i, for q_i(x_i) and residuals.
    pub q: Option<&'a Tensor>,
    /// The judge head's inputs, for a judge logit per drafted position.
    pub judge: Option<JudgeInput<'a>>,
}

/// The judge dot product's inputs: drafted position i is scored on `hidden` row `row0 + i`
/// (1 in a speculation step: the row where x_i is the input).
pub struct JudgeInput<'a> {
    /// `[rows, H]` f32: the target's last hidden states.
    pub hidden: &'a Tensor,
    pub row0: usize,
    /// `[H]` or `[H, 1]` f32: the head's weights with the standardisation folded in
    /// ([`super::JudgeScorer::weight`]).
    pub weight: &'a Tensor,
    /// The folded bias ([`super::JudgeScorer::bias`]).
    pub bias: f32,
}

/// The features of every row, on the host, plus the rows' distributions kept on the device for
/// [`StepKernels::sample`].
pub struct StepFeatures {
    dev: CudaDevice,
    probs: CudaSlice<f32>,
    /// The input rows (a handle on the same device memory).
    logits: Tensor,
    /// The drafted tokens x_i.
    pub tokens: Vec<u32>,
    pub rows: usize,
    pub vocab: usize,
    /// K: entries per row in `top_ids` / `top_probs`.
    pub top_k: usize,
    /// Per row: [`crate::sample::argmax`] of its logits (the greedy decision).
    pub argmax: Vec<u32>,
    /// Per row: H(p) in nats.
    pub entropy: Vec<f32>,
    /// rows * K: each row's K most likely tokens, most likely first (ties: lower id first).
    pub top_ids: Vec<u32>,
    pub top_probs: Vec<f32>,
    /// Per drafted position: p_i(x_i).
    pub target_prob: Vec<f32>,
    /// Per drafted position: q_i(x_i), when the input had q rows.
    pub draft_prob: Option<Vec<f32>>,
    /// Per drafted position: the judge logit, when the input had a judge.
    pub judge: Option<Vec<f32>>,
    /// Per row: the largest logit m and ln sum exp(logits - m) at temperature 1, so that
    /// [`crate::sample::log_sum_exp`] of the row is m + log_z.
    pub max_logit: Vec<f32>,
    pub log_z: Vec<f32>,
    /// Per drafted position: the raw logit of x_i.
    pub token_logit: Vec<f32>,
}

/// Which distribution one draw uses ([`StepKernels::sample`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Draw {
    /// p of the row itself: a bonus token or a `sample` correction.
    P,
    /// The residual norm(max(0, p - q)) with q = row `i` of the step's q rows.
    Residual(usize),
    /// The residual against a one-hot q on the drafted token (a deterministic drafter).
    ResidualOneHot(u32),
}

impl StepKernels {
    /// Loads the kernels on `device` (which must be a CUDA device).
    pub fn new(device: &Device) -> Result<StepKernels> {
        let dev = device
            .as_cuda_device()
            .context("the step kernels need a CUDA device")?
            .clone();
        let load = |name: &str| {
            dev.get_or_load_custom_func(name, MODULE, PTX)
                .map(|f| f.into_cuda_function())
                .with_context(|| format!("loading kernel {name} from kernels/step.cu"))
        };
        Ok(StepKernels {
            features: load("step_features")?,
            sample: load("step_sample")?,
            stream: dev.cuda_stream(),
            dev,
        })
    }

    /// Whether the kernels compute the features for these sampling parameters: softmax at a
    /// temperature, no top-k / top-p truncation (the CPU path handles those).
    pub fn supports(params: &SamplingParams) -> bool {
        let f = super::feature_params(params);
        f.temperature > 0.0 && f.top_k == 0 && f.top_p >= 1.0 && f.min_p <= 0.0
    }

    /// Every row's features: one kernel launch and one copy to the host.
    pub fn features(&self, input: &StepInput) -> Result<StepFeatures> {
        let (rows, vocab) = input
            .logits
            .dims2()
            .context("step kernels: logits must be [rows, vocab]")?;
        let drafted = input.tokens.len();
        ensure!(
            rows >= 1 && vocab >= 1,
            "step kernels: empty logits [{rows}, {vocab}]"
        );
        ensure!(
            drafted <= rows,
            "step kernels: {drafted} drafted tokens but only {rows} logit rows"
        );
        ensure!(
            input.temperature > 0.0 && input.temperature.is_finite(),
            "step kernels: temperature must be finite and > 0, got {}",
            input.temperature
        );
        ensure!(input.top_k >= 1, "step kernels: top_k must be >= 1");
        let top_k = input.top_k.min(vocab);
        let rows_u = u32_of(rows, "rows")?;
        let vocab_u = u32_of(vocab, "vocab size")?;

        check_f32(input.logits, "logits")?;
        let (ls, ll) = input.logits.storage_and_layout();
        let logits = cuda_f32(&ls, ll, "logits", rows * vocab)?;
        if let Some(q) = input.q {
            check_f32(q, "q")?;
        }
        let q_guard = input.q.map(|q| {
            let (s, l) = q.storage_and_layout();
            (s, l.clone(), q.dims().to_vec())
        });
        let q = match &q_guard {
            Some((s, l, dims)) => {
                ensure!(
                    dims.len() == 2 && dims[0] >= drafted && dims[1] == vocab,
                    "step kernels: q must be [>= {drafted}, {vocab}], got {dims:?}"
                );
                Some(cuda_f32(s, l, "q", drafted * vocab)?)
            }
            None => None,
        };
        let judge_guard = match &input.judge {
            Some(j) => {
                check_f32(j.hidden, "hidden")?;
                check_f32(j.weight, "judge weight")?;
                let (hs, hl) = j.hidden.storage_and_layout();
                let (ws, wl) = j.weight.storage_and_layout();
                let (hrows, h) = j
                    .hidden
                    .dims2()
                    .context("step kernels: hidden must be [rows, H]")?;
                ensure!(
                    j.weight.elem_count() == h,
                    "step kernels: judge weight has {} entries, hidden states {h}",
                    j.weight.elem_count()
                );
                ensure!(
                    j.row0 + drafted <= hrows,
                    "step kernels: judge rows {}..{} outside the {hrows} hidden rows",
                    j.row0,
                    j.row0 + drafted
                );
                Some((hs, hl.clone(), ws, wl.clone(), hrows, h, j.row0, j.bias))
            }
            None => None,
        };
        let judge = match &judge_guard {
            Some((hs, hl, ws, wl, hrows, h, row0, bias)) => Some((
                cuda_f32(hs, hl, "hidden", hrows * h)?,
                cuda_f32(ws, wl, "judge weight", *h)?,
                u32_of(*h, "hidden size")?,
                u32_of(*row0, "judge row")?,
                *bias,
            )),
            None => None,
        };

        // One output buffer of 32-bit words (floats as their bits): one copy back.
        let lay = OutLayout::new(rows, drafted, top_k);
        let mut out = self.dev.alloc_zeros::<u32>(lay.len)?;
        let mut probs = self.dev.alloc_zeros::<f32>(rows * vocab)?;
        let tokens = self.dev.clone_htod(if drafted > 0 {
            input.tokens
        } else {
            &[0u32][..]
        })?;
        let inv_t = 1.0 / input.temperature; // f32, as sample::probabilities computes it
        let (drafted_u, top_k_u) = (u32_of(drafted, "drafted")?, u32_of(top_k, "top_k")?);
        let null = 0u64;
        let zero_u = 0u32;
        let zero_f = 0f32;
        {
            // The regions of `out` as raw pointers (cudarc has no way to hand out several
            // mutable views of one buffer); `out` lives on this stream until the copy below.
            let (base, _sync) = out.device_ptr_mut(&self.stream);
            let at: Vec<u64> = (0..OutLayout::PARTS)
                .map(|i| base + 4 * lay.range(i).start as u64)
                .collect();
            let mut b = self.stream.launch_builder(&self.features);
            b.arg(&logits)
                .arg(&rows_u)
                .arg(&vocab_u)
                .arg(&inv_t)
                .arg(&mut probs)
                .arg(&at[0]) // argmax
                .arg(&at[1]) // entropy
                .arg(&top_k_u)
                .arg(&at[2]) // top ids
                .arg(&at[3]) // top probs
                .arg(&tokens)
                .arg(&drafted_u)
                .arg(&at[4]); // target prob
            match &q {
                Some(q) => b.arg(q),
                None => b.arg(&null),
            };
            b.arg(&at[5]); // draft prob
            match &judge {
                Some((h, w, hsize, row0, bias)) => {
                    b.arg(h).arg(hsize).arg(row0).arg(w).arg(bias);
                }
                None => {
                    b.arg(&null)
                        .arg(&zero_u)
                        .arg(&zero_u)
                        .arg(&null)
                        .arg(&zero_f);
                }
            }
            b.arg(&at[6]) // judge
                .arg(&at[7]) // max logit
                .arg(&at[8]) // log z
                .arg(&at[9]); // token logit
            let cfg = LaunchConfig {
                grid_dim: (rows_u, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments follow step_features' signature in kernels/step.cu, every
            // buffer holds the lengths the kernel indexes (checked above), and the kernel writes
            // only `probs` and `out`, which nothing else uses.
            unsafe { b.launch(cfg) }.context("launching step_features")?;
        }
        let words = self.dev.clone_dtoh(&out)?;
        let floats = |r: std::ops::Range<usize>| -> Vec<f32> {
            words[r].iter().map(|&w| f32::from_bits(w)).collect()
        };
        Ok(StepFeatures {
            dev: self.dev.clone(),
            probs,
            logits: input.logits.clone(),
            tokens: input.tokens.to_vec(),
            rows,
            vocab,
            top_k,
            argmax: words[lay.range(0)].to_vec(),
            entropy: floats(lay.range(1)),
            top_ids: words[lay.range(2)].to_vec(),
            top_probs: floats(lay.range(3)),
            target_prob: floats(lay.range(4)),
            draft_prob: q.is_some().then(|| floats(lay.range(5))),
            judge: judge.is_some().then(|| floats(lay.range(6))),
            max_logit: floats(lay.range(7)),
            log_z: floats(lay.range(8)),
            token_logit: floats(lay.range(9)),
        })
    }

    /// Draws one token per `(row, draw, uniform)` from the rows of `features`, as
    /// [`crate::sample::sample`] over [`crate::sample::residual`] (or over p) does on the host.
    /// `q` is the input's q tensor when a draw names a q row.
    pub fn sample(
        &self,
        features: &StepFeatures,
        q: Option<&Tensor>,
        draws: &[(usize, Draw, f32)],
    ) -> Result<Vec<u32>> {
        if draws.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = features.vocab;
        let mut rows = Vec::with_capacity(draws.len());
        let mut q_rows = Vec::with_capacity(draws.len());
        let mut onehot = Vec::with_capacity(draws.len());
        let mut uniforms = Vec::with_capacity(draws.len());
        let mut q_needed = 0;
        for &(row, draw, u) in draws {
            ensure!(
                row < features.rows,
                "step kernels: draw from row {row} of {}",
                features.rows
            );
            let (qr, hot) = match draw {
                Draw::P => (-1, -1),
                Draw::Residual(i) => {
                    q_needed = q_needed.max(i + 1);
                    (i32::try_from(i).context("q row index")?, -1)
                }
                Draw::ResidualOneHot(t) => (-1, i32::try_from(t).unwrap_or(i32::MAX)),
            };
            rows.push(u32_of(row, "row")?);
            q_rows.push(qr);
            onehot.push(hot);
            uniforms.push(u);
        }
        let q_guard = match (q, q_needed) {
            (_, 0) => None,
            (None, _) => bail!("step kernels: a residual draw names a q row but q is missing"),
            (Some(q), n) => {
                check_f32(q, "q")?;
                let dims = q.dims().to_vec();
                ensure!(
                    dims.len() == 2 && dims[0] >= n && dims[1] == vocab,
                    "step kernels: q must be [>= {n}, {vocab}], got {dims:?}"
                );
                let (s, l) = q.storage_and_layout();
                Some((s, l.clone(), n))
            }
        };
        let q_view = match &q_guard {
            Some((s, l, n)) => Some(cuda_f32(s, l, "q", n * vocab)?),
            None => None,
        };
        let n = u32_of(draws.len(), "draws")?;
        let vocab_u = u32_of(vocab, "vocab size")?;
        let rows = self.dev.clone_htod(&rows)?;
        let q_rows = self.dev.clone_htod(&q_rows)?;
        let onehot = self.dev.clone_htod(&onehot)?;
        let uniforms = self.dev.clone_htod(&uniforms)?;
        let mut out = self.dev.alloc_zeros::<u32>(draws.len())?;
        let null = 0u64;
        {
            let mut b = self.stream.launch_builder(&self.sample);
            b.arg(&features.probs).arg(&vocab_u).arg(&rows);
            match &q_view {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&q_rows)
                .arg(&onehot)
                .arg(&uniforms)
                .arg(&n)
                .arg(&mut out);
            let cfg = LaunchConfig {
                grid_dim: (n, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments as step_sample's signature; every row index was checked against
            // the buffers above; the kernel writes only `out`.
            unsafe { b.launch(cfg) }.context("launching step_sample")?;
        }
        Ok(self.dev.clone_dtoh(&out)?)
    }
}

impl StepFeatures {
    /// Row `i`'s distribution p, copied to the host (for checks; the step itself never needs it).
    pub fn probs_row(&self, i: usize) -> Result<Vec<f32>> {
        ensure!(i < self.rows, "row {i} of {}", self.rows);
        Ok(self
            .dev
            .clone_dtoh(&self.probs.slice(i * self.vocab..(i + 1) * self.vocab))?)
    }

    /// Appends the drafted positions to `step` as [`super::verify`] does (judge logits when
    /// computed, `draft_probs` where the input had no q rows, the request's `uniforms`).
    pub fn push_into(&self, step: &mut Step, draft_probs: &[f32], uniforms: &[f32]) -> Result<()> {
        let k = self.target_prob.len();
        ensure!(
            draft_probs.len() >= k && uniforms.len() >= k,
            "{k} drafted positions but {} draft probabilities and {} uniforms",
            draft_probs.len(),
            uniforms.len()
        );
        let kk = self.top_k;
        let mut top = Vec::with_capacity(kk);
        for i in 0..k {
            top.clear();
            top.extend(
                self.top_ids[i * kk..(i + 1) * kk]
                    .iter()
                    .copied()
                    .zip(self.top_probs[i * kk..(i + 1) * kk].iter().copied()),
            );
            let f = Features {
                token: self.tokens[i],
                draft_prob: self.draft_prob.as_ref().map_or(draft_probs[i], |d| d[i]),
                target_prob: self.target_prob[i],
                entropy: self.entropy[i],
                uniform: uniforms[i],
                judge: self.judge.as_ref().map(|j| j[i]),
            };
            step.push(f, &top);
        }
        Ok(())
    }
}

/// Where each output lives in the one word buffer: argmax, entropy (rows each), top ids, top
/// probs (rows * K each), target prob, draft prob, judge (drafted each), max logit, log z (rows
/// each), token logit (drafted).
struct OutLayout {
    ends: [usize; OutLayout::PARTS],
    len: usize,
}

impl OutLayout {
    const PARTS: usize = 10;

    fn new(rows: usize, drafted: usize, top_k: usize) -> OutLayout {
        let sizes = [
            rows,
            rows,
            rows * top_k,
            rows * top_k,
            drafted,
            drafted,
            drafted,
            rows,
            rows,
            drafted,
        ];
        let mut ends = [0; OutLayout::PARTS];
        let mut at = 0;
        for (e, s) in ends.iter_mut().zip(sizes) {
            at += s;
            *e = at;
        }
        OutLayout {
            ends,
            len: at.max(1),
        }
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        (if i == 0 { 0 } else { self.ends[i - 1] })..self.ends[i]
    }
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).with_context(|| format!("step kernels: {what} {n} does not fit in 32 bits"))
}

fn check_f32(t: &Tensor, what: &str) -> Result<()> {
    ensure!(
        t.dtype() == DType::F32,
        "step kernels: {what} must be f32, got {:?}",
        t.dtype()
    );
    Ok(())
}

/// The first `len` f32 values of a contiguous CUDA tensor's storage.
fn cuda_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
    len: usize,
) -> Result<CudaView<'a, f32>> {
    ensure!(
        layout.is_contiguous(),
        "step kernels: {what} must be contiguous"
    );
    let Storage::Cuda(s) = storage else {
        bail!("step kernels: {what} is not on a CUDA device");
    };
    let start = layout.start_offset();
    let slice = s.as_cuda_slice::<f32>()?;
    ensure!(
        start + len <= slice.len(),
        "step kernels: {what} holds {} values, need {}",
        slice.len() - start.min(slice.len()),
        len
    );
    Ok(slice.slice(start..start + len))
}

/// A verification's rows kept on the device ([`super::Verification`]): their features on the
/// host, the distributions on the device for the draws.
pub struct DeviceRows {
    kernels: Arc<StepKernels>,
    features: StepFeatures,
    greedy: bool,
}

impl DeviceRows {
    pub fn new(
        kernels: Arc<StepKernels>,
        features: StepFeatures,
        sampling: &SamplingParams,
    ) -> Self {
        DeviceRows {
            kernels,
            features,
            greedy: sampling.is_greedy(),
        }
    }

    pub fn argmax(&self, i: usize) -> Result<u32> {
        self.features
            .argmax
            .get(i)
            .copied()
            .with_context(|| format!("row {i} of {} logit rows", self.features.rows))
    }

    /// As [`super::Verification::draw`]: the argmax at T = 0, else one `step_sample` launch.
    pub fn draw(
        &self,
        i: usize,
        from: super::DrawFrom,
        rng: &mut crate::sample::Rng64,
    ) -> Result<u32> {
        if self.greedy {
            return self.argmax(i);
        }
        let u = rng.uniform();
        let q_row;
        let (q, draw) = match from {
            super::DrawFrom::P => (None, Draw::P),
            super::DrawFrom::Residual { q: None, token } => (None, Draw::ResidualOneHot(token)),
            super::DrawFrom::Residual { q: Some(q), .. } => {
                // The draft's row, to the device for this one draw.
                q_row =
                    Tensor::from_slice(q, (1, q.len()), &Device::Cuda(self.kernels.dev.clone()))?;
                (Some(&q_row), Draw::Residual(0))
            }
        };
        let out = self.kernels.sample(&self.features, q, &[(i, draw, u)])?;
        out.first()
            .copied()
            .context("step_sample returned no token")
    }

    /// ln softmax(row i)[t] at temperature 1, from the row's max and log_z and the token's logit
    /// (known for the drafted token and the argmax; any other token's logit is copied over).
    pub fn logprob(&self, i: usize, t: u32) -> Result<f64> {
        let f = &self.features;
        let (m, log_z) = match (f.max_logit.get(i), f.log_z.get(i)) {
            (Some(&m), Some(&z)) => (m, z),
            _ => bail!("row {i} of {} logit rows", f.rows),
        };
        if t as usize >= f.vocab {
            return Ok(f64::NEG_INFINITY);
        }
        let logit = if f.argmax[i] == t {
            m
        } else if f.tokens.get(i) == Some(&t) {
            f.token_logit[i]
        } else {
            f.logits.get(i)?.get(t as usize)?.to_scalar::<f32>()?
        };
        Ok((logit - m) as f64 - log_z as f64)
    }
}
