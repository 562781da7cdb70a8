//! `topk-entropy`: a lossy acceptance rule written from scratch against the verdict SDK.
//!
//! Accept a drafted token while
//!   1. it is among the target's `k` most likely tokens (the target finds it plausible), and
//!   2. the target's entropy at that position is below `max_entropy` nats (the target is sure
//!      enough about the context that a plausible alternative is not a fork in the road).
//!
//! Stop at the first position that fails and let the host sample the target there (argmax at
//! T = 0). Unlike `strict` this ignores the draft's probabilities: it trades exactness for
//! longer accepted prefixes where the target is confident.
use verdict_policy_sdk::*;

/// The largest `k` a request may ask for; the host then sends this many top entries.
const MAX_K: u32 = 8;

struct TopKEntropy;

impl Policy for TopKEntropy {
    fn info() -> Info {
        info("topk-entropy", env!("CARGO_PKG_VERSION"))
            .top_k(MAX_K)
            .param(integer(
                "k",
                4,
                1,
                MAX_K as i64,
                "accept only tokens among the target's top k",
            ))
            .param(real(
                "max_entropy",
                2.0,
                0.0,
                20.0,
                "accept only where the target's entropy (nats) is below this",
            ))
            .build()
    }

    fn verify(step: Step) -> Verdict {
        // The host sends every declared parameter (defaults or the request's overrides, already
        // range-checked), so the fallbacks here never apply in verdict; they keep tests simple.
        let k = param_or(&step, "k", 4.0) as usize;
        let max_entropy = param_or(&step, "max_entropy", 2.0) as f32;
        let accepted = accept_prefix(&step, |_, pos| {
            pos.entropy < max_entropy && in_top_k(pos, k)
        });
        verdict(accepted, fallback_correction(&step))
    }
}

export_policy!(TopKEntropy);
