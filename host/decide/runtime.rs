//! The wasmtime side of the policy host: one `Engine` (fuel + epoch interruption, pooling
//! allocator), compilation with an on-disk cache of precompiled artifacts, `InstancePre`s, and
//! the per-instance `Store` with its memory cap.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::component::{Component, ComponentExportIndex, Func, InstancePre, Linker, TypedFunc};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
};

use super::types::{FaultKind, Info, Step, Verdict};
use crate::files::write_atomic;

/// Resource caps for every policy call. The defaults leave a correct policy (a few thousand
/// instructions per step) orders of magnitude of headroom.
#[derive(Clone, Debug)]
pub struct PolicyLimits {
    /// Fuel (roughly wasm instructions) per `verify` / `info` call.
    pub fuel_per_call: u64,
    /// Wall-clock backstop per call, enforced with epoch interruption.
    pub deadline: Duration,
    /// Epoch tick: the deadline's granularity.
    pub epoch_tick: Duration,
    /// Linear-memory cap per instance, bytes.
    pub memory_bytes: usize,
    /// Pooling allocator: instances that may be live at once (one per in-flight request).
    /// Beyond it instantiation fails: those steps fall back to strict (`instantiate` faults).
    pub pool_instances: u32,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            fuel_per_call: 10_000_000,
            deadline: Duration::from_millis(200),
            epoch_tick: Duration::from_millis(10),
            memory_bytes: 32 << 20,
            pool_instances: 256,
        }
    }
}

/// Per-store data: the memory limiter, which also records that it refused a growth so that the
/// trap that follows is reported as a memory fault.
pub(crate) struct StoreState {
    memory_bytes: usize,
    pub(crate) memory_denied: bool,
}

impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes;
        if !ok {
            self.memory_denied = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        8
    }
}

