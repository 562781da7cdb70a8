//! Sampling: logits -> probabilities (temperature, top-k, top-p, min-p), seeded uniforms,
//! drawing a token, and the residual distribution norm(max(0, p - q)) that speculative sampling
//! resamples from on a rejection. Pure Rust on `&[f32]`; the same functions serve plain
//! generation and speculation, so both draw from exactly the same distribution. A request's
//! logit bias and repetition penalties adjust the logits first (`penalties.rs`), then its
//! grammar masks them (`grammar.rs`): [`Adjust`] holds both.

mod grammar;
mod penalties;

pub use grammar::{Constraint, GrammarError, GrammarSpec, Grammars, bounded_json};
pub use penalties::{MAX_LOGIT_BIAS, MAX_PENALTY, Penalizer, Penalties, bad_words_ids};

/// What one request changes in the target's logit rows: its penalties, then its grammar's mask.
#[derive(Debug, Clone)]
pub struct Adjust {
    pub penalties: Option<Penalizer>,
    pub grammar: Option<Constraint>,
}

impl Adjust {
    /// `None` when neither changes anything (the request then skips this stage).
    pub fn new(penalties: Option<Penalizer>, grammar: Option<Constraint>) -> Option<Adjust> {
        (penalties.is_some() || grammar.is_some()).then_some(Adjust { penalties, grammar })
    }

    /// Adjusts `rows`: row i is the position after the output and `drafts[..i]`. Returns how
    /// many drafts in a row the adjusted rows allow (the grammar, and the masks: a draft whose
    /// own row bars it ends them): no step may accept more, whatever a lossy policy says.
    /// A row that would be read (up to the one after the last allowed draft) with no token
    /// left is a [`NoTokenAllowed`] error: nothing could be drawn there but a wrong token.
    pub fn rows(&mut self, rows: &mut [Vec<f32>], drafts: &[u32]) -> anyhow::Result<usize> {
        if let Some(z) = &self.penalties {
            for (i, row) in rows.iter_mut().enumerate() {
                z.apply(row, &drafts[..i.min(drafts.len())]);
            }
        }
        let mut allowed = match self.grammar.as_mut() {
            Some(g) => g.mask_rows(rows, drafts)?,
            None => drafts.len(),
        };
        if self.penalties.is_some() {
            let barred = |i: usize| {
                rows.get(i)
                    .and_then(|r| r.get(drafts[i] as usize))
                    .is_none_or(|&x| x == f32::NEG_INFINITY)
            };
            allowed = (0..allowed).find(|&i| barred(i)).unwrap_or(allowed);
        }
        if let Some(i) = rows
            .iter()
            .take(allowed + 1)
            .position(|r| max(r) == f32::NEG_INFINITY)
        {
            let generated = self.penalties.as_ref().map(Penalizer::generated);
            return Err(NoTokenAllowed {
                position: generated.map(|g| g + i),
            }
            .into());
        }
        Ok(allowed)
    }

    /// Records an emitted token.
    pub fn push(&mut self, t: u32) -> anyhow::Result<()> {
        if let Some(z) = self.penalties.as_mut() {
            z.push(t);
        }
        match self.grammar.as_mut() {
            Some(g) => g.push(t),
            None => Ok(()),
        }
    }

    /// The tokens the grammar forces next ([`Constraint::forced`]; empty without a grammar).
    pub fn forced(&mut self) -> Vec<u32> {
        self.grammar
            .as_mut()
            .map(Constraint::forced)
            .unwrap_or_default()
    }

    /// Whether `t` ends the output because the grammar is complete (besides the stop tokens).
    pub fn ends(&self, t: u32) -> bool {
        self.grammar.as_ref().is_some_and(|g| g.ends(t))
    }
}

