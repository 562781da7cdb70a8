//! Adaptive speculation length: choose k per step from the request's own acceptance history and
//! the measured costs of drafting and verifying, instead of a fixed k.
//!
//! A step that drafts k tokens emits 1 + S(1) + ... + S(k) tokens on average, where S(i) is the
//! chance that the first i drafted tokens are all accepted, and costs k * t_draft +
//! t_verify(k). With one acceptance rate a for every position, S(i) = a^i and the sum is
//! (1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023). Acceptances are not independent, though:
//! prompt lookup copying a file is accepted in long runs, and once a run has started it tends to
//! go on. So S(i) is the product of per-position acceptance rates (of the positions a step
//! reached), each estimated from the request's own steps, with the overall rate standing in for
//! positions seen too rarely. We pick the k in [1, k_max] that maximises tokens per second under
//! these estimates and running estimates of t_draft and t_verify; all decay so k follows the
//! text (code boilerplate drafts well, prose less). t_verify(n) is a line through the measured
//! verifications and plain steps ([`VerifyFit`]): on a CPU each verified position costs about
//! 40% of a one-position forward, on a GPU a few percent, and the best k follows that slope.

/// Running estimates for one request.
#[derive(Debug, Clone)]
pub struct AdaptiveK {
    k_max: usize,
    /// Acceptance rate estimate (per drafted position reached).
    rate: f64,
    /// Per position i (index i - 1): steps that reached it (drafted it, with every earlier
    /// position accepted) and steps that rejected it there, both decayed.
    reached: Vec<f64>,
    rejected: Vec<f64>,
    /// Seconds per drafted token (0 for free drafters such as prompt lookup).
    t_draft: f64,
    /// Seconds of verification: a fixed part plus a part per verified position.
    t_verify_fixed: f64,
    t_verify_per_pos: f64,
    /// The line through the measured verify times, once they tell the slope (it then replaces
    /// the two estimates above); `None`: the estimates alone (see [`AdaptiveK::without_fit`]).
    fit: Option<VerifyFit>,
}

const ALPHA: f64 = 0.2;
/// Per-step decay of the per-position counts (about the last 7 steps weigh most).
const POSITION_DECAY: f64 = 0.85;
/// Weight of the overall rate in each position's estimate, in steps.
const POSITION_PRIOR: f64 = 1.0;

/// Seconds to verify n positions, `fixed + per_position * n`, fitted by least squares over the
/// measured verifications and plain steps (n = 1), decayed so it follows load changes. The
/// target's cost does not depend on who drafted, and only forwards of different lengths tell the
/// fixed part from the per-position part.
#[derive(Debug, Clone, Default)]
pub struct VerifyFit {
    w: f64,
    sn: f64,
    snn: f64,
    st: f64,
    snt: f64,
}

impl VerifyFit {
    const DECAY: f64 = 0.97;

    /// One forward over `positions` rows that took `seconds`.
    pub fn observe(&mut self, positions: usize, seconds: f64) {
        let n = positions as f64;
        let d = Self::DECAY;
        self.w = d * self.w + 1.0;
        self.sn = d * self.sn + n;
        self.snn = d * self.snn + n * n;
        self.st = d * self.st + seconds;
        self.snt = d * self.snt + n * seconds;
    }

    /// `(fixed, per_position)`, once the forwards seen differ enough in length.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.w < 2.0 {
            return None;
        }
        let mean_n = self.sn / self.w;
        let var_n = self.snn / self.w - mean_n * mean_n;
        if var_n < 0.25 {
            return None;
        }
        let mean_t = self.st / self.w;
        let per = ((self.snt / self.w - mean_n * mean_t) / var_n).max(0.0);
        let fixed = (mean_t - per * mean_n).max(0.0);
        Some((fixed, per))
    }
}

impl AdaptiveK {
    pub fn new(k_max: usize) -> Self {
        Self {
            k_max: k_max.max(1),
            rate: 0.7,
            reached: vec![0.0; k_max.max(1)],
            rejected: vec![0.0; k_max.max(1)],
            t_draft: 0.0,
            t_verify_fixed: 1.0,
            t_verify_per_pos: 0.05,
            fit: Some(VerifyFit::default()),
        }
    }