/// The shared wasmtime engine and its configuration. Cheap to share (`Arc`).
pub struct PolicyRuntime {
    engine: Engine,
    limits: PolicyLimits,
    epoch_ticks: u64,
    cache_dir: Option<PathBuf>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for PolicyRuntime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl PolicyRuntime {
    /// A runtime whose precompiled artifacts are cached under `cache_dir` (if any), in a
    /// sub-directory named by the engine's compatibility hash.
    pub fn new(limits: PolicyLimits, cache_dir: Option<PathBuf>) -> Result<Arc<Self>> {
        let mut cfg = Config::new();
        cfg.consume_fuel(true);
        cfg.epoch_interruption(true);
        cfg.max_wasm_stack(512 << 10);
        // A policy's memory is small: reserve just the cap plus a guard instead of 4 GiB per
        // slot, so that a pool of a few hundred slots stays a few GiB of address space.
        cfg.memory_reservation(limits.memory_bytes as u64);
        cfg.memory_guard_size(64 << 10);
        cfg.memory_reservation_for_growth(0);
        let n = limits.pool_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 4)
            .max_memory_size(limits.memory_bytes);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine =
            Engine::new(&cfg).map_err(|e| anyhow!("cannot create the wasm engine: {e}"))?;

        let tick = limits.epoch_tick.max(Duration::from_millis(1));
        let epoch_ticks = (limits.deadline.as_nanos() / tick.as_nanos()).max(1) as u64;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (stop, weak) = (stop.clone(), engine.weak());
            std::thread::Builder::new()
                .name("policy-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        match weak.upgrade() {
                            Some(e) => e.increment_epoch(),
                            None => break,
                        }
                    }
                })
                .context("cannot start the policy epoch thread")?;
        }
        let cache_dir = cache_dir.map(|d| d.join(format!("{:016x}", compat_hash(&engine))));
        Ok(Arc::new(PolicyRuntime {
            engine,
            limits,
            epoch_ticks,
            cache_dir,
            stop_ticker: stop,
        }))
    }

    pub fn limits(&self) -> &PolicyLimits {
        &self.limits
    }

    /// Compile `wasm` (or load its cached artifact), link it with no usable imports, and check
    /// that it exports `info` and `verify` with the contract's types.
    pub(crate) fn compile(self: &Arc<Self>, wasm: &[u8], sha256: &str) -> Result<Compiled> {
        let component = self.component(wasm, sha256)?;
        check_contract_version(&component, &self.engine)?;
        let mut linker: Linker<StoreState> = Linker::new(&self.engine);
        // std Rust guests for wasm32-wasip2 import a few WASI interfaces; policies get none of
        // them: every import is defined as a function that traps when called.
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| anyhow!("cannot link the component: {e}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("cannot link the component: {e}"))?;
        let info_idx = component.get_export_index(None, "info").with_context(|| {
            format!(
                "the component does not export `info` (is it built against wit/policy.wit, \
             verdict:policy@{CONTRACT_VERSION}?)"
            )
        })?;
        let verify_idx = component
            .get_export_index(None, "verify")
            .with_context(|| {
                format!(
                    "the component does not export `verify` (is it built against wit/policy.wit, \
             verdict:policy@{CONTRACT_VERSION}?)"
                )
            })?;
        let compiled = Compiled {
            runtime: self.clone(),
            pre,
            info_idx,
            verify_idx,
        };
        // Type-check both exports once here; later calls use the unchecked typed handles.
        let mut store = compiled.store();
        compiled.arm(&mut store);
        let instance = compiled
            .pre
            .instantiate(&mut store)
            .map_err(|e| anyhow!("the component does not instantiate: {}", error_chain(&e)))?;
        let f = instance
            .get_func(&mut store, compiled.info_idx)
            .context("`info` is not a function")?;
        f.typed::<(), (Info,)>(&store).map_err(|e| {
            anyhow!("`info` has the wrong type for verdict:policy@{CONTRACT_VERSION}: {e}")
        })?;
        let f = instance
            .get_func(&mut store, compiled.verify_idx)
            .context("`verify` is not a function")?;
        f.typed::<(&Step,), (Verdict,)>(&store).map_err(|e| {
            anyhow!("`verify` has the wrong type for verdict:policy@{CONTRACT_VERSION}: {e}")
        })?;
        Ok(compiled)
    }

    fn component(&self, wasm: &[u8], sha256: &str) -> Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return self.compile_fresh(wasm);
        };
        let path = dir.join(format!("{sha256}.cwasm"));
        if path.exists() {
            // SAFETY: the file is an artifact this process family wrote itself (atomically,
            // under a directory keyed by this engine's compatibility hash); deserialize_file
            // also checks the header. A file that fails to load is recompiled and replaced.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!("discarding cached policy artifact {}: {e}", path.display())
                }
            }
        }
        let bytes = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| anyhow!("not a valid policy component: {}", error_chain(&e)))?;
        if let Err(e) = write_atomic(&path, &bytes) {
            tracing::warn!(
                "cannot cache the compiled policy at {}: {e:#}",
                path.display()
            );
        }
        // SAFETY: `bytes` was produced by `precompile_component` on this very engine.
        unsafe { Component::deserialize(&self.engine, &bytes) }
            .map_err(|e| anyhow!("cannot load the compiled policy: {e}"))
    }

    fn compile_fresh(&self, wasm: &[u8]) -> Result<Component> {
        Component::new(&self.engine, wasm)
            .map_err(|e| anyhow!("not a valid policy component: {}", error_chain(&e)))
    }
}

fn compat_hash(engine: &Engine) -> u64 {
    // DefaultHasher::new() uses fixed keys: stable for one build of this binary, which is all a
    // cache of machine code can be valid for anyway.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    h.finish()
}

