//! The policy registry: named, versioned policies that can be loaded, listed, replaced and
//! removed while the server runs.
//!
//! Publication is one atomic pointer swap (arc-swap) of an immutable snapshot, after the new
//! version has been compiled and validated (instantiates, answers `info`, passes a probe
//! `verify`) and written to the policy directory. A failed upload changes nothing.
//!
//! Which version does a running request use? The one it resolved when it started: a
//! [`PolicyHandle`] pins its version, so a request finishes every step on it, and the next
//! request (the next `resolve`) sees the new one. Pinning per request keeps a request's
//! parameters (validated against that version's declarations) meaningful for all its steps.
//!
//! Persistence: `<dir>/manifest.json` (written atomically: temp file, fsync, rename) lists each
//! name's versions; the components are content-addressed files `<dir>/components/<sha256>.wasm`;
//! compiled artifacts are cached in `<dir>/cache/<engine hash>/<sha256>.cwasm`. After a restart
//! (or a kill -9 at any point) the registry comes back with the last manifest written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::builtin;
use super::policy::{LoadedPolicy, PolicyCounters, PolicyHandle};
use super::runtime::{PolicyLimits, PolicyRuntime};
use super::types::{Info, ParamKind};
use crate::files::write_atomic;

/// Limits on what a policy may declare (a hostile `info` must not bloat the host).
const MAX_NAME: usize = 64;
const MAX_DESCRIPTION: usize = 1024;
const MAX_PARAMS: usize = 64;
const MAX_TOP_K: u32 = 256;

struct Builtin {
    name: &'static str,
    wasm: Option<&'static [u8]>,
    loaded: OnceLock<Result<Arc<LoadedPolicy>, String>>,
    counters: Arc<PolicyCounters>,
}

#[derive(Clone, Default)]
struct Snapshot {
    slots: BTreeMap<String, Slot>,
}

#[derive(Clone)]
struct Slot {
    /// Registration order; the last one is current.
    versions: Vec<Arc<LoadedPolicy>>,
    counters: Arc<PolicyCounters>,
}

/// One row of [`PolicyRegistry::list`].
#[derive(Clone, Debug, Serialize)]
pub struct PolicyListing {
    pub name: String,
    /// The version `resolve(name)` returns.
    pub current: Option<String>,
    /// All loaded versions, oldest first.
    pub versions: Vec<String>,
    pub builtin: bool,
    pub info: Option<Info>,
    pub calls: u64,
    pub faults: u64,
    /// Why a built-in is unavailable.
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
struct Manifest {
    format: u32,
    policies: Vec<ManifestPolicy>,
}

#[derive(Serialize, Deserialize)]
struct ManifestPolicy {
    name: String,
    /// Oldest first; the last is current.
    versions: Vec<ManifestVersion>,
}

#[derive(Serialize, Deserialize)]
struct ManifestVersion {
    version: String,
    sha256: String,
}

const MANIFEST_FORMAT: u32 = 1;

pub struct PolicyRegistry {
    runtime: Arc<PolicyRuntime>,
    dir: Option<PathBuf>,
    state: ArcSwap<Snapshot>,
    /// Serialises writers (register / remove); readers never take it.
    write: Mutex<()>,
    builtins: Vec<Builtin>,
    load_errors: Vec<String>,
}

impl PolicyRegistry {
    /// A registry that keeps nothing on disk (built-ins plus whatever is registered).
    pub fn in_memory(limits: PolicyLimits) -> Result<Self> {
        let runtime = PolicyRuntime::new(limits, None)?;
        Ok(Self::with_runtime(runtime, None))
    }

