//! The native strict rule: what a step falls back to when a policy faults. It must agree with the
//! `strict` built-in exactly (tests check both against an independent reference).

use super::types::{Correction, Position, Step, Verdict};

/// min(1, p / q) without dividing by zero (q = 0 accepts any token the target allows).
pub fn acceptance_probability(target_prob: f32, draft_prob: f32) -> f32 {
    if draft_prob.is_nan() || draft_prob <= 0.0 {
        return if target_prob > 0.0 { 1.0 } else { 0.0 };
    }
    (target_prob / draft_prob).min(1.0)
}

fn strict_accepts(pos: &Position, temperature: f32) -> bool {
    if temperature <= 0.0 {
        pos.top_ids.first() == Some(&pos.token)
    } else {
        pos.uniform < acceptance_probability(pos.target_prob, pos.draft_prob)
    }
}

/// Strict speculative verification: the accepted prefix and the residual (argmax at T = 0).
/// On a step whose positions are malformed ([`Step::check_shape`]) it accepts nothing (it must
/// never panic: it is what a malformed step falls back to).
pub fn strict_verdict(step: &Step) -> Verdict {
    let t = step.temperature;
    let accepted = if step.check_shape().is_ok() {
        step.positions()
            .take_while(|pos| strict_accepts(pos, t))
            .count() as u32
    } else {
        0
    };
    let correction = if t <= 0.0 {
        Correction::Argmax
    } else {
        Correction::Residual
    };
    Verdict {
        accepted,
        correction,
    }
}
