//! A loaded policy version ([`PolicyHandle`]) and its per-request instance ([`PolicyInstance`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};

use super::fallback;
use super::runtime::{Compiled, Live};
use super::types::{Decision, Fault, FaultKind, Info, ParamKind, Step, Verdict};

/// Call and fault counters of one policy name (shared by all its versions, kept across swaps).
#[derive(Default, Debug)]
pub struct PolicyCounters {
    calls: AtomicU64,
    faults: [AtomicU64; FaultKind::ALL.len()],
}

impl PolicyCounters {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults[kind.index()].load(Ordering::Relaxed)
    }
    pub fn total_faults(&self) -> u64 {
        FaultKind::ALL.iter().map(|&k| self.faults(k)).sum()
    }
    fn record(&self, fault: Option<&Fault>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = fault {
            self.faults[f.kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One compiled, validated version of a policy.
pub(crate) struct LoadedPolicy {
    pub(crate) info: Info,
    pub(crate) sha256: String,
    pub(crate) builtin: bool,
    pub(crate) compiled: Compiled,
    pub(crate) counters: Arc<PolicyCounters>,
}

/// A resolved policy version. Cloning is cheap; a handle keeps its version alive and usable even
/// after the registry replaced or removed it (so a request finishes on the version it started
/// with).
#[derive(Clone)]
pub struct PolicyHandle {
    pub(crate) inner: Arc<LoadedPolicy>,
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyHandle({}@{})", self.name(), self.version())
    }
}

impl PolicyHandle {
    pub fn info(&self) -> &Info {
        &self.inner.info
    }
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }
    pub fn version(&self) -> &str {
        &self.inner.info.version
    }
    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }
    pub fn is_builtin(&self) -> bool {
        self.inner.builtin
    }
    /// Calls and faults of this policy name (all versions).
    pub fn counters(&self) -> &Arc<PolicyCounters> {
        &self.inner.counters
    }

    /// A new instance for one request (or one worker). Instantiation is lazy: the first
    /// `verify` pays it (a few microseconds from the pool).
    pub fn instance(&self) -> PolicyInstance {
        PolicyInstance {
            policy: self.inner.clone(),
            live: None,
        }
    }

    /// The value of every declared parameter in declaration order (`Step::params`), with
    /// `overrides` applied. Fails, naming the parameter, on an unknown name, a duplicate, a
    /// non-finite or out-of-range value, a fractional integer or a boolean other than 0 / 1.
    pub fn resolve_params(&self, overrides: &[(String, f64)]) -> Result<Vec<f64>> {
        let info = &self.inner.info;
        let mut out: Vec<f64> = info.params.iter().map(|p| p.default).collect();
        for (i, (name, value)) in overrides.iter().enumerate() {
            let Some(idx) = info.params.iter().position(|p| &p.name == name) else {
                let known: Vec<&str> = info.params.iter().map(|p| p.name.as_str()).collect();
                bail!(
                    "policy `{}` has no parameter `{name}` (its parameters: {})",
                    info.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            };
            if overrides[..i].iter().any(|(n, _)| n == name) {
                bail!("parameter `{name}` is given twice");
            }
            let spec = &info.params[idx];
            let v = *value;
            if !v.is_finite() {
                bail!("parameter `{name}` must be a finite number, got {v}");
            }
            match spec.kind {
                ParamKind::Integer if v.fract() != 0.0 => {
                    bail!("parameter `{name}` must be an integer, got {v}")
                }
                ParamKind::Boolean if v != 0.0 && v != 1.0 => {
                    bail!("parameter `{name}` is a boolean (0 or 1), got {v}")
                }
                _ => {}
            }
            if v < spec.min || v > spec.max {
                bail!(
                    "parameter `{name}` = {v} is outside its range [{}, {}]",
                    spec.min,
                    spec.max
                );
            }
            out[idx] = v;
        }
        Ok(out)
    }
}

/// One request's instance of a policy version. Not shared between threads at once (`&mut`);
/// `Send`, so a request may move between worker threads between steps.
pub struct PolicyInstance {
    policy: Arc<LoadedPolicy>,
    live: Option<Live>,
}

impl PolicyInstance {
    pub fn info(&self) -> &Info {
        &self.policy.info
    }

    /// Decides one step. Never fails: a fault (trap, fuel, deadline, memory, bad verdict, bad
    /// step) yields the strict verdict for this step, is counted for the policy and reported in
    /// `Decision::fault`; the next call runs on a fresh instance.
    pub fn verify(&mut self, step: &Step) -> Decision {
        let result = self.try_verify(step);
        let decision = match result {
            Ok(verdict) => Decision {
                verdict,
                fault: None,
            },
            Err((kind, detail)) => {
                if !matches!(kind, FaultKind::BadVerdict | FaultKind::BadStep) {
                    // A trap poisons the store: drop it, the next step instantiates anew.
                    self.live = None;
                }
                Decision {
                    verdict: fallback::strict_verdict(step),
                    fault: Some(Fault { kind, detail }),
                }
            }
        };
        self.policy.counters.record(decision.fault.as_ref());
        decision
    }

    fn try_verify(&mut self, step: &Step) -> Result<Verdict, (FaultKind, String)> {
        check_step(step, &self.policy.info).map_err(|e| (FaultKind::BadStep, e))?;
        let compiled = &self.policy.compiled;
        if self.live.is_none() {
            self.live = Some(compiled.instantiate()?);
        }
        let live = self.live.as_mut().expect("instantiated above");
        let verdict = compiled.call_verify(live, step)?;
        check_verdict(&verdict, step).map_err(|e| (FaultKind::BadVerdict, e))?;
        Ok(verdict)
    }
}

/// What the host checks before calling the guest: the step's shape and one value per declared
/// parameter.
fn check_step(step: &Step, info: &Info) -> Result<(), String> {
    step.check()?;
    if step.params.len() != info.params.len() {
        return Err(format!(
            "the step has {} parameter values, policy `{}` declares {}",
            step.params.len(),
            info.name,
            info.params.len()
        ));
    }
    Ok(())
}

/// The host's range checks on a verdict.
pub(crate) fn check_verdict(v: &Verdict, step: &Step) -> Result<(), String> {
    let k = step.k();
    if v.accepted as usize > k {
        return Err(format!("accepted = {} but k = {k}", v.accepted));
    }
    if let super::types::Correction::Token(t) = v.correction
        && t >= step.vocab_size
    {
        return Err(format!(
            "correction token {t} is outside the vocabulary (size {})",
            step.vocab_size
        ));
    }
    Ok(())
}

impl LoadedPolicy {
    /// Instantiates, asks `info`, and runs a probe `verify`: what every new version must pass
    /// before the registry publishes it.
    pub(crate) fn validate(compiled: &Compiled) -> Result<Info> {
        let mut live = compiled
            .instantiate()
            .map_err(|(k, e)| anyhow::anyhow!("the component does not instantiate ({k}): {e}"))?;
        let info = compiled
            .call_info(&mut live)
            .map_err(|(k, e)| anyhow::anyhow!("`info` failed ({k}): {e}"))?;
        super::registry::check_info(&info)?;
        let step = probe_step(&info);
        let verdict = compiled
            .call_verify(&mut live, &step)
            .map_err(|(k, e)| anyhow::anyhow!("the probe `verify` failed ({k}): {e}"))?;
        check_verdict(&verdict, &step)
            .map_err(|e| anyhow::anyhow!("the probe `verify` returned a bad verdict: {e}"))?;
        Ok(info)
    }
}

/// A plausible step shaped as `info` asks (top-K entries, judge logits, default parameters).
pub(crate) fn probe_step(info: &Info) -> Step {
    let kk = info.top_k_to_send();
    let mut step = Step::new(
        kk,
        1.0,
        32_000,
        info.params.iter().map(|p| p.default).collect(),
    );
    for i in 0..4u32 {
        let top: Vec<(u32, f32)> = (0..kk as u32)
            .map(|j| (i * 7 + j, 0.5f32 / (1u64 << j.min(40)) as f32))
            .collect();
        let f = super::types::Features {
            token: i * 7,
            draft_prob: 0.4,
            target_prob: 0.5,
            entropy: 1.2,
            uniform: 0.25 * i as f32,
            judge: info.needs_judge.then_some(0.3),
        };
        step.push(f, &top);
    }
    step
}