/// Every token of a row the request needs got -inf: its `allowed_token_ids`, `bad_words`,
/// `min_tokens` and grammar together leave nothing to generate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "no token may come next{}: the request's allowed_token_ids, bad_words, min_tokens and output grammar together exclude every token",
    position.map(|p| format!(" at output position {p}")).unwrap_or_default()
)]
pub struct NoTokenAllowed {
    /// Tokens generated before that row, when known.
    pub position: Option<usize>,
}

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// How to turn logits into a distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy: the distribution is one-hot on the argmax.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = no limit.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches top_p; 1.0 = no limit.
    pub top_p: f32,
    /// Keep only tokens at least this fraction as likely as the most likely one (vLLM's and
    /// llama.cpp's min-p); 0 = no limit.
    pub min_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks the ranges an API request may set; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        Ok(())
    }
}

/// Index of the largest value (the first one on ties; NaN never wins). 0 for an empty slice.
pub fn argmax(xs: &[f32]) -> u32 {
    // Two branch-free passes (the max, then the first block holding it) vectorise; one pass
    // with a running index does not. A 150k vocabulary is read every decoded token.
    let best_v = max(xs);
    if best_v == f32::NEG_INFINITY {
        return 0;
    }
    let mut at = 0;
    for c in xs.chunks(64) {
        if c.iter().fold(false, |hit, &v| hit | (v == best_v)) {
            return (at + c.iter().position(|&v| v == best_v).unwrap_or(0)) as u32;
        }
        at += c.len();
    }
    0
}

/// The largest value, ignoring NaN (`NEG_INFINITY` when there is none).
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    it.remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// ln sum exp(xs), given their maximum `max` (from [`max`]). The exponentials are f32
/// (relative error ~2e-7 each) in 8 lanes so the loop vectorises; blocks are summed in f64.
pub fn log_sum_exp(xs: &[f32], max: f32) -> f64 {
    max as f64 + lane_sum(xs, |v| exp_nonpositive(v - max)).ln()
}

/// Sum of f(x) over xs: f32 in 8 lanes (so that the loop vectorises when f has no branch or
/// libm call), blocks of 1024 summed in f64.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += f(v);
            }
        }
        let rest: f32 = it.remainder().iter().map(|&v| f(v)).sum();
        total += (rest + lanes.iter().sum::<f32>()) as f64;
    }
    total
}

