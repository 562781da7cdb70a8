//! Adaptive speculation length: choose k per step from the request's own acceptance history and
//! the measured costs of drafting and verifying, instead of a fixed k.
//!
//! With a per-token acceptance rate a, a step that drafts k tokens emits on average
//! (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al. 2023) and costs k * t_draft + t_verify(k).
//! We pick the k in [1, k_max] that maximises tokens per second under running estimates of a,
//! t_draft and t_verify; the estimates are exponential moving averages so k follows the text
//! (code boilerplate drafts well, prose less).

/// Running estimates for one request.
#[derive(Debug, Clone)]
pub struct AdaptiveK {
    k_max: usize,
    /// Acceptance rate estimate (per drafted position reached).
    rate: f64,
    /// Seconds per drafted token (0 for free drafters such as prompt lookup).
    t_draft: f64,
    /// Seconds of verification: a fixed part plus a part per verified position.
    t_verify_fixed: f64,
    t_verify_per_pos: f64,
}

const ALPHA: f64 = 0.2;

impl AdaptiveK {
    pub fn new(k_max: usize) -> Self {
        Self {
            k_max: k_max.max(1),
            rate: 0.7,
            t_draft: 0.0,
            t_verify_fixed: 1.0,
            t_verify_per_pos: 0.05,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Expected tokens per unit time of a plain step (no draft: one token per one-position
    /// verify), to compare drafting against.
    pub fn plain_speed(&self) -> f64 {
        1.0 / (self.t_verify_fixed + self.t_verify_per_pos).max(1e-12)
    }

    /// The k that maximises expected tokens per unit time.
    pub fn next_k(&self) -> usize {
        self.best().0
    }

    /// That k and its expected tokens per second.
    pub fn best(&self) -> (usize, f64) {
        self.best_with(|positions| self.t_verify_fixed + positions as f64 * self.t_verify_per_pos)
    }

    /// [`Self::best`] with the seconds of verifying n positions given by `verify(n)` (a cost
    /// model fitted elsewhere) instead of this estimate's own.
    pub fn best_with(&self, verify: impl Fn(usize) -> f64) -> (usize, f64) {
        let a = self.rate.clamp(0.0, 0.999);
        let mut best = (1usize, f64::MIN);
        for k in 1..=self.k_max {
            let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
            let cost = k as f64 * self.t_draft + verify(k + 1);
            let speed = tokens / cost.max(1e-12);
            if speed > best.1 * (1.0 + 1e-9) {
                best = (k, speed);
            }
        }
        best
    }

    /// Record one step: `drafted` positions proposed, `accepted` of them kept (a prefix), and the
    /// measured times.
    pub fn observe(&mut self, drafted: usize, accepted: usize, draft_s: f64, verify_s: f64) {
        if drafted == 0 {
            return;
        }
        // Positions that were actually tested: the accepted prefix plus the one that failed.
        let tested = (accepted + 1).min(drafted);
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
    fn expensive_drafts_keep_k_small() {
        let mut a = AdaptiveK::new(16);
        for _ in 0..50 {
            // 80% acceptance, a draft token costs as much as a whole verification.
            a.observe(4, 3, 4.0 * 0.1, 0.1);
        }
        assert!(a.next_k() <= 3, "k = {}", a.next_k());
    }
}
