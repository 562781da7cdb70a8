//! Decide: the policy host. Runs acceptance policies (WebAssembly components implementing
//! `wit/policy.wit`) on wasmtime, once per speculation step. Knows the WIT types and wasmtime,
//! nothing of models or tensors.
//!
//! Engine-facing API (synchronous; call from a worker thread):
//!
//! ```ignore
//! let registry = PolicyRegistry::open(dir, PolicyLimits::default())?; // or ::in_memory
//! let handle = registry.resolve("judge@0.1.0")?;       // per request: pins the version
//! let params = handle.resolve_params(&overrides)?;      // request's policy_params, validated
//! let needs = (handle.info().needs_judge, handle.info().top_k_to_send());
//! let mut inst = handle.instance();                     // per request
//! let decision = inst.verify(&step);                    // per step; never fails
//! // decision.verdict is in range; decision.fault is Some when strict decided instead.
//! ```
//!
//! Safety: policies get no imports (every import traps), a fuel budget and a wall-clock epoch
//! deadline per call, and a memory cap; any fault (trap, overrun, out-of-range verdict) falls
//! back to the native strict rule for that step, is counted per policy, and the next step runs
//! on a fresh instance.

mod builtin;
mod fallback;
mod policy;
mod registry;
mod runtime;
pub mod trace;
pub mod types;

pub use builtin::{BUILTIN_NAMES, wasm as builtin_wasm};
pub use fallback::strict_verdict;
pub use policy::{PolicyCounters, PolicyHandle, PolicyInstance};
pub use registry::{PolicyListing, PolicyRegistry};
pub use runtime::PolicyLimits;
pub use types::{
    Correction, Decision, Fault, FaultKind, Features, Info, ParamKind, ParamSpec, Position, Step,
    Verdict,
};