/// e^x for x <= 0 without a libm call, so that loops over it vectorise: x = n ln2 + r with
/// |r| <= ln2/2 (ln2 split in two for exactness), e^r by its degree-6 Taylor polynomial
/// (remainder < 1.2e-7 relative), 2^n from the exponent bits. Below -87 (where e^x is under
/// f32's normal range), and for NaN, it returns ~1e-38, which a sum of exponentials of logits
/// never notices.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    // max/min, not clamp: NaN becomes the floor (clamp would keep it).
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(0.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // n as an integer from t's low mantissa bits: no float-to-int cast, which kept the loops
    // over this function scalar (|n| <= 126 < 2^22).
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Softmax of `logits / temperature` restricted by top-k, top-p and min-p (the tokens that all
/// three keep), as a full-vocabulary vector (zeros outside the kept set). Temperature 0 gives a
/// one-hot at the argmax.
pub fn probabilities(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let n = logits.len();
    let mut p = vec![0f32; n];
    if n == 0 {
        return p;
    }
    if params.is_greedy() {
        p[argmax(logits) as usize] = 1.0;
        return p;
    }
    let inv_t = 1.0 / params.temperature;
    let max = max(logits);
    if !max.is_finite() {
        // All -inf (or NaN): nothing to prefer, fall back to the argmax rule.
        p[argmax(logits) as usize] = 1.0;
        return p;
    }
    // -inf (a barred token: a grammar, min_tokens) and NaN get exactly 0, not the floor of
    // `exp_nonpositive`; the sum is f32 lanes per block, blocks in f64.
    for (pi, &l) in p.iter_mut().zip(logits) {
        let e = exp_nonpositive((l - max) * inv_t);
        *pi = if l > f32::NEG_INFINITY { e } else { 0.0 };
    }
    let sum = lane_sum(&p, |x| x);
    let inv = (1.0 / sum) as f32;
    p.iter_mut().for_each(|x| *x *= inv);

    let limit_k = params.top_k > 0 && params.top_k < n;
    let limit_p = params.top_p < 1.0;
    // min-p after top-k and top-p (vLLM's order), relative to the most likely token, which
    // they always keep.
    let floor = params.min_p * p[argmax(&p) as usize];
    if !(limit_k || limit_p) {
        if floor > 0.0 {
            p.iter_mut().filter(|x| **x < floor).for_each(|x| *x = 0.0);
            let inv = (1.0 / lane_sum(&p, |x| x)) as f32;
            p.iter_mut().for_each(|x| *x *= inv);
        }
        return p;
    }
    // Candidate order: probability descending, then id ascending (deterministic on ties).
    let mut order: Vec<u32> = (0..n as u32).collect();
    let by_prob = |a: &u32, b: &u32| {
        p[*b as usize]
            .total_cmp(&p[*a as usize])
            .then_with(|| a.cmp(b))
    };
    let keep_k = if limit_k { params.top_k } else { n };
    if keep_k < n {
        order.select_nth_unstable_by(keep_k - 1, by_prob);
        order.truncate(keep_k);
    }
    order.sort_unstable_by(by_prob);
    let mut kept = order.len();
    if limit_p {
        let mass: f64 = order.iter().map(|&i| p[i as usize] as f64).sum();
        let target = params.top_p as f64 * mass;
        let mut acc = 0f64;
        for (j, &i) in order.iter().enumerate() {
            acc += p[i as usize] as f64;
            if acc >= target {
                kept = j + 1;
                break;
            }
        }
    }
    if floor > 0.0 {
        kept = order[..kept].partition_point(|&i| p[i as usize] >= floor);
    }
    let mut out = vec![0f32; n];
    let total: f64 = order[..kept].iter().map(|&i| p[i as usize] as f64).sum();
    for &i in &order[..kept] {
        out[i as usize] = (p[i as usize] as f64 / total) as f32;
    }
    out
}

/// Draws a token from `probs` with the uniform `u` in [0, 1): the first token whose cumulative
/// mass exceeds `u * total` (so unnormalised inputs work too). Zero-probability tokens are
/// never drawn; an all-zero vector gives its argmax (0).
pub fn sample(probs: &[f32], u: f32) -> u32 {
    let total: f64 = probs.iter().map(|&x| x.max(0.0) as f64).sum();
    if total <= 0.0 || !total.is_finite() {
        return argmax(probs);
    }
    let target = (u.clamp(0.0, 1.0) as f64) * total;
    let mut acc = 0f64;
    let mut last_nonzero = 0u32;
    for (i, &x) in probs.iter().enumerate() {
        if x > 0.0 {
            acc += x as f64;
            last_nonzero = i as u32;
            if acc > target {
                return i as u32;
            }
        }
    }
    // Rounding left target at the very top: the last token with mass.
    last_nonzero
}

/// The residual distribution norm(max(0, p - q)): what speculative sampling draws from after
/// rejecting a drafted token, so that the output follows p exactly. When p <= q everywhere (no
/// residual mass, e.g. p == q) it falls back to p.
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let mut r: Vec<f32> = p
        .iter()
        .zip(q.iter().chain(std::iter::repeat(&0.0)))
        .map(|(&a, &b)| (a - b).max(0.0))
        .collect();
    let mass: f64 = r.iter().map(|&x| x as f64).sum();
    if mass <= 0.0 || !mass.is_finite() {
        return p.to_vec();
    }
    let inv = (1.0 / mass) as f32;
    r.iter_mut().for_each(|x| *x *= inv);
    r
}

/// A request's random stream: ChaCha20 seeded from the request seed, so a (seed, request) pair
/// reproduces the same tokens.
#[derive(Debug, Clone)]
pub struct Rng64 {
    rng: ChaCha20Rng,
}

impl Rng64 {
    pub fn new(seed: u64) -> Self {
        Rng64 {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }
}

/// One-call sampling: probabilities with `params`, then a draw with the next uniform from `rng`
/// (greedy consumes no randomness).
pub fn sample_logits(logits: &[f32], params: &SamplingParams, rng: &mut Rng64) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let p = probabilities(logits, params);
    sample(&p, rng.uniform())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: 0.0,
        }
    }

    #[test]
    fn min_p_keeps_tokens_near_the_most_likely() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        let with = |k: usize, p: f32, m: f32| {
            probabilities(
                &logits,
                &SamplingParams {
                    min_p: m,
                    ..params(1.0, k, p)
                },
            )
        };
        // Floor 0.1: the 0.05 token goes.
        assert!(close(
            &with(0, 1.0, 0.2),
            &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]
        ));
        // After top-k 3 the floor 0.35 leaves only the first.
        assert!(close(&with(3, 1.0, 0.7), &[1.0, 0.0, 0.0, 0.0]));
        // top-p 0.9 keeps three (0.95 reaches it), then floor 0.2 drops 0.15.
        assert!(close(&with(0, 0.9, 0.4), &[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]));
        assert!(close(&with(0, 1.0, 0.0), &[0.5, 0.3, 0.15, 0.05]));
        assert!(
            SamplingParams {
                min_p: 1.5,
                ..SamplingParams::default()
            }
            .validate()
            .unwrap_err()
            .starts_with("min_p")
        );
    }

    #[test]
    fn argmax_first_max_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), 0);
        // Long rows (the vectorised blocks): the first of equal maxima, anywhere.
        let mut rng = Rng64::new(3);
        for n in [1, 7, 8, 63, 64, 65, 1000, 151_936] {
            let mut row: Vec<f32> = (0..n).map(|_| rng.uniform() * 10.0 - 5.0).collect();
            let want = (0..n).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            assert_eq!(argmax(&row) as usize, want, "n = {n}");
            row[n - 1] = 9.0;
            row[n / 2] = 9.0;
            assert_eq!(argmax(&row) as usize, n / 2, "n = {n}");
        }
    }

    #[test]
    fn a_nan_logit_gets_no_probability() {
        let p = probabilities(&[1.0, f32::NAN, 2.0], &params(1.0, 0, 1.0));
        assert!(p.iter().all(|x| x.is_finite()), "{p:?}");
        assert!(p[1] < 1e-30);
        let e = (1f64).exp();
        assert!((p[2] as f64 - e / (1.0 + e)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        let mut rng = Rng64::new(5);
        for (n, spread) in [
            (1, 1.0),
            (9, 3.0),
            (1000, 10.0),
            (151_936, 30.0),
            (5000, 200.0),
        ] {
            let row: Vec<f32> = (0..n).map(|_| (rng.uniform() - 0.7) * spread).collect();
            let m = max(&row);
            let want = m as f64
                + row
                    .iter()
                    .map(|&x| (x as f64 - m as f64).exp())
                    .sum::<f64>()
                    .ln();
            let got = log_sum_exp(&row, m);
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "n {n}: {got} vs {want}"
            );
        }
        // Every exponent over f32's range, one by one.
        for i in 0..=2000 {
            let x = -(i as f32) * 0.05;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if x >= -87.0 {
                assert!((got - want).abs() <= 3e-7 * want, "e^{x}: {got} vs {want}");
            } else {
                assert!(got < 2e-38, "e^{x}: {got}");
            }
        }
    }

    #[test]
    fn greedy_is_one_hot() {
        let p = probabilities(&[0.1, 2.0, -1.0, 1.9], &params(0.0, 0, 1.0));
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn softmax_with_temperature() {
        let logits = [0.0f32, (2.0f32).ln()];
        let p = probabilities(&logits, &params(1.0, 0, 1.0));
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6);
        // T = 0.5 squares the odds: 1 : 4.
        let p = probabilities(&logits, &params(0.5, 0, 1.0));
        assert!(
            (p[0] - 0.2).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn top_k_keeps_k_and_renormalises() {
        let logits = [1.0f32, 4.0, 3.0, 2.0];
        let p = probabilities(&logits, &params(1.0, 2, 1.0));
        assert_eq!(p[0], 0.0);
        assert_eq!(p[3], 0.0);
        let e = (1.0f32).exp();
        assert!((p[1] - e / (e + 1.0)).abs() < 1e-6, "{p:?}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_mass() {
        // probabilities 0.5, 0.3, 0.2 (as logits ln p).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = probabilities(&logits, &params(1.0, 0, 0.5));
        assert_eq!(p, vec![1.0, 0.0, 0.0]);
        let p = probabilities(&logits, &params(1.0, 0, 0.75));
        assert!((p[0] - 0.625).abs() < 1e-6 && (p[1] - 0.375).abs() < 1e-6 && p[2] == 0.0);
        let p = probabilities(&logits, &params(1.0, 0, 1.0));
        assert!((p[2] - 0.2).abs() < 1e-6);
    }

    #[test]
    fn sample_inverts_the_cdf() {
        let p = [0.25f32, 0.0, 0.5, 0.25];
        assert_eq!(sample(&p, 0.0), 0);
        assert_eq!(sample(&p, 0.2499), 0);
        assert_eq!(sample(&p, 0.25), 2);
        assert_eq!(sample(&p, 0.7499), 2);
        assert_eq!(sample(&p, 0.75), 3);
        assert_eq!(sample(&p, 0.99999), 3);
        assert_eq!(sample(&p, 1.0), 3);
        assert_eq!(sample(&[0.0, 0.0], 0.5), 0);
        // unnormalised input
        assert_eq!(sample(&[1.0, 3.0], 0.3), 1);
    }

    #[test]
    fn residual_normalises_positive_part_and_falls_back() {
        let p = [0.5f32, 0.3, 0.2];
        let q = [0.2f32, 0.5, 0.3];
        let r = residual(&p, &q);
        assert!(
            (r[0] - 1.0).abs() < 1e-6 && r[1] == 0.0 && r[2] == 0.0,
            "{r:?}"
        );
        let q2 = [0.4f32, 0.1, 0.5];
        let r = residual(&p, &q2);
        // max(0, p-q) = [0.1, 0.2, 0] -> [1/3, 2/3, 0]
        assert!((r[0] - 1.0 / 3.0).abs() < 1e-6 && (r[1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(residual(&p, &p), p.to_vec());
    }

    #[test]
    fn seeded_stream_is_reproducible_and_in_range() {
        let mut a = Rng64::new(42);
        let mut b = Rng64::new(42);
        let mut c = Rng64::new(43);
        let xs: Vec<f32> = (0..100).map(|_| a.uniform()).collect();
        let ys: Vec<f32> = (0..100).map(|_| b.uniform()).collect();
        let zs: Vec<f32> = (0..100).map(|_| c.uniform()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert!(xs.iter().all(|&u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn sampling_frequencies_follow_probabilities() {
        let logits = [0.0f32, 1.0, 2.0];
        let prm = params(1.0, 0, 1.0);
        let p = probabilities(&logits, &prm);
        let mut rng = Rng64::new(7);
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[sample_logits(&logits, &prm, &mut rng) as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f32 / n as f32;
            assert!((f - p[i]).abs() < 0.015, "token {i}: {f} vs {}", p[i]);
        }
    }

    #[test]
    fn validate_names_field() {
        assert!(
            params(-1.0, 0, 1.0)
                .validate()
                .unwrap_err()
                .contains("temperature")
        );
        assert!(
            params(1.0, 0, 0.0)
                .validate()
                .unwrap_err()
                .contains("top_p")
        );
        assert!(params(0.7, 40, 0.9).validate().is_ok());
    }
}