    /// Opens (creating if needed) the policy directory `dir` and loads every policy its
    /// manifest lists. A version that no longer loads is skipped and reported in
    /// [`Self::load_errors`]; the others serve.
    pub fn open(dir: impl AsRef<Path>, limits: PolicyLimits) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join("components"))
            .with_context(|| format!("cannot create the policy directory {}", dir.display()))?;
        let runtime = PolicyRuntime::new(limits, Some(dir.join("cache")))?;
        let mut reg = Self::with_runtime(runtime, Some(dir.clone()));
        let manifest = read_manifest(&dir)?;
        let mut snap = Snapshot::default();
        for p in manifest.policies {
            let counters = Arc::new(PolicyCounters::default());
            let mut versions = Vec::new();
            for v in p.versions {
                match reg.load_stored(&p.name, &v, &counters) {
                    Ok(l) => versions.push(l),
                    Err(e) => reg
                        .load_errors
                        .push(format!("policy `{}@{}`: {e:#}", p.name, v.version)),
                }
            }
            if !versions.is_empty() {
                snap.slots.insert(p.name, Slot { versions, counters });
            }
        }
        reg.state.store(Arc::new(snap));
        Ok(reg)
    }

    fn with_runtime(runtime: Arc<PolicyRuntime>, dir: Option<PathBuf>) -> Self {
        let builtins = builtin::BUILTIN_NAMES
            .iter()
            .map(|&name| Builtin {
                name,
                wasm: builtin::wasm(name),
                loaded: OnceLock::new(),
                counters: Arc::new(PolicyCounters::default()),
            })
            .collect();
        PolicyRegistry {
            runtime,
            dir,
            state: ArcSwap::from_pointee(Snapshot::default()),
            write: Mutex::new(()),
            builtins,
            load_errors: Vec::new(),
        }
    }

    /// The policy directory, if this registry persists.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn limits(&self) -> &PolicyLimits {
        self.runtime.limits()
    }

    /// Versions listed in the manifest that failed to load at `open`.
    pub fn load_errors(&self) -> &[String] {
        &self.load_errors
    }

    /// `"name"` (the current version) or `"name@version"`.
    pub fn resolve(&self, spec: &str) -> Result<PolicyHandle> {
        let (name, version) = split_spec(spec)?;
        if let Some(b) = self.builtins.iter().find(|b| b.name == name) {
            let loaded = self.builtin(b)?;
            if let Some(v) = version
                && v != loaded.info.version
            {
                bail!(
                    "built-in policy `{name}` has version {}, not {v}",
                    loaded.info.version
                );
            }
            return Ok(PolicyHandle { inner: loaded });
        }
        let snap = self.state.load();
        let slot = snap.slots.get(name).ok_or_else(|| {
            anyhow!(
                "unknown policy `{name}` (available: {})",
                self.names(&snap).join(", ")
            )
        })?;
        let loaded = match version {
            None => slot.versions.last(),
            Some(v) => slot.versions.iter().rev().find(|l| l.info.version == v),
        };
        let loaded = loaded.ok_or_else(|| {
            let have: Vec<&str> = slot
                .versions
                .iter()
                .map(|l| l.info.version.as_str())
                .collect();
            anyhow!(
                "policy `{name}` has no version {} (loaded: {})",
                version.unwrap_or("?"),
                have.join(", ")
            )
        })?;
        Ok(PolicyHandle {
            inner: loaded.clone(),
        })
    }

    fn names(&self, snap: &Snapshot) -> Vec<String> {
        self.builtins
            .iter()
            .map(|b| b.name.to_string())
            .chain(snap.slots.keys().cloned())
            .collect()
    }

    fn builtin(&self, b: &Builtin) -> Result<Arc<LoadedPolicy>> {
        let r = b.loaded.get_or_init(|| {
            let wasm = b.wasm.ok_or_else(builtin::missing_message)?;
            self.load(wasm, Some(b.name), true, b.counters.clone())
                .map(Arc::new)
                .map_err(|e| format!("built-in policy `{}` does not load: {e:#}", b.name))
        });
        r.clone().map_err(|e| anyhow!(e))
    }

    /// Built-ins first, then registered policies by name.
    pub fn list(&self) -> Vec<PolicyListing> {
        let mut out = Vec::new();
        for b in &self.builtins {
            let row = match self.builtin(b) {
                Ok(l) => PolicyListing {
                    name: b.name.to_string(),
                    current: Some(l.info.version.clone()),
                    versions: vec![l.info.version.clone()],
                    builtin: true,
                    info: Some(l.info.clone()),
                    calls: b.counters.calls(),
                    faults: b.counters.total_faults(),
                    error: None,
                },
                Err(e) => PolicyListing {
                    name: b.name.to_string(),
                    current: None,
                    versions: Vec::new(),
                    builtin: true,
                    info: None,
                    calls: 0,
                    faults: 0,
                    error: Some(format!("{e:#}")),
                },
            };
            out.push(row);
        }
        let snap = self.state.load();
        for (name, slot) in &snap.slots {
            let cur = slot.versions.last().map(|l| l.info.clone());
            out.push(PolicyListing {
                name: name.clone(),
                current: cur.as_ref().map(|i| i.version.clone()),
                versions: slot
                    .versions
                    .iter()
                    .map(|l| l.info.version.clone())
                    .collect(),
                builtin: false,
                info: cur,
                calls: slot.counters.calls(),
                faults: slot.counters.total_faults(),
                error: None,
            });
        }
        out
    }

    /// Validates a component without registering it: compiles, instantiates, asks `info`, runs
    /// the probe `verify`. Returns its info.
    pub fn check(&self, wasm: &[u8]) -> Result<Info> {
        Ok(self
            .load(wasm, None, false, Arc::new(PolicyCounters::default()))?
            .info)
    }

    /// Registers `wasm` under `name` (default: the name its `info` gives) as a new version (its
    /// `info` version; re-uploading an existing version replaces it). The new version becomes
    /// current only after it validated and the manifest was written; on any error the registry
    /// is unchanged and the previous version keeps serving.
    pub fn register(&self, name: Option<&str>, wasm: &[u8]) -> Result<PolicyHandle> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.state.load_full();
        let probe = self.load(wasm, None, false, Arc::new(PolicyCounters::default()))?;
        let name = name.unwrap_or(&probe.info.name).to_string();
        check_name(&name)?;
        if self.builtins.iter().any(|b| b.name == name) {
            bail!("`{name}` is a built-in policy name; register under another name");
        }
        let counters = snap
            .slots
            .get(&name)
            .map(|s| s.counters.clone())
            .unwrap_or_default();
        let loaded = Arc::new(LoadedPolicy {
            counters: counters.clone(),
            ..probe
        });
        let mut next = (*snap).clone();
        let slot = next.slots.entry(name.clone()).or_insert_with(|| Slot {
            versions: Vec::new(),
            counters,
        });
        slot.versions
            .retain(|l| l.info.version != loaded.info.version);
        slot.versions.push(loaded.clone());
        if let Some(dir) = &self.dir {
            let path = component_path(dir, &loaded.sha256);
            if !path.exists() {
                write_atomic(&path, wasm)?;
            }
            write_manifest(dir, &next)?;
        }
        self.state.store(Arc::new(next));
        Ok(PolicyHandle { inner: loaded })
    }

    /// Removes `"name"` (all versions) or `"name@version"`. Handles already resolved keep
    /// working until dropped.
    pub fn remove(&self, spec: &str) -> Result<()> {
        let (name, version) = split_spec(spec)?;
        if self.builtins.iter().any(|b| b.name == name) {
            bail!("`{name}` is a built-in policy and cannot be removed");
        }
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.state.load_full();
        let mut next = (*snap).clone();
        let Some(slot) = next.slots.get_mut(name) else {
            bail!("unknown policy `{name}`");
        };
        match version {
            None => {
                next.slots.remove(name);
            }
            Some(v) => {
                let before = slot.versions.len();
                slot.versions.retain(|l| l.info.version != v);
                if slot.versions.len() == before {
                    bail!("policy `{name}` has no version {v}");
                }
                if slot.versions.is_empty() {
                    next.slots.remove(name);
                }
            }
        }
        if let Some(dir) = &self.dir {
            write_manifest(dir, &next)?;
            // Drop component files nothing refers to any more (best effort).
            let live: std::collections::HashSet<&str> = next
                .slots
                .values()
                .flat_map(|s| s.versions.iter().map(|l| l.sha256.as_str()))
                .collect();
            for l in snap.slots.values().flat_map(|s| s.versions.iter()) {
                if !live.contains(l.sha256.as_str()) {
                    let _ = std::fs::remove_file(component_path(dir, &l.sha256));
                }
            }
        }
        self.state.store(Arc::new(next));
        Ok(())
    }

    /// Re-reads the manifest and publishes what it lists (another process, e.g. `verdict
    /// policy add` or a replica sharing the directory, may have changed it). Versions already
    /// loaded are reused; new ones are loaded and validated; a version that fails is skipped and
    /// returned as an error message while the rest is published. No-op without a directory.
    pub fn refresh(&self) -> Result<Vec<String>> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let manifest = read_manifest(dir)?;
        let old = self.state.load_full();
        let mut next = Snapshot::default();
        let mut errors = Vec::new();
        for p in manifest.policies {
            let prev = old.slots.get(&p.name);
            let counters = prev.map(|s| s.counters.clone()).unwrap_or_default();
            let mut versions = Vec::new();
            for v in p.versions {
                let reuse = prev.and_then(|s| {
                    s.versions
                        .iter()
                        .find(|l| l.sha256 == v.sha256 && l.info.version == v.version)
                });
                match reuse {
                    Some(l) => versions.push(l.clone()),
                    None => match self.load_stored(&p.name, &v, &counters) {
                        Ok(l) => versions.push(l),
                        Err(e) => errors.push(format!("policy `{}@{}`: {e:#}", p.name, v.version)),
                    },
                }
            }
            if !versions.is_empty() {
                next.slots.insert(p.name, Slot { versions, counters });
            }
        }
        self.state.store(Arc::new(next));
        Ok(errors)
    }

    fn load_stored(
        &self,
        _name: &str,
        v: &ManifestVersion,
        counters: &Arc<PolicyCounters>,
    ) -> Result<Arc<LoadedPolicy>> {
        let dir = self.dir.as_ref().context("registry has no directory")?;
        let path = component_path(dir, &v.sha256);
        let wasm =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let l = self.load(&wasm, None, false, counters.clone())?;
        if l.sha256 != v.sha256 {
            bail!("{} does not match its recorded sha256", path.display());
        }
        if l.info.version != v.version {
            bail!(
                "{} now reports version {}, the manifest says {}",
                path.display(),
                l.info.version,
                v.version
            );
        }
        Ok(Arc::new(l))
    }

    fn load(
        &self,
        wasm: &[u8],
        expect_name: Option<&str>,
        builtin: bool,
        counters: Arc<PolicyCounters>,
    ) -> Result<LoadedPolicy> {
        let sha256 = hex::encode(Sha256::digest(wasm));
        let compiled = self.runtime.compile(wasm, &sha256)?;
        let info = LoadedPolicy::validate(&compiled)?;
        if let Some(n) = expect_name
            && n != info.name
        {
            bail!("the component calls itself `{}`, expected `{n}`", info.name);
        }
        Ok(LoadedPolicy {
            info,
            sha256,
            builtin,
            compiled,
            counters,
        })
    }
}

