//! Per-request speculation statistics (the `--stats` line, the HTTP response's `speculation`
//! field, the metrics).

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecStats {
    /// Generated tokens (stop tokens excluded).
    pub tokens: u64,
    /// Target forwards after the prefill (speculative or plain).
    pub steps: u64,
    /// Drafted tokens proposed to the target.
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    /// Steps whose position i was accepted, per i.
    pub accepted_per_position: Vec<u64>,
    /// Steps that drafted a position i, per i.
    pub drafted_per_position: Vec<u64>,
    /// Accepted drafted tokens that were not the target's argmax: what a lossy policy accepted
    /// beyond what strict greedy verification would (at T = 0, strict's rejections overturned).
    pub accepted_off_argmax: u64,
    /// Steps that stopped before the end of the draft (a drafted token was rejected).
    pub rejections: u64,
    /// Sum of the target's log-probabilities (T = 1, natural log) of the generated tokens: how
    /// likely the target finds the output, whatever policy produced it.
    pub target_logprob: f64,
    /// Steps the policy faulted on (strict decided instead).
    pub policy_faults: u64,
    /// Time spent in policy calls, seconds.
    pub policy_seconds: f64,
    /// `name@version` of the policy, when speculating.
    pub policy: Option<String>,
    /// The drafter, when speculating.
    pub drafter: Option<String>,
    /// Speculative steps per drafter that proposed them (several only for `auto`).
    pub drafter_steps: std::collections::BTreeMap<String, u64>,
    /// The request sent a predicted output; of the tokens drafted from it, those accepted and
    /// those rejected (OpenAI's `accepted_prediction_tokens`, `rejected_prediction_tokens`).
    pub prediction: bool,
    pub prediction_accepted: u64,
    pub prediction_rejected: u64,
    /// Steps whose drafts the request's grammar cut short (drafters without a distribution to
    /// mask: prompt lookup).
    pub grammar_cuts: u64,
    /// Where the time of autoregressive steps goes.
    pub plain_phases: PlainPhases,
    /// Where the time of speculative steps goes.
    pub spec_phases: SpecPhases,
}

/// Seconds spent in each phase of the speculative steps (those that verified a draft).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecPhases {
    pub steps: u64,
    /// The drafter proposing (a draft model's forwards, its q rows).
    pub draft_s: f64,
    /// The target's forward over [last, drafts] returning.
    pub forward_s: f64,
    /// Its logit rows on the host.
    pub logits_s: f64,
    /// Every row's features (softmax, top-K, entropy, judge) for the policy.
    pub features_s: f64,
    /// The policy call.
    pub policy_s: f64,
    /// The step trace (when asked for), the correction or bonus token, and the rollback of the
    /// target's cache.
    pub commit_s: f64,
    /// The drafter observing, and appending the tokens (their log-probabilities, stop checks).
    pub emit_s: f64,
}

impl SpecPhases {
    /// Adds another request's phases.
    pub fn add(&mut self, o: &SpecPhases) {
        self.steps += o.steps;
        self.draft_s += o.draft_s;
        self.forward_s += o.forward_s;
        self.logits_s += o.logits_s;
        self.features_s += o.features_s;
        self.policy_s += o.policy_s;
        self.commit_s += o.commit_s;
        self.emit_s += o.emit_s;
    }

    /// "ms per step draft/forward/logits/features/policy/commit/emit a / b / ...".
    pub fn per_step_ms(&self) -> String {
        let n = self.steps.max(1) as f64;
        let ms = [
            self.draft_s,
            self.forward_s,
            self.logits_s,
            self.features_s,
            self.policy_s,
            self.commit_s,
            self.emit_s,
        ]
        .map(|s| format!("{:.2}", s / n * 1e3));
        format!(
            "ms per step draft/forward/logits/features/policy/commit/emit {}",
            ms.join(" / ")
        )
    }
}

/// Seconds spent in each phase of the autoregressive steps (on a GPU, `forward_s` is the
/// host's time to queue the forward's kernels and `logits_s` the wait for the device to finish
/// plus the copy of the logits row: together they say whether decoding is launch-bound).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlainPhases {
    pub steps: u64,
    /// `Session::forward` returning.
    pub forward_s: f64,
    /// The logits row on the host.
    pub logits_s: f64,
    /// Choosing the token.
    pub sample_s: f64,
    /// Appending it: stop check, its log-probability (a pass over the vocabulary), logprobs.
    pub emit_s: f64,
}

impl SpecStats {
    pub(crate) fn record_step(
        &mut self,
        drafted: usize,
        accepted: usize,
        off_argmax: usize,
        fault: bool,
    ) {
        self.steps += 1;
        self.accepted_off_argmax += off_argmax as u64;
        self.rejections += (accepted < drafted) as u64;
        self.drafted += drafted as u64;
        self.accepted += accepted as u64;
        if self.drafted_per_position.len() < drafted {
            self.drafted_per_position.resize(drafted, 0);
            self.accepted_per_position.resize(drafted, 0);
        }
        for i in 0..drafted {
            self.drafted_per_position[i] += 1;
            if i < accepted {
                self.accepted_per_position[i] += 1;
            }
        }
        self.policy_faults += fault as u64;
    }

    /// Share of the positions strict greedy verification rejects that the policy accepted:
    /// overturned / (overturned + rejections that stood).
    pub fn overturned_share(&self) -> f64 {
        let all = self.accepted_off_argmax + self.rejections;
        if all == 0 {
            0.0
        } else {
            self.accepted_off_argmax as f64 / all as f64
        }
    }

    /// Mean target log-likelihood per generated token.
    pub fn mean_target_logprob(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.target_logprob / self.tokens as f64
        }
    }

    /// Generated tokens per target forward (1.0 for plain decoding).
    pub fn tokens_per_step(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            // The prefill's token is not a step of its own.
            (self.tokens.saturating_sub(1)) as f64 / self.steps as f64
        }
    }
}
