//! Stages 2-3, verify: one target forward over the last committed token plus the k drafts, then
//! the per-position features a policy sees. Only these few numbers per position cross into the
//! policy; the whole rows stay here for the host-side correction (residual / sample / argmax).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod judge;

use anyhow::Result;

use crate::decide::{Features, Step};
use crate::draft::Draft;
use crate::models::{Rows, Session};
use crate::sample::{self, Rng64, SamplingParams};
pub use judge::{HeadChoice, JudgeHead, JudgeScorer};

/// The target's view of one step.
pub struct Verification {
    /// Logit rows, k + 1 of them: row i scores position i (row k is the bonus position).
    pub logits: Vec<Vec<f32>>,
    /// The request's sampling distribution p_i per row (T > 0 only; at T = 0 corrections use the
    /// argmax of `logits`).
    pub probs: Vec<Vec<f32>>,
}

/// Runs the target over `[last, drafts...]`, appending them to its cache (the caller truncates
/// the rejected ones afterwards). The drafted positions' features replace `step`'s positions
/// (`step.top_k` entries of top-K each; its other fields are left as they are). With a `judge`,
/// each drafted position also gets its judge logit, scored on the hidden state at the drafted
/// token (row i + 1: the row where x_i is the input).
pub fn verify(
    target: &mut Session,
    last: u32,
    draft: &Draft,
    sampling: &SamplingParams,
    step: &mut Step,
    judge: Option<&JudgeScorer>,
    rng: &mut Rng64,
) -> Result<Verification> {
    let mut input = Vec::with_capacity(draft.tokens.len() + 1);
    input.push(last);
    input.extend_from_slice(&draft.tokens);
    let out = target.forward(&input, Rows::All)?;
    let logits = out.logits.to_vec2::<f32>()?;
    let feature_params = feature_params(sampling);
    let mut probs = Vec::new();
    step.clear_positions();
    let mut top = Vec::with_capacity(step.top_k as usize + 1);
    for (i, row) in logits.iter().enumerate() {
        let p = sample::probabilities(row, &feature_params);
        if let Some(&x) = draft.tokens.get(i) {
            top_entries_into(&p, step.top_k as usize, &mut top);
            step.push(features(&p, x, draft.q_token[i], rng.uniform()), &top);
        }
        if !sampling.is_greedy() {
            probs.push(p);
        }
    }
    if let Some(j) = judge {
        step.judge = Some(j.score(&out.hidden.narrow(0, 1, draft.tokens.len())?)?);
    }
    Ok(Verification { logits, probs })
}

/// The distribution features are computed from: the request's own at T > 0; the model's softmax
/// (T = 1) at T = 0, where the sampling distribution would be a one-hot that tells a lossy policy
/// nothing (strict compares the drafted token with the top-1, which is the argmax either way).
pub fn feature_params(sampling: &SamplingParams) -> SamplingParams {
    if sampling.is_greedy() {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    } else {
        *sampling
    }
}

/// One position's features from its distribution `p` (no judge logit).
pub fn features(p: &[f32], token: u32, draft_prob: f32, uniform: f32) -> Features {
    Features {
        token,
        draft_prob,
        target_prob: p.get(token as usize).copied().unwrap_or(0.0),
        entropy: entropy(p),
        uniform,
        judge: None,
    }
}

/// The k largest (id, p), most likely first (ties: lower id first).
pub fn top_entries(p: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top = Vec::with_capacity(k.min(p.len()) + 1);
    top_entries_into(p, k, &mut top);
    top
}

/// [`top_entries`] into a reused buffer.
pub fn top_entries_into(p: &[f32], k: usize, top: &mut Vec<(u32, f32)>) {
    top.clear();
    let k = k.min(p.len());
    for (i, &v) in p.iter().enumerate() {
        if top.len() == k && top.last().is_some_and(|&(_, m)| v <= m) {
            continue;
        }
        let at = top.partition_point(|&(_, m)| m >= v);
        top.insert(at, (i as u32, v));
        top.truncate(k);
    }
}

/// H(p) in nats.
pub fn entropy(p: &[f32]) -> f32 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x as f64 * (x as f64).ln())
        .sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_entries_sorted_with_ties_by_id() {
        let p = [0.1, 0.4, 0.1, 0.3, 0.1];
        assert_eq!(top_entries(&p, 3), vec![(1, 0.4), (3, 0.3), (0, 0.1)]);
        assert_eq!(top_entries(&p, 9).len(), 5);
        assert_eq!(top_entries(&[], 2), vec![]);
    }

    #[test]
    fn entropy_of_uniform_and_one_hot() {
        assert!((entropy(&[0.25; 4]) - 4f32.ln()).abs() < 1e-6);
        assert_eq!(entropy(&[0.0, 1.0, 0.0]), 0.0);
    }

    #[test]
    fn features_read_p_of_the_token() {
        let p = [0.2, 0.5, 0.3];
        let f = features(&p, 2, 0.9, 0.25);
        assert_eq!(f.target_prob, 0.3);
        assert_eq!((f.draft_prob, f.uniform, f.judge), (0.9, 0.25, None));
        let mut step = Step::new(2, 1.0, 3, Vec::new());
        step.push(f, &top_entries(&p, 2));
        step.check().unwrap();
        let pos = step.position(0);
        assert_eq!((pos.top_ids, pos.top_probs), (&[1, 2][..], &[0.5, 0.3][..]));
    }
}