fn component_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("components").join(format!("{sha256}.wasm"))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid policy manifest", path.display()))?;
    if m.format != MANIFEST_FORMAT {
        bail!(
            "{} has format {}, this verdict reads format {MANIFEST_FORMAT}",
            path.display(),
            m.format
        );
    }
    Ok(m)
}

fn write_manifest(dir: &Path, snap: &Snapshot) -> Result<()> {
    let m = Manifest {
        format: MANIFEST_FORMAT,
        policies: snap
            .slots
            .iter()
            .map(|(name, slot)| ManifestPolicy {
                name: name.clone(),
                versions: slot
                    .versions
                    .iter()
                    .map(|l| ManifestVersion {
                        version: l.info.version.clone(),
                        sha256: l.sha256.clone(),
                    })
                    .collect(),
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&m)?;
    text.push('\n');
    write_atomic(&dir.join("manifest.json"), text.as_bytes())
}

fn split_spec(spec: &str) -> Result<(&str, Option<&str>)> {
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    check_name(name)?;
    if version.is_some_and(str::is_empty) {
        bail!("policy `{spec}`: empty version after `@`");
    }
    Ok((name, version))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!(
            "invalid policy name `{}`: use 1-{MAX_NAME} characters from A-Z a-z 0-9 - _ .",
            truncate(name, 80)
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// What the host accepts from `info`.
pub(crate) fn check_info(info: &Info) -> Result<()> {
    check_name(&info.name).context("in the component's info")?;
    if info.version.is_empty()
        || info.version.len() > MAX_NAME
        || info
            .version
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '/')
    {
        bail!(
            "invalid version `{}` in the component's info: 1-{MAX_NAME} characters, no spaces, \
             `@` or `/`",
            truncate(&info.version, 80)
        );
    }
    if info.top_k > MAX_TOP_K {
        bail!(
            "info.top-k = {} exceeds the host's limit {MAX_TOP_K}",
            info.top_k
        );
    }
    if info.params.len() > MAX_PARAMS {
        bail!(
            "info declares {} parameters, the limit is {MAX_PARAMS}",
            info.params.len()
        );
    }
    for (i, p) in info.params.iter().enumerate() {
        check_name(&p.name).with_context(|| format!("parameter #{i} of the component's info"))?;
        if info.params[..i].iter().any(|q| q.name == p.name) {
            bail!("parameter `{}` is declared twice", p.name);
        }
        if p.description.len() > MAX_DESCRIPTION {
            bail!(
                "parameter `{}`: description is {} bytes, the limit is {MAX_DESCRIPTION}",
                p.name,
                p.description.len()
            );
        }
        if !(p.min.is_finite() && p.max.is_finite() && p.default.is_finite()) || p.min > p.max {
            bail!(
                "parameter `{}`: range [{}, {}] with default {} is not a finite, ordered range",
                p.name,
                p.min,
                p.max,
                p.default
            );
        }
        if p.default < p.min || p.default > p.max {
            bail!(
                "parameter `{}`: default {} is outside [{}, {}]",
                p.name,
                p.default,
                p.min,
                p.max
            );
        }
        match p.kind {
            ParamKind::Integer if p.default.fract() != 0.0 => {
                bail!("integer parameter `{}` has a fractional default", p.name)
            }
            ParamKind::Boolean if p.default != 0.0 && p.default != 1.0 => {
                bail!("boolean parameter `{}` has default {}", p.name, p.default)
            }
            _ => {}
        }
    }
    Ok(())
}
