//! Stages 2-3, verify: one target forward over the last committed token plus the k drafts, then
//! the per-position features a policy sees. Only these few numbers per position cross into the
//! policy; the whole rows stay here for the host-side correction (residual / sample / argmax).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod judge;

use anyhow::Result;

use crate::decide::{Features, Step};
use crate::draft::Draft;
use crate::models::{Rows, Session};
use crate::sample::{self, Adjust, Rng64, SamplingParams};
pub use judge::{HeadChoice, JudgeHead, JudgeScorer};

/// The target's view of one step: the rows' facts the commit needs (argmax, draws, the emitted
/// tokens' log-likelihood), wherever the rows live.
pub struct Verification {
    rows: Scored,
    /// How many drafts the request's grammar allows in a row (all without one): the step
    /// accepts no more, whatever its policy says.
    pub allowed: usize,
    /// Seconds in the target's forward returning, in bringing the logit rows (or, on the device,
    /// their features) to the host, and in the features (softmax, top-K, entropy, judge) of
    /// every row.
    pub forward_s: f64,
    pub logits_s: f64,
    pub features_s: f64,
}

enum Scored {
    /// Row i's logits (after the request's penalties and grammar mask), and (T > 0 only) the
    /// request's sampling distribution p_i; at T = 0 corrections use the argmax of the logits.
    /// `raw`: the model's own logits when the request adjusted them (logprobs report those).
    Host {
        logits: Vec<Vec<f32>>,
        probs: Vec<Vec<f32>>,
        raw: Option<Vec<Vec<f32>>>,
    },
    /// The rows stay on the GPU; their features came back ([`cuda::StepKernels`]).
    #[cfg(feature = "cuda")]
    Device(Box<cuda::DeviceRows>),
}

/// Which distribution [`Verification::draw`] samples.
#[derive(Debug, Clone, Copy)]
pub enum DrawFrom<'a> {
    /// The row's own p (a bonus token, a `sample` correction).
    P,
    /// The residual norm(max(0, p - q)) against the draft's q at this position (`q`), or a
    /// one-hot on the drafted `token` (a deterministic drafter).
    Residual { q: Option<&'a [f32]>, token: u32 },
}

/// Where a request's step features are computed: on the target's GPU when the `cuda` feature is
/// built, the target runs on CUDA and `VERDICT_STEP_KERNELS` is not `0`; else on the host.
#[derive(Clone, Default)]
pub struct StepDevice {
    #[cfg(feature = "cuda")]
    kernels: Option<std::sync::Arc<cuda::StepKernels>>,
}

impl StepDevice {
    /// The step kernels for `device` when it is a CUDA device (a load failure is logged and
    /// leaves the host path).
    pub fn for_device(device: &candle_core::Device) -> StepDevice {
        #[cfg(feature = "cuda")]
        if device.is_cuda() && std::env::var("VERDICT_STEP_KERNELS").as_deref() != Ok("0") {
            match cuda::StepKernels::new(device) {
                Ok(k) => {
                    return StepDevice {
                        kernels: Some(std::sync::Arc::new(k)),
                    };
                }
                Err(e) => tracing::warn!("step kernels off, features on the host: {e:#}"),
            }
        }
        let _ = device;
        StepDevice::default()
    }

    /// Whether a request with these sampling parameters gets its features on the device (the
    /// kernels compute softmax at a temperature; top-k / top-p truncation runs on the host, as
    /// do requests that want per-token alternatives or adjust the logits (penalties), which
    /// need whole rows).
    pub fn serves(&self, sampling: &SamplingParams, wants_rows: bool) -> bool {
        #[cfg(feature = "cuda")]
        if self.kernels.is_some() && !wants_rows && cuda::StepKernels::supports(sampling) {
            return true;
        }
        let _ = (sampling, wants_rows);
        false
    }
}

