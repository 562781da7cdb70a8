//! The step trace: JSON Lines, one [`Step`] per line, exactly as the policy saw it. The engine
//! writes it (`write_step`) when asked to record; `verdict policy replay` runs any policy over it
//! (offline policy evaluation).
//!
//! One line (k = 2, top-K 2, parameters of `threshold` abbreviated):
//!
//! ```json
//! {"tokens":[42,9],"draft_probs":[0.61,0.3],"target_probs":[0.55,0.01],"entropies":[1.3,0.7],"uniforms":[0.18,0.93],"judge":null,"top_k":2,"top_ids":[42,7,11,9],"top_probs":[0.55,0.2,0.8,0.01],"temperature":0.8,"vocab_size":151936,"params":[0,0.09]}
//! ```
//!
//! The fields are those of `step` in wit/policy.wit (snake_case), one list per feature: position
//! i is entry i of `tokens` (x_i), `draft_probs` (q_i(x_i)), `target_probs` (p_i(x_i)),
//! `entropies` (H(p_i), nats), `uniforms` (u_i in [0, 1)) and `judge` (logits, or null); its
//! top-K is `top_ids` / `top_probs` [i*K, (i+1)*K) with K = `top_k`, most likely first;
//! `params` are the recording policy's parameter values in the order of its `info` (replay
//! replaces them with the replaying policy's). `judge` and `params` may be omitted.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::policy::PolicyHandle;
use super::types::{Correction, Step};

/// Appends `step` as one JSON line.
pub fn write_step(w: &mut impl Write, step: &Step) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, step)?;
    w.write_all(b"\n")
}

/// Reads a trace; errors name the file and line. Blank lines are skipped.
pub fn read_trace(path: &Path) -> Result<Vec<Step>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open trace {}", path.display()))?;
    parse_trace(std::io::BufReader::new(f), &path.display().to_string())
}

/// [`read_trace`] from any reader; `source` names it in errors.
pub fn parse_trace(r: impl BufRead, source: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line.with_context(|| format!("{source}:{}: cannot read", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let step: Step = serde_json::from_str(&line)
            .with_context(|| format!("{source}:{}: not a step", i + 1))?;
        if let Err(e) = step.check() {
            bail!("{source}:{}: malformed step: {e}", i + 1);
        }
        steps.push(step);
    }
    Ok(steps)
}

/// What one policy did on one recorded step.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayedStep {
    pub k: usize,
    pub accepted: u32,
    pub correction: Correction,
    /// The accepted drafted token ids.
    pub tokens: Vec<u32>,
    /// Tokens this step would emit: the accepted ones plus the correction (or bonus) token.
    pub emitted: u32,
    pub fault: Option<String>,
}

/// The result of replaying a trace.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub policy: String,
    pub version: String,
    /// The replaying policy's parameters, name and value, in declaration order.
    pub params: Vec<(String, f64)>,
    pub steps: Vec<ReplayedStep>,
    /// Per drafted position i: (steps where position i was accepted, steps that had a position i).
    pub per_position: Vec<(u64, u64)>,
    pub faults: u64,
}

impl ReplayReport {
    /// Mean tokens emitted per step (accepted + 1).
    pub fn tokens_per_step(&self) -> f64 {
        let total: u64 = self.steps.iter().map(|s| s.emitted as u64).sum();
        total as f64 / self.steps.len().max(1) as f64
    }

    /// Accepted / drafted over all steps.
    pub fn acceptance_rate(&self) -> f64 {
        let acc: u64 = self.steps.iter().map(|s| s.accepted as u64).sum();
        let drafted: u64 = self.steps.iter().map(|s| s.k as u64).sum();
        acc as f64 / drafted.max(1) as f64
    }
}

/// Runs `policy` over `steps`, with `params` (from [`PolicyHandle::resolve_params`]) replacing
/// the recorded ones: the recorded parameters belonged to the policy that recorded the trace.
pub fn replay(policy: &PolicyHandle, params: &[f64], steps: &[Step]) -> ReplayReport {
    let mut inst = policy.instance();
    let mut out = Vec::with_capacity(steps.len());
    let mut per_position: Vec<(u64, u64)> = Vec::new();
    let mut faults = 0;
    for recorded in steps {
        let mut step = recorded.clone();
        step.params = params.to_vec();
        let d = inst.verify(&step);
        let k = step.k();
        if per_position.len() < k {
            per_position.resize(k, (0, 0));
        }
        for (i, slot) in per_position.iter_mut().enumerate().take(k) {
            slot.1 += 1;
            if (i as u32) < d.verdict.accepted {
                slot.0 += 1;
            }
        }
        faults += d.fault.is_some() as u64;
        out.push(ReplayedStep {
            k,
            accepted: d.verdict.accepted,
            correction: d.verdict.correction,
            tokens: step.tokens[..(d.verdict.accepted as usize).min(k)].to_vec(),
            emitted: d.verdict.accepted + 1,
            fault: d.fault.map(|f| f.to_string()),
        });
    }
    ReplayReport {
        policy: policy.name().to_string(),
        version: policy.version().to_string(),
        params: policy
            .info()
            .params
            .iter()
            .zip(params)
            .map(|(p, &v)| (p.name.clone(), v))
            .collect(),
        steps: out,
        per_position,
        faults,
    }
}