/// Formats a wasmtime error with its whole chain (the trap message plus the backtrace context).
pub(crate) fn error_chain(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// A compiled, linked policy component: instantiate as often as needed.
pub(crate) struct Compiled {
    runtime: Arc<PolicyRuntime>,
    pre: InstancePre<StoreState>,
    info_idx: ComponentExportIndex,
    verify_idx: ComponentExportIndex,
}

/// A live instance: its own store (so a trap poisons only this one).
pub(crate) struct Live {
    store: Store<StoreState>,
    info: Func,
    verify: Func,
}

impl Compiled {
    fn store(&self) -> Store<StoreState> {
        let mut store = Store::new(
            &self.runtime.engine,
            StoreState {
                memory_bytes: self.runtime.limits.memory_bytes,
                memory_denied: false,
            },
        );
        store.limiter(|s| s);
        store
    }

    pub(crate) fn instantiate(&self) -> Result<Live, (FaultKind, String)> {
        let mut store = self.store();
        self.arm(&mut store);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, &e, FaultKind::Instantiate))?;
        let info = instance
            .get_func(&mut store, self.info_idx)
            .ok_or((FaultKind::Instantiate, "`info` export missing".to_string()))?;
        let verify = instance.get_func(&mut store, self.verify_idx).ok_or((
            FaultKind::Instantiate,
            "`verify` export missing".to_string(),
        ))?;
        Ok(Live {
            store,
            info,
            verify,
        })
    }

    fn arm(&self, store: &mut Store<StoreState>) {
        // set_fuel only fails when fuel is not enabled, which this engine always has.
        let _ = store.set_fuel(self.runtime.limits.fuel_per_call);
        store.set_epoch_deadline(self.runtime.epoch_ticks);
    }

    /// Calls `info`. Errors are (fault kind, message); the caller drops a faulted `Live`.
    pub(crate) fn call_info(&self, live: &mut Live) -> Result<Info, (FaultKind, String)> {
        self.arm(&mut live.store);
        // SAFETY: `info`'s type was checked against `() -> info` in `PolicyRuntime::compile` for
        // this component; every instance of a component has the same export types.
        let f = unsafe { TypedFunc::<(), (Info,)>::new_unchecked(live.info) };
        f.call(&mut live.store, ())
            .map(|(i,)| i)
            .map_err(|e| classify(&live.store, &e, FaultKind::Trap))
    }

    /// Calls `verify`. Errors are (fault kind, message); the caller drops a faulted `Live`.
    pub(crate) fn call_verify(
        &self,
        live: &mut Live,
        step: &Step,
    ) -> Result<Verdict, (FaultKind, String)> {
        self.arm(&mut live.store);
        // SAFETY: as in `call_info`, the type was checked against `(step) -> verdict`.
        let f = unsafe { TypedFunc::<(&Step,), (Verdict,)>::new_unchecked(live.verify) };
        f.call(&mut live.store, (step,))
            .map(|(v,)| v)
            .map_err(|e| classify(&live.store, &e, FaultKind::Trap))
    }
}

fn classify(
    store: &Store<StoreState>,
    e: &wasmtime::Error,
    other: FaultKind,
) -> (FaultKind, String) {
    let kind = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => FaultKind::OutOfFuel,
        Some(wasmtime::Trap::Interrupt) => FaultKind::Timeout,
        _ if store.data().memory_denied => FaultKind::Memory,
        _ => other,
    };
    let mut msg = error_chain(e);
    // Guest backtraces can be long; a fault message is for logs and counters.
    if msg.len() > 600 {
        let mut cut = 600;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push_str("...");
    }
    (kind, msg)
}

/// The version of `wit/policy.wit` this host speaks (its `package verdict:policy@...`).
pub const CONTRACT_VERSION: &str = "0.2.0";

/// Refuses a component built against another version of the contract, naming both versions.
/// A guest that uses the contract's types imports the (types-only) interface
/// `verdict:policy/types@VERSION`; its exports would also fail the type check below, but with a
/// message about record fields instead of the cause.
fn check_contract_version(component: &Component, engine: &Engine) -> Result<()> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        let Some(rest) = name.strip_prefix("verdict:policy/") else {
            continue;
        };
        let version = rest.split_once('@').map_or("(none)", |(_, v)| v);
        if version != CONTRACT_VERSION {
            bail!(
                "the component is built against verdict:policy@{version} (it imports `{name}`), \
                 this verdict speaks verdict:policy@{CONTRACT_VERSION}: rebuild it against the \
                 current wit/policy.wit (plugins/sdk)"
            );
        }
    }
    Ok(())
}
