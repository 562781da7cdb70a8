//! Automatic drafter choice: per request and per step, the drafter expected to give the most
//! tokens per second, from each candidate's own acceptance history and measured costs (the
//! estimates adaptive k keeps, see [`crate::engine::AdaptiveK`]).
//!
//! Prompt lookup drafts for free but only when the text repeats itself; a draft model always
//! has a proposal but costs a forward per token. The target's verify cost is one fit over all
//! candidates' verifications and the plain steps (`VerifyFit`): forwards of different lengths
//! are what separate its fixed part from its per-position part. So each step tries the
//! candidates from the best expected speed down and takes the first that has something to
//! propose, skipping those expected to be slower than a plain step (no draft at all: then the
//! step is plain). Every [`EXPLORE_EVERY`]-th step tries the least recently used candidate
//! first, whatever its estimate, so an estimate that turned pessimistic can recover when the
//! text changes.
//!
//! Without adaptation (a seeded request keeps its choices reproducible), the order is fixed:
//! the candidates as given, each proposing the full k.

use anyhow::Result;

use super::{Draft, Drafter};
use crate::engine::{AdaptiveK, VerifyFit};
use crate::models::Session;
use crate::sample::{Rng64, SamplingParams};

/// One step in this many explores the least recently used candidate.
pub const EXPLORE_EVERY: u64 = 16;

struct Candidate {
    drafter: Box<dyn Drafter>,
    estimate: AdaptiveK,
    last_used: u64,
}

/// Chooses among drafters per step (`auto`).
pub struct AutoDrafter {
    candidates: Vec<Candidate>,
    adaptive: bool,
    steps: u64,
    /// The candidate that made the last proposal.
    last: Option<usize>,
    verify: VerifyFit,
}

impl AutoDrafter {
    /// `candidates` in their order of preference when not adapting; `k_max` caps every k.
    pub fn new(candidates: Vec<Box<dyn Drafter>>, k_max: usize, adaptive: bool) -> Self {
        AutoDrafter {
            candidates: candidates
                .into_iter()
                .map(|drafter| Candidate {
                    drafter,
                    estimate: AdaptiveK::new(k_max),
                    last_used: 0,
                })
                .collect(),
            adaptive,
            steps: 0,
            last: None,
            verify: VerifyFit::default(),
        }
    }

    /// The candidates to try in this step, in order, each with its draft length (at most `k`).
    fn order(&self, k: usize) -> Vec<(usize, usize)> {
        if !self.adaptive {
            return (0..self.candidates.len()).map(|i| (i, k)).collect();
        }
        // Each candidate's best k and expected tokens per second, and a plain step's: with the
        // shared verify cost once it is known (it has every candidate's and plain step's
        // forwards), else each candidate's own estimate.
        let fit = self.verify.fit();
        let best: Vec<((usize, f64), f64)> = self
            .candidates
            .iter()
            .map(|c| match fit {
                Some((fixed, per)) => (
                    c.estimate.best_with(|n| fixed + per * n as f64),
                    1.0 / (fixed + per).max(1e-12),
                ),
                None => (c.estimate.best(), c.estimate.plain_speed()),
            })
            .collect();
        let mut order: Vec<usize> = (0..self.candidates.len()).collect();
        // Drafting that is not expected to beat a plain step is not tried.
        order.retain(|&i| best[i].0.1 >= best[i].1);
        // Best expected speed first (a stable sort keeps the given order on ties).
        order.sort_by(|&a, &b| best[b].0.1.total_cmp(&best[a].0.1));
        if self.steps % EXPLORE_EVERY == EXPLORE_EVERY - 1
            && let Some(stale) =
                (0..self.candidates.len()).min_by_key(|&i| self.candidates[i].last_used)
        {
            order.retain(|&i| i != stale);
            order.insert(0, stale); // explored even when its estimate says plain is faster
        }
        order.into_iter().map(|i| (i, best[i].0.0.min(k))).collect()
    }
}

impl Drafter for AutoDrafter {
    fn name(&self) -> String {
        "auto".into()
    }