/// Runs the target over `[last, drafts...]`, appending them to its cache (the caller truncates
/// the rejected ones afterwards). The drafted positions' features replace `step`'s positions
/// (`step.top_k` entries of top-K each; its other fields are left as they are). With a `judge`,
/// each drafted position also gets its judge logit, scored on the hidden state at the drafted
/// token (row i + 1: the row where x_i is the input). With `on_device` the features are
/// computed where the rows are (one launch, one small copy back); the caller decides
/// ([`StepDevice::serves`]). With `adjust` (penalties, a grammar), row i is adjusted as the
/// position after the generated tokens and the first i drafts (host rows only).
#[allow(clippy::too_many_arguments)]
pub fn verify(
    target: &mut Session,
    last: u32,
    draft: &Draft,
    sampling: &SamplingParams,
    adjust: Option<&mut Adjust>,
    step: &mut Step,
    judge: Option<&JudgeScorer>,
    rng: &mut Rng64,
    on_device: Option<&StepDevice>,
) -> Result<Verification> {
    let mut input = Vec::with_capacity(draft.tokens.len() + 1);
    input.push(last);
    input.extend_from_slice(&draft.tokens);
    let t0 = std::time::Instant::now();
    let out = target.forward(&input, Rows::All)?;
    let t1 = std::time::Instant::now();
    let feature_params = feature_params(sampling);
    step.clear_positions();
    #[cfg(feature = "cuda")]
    // Adjustments need whole rows on the host (the engine does not ask the device then).
    if let Some(k) = on_device
        .filter(|_| adjust.is_none())
        .and_then(|d| d.kernels.as_ref())
    {
        let uniforms: Vec<f32> = draft.tokens.iter().map(|_| rng.uniform()).collect();
        let judge_in = judge.map(|j| cuda::JudgeInput {
            hidden: &out.hidden,
            row0: 1,
            weight: j.weight(),
            bias: j.bias(),
        });
        let f = k.features(&cuda::StepInput {
            logits: &out.logits,
            temperature: feature_params.temperature,
            tokens: &draft.tokens,
            top_k: step.top_k as usize,
            q: None,
            judge: judge_in,
        })?;
        // Judge logits, when computed, go in with each position.
        f.push_into(step, &draft.q_token, &uniforms)?;
        return Ok(Verification {
            rows: Scored::Device(Box::new(cuda::DeviceRows::new(k.clone(), f, sampling))),
            allowed: draft.tokens.len(),
            forward_s: (t1 - t0).as_secs_f64(),
            logits_s: 0.0,
            features_s: t1.elapsed().as_secs_f64(),
        });
    }
    let _ = on_device;
    let mut logits = out.logits.to_vec2::<f32>()?;
    let (raw, allowed) = match adjust {
        Some(a) => {
            let raw = logits.clone();
            let allowed = a.rows(&mut logits, &draft.tokens)?;
            (Some(raw), allowed)
        }
        None => (None, draft.tokens.len()),
    };
    let t2 = std::time::Instant::now();
    let mut probs = Vec::new();
    let mut top = Vec::with_capacity(step.top_k as usize + 1);
    for (i, row) in logits.iter().enumerate() {
        let p = sample::probabilities(row, &feature_params);
        if let Some(&x) = draft.tokens.get(i) {
            top_entries_into(&p, step.top_k as usize, &mut top);
            step.push(features(&p, x, draft.q_token[i], rng.uniform()), &top);
        }
        if !sampling.is_greedy() {
            probs.push(p);
        }
    }
    if let Some(j) = judge {
        step.judge = Some(j.score(&out.hidden.narrow(0, 1, draft.tokens.len())?)?);
    }
    Ok(Verification {
        rows: Scored::Host { logits, probs, raw },
        allowed,
        forward_s: (t1 - t0).as_secs_f64(),
        logits_s: (t2 - t1).as_secs_f64(),
        features_s: t2.elapsed().as_secs_f64(),
    })
}