    /// Adaptive k without the fit, as it was before it had one (`bench lookup` compares the
    /// two): each verify time is split between the fixed and per-position parts in the prior's
    /// 20:1 ratio forever, which makes positions look cheap on a CPU.
    pub fn without_fit(k_max: usize) -> Self {
        Self {
            fit: None,
            ..Self::new(k_max)
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Expected tokens per unit time of a plain step (no draft: one token per one-position
    /// verify), to compare drafting against.
    pub fn plain_speed(&self) -> f64 {
        let (fixed, per) = self.verify_line();
        1.0 / (fixed + per).max(1e-12)
    }

    /// Seconds to verify n positions as `fixed + per * n`: the fit when there is one.
    fn verify_line(&self) -> (f64, f64) {
        self.fit
            .as_ref()
            .and_then(VerifyFit::fit)
            .unwrap_or((self.t_verify_fixed, self.t_verify_per_pos))
    }

    /// The k that maximises expected tokens per unit time.
    pub fn next_k(&self) -> usize {
        self.best().0
    }

    /// That k and its expected tokens per second.
    pub fn best(&self) -> (usize, f64) {
        let (fixed, per) = self.verify_line();
        self.best_with(|positions| fixed + positions as f64 * per)
    }

    /// [`Self::best`] with the seconds of verifying n positions given by `verify(n)` (a cost
    /// model fitted elsewhere) instead of this estimate's own.
    pub fn best_with(&self, verify: impl Fn(usize) -> f64) -> (usize, f64) {
        let a = self.rate.clamp(0.0, 0.999);
        let mut best = (1usize, f64::MIN);
        // Expected tokens of a k-token draft: the bonus or correction token, plus S(1..=k).
        let (mut tokens, mut survive) = (1.0, 1.0);
        for k in 1..=self.k_max {
            let (reached, rejected) = (self.reached[k - 1], self.rejected[k - 1]);
            let accept = 1.0 - (rejected + POSITION_PRIOR * (1.0 - a)) / (reached + POSITION_PRIOR);
            survive *= accept.clamp(0.0, 0.999);
            tokens += survive;
            let cost = k as f64 * self.t_draft + verify(k + 1);
            let speed = tokens / cost.max(1e-12);
            if speed > best.1 * (1.0 + 1e-9) {
                best = (k, speed);
            }
        }
        best
    }

    /// Record one step: `drafted` positions proposed, `accepted` of them kept (a prefix), and the
    /// measured times. A plain step (`drafted` = 0, its forward as `verify_s`) only adds a point
    /// to the verify fit.
    pub fn observe(&mut self, drafted: usize, accepted: usize, draft_s: f64, verify_s: f64) {
        if let Some(fit) = self.fit.as_mut().filter(|_| verify_s > 0.0) {
            fit.observe(drafted + 1, verify_s);
        }
        if drafted == 0 {
            return;
        }
        // Positions that were actually tested: the accepted prefix plus the one that failed.
        let tested = (accepted + 1).min(drafted);
        for (r, j) in self.reached.iter_mut().zip(self.rejected.iter_mut()) {
            *r *= POSITION_DECAY;
            *j *= POSITION_DECAY;
        }
        for r in self.reached.iter_mut().take(tested) {
            *r += 1.0;
        }
        if accepted < drafted
            && let Some(j) = self.rejected.get_mut(accepted)
        {
            *j += 1.0;
        }
        let step_rate = accepted as f64 / tested as f64;
        self.rate += ALPHA * (step_rate - self.rate);
        self.t_draft += ALPHA * (draft_s / drafted as f64 - self.t_draft);
        // Split the verify time with the current fixed/per-position ratio.
        let predicted = self.t_verify_fixed + (drafted as f64 + 1.0) * self.t_verify_per_pos;
        if predicted > 0.0 && verify_s > 0.0 {
            let scale = verify_s / predicted;
            self.t_verify_fixed += ALPHA * (self.t_verify_fixed * scale - self.t_verify_fixed);
            self.t_verify_per_pos +=
                ALPHA * (self.t_verify_per_pos * scale - self.t_verify_per_pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AdaptiveK;

    #[test]
    fn high_acceptance_with_cheap_drafts_grows_k_low_acceptance_shrinks_it() {
        let mut good = AdaptiveK::new(16);
        let mut bad = AdaptiveK::new(16);
        for _ in 0..50 {
            good.observe(8, 8, 0.008, 0.1);
            bad.observe(8, 0, 0.008, 0.1);
        }
        assert!(good.next_k() >= 12, "good k = {}", good.next_k());
        assert_eq!(bad.next_k(), 1);
        assert!(good.rate() > 0.95 && bad.rate() < 0.05);
    }

    #[test]
    fn the_verify_slope_is_fitted_from_plain_steps_and_drafts() {
        // Half of the drafted positions are kept. A CPU-like target: each verified position
        // costs 40% of a one-position forward, so drafting 1 token beats drafting 3 (1.5 tokens
        // per 1.8 forwards against 1.875 per 2.6). A GPU-like target: positions are nearly free,
        // so long drafts pay.
        for (per, k_is_small) in [(0.4, true), (0.01, false)] {
            let cost = |n: usize| 1.0 + per * n as f64;
            let mut a = AdaptiveK::new(8);
            for i in 0..60 {
                a.observe(0, 0, 0.0, cost(1));
                let d = 1 + i % 4;
                a.observe(d, d / 2, 0.0, cost(d + 1));
            }
            let k = a.next_k();
            assert_eq!(k == 1, k_is_small, "per-position cost {per}: k = {k}");
            let plain = a.plain_speed();
            assert!((plain - 1.0 / cost(1)).abs() < 1e-6, "plain speed {plain}");
        }
    }

    #[test]
    fn acceptance_in_long_runs_drafts_longer_than_one_rate_would() {
        // A quarter of the steps reject the first drafted token; the rest accept all 8 (text
        // copied in runs). One rate for every position (0.75) would make the 8th token worth
        // 0.75^8 = 0.1 of a token and pick k = 5 at this verify cost; the run goes on once
        // started, so the later positions are nearly free tokens.
        let cost = |n: usize| 1.0 + 0.1 * n as f64;
        let mut a = AdaptiveK::new(16);
        for i in 0..40 {
            a.observe(0, 0, 0.0, cost(1));
            let accepted = if i % 4 == 0 { 0 } else { 8 };
            a.observe(8, accepted, 0.0, cost(9));
        }
        assert!(a.next_k() >= 8, "k = {}", a.next_k());
        // Independent rejections at the same overall rate keep k short.
        let mut b = AdaptiveK::new(16);
        for i in 0..40 {
            b.observe(0, 0, 0.0, cost(1));
            b.observe(4, [1, 2, 3, 4][i % 4], 0.0, cost(5));
        }
        assert!(b.next_k() < a.next_k(), "{} vs {}", b.next_k(), a.next_k());
    }

    #[test]
    fn expensive_drafts_keep_k_small() {
        let mut a = AdaptiveK::new(16);
        for _ in 0..50 {
            // 80% acceptance, a draft token costs as much as a whole verification.
            a.observe(4, 3, 4.0 * 0.1, 0.1);
        }
        assert!(a.next_k() <= 3, "k = {}", a.next_k());
    }
}