    fn constrain(&mut self, grammar: &crate::sample::Constraint) {
        for c in &mut self.candidates {
            c.drafter.constrain(grammar);
        }
    }

    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut Rng64,
    ) -> Result<Draft> {
        self.steps += 1;
        self.last = None;
        for (i, k_i) in self.order(k) {
            let c = &mut self.candidates[i];
            let draft = c.drafter.propose(context, k_i, sampling, rng)?;
            if !draft.tokens.is_empty() {
                c.last_used = self.steps;
                self.last = Some(i);
                return Ok(draft);
            }
        }
        Ok(Draft::default())
    }

    fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        self.candidates
            .iter_mut()
            .try_for_each(|c| c.drafter.prefill(prompt))
    }

    fn has_sequence(&self) -> bool {
        self.candidates.iter().any(|c| c.drafter.has_sequence())
    }

    fn take_sequence(&mut self) -> Option<(Session, Vec<u32>)> {
        self.candidates
            .iter_mut()
            .find_map(|c| c.drafter.take_sequence())
    }

    fn copy_sequence(&self) -> Option<Result<(Session, Vec<u32>)>> {
        self.candidates
            .iter()
            .find_map(|c| c.drafter.copy_sequence())
    }

    fn resume(&mut self, session: Session, tokens: Vec<u32>) {
        // The one candidate with a draft model takes it (a sequence comes from that model).
        if let Some(c) = self
            .candidates
            .iter_mut()
            .find(|c| c.drafter.has_sequence())
        {
            c.drafter.resume(session, tokens);
        }
    }

    fn chooses_k(&self) -> bool {
        self.adaptive
    }

    fn observe(&mut self, drafted: usize, accepted: usize, draft_s: f64, verify_s: f64) {
        // A plain step (drafted = 0) is the fit's one-position point.
        self.verify.observe(drafted + 1, verify_s);
        if drafted == 0 {
            return;
        }
        if let Some(i) = self.last {
            self.candidates[i]
                .estimate
                .observe(drafted, accepted, draft_s, verify_s);
        }
    }

    fn last_choice(&self) -> Option<String> {
        self.last.map(|i| self.candidates[i].drafter.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draft::PromptLookup;

    /// A drafter that always proposes `k` copies of one token.
    struct Fixed(u32);

    impl Drafter for Fixed {
        fn name(&self) -> String {
            format!("fixed:{}", self.0)
        }
        fn propose(
            &mut self,
            _: &[u32],
            k: usize,
            _: &SamplingParams,
            _: &mut Rng64,
        ) -> Result<Draft> {
            Ok(Draft::certain(vec![self.0; k]))
        }
    }

    fn step(a: &mut AutoDrafter, ctx: &[u32]) -> (Option<String>, usize) {
        let d = a
            .propose(ctx, 8, &SamplingParams::default(), &mut Rng64::new(1))
            .unwrap();
        (a.last_choice(), d.tokens.len())
    }

    #[test]
    fn falls_through_to_a_drafter_that_has_a_proposal() {
        let mut a = AutoDrafter::new(
            vec![Box::new(PromptLookup::default()), Box::new(Fixed(7))],
            8,
            false,
        );
        // No repetition: prompt lookup has nothing, the fixed drafter proposes.
        assert_eq!(step(&mut a, &[1, 2, 3]), (Some("fixed:7".into()), 8));
        // A repeat: prompt lookup comes first when not adapting.
        assert_eq!(
            step(&mut a, &[1, 2, 3, 1, 2]).0.as_deref(),
            Some("prompt-lookup")
        );
        assert!(!a.chooses_k());
    }

    #[test]
    fn learns_which_candidate_pays_and_still_explores() {
        let mut a = AutoDrafter::new(vec![Box::new(Fixed(1)), Box::new(Fixed(2))], 8, true);
        let mut uses = [0usize; 2];
        for _ in 0..200 {
            let (name, n) = step(&mut a, &[5]);
            let i = usize::from(name.as_deref() == Some("fixed:2"));
            uses[i] += 1;
            // Candidate 2's drafts are all accepted, candidate 1's never; same costs.
            let accepted = if i == 1 { n } else { 0 };
            a.observe(n, accepted, 0.001 * n as f64, 0.01);
        }
        assert!(uses[1] > 150, "{uses:?}");
        // Exploration keeps trying the losing one now and then.
        assert!(uses[0] >= 200 / EXPLORE_EVERY as usize / 2, "{uses:?}");
        assert!(a.chooses_k());
    }

    #[test]
    fn the_verify_fit_separates_fixed_and_per_position_costs() {
        let mut f = VerifyFit::default();
        f.observe(3, 0.1 + 3.0 * 0.02);
        assert!(f.fit().is_none(), "one length tells nothing apart");
        for n in [3, 9, 3, 9, 5] {
            f.observe(n, 0.1 + n as f64 * 0.02);
        }
        let (fixed, per) = f.fit().unwrap();
        assert!(
            (fixed - 0.1).abs() < 1e-9 && (per - 0.02).abs() < 1e-9,
            "{fixed} {per}"
        );
    }

    #[test]
    fn a_candidate_slower_than_plain_decoding_is_skipped_but_explored() {
        let mut a = AutoDrafter::new(vec![Box::new(Fixed(3))], 8, true);
        let (mut drafted_steps, mut plain_steps) = (0, 0);
        for _ in 0..160 {
            let (name, n) = step(&mut a, &[5]);
            if name.is_some() {
                drafted_steps += 1;
                // Nothing accepted, and each drafted token costs as much as a verification.
                a.observe(n, 0, 0.01 * n as f64, 0.01);
            } else {
                plain_steps += 1;
            }
        }
        assert!(
            plain_steps > 120,
            "{drafted_steps} drafted, {plain_steps} plain"
        );
        assert!(drafted_steps >= 160 / EXPLORE_EVERY as usize / 2);
    }
}
