//! `judge` (Bachmann et al., "Judge Decoding", ICLR 2025): accept x_i if the strict test accepts
//! it OR sigmoid(judge logit) >= `threshold`; stop at the first position that fails both and
//! correct by sampling p (argmax at T = 0). Without a judge logit a position falls back to the
//! strict test alone.
use verdict_policy_sdk::*;

struct Judge;

impl Policy for Judge {
    fn info() -> Info {
        info("judge", env!("CARGO_PKG_VERSION"))
            .needs_judge()
            .param(real(
                "threshold",
                0.5,
                0.0,
                1.0,
                "accept a token the strict test rejects when sigmoid(judge logit) >= threshold",
            ))
            .build()
    }

    fn verify(step: Step) -> Verdict {
        let threshold = param_or(&step, "threshold", 0.5) as f32;
        let t = step.temperature;
        let n = accept_prefix(&step, |_, pos| {
            strict_accepts(pos, t) || pos.judge.is_some_and(|j| sigmoid(j) >= threshold)
        });
        verdict(n, fallback_correction(&step))
    }
}

export_policy!(Judge);