/// One plain (autoregressive) position: `logits` is the target's `[1, V]` row. Where the row
/// lives, [`Verification::draw`] and [`Verification::logprob`] work as for a step's rows.
/// `adjust` changes the row (host rows only).
pub fn score_row(
    logits: &candle_core::Tensor,
    sampling: &SamplingParams,
    adjust: Option<&mut Adjust>,
    on_device: Option<&StepDevice>,
) -> Result<Verification> {
    let t0 = std::time::Instant::now();
    #[cfg(feature = "cuda")]
    // Adjustments need whole rows on the host (the engine does not ask the device then).
    if let Some(k) = on_device
        .filter(|_| adjust.is_none())
        .and_then(|d| d.kernels.as_ref())
    {
        let f = k.features(&cuda::StepInput {
            logits,
            temperature: feature_params(sampling).temperature,
            tokens: &[],
            top_k: 1,
            q: None,
            judge: None,
        })?;
        return Ok(Verification {
            rows: Scored::Device(Box::new(cuda::DeviceRows::new(k.clone(), f, sampling))),
            allowed: 0,
            forward_s: 0.0,
            logits_s: t0.elapsed().as_secs_f64(),
            features_s: 0.0,
        });
    }
    let _ = on_device;
    let mut logits = logits.to_vec2::<f32>()?;
    let raw = match adjust {
        Some(a) => {
            let raw = logits.clone();
            a.rows(&mut logits, &[])?;
            Some(raw)
        }
        None => None,
    };
    let t1 = std::time::Instant::now();
    let probs = if sampling.is_greedy() {
        Vec::new()
    } else {
        logits
            .iter()
            .map(|r| sample::probabilities(r, sampling))
            .collect()
    };
    Ok(Verification {
        rows: Scored::Host { logits, probs, raw },
        allowed: 0,
        forward_s: 0.0,
        logits_s: (t1 - t0).as_secs_f64(),
        features_s: t1.elapsed().as_secs_f64(),
    })
}

impl Verification {
    /// Whether row i gives `t` any chance (false where the request's grammar bars it).
    pub fn allows(&self, i: usize, t: u32) -> Result<bool> {
        match &self.rows {
            Scored::Host { logits, .. } => Ok(row(logits, i)?
                .get(t as usize)
                .is_some_and(|x| *x > f32::NEG_INFINITY)),
            #[cfg(feature = "cuda")]
            Scored::Device(_) => Ok(true),
        }
    }

    /// Row i's argmax: the greedy token at that position.
    pub fn argmax(&self, i: usize) -> Result<u32> {
        match &self.rows {
            Scored::Host { logits, .. } => Ok(sample::argmax(row(logits, i)?)),
            #[cfg(feature = "cuda")]
            Scored::Device(d) => d.argmax(i),
        }
    }

    /// A token from row i: sampled with the next uniform of `rng` (T > 0), or the argmax (T = 0,
    /// where the residual of a one-hot p is that one-hot).
    pub fn draw(&self, i: usize, from: DrawFrom, rng: &mut Rng64) -> Result<u32> {
        match &self.rows {
            Scored::Host { logits, probs, .. } => {
                let Some(p) = probs.get(i) else {
                    return Ok(sample::argmax(row(logits, i)?));
                };
                Ok(match from {
                    DrawFrom::P => sample::sample(p, rng.uniform()),
                    DrawFrom::Residual { q: Some(q), .. } => {
                        sample::sample(&sample::residual(p, q), rng.uniform())
                    }
                    DrawFrom::Residual { q: None, token } => {
                        let mut one_hot = vec![0f32; p.len()];
                        if let Some(x) = one_hot.get_mut(token as usize) {
                            *x = 1.0;
                        }
                        sample::sample(&sample::residual(p, &one_hot), rng.uniform())
                    }
                })
            }
            #[cfg(feature = "cuda")]
            Scored::Device(d) => d.draw(i, from, rng),
        }
    }

    /// `ln softmax(row i)[t]` at temperature 1 (the target's log-likelihood of `t` there, from
    /// its own logits, before any penalties), and (host rows only; empty on the device) the
    /// `top_n` most likely tokens with theirs.
    pub fn logprob(&self, i: usize, t: u32, top_n: usize) -> Result<(f64, Vec<(u32, f64)>)> {
        match &self.rows {
            Scored::Host { logits, raw, .. } => Ok(token_logprobs(
                row(raw.as_ref().unwrap_or(logits), i)?,
                t,
                top_n,
            )),
            #[cfg(feature = "cuda")]
            Scored::Device(d) => Ok((d.logprob(i, t)?, Vec::new())),
        }
    }
}

