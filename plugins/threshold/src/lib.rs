//! `threshold`: the practical lossy acceptance rules, one chosen by the `rule` parameter.
//!
//! - `rule = 0`, typical acceptance (Medusa): accept x if p(x) > min(eps, delta * exp(-H(p))).
//! - `rule = 1`, relaxed top-K (TensorRT-LLM MTP): accept x if it is among the target's top
//!   `topk` tokens and p(x) >= p(top-1) - `topk_delta`.
//! - `rule = 2`, probability floor (SGLang `threshold_single`): accept x if p(x) >= `floor`, or
//!   if the strict test accepts it (so the rule never keeps fewer tokens than strict).
//!
//! Every rule stops at the first rejected position and corrects by sampling p (argmax at T = 0).
use verdict_policy_sdk::*;

/// The top-K this policy asks the host for (the upper bound of `topk`).
const MAX_TOP_K: u32 = 8;

struct Threshold;

impl Policy for Threshold {
    fn info() -> Info {
        info("threshold", env!("CARGO_PKG_VERSION"))
            .top_k(MAX_TOP_K)
            .param(integer(
                "rule",
                0,
                0,
                2,
                "0 = typical acceptance, 1 = relaxed top-K, 2 = probability floor",
            ))
            .param(real(
                "eps",
                0.09,
                0.0,
                1.0,
                "typical: hard threshold epsilon",
            ))
            .param(real(
                "delta",
                0.3,
                0.0,
                1.0,
                "typical: entropy-scaled threshold delta",
            ))
            .param(integer(
                "topk",
                MAX_TOP_K as i64,
                1,
                MAX_TOP_K as i64,
                "relaxed top-K: the token must be among the target's top `topk`",
            ))
            .param(real(
                "topk_delta",
                0.5,
                0.0,
                1.0,
                "relaxed top-K: p(x) must be at least p(top-1) - topk_delta",
            ))
            .param(real(
                "floor",
                0.1,
                0.0,
                1.0,
                "probability floor: accept when p(x) >= floor",
            ))
            .build()
    }

    fn verify(step: Step) -> Verdict {
        let rule = param_or(&step, "rule", 0.0) as i64;
        let t = step.temperature;
        let n = match rule {
            1 => {
                let k = param_or(&step, "topk", MAX_TOP_K as f64) as usize;
                let delta = param_or(&step, "topk_delta", 0.5) as f32;
                accept_prefix(&step, |_, pos| {
                    let top1 = top1(pos).map_or(1.0, |(_, p)| p);
                    in_top_k(pos, k) && pos.target_prob >= top1 - delta
                })
            }
            2 => {
                let floor = param_or(&step, "floor", 0.1) as f32;
                accept_prefix(&step, |_, pos| {
                    pos.target_prob >= floor || strict_accepts(pos, t)
                })
            }
            _ => {
                let eps = param_or(&step, "eps", 0.09) as f32;
                let delta = param_or(&step, "delta", 0.3) as f32;
                // p > min(eps, delta * e^-H), with the exp (a libm call in wasm, the costliest
                // part of this rule) only where p <= eps.
                accept_prefix(&step, |_, pos| {
                    pos.target_prob > eps || pos.target_prob > delta * (-pos.entropy).exp()
                })
            }
        };
        verdict(n, fallback_correction(&step))
    }
}

export_policy!(Threshold);
