//! `strict`: lossless speculative verification. At T = 0 accept while the drafted token is the
//! target's argmax and correct with the argmax; at T > 0 accept while u < min(1, p(x) / q(x)) and
//! resample the first rejected position from the residual norm(max(0, p - q)), so the output is
//! distributed exactly as the target's (Leviathan et al. 2023; Chen et al. 2023).
use verdict_policy_sdk::*;

struct Strict;

impl Policy for Strict {
    fn info() -> Info {
        info("strict", env!("CARGO_PKG_VERSION")).build()
    }

    fn verify(step: Step) -> Verdict {
        strict_verdict(&step)
    }
}

export_policy!(Strict);