fn row(logits: &[Vec<f32>], i: usize) -> Result<&[f32]> {
    logits
        .get(i)
        .map(Vec::as_slice)
        .ok_or_else(|| anyhow::anyhow!("row {i} of {} logit rows", logits.len()))
}

/// `ln softmax(logits)[t]` at temperature 1 (the target model's own log-likelihood of `t`), and
/// the `top_n` most likely tokens with theirs, most likely first (ties: lower id first).
/// Runs for every emitted token, so it is two vectorised passes over the row (max, then
/// log-sum-exp) plus, only when alternatives are asked for, one that keeps the best few in a
/// sorted vector (`top_n` is small: cheaper than sorting the vocabulary).
pub fn token_logprobs(logits: &[f32], t: u32, top_n: usize) -> (f64, Vec<(u32, f64)>) {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for (i, &x) in logits.iter().enumerate() {
            // Strictly greater: an equal logit at a higher id stays behind the earlier one.
            if best.len() < top_n || best.last().is_some_and(|&(_, b)| x > b) {
                let at = best.partition_point(|&(_, b)| b >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top_n);
            }
        }
    }
    let lse = sample::log_sum_exp(logits, sample::max(logits));
    let lp = logits
        .get(t as usize)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - lse);
    let top = best.into_iter().map(|(i, x)| (i, x as f64 - lse)).collect();
    (lp, top)
}

/// `t`'s place among the logits, 1 for the most likely, in [`token_logprobs`]' order: a tie
/// goes to the lower id. A token past the row (a padded vocabulary's) comes after them all.
pub fn token_rank(logits: &[f32], t: u32) -> u32 {
    let Some(&x) = logits.get(t as usize) else {
        return logits.len() as u32 + 1;
    };
    let (before, after) = logits.split_at(t as usize);
    let above =
        before.iter().filter(|&&y| y >= x).count() + after.iter().filter(|&&y| y > x).count();
    above as u32 + 1
}

/// The distribution features are computed from: the request's own at T > 0; the model's softmax
/// (T = 1) at T = 0, where the sampling distribution would be a one-hot that tells a lossy policy
/// nothing (strict compares the drafted token with the top-1, which is the argmax either way).
pub fn feature_params(sampling: &SamplingParams) -> SamplingParams {
    if sampling.is_greedy() {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    } else {
        *sampling
    }
}

/// One position's features from its distribution `p` (no judge logit).
pub fn features(p: &[f32], token: u32, draft_prob: f32, uniform: f32) -> Features {
    Features {
        token,
        draft_prob,
        target_prob: p.get(token as usize).copied().unwrap_or(0.0),
        entropy: entropy(p),
        uniform,
        judge: None,
    }
}

/// The k largest (id, p), most likely first (ties: lower id first).
pub fn top_entries(p: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top = Vec::with_capacity(k.min(p.len()) + 1);
    top_entries_into(p, k, &mut top);
    top
}

/// [`top_entries`] into a reused buffer.
pub fn top_entries_into(p: &[f32], k: usize, top: &mut Vec<(u32, f32)>) {
    top.clear();
    let k = k.min(p.len());
    // Blocks of 64 whose (vectorised) maximum cannot enter a full list are skipped whole: per
    // entry, the compare-and-branch cost 0.3 ms of a 152k-entry row.
    for (b, block) in p.chunks(64).enumerate() {
        if top.len() == k
            && top
                .last()
                .is_some_and(|&(_, m)| crate::sample::max(block) <= m)
        {
            continue;
        }
        for (j, &v) in block.iter().enumerate() {
            if top.len() == k && top.last().is_some_and(|&(_, m)| v <= m) {
                continue;
            }
            let at = top.partition_point(|&(_, m)| m >= v);
            top.insert(at, ((64 * b + j) as u32, v));
            top.truncate(k);
        }
    }
}

/// H(p) in nats. The terms p ln p are f32 (ln from `ln_positive`, relative error ~1e-7) in 8
/// lanes so that the loop vectorises, and blocks are summed in f64: a libm `ln` per entry made
/// this 1.2 ms of every 152k-entry row, the largest part of a speculation step's host work.
pub fn entropy(p: &[f32]) -> f32 {
    // 0 * ln(smallest normal) = 0: no branch, so the loop vectorises.
    -crate::sample::lane_sum(p, |x| x * ln_positive(x)) as f32
}

/// ln x for x > 0 without a libm call (so loops over it vectorise): x = m 2^e with m in
/// [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, by its
/// series to s^9 (remainder < 4e-10). Values below f32's normal range are taken as the
/// smallest normal (their p ln p terms are below 1e-36 either way).
#[inline(always)]
pub(crate) fn ln_positive(x: f32) -> f32 {
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    // Exponent and mantissa, with the mantissa moved into [sqrt(1/2), sqrt(2)).
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    // Halve m above sqrt(2) without a branch (a branch keeps the loop scalar).
    let big = (m > std::f32::consts::SQRT_2) as i32;
    let e = ((bits >> 23) & 0xff) as i32 - 127 + big;
    let m = m * (1.0 - 0.5 * big as f32);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series =
        s * (2.0 + s2 * (2.0 / 3.0 + s2 * (2.0 / 5.0 + s2 * (2.0 / 7.0 + s2 * (2.0 / 9.0)))));
    e as f32 * std::f32::consts::LN_2 + series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_entries_sorted_with_ties_by_id() {
        let p = [0.1, 0.4, 0.1, 0.3, 0.1];
        assert_eq!(top_entries(&p, 3), vec![(1, 0.4), (3, 0.3), (0, 0.1)]);
        assert_eq!(top_entries(&p, 9).len(), 5);
        assert_eq!(top_entries(&[], 2), vec![]);
    }

    #[test]
    fn entropy_of_uniform_and_one_hot() {
        assert!((entropy(&[0.25; 4]) - 4f32.ln()).abs() < 1e-6);
        assert_eq!(entropy(&[0.0, 1.0, 0.0]), 0.0);
    }

    #[test]
    fn ln_positive_matches_libm() {
        let mut x = 1e-37f32;
        while x < 1e30 {
            for m in [1.0f32, 1.0001, 1.2, 1.414, 1.415, 1.7, 1.9999] {
                let v = x * m;
                let (a, b) = (ln_positive(v) as f64, (v as f64).ln());
                assert!(
                    (a - b).abs() <= 2e-7 * b.abs().max(1.0),
                    "ln {v}: {a} vs {b}"
                );
            }
            x *= 3.7;
        }
        assert_eq!(ln_positive(1.0), 0.0);
        // Below the normal range: the smallest normal's logarithm, finite.
        assert!((ln_positive(1e-45) - f32::MIN_POSITIVE.ln()).abs() < 1e-4);
    }

    #[test]
    fn entropy_matches_the_f64_sum() {
        // A softmax-like row over a vocabulary, with zeros and tiny entries.
        let n = 151_936;
        let mut p: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .map(|u| (-20.0 * u).exp())
            .collect();
        p[3] = 0.0;
        p[5] = 1e-40;
        let z: f64 = p.iter().map(|&x| x as f64).sum();
        p.iter_mut().for_each(|x| *x = (*x as f64 / z) as f32);
        let want = -p
            .iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| x as f64 * (x as f64).ln())
            .sum::<f64>();
        let got = entropy(&p) as f64;
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn features_read_p_of_the_token() {
        let p = [0.2, 0.5, 0.3];
        let f = features(&p, 2, 0.9, 0.25);
        assert_eq!(f.target_prob, 0.3);
        assert_eq!((f.draft_prob, f.uniform, f.judge), (0.9, 0.25, None));
        let mut step = Step::new(2, 1.0, 3, Vec::new());
        step.push(f, &top_entries(&p, 2));
        step.check().unwrap();
        let pos = step.position(0);
        assert_eq!((pos.top_ids, pos.top_probs), (&[1, 2][..], &[0.5, 0.3][..]));
    }
}
