//! Policy host tests: built-ins against native references, exactness of strict sampling,
//! hostile guests, hot swap under concurrent callers, persistence, parameters, traces, CLI.
//!
//! Guests other than the built-ins are built here with cargo for wasm32-wasip2 (the target must
//! be installed: `rustup target add wasm32-wasip2`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{cargo_wasm, hostile, target_root};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use verdict::decide::trace;
use verdict::decide::{
    Correction, FaultKind, Features, Info, PolicyLimits, PolicyRegistry, Step, Verdict,
};

// ---------------------------------------------------------------------------------------------
// helpers

fn limits() -> PolicyLimits {
    PolicyLimits {
        pool_instances: 32,
        ..PolicyLimits::default()
    }
}

fn registry() -> PolicyRegistry {
    PolicyRegistry::in_memory(limits()).expect("registry")
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed (is the wasm32-wasip2 target installed? `rustup target add \
         wasm32-wasip2`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------------
// native references of the built-in rules (written from DESIGN.md, independent of plugins/)

fn ref_ratio(p: f32, q: f32) -> f32 {
    if q > 0.0 {
        (p / q).min(1.0)
    } else if p > 0.0 {
        1.0
    } else {
        0.0
    }
}

/// One position, read from the step's flat lists by index (independently of the host's and the
/// SDK's views): position i is entry i of each list, its top-K entries [i*K, (i+1)*K).
struct Pos {
    token: u32,
    draft_prob: f32,
    target_prob: f32,
    entropy: f32,
    uniform: f32,
    judge: Option<f32>,
    top: Vec<(u32, f32)>,
}

fn positions(step: &Step) -> Vec<Pos> {
    let kk = step.top_k as usize;
    (0..step.tokens.len())
        .map(|i| Pos {
            token: step.tokens[i],
            draft_prob: step.draft_probs[i],
            target_prob: step.target_probs[i],
            entropy: step.entropies[i],
            uniform: step.uniforms[i],
            judge: step.judge.as_ref().map(|j| j[i]),
            top: (i * kk..(i + 1) * kk)
                .map(|j| (step.top_ids[j], step.top_probs[j]))
                .collect(),
        })
        .collect()
}

fn ref_strict_ok(pos: &Pos, t: f32) -> bool {
    if t <= 0.0 {
        pos.top[0].0 == pos.token
    } else {
        pos.uniform < ref_ratio(pos.target_prob, pos.draft_prob)
    }
}

fn prefix(step: &Step, f: impl Fn(&Pos) -> bool) -> u32 {
    let mut n = 0;
    for p in &positions(step) {
        if !f(p) {
            break;
        }
        n += 1;
    }
    n
}

/// The value of parameter `name`: `step.params` follows the order of `info.params`.
fn param(step: &Step, info: &Info, name: &str) -> f64 {
    let i = info
        .params
        .iter()
        .position(|p| p.name == name)
        .unwrap_or_else(|| panic!("param {name} not declared"));
    step.params[i]
}

fn lossy_correction(step: &Step) -> Correction {
    if step.temperature <= 0.0 {
        Correction::Argmax
    } else {
        Correction::Sample
    }
}

fn ref_strict(step: &Step) -> Verdict {
    Verdict {
        accepted: prefix(step, |p| ref_strict_ok(p, step.temperature)),
        correction: if step.temperature <= 0.0 {
            Correction::Argmax
        } else {
            Correction::Residual
        },
    }
}

fn ref_judge(step: &Step, info: &Info) -> Verdict {
    let thr = param(step, info, "threshold") as f32;
    Verdict {
        accepted: prefix(step, |p| {
            ref_strict_ok(p, step.temperature) || p.judge.is_some_and(|j| sigmoid(j) >= thr)
        }),
        correction: lossy_correction(step),
    }
}

fn ref_threshold(step: &Step, info: &Info) -> Verdict {
    let param = |name| param(step, info, name);
    let accepted = match param("rule") as i64 {
        0 => {
            let (eps, delta) = (param("eps") as f32, param("delta") as f32);
            prefix(step, |p| {
                p.target_prob > eps.min(delta * (-p.entropy).exp())
            })
        }
        1 => {
            let k = param("topk") as usize;
            let d = param("topk_delta") as f32;
            prefix(step, |p| {
                p.top[..k.min(p.top.len())]
                    .iter()
                    .any(|&(id, _)| id == p.token)
                    && p.target_prob >= p.top[0].1 - d
            })
        }
        2 => {
            let floor = param("floor") as f32;
            prefix(step, |p| {
                p.target_prob >= floor || ref_strict_ok(p, step.temperature)
            })
        }
        r => panic!("rule {r}"),
    };
    Verdict {
        accepted,
        correction: lossy_correction(step),
    }
}

/// A random step: tokens often the target's top-1, sometimes elsewhere in the top-K, sometimes
/// outside; edge cases (q = 0, q = 1, T = 0, no judge logits) included.
fn random_step(rng: &mut ChaCha8Rng, top_k: usize, params: Vec<f64>) -> Step {
    let k = rng.random_range(1..=16);
    let temperature = if rng.random_bool(0.3) {
        0.0
    } else {
        rng.random_range(0.3..1.5)
    };
    let with_judge = rng.random_bool(0.8);
    let mut step = Step::new(top_k, temperature, 1500, params);
    for _ in 0..k {
        let mut probs: Vec<f32> = (0..top_k).map(|_| rng.random::<f32>()).collect();
        probs.sort_by(|a, b| b.total_cmp(a));
        let scale: f32 = rng.random_range(0.3..1.0) / probs.iter().sum::<f32>();
        let ids: Vec<u32> = rand::seq::index::sample(rng, 1000, top_k)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let top: Vec<(u32, f32)> = ids
            .iter()
            .zip(&probs)
            .map(|(&i, &p)| (i, p * scale))
            .collect();
        let r: f64 = rng.random();
        let (token, target_prob) = if r < 0.5 {
            top[0]
        } else if r < 0.8 {
            top[rng.random_range(0..top_k)]
        } else {
            (1000 + rng.random_range(0..500), rng.random::<f32>() * 0.05)
        };
        let draft_prob = match rng.random_range(0..20) {
            0 => 0.0,
            1 => 1.0,
            _ => rng.random::<f32>(),
        };
        let f = Features {
            token,
            draft_prob,
            target_prob,
            entropy: rng.random_range(0.0..6.0),
            uniform: rng.random(),
            judge: with_judge.then(|| rng.random_range(-4.0..4.0)),
        };
        step.push(f, &top);
    }
    step
}

/// Random values inside each declared range (integers integral).
fn random_params(rng: &mut ChaCha8Rng, info: &verdict::decide::Info) -> Vec<(String, f64)> {
    info.params
        .iter()
        .map(|p| {
            let v = match p.kind {
                verdict::decide::ParamKind::Real => rng.random_range(p.min..=p.max),
                _ => rng.random_range(p.min as i64..=p.max as i64) as f64,
            };
            (p.name.clone(), v)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// built-ins

fn conformance(name: &str, reference: fn(&Step, &Info) -> Verdict, seed: u64) {
    let reg = registry();
    let h = reg.resolve(name).expect("built-in");
    assert!(h.is_builtin());
    let info = h.info().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut inst = h.instance();
    let mut accepted_hist = [0u32; 17];
    for i in 0..3000 {
        let params = random_params(&mut rng, &info);
        let params = h.resolve_params(&params).expect("params in range");
        let step = random_step(&mut rng, info.top_k_to_send().max(8), params);
        let d = inst.verify(&step);
        assert!(d.fault.is_none(), "{name} step {i} faulted: {:?}", d.fault);
        assert_eq!(
            d.verdict,
            reference(&step, &info),
            "{name} step {i}: {step:?}"
        );
        accepted_hist[d.verdict.accepted as usize] += 1;
    }
    // The random steps must exercise the rule: both rejections at 0 and long prefixes.
    assert!(accepted_hist[0] > 50, "{name}: {accepted_hist:?}");
    assert!(
        accepted_hist[2..].iter().sum::<u32>() > 200,
        "{name}: {accepted_hist:?}"
    );
    assert_eq!(h.counters().calls(), 3000);
    assert_eq!(h.counters().total_faults(), 0);
}

#[test]
fn strict_matches_reference() {
    conformance("strict", |s, _| ref_strict(s), 1);
}

#[test]
fn judge_matches_reference() {
    conformance("judge", ref_judge, 2);
}

#[test]
fn threshold_matches_reference() {
    conformance("threshold", ref_threshold, 3);
}

#[test]
fn native_fallback_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..5000 {
        let step = random_step(&mut rng, 8, Vec::new());
        assert_eq!(verdict::decide::strict_verdict(&step), ref_strict(&step));
    }
}

#[test]
fn builtin_infos() {
    let reg = registry();
    let names: Vec<String> = reg.list().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["strict", "judge", "threshold"]);
    let judge = reg.resolve("judge").unwrap();
    assert!(judge.info().needs_judge);
    assert_eq!(judge.info().params[0].name, "threshold");
    let thr = reg.resolve("threshold@0.1.0").unwrap();
    assert_eq!(thr.info().top_k, 8);
    let names: Vec<&str> = thr.info().params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["rule", "eps", "delta", "topk", "topk_delta", "floor"]
    );
    let err = reg.resolve("strict@9.9.9").unwrap_err().to_string();
    assert!(err.contains("has version 0.1.0, not 9.9.9"), "{err}");
    let err = reg.resolve("nope").unwrap_err().to_string();
    assert!(
        err.contains("unknown policy `nope`") && err.contains("strict"),
        "{err}"
    );
}

/// Exactness of strict speculative sampling: draw x ~ q, let the strict component decide with
/// the uniform, resample the residual norm(max(0, p - q)) on rejection; the emitted tokens must
/// follow p (chi-square, 5 degrees of freedom, alpha = 0.001). The same histogram test rejects
/// the draft's own distribution, so it has the power to fail.
#[test]
fn strict_sampling_reproduces_target() {
    let p = [0.30f32, 0.25, 0.20, 0.12, 0.08, 0.05];
    let q = [0.10f32, 0.10, 0.30, 0.30, 0.10, 0.10];
    let entropy: f32 = p.iter().map(|&x| -x * x.ln()).sum();
    let reg = registry();
    let mut inst = reg.resolve("strict").unwrap().instance();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let draw = |rng: &mut ChaCha8Rng, w: &[f32]| -> usize {
        let total: f32 = w.iter().sum();
        let mut u = rng.random::<f32>() * total;
        for (i, &x) in w.iter().enumerate() {
            if u < x {
                return i;
            }
            u -= x;
        }
        w.len() - 1
    };
    let residual: Vec<f32> = p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).collect();
    let n = 20_000;
    let mut hist = [0u64; 6];
    let mut draft_hist = [0u64; 6];
    let mut rejected = 0;
    for _ in 0..n {
        let x = draw(&mut rng, &q);
        draft_hist[x] += 1;
        let mut step = Step::new(1, 1.0, 6, Vec::new());
        let f = Features {
            token: x as u32,
            draft_prob: q[x],
            target_prob: p[x],
            entropy,
            uniform: rng.random(),
            judge: None,
        };
        step.push(f, &[(0, p[0])]);
        let d = inst.verify(&step);
        assert!(d.fault.is_none());
        let out = match d.verdict.accepted {
            1 => x,
            0 => {
                assert_eq!(d.verdict.correction, Correction::Residual);
                rejected += 1;
                draw(&mut rng, &residual)
            }
            a => panic!("accepted {a} of 1"),
        };
        hist[out] += 1;
    }
    let chi2 = |h: &[u64; 6]| -> f64 {
        h.iter()
            .zip(&p)
            .map(|(&o, &pi)| {
                let e = n as f64 * pi as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    };
    let critical = 20.515; // chi-square, 5 dof, p = 0.001
    assert!(chi2(&hist) < critical, "chi2 {} for {hist:?}", chi2(&hist));
    assert!(chi2(&draft_hist) > 10.0 * critical, "the test has no power");
    // Acceptance rate sum_x min(p, q) = 0.1+0.1+0.2+0.12+0.08+0.05 = 0.65.
    let acc = 1.0 - rejected as f64 / n as f64;
    assert!((acc - 0.65).abs() < 0.02, "acceptance {acc}");
}

// ---------------------------------------------------------------------------------------------
// hostile guests

fn mode_step(mode: f64) -> Step {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    loop {
        let step = random_step(&mut rng, 4, vec![mode]);
        if step.k() <= 4 {
            return step;
        }
    }
}

#[test]
fn hostile_guests_fall_back_to_strict() {
    let reg = registry();
    let h = reg
        .register(None, &hostile(""))
        .expect("honest mode validates");
    assert_eq!((h.name(), h.version()), ("hostile", "1.0.0"));
    let mut inst = h.instance();
    let cases = [
        (1.0, FaultKind::OutOfFuel),
        (2.0, FaultKind::Memory),
        (3.0, FaultKind::Trap),
        (4.0, FaultKind::BadVerdict),
        (5.0, FaultKind::BadVerdict),
        (6.0, FaultKind::Trap),
        (7.0, FaultKind::Trap),
    ];
    for (mode, kind) in cases {
        let step = mode_step(mode);
        let t = Instant::now();
        let d = inst.verify(&step);
        let fault = d
            .fault
            .unwrap_or_else(|| panic!("mode {mode} did not fault"));
        assert_eq!(fault.kind, kind, "mode {mode}: {fault}");
        assert_eq!(
            d.verdict,
            ref_strict(&step),
            "mode {mode}: fallback is strict"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "mode {mode} took {:?}",
            t.elapsed()
        );
        // The same instance serves the next step (on a fresh store after a trap).
        let ok = inst.verify(&mode_step(0.0));
        assert!(ok.fault.is_none(), "after mode {mode}: {:?}", ok.fault);
        assert_eq!(ok.verdict.correction, Correction::Token(1));
    }
    let c = h.counters();
    assert_eq!(c.faults(FaultKind::OutOfFuel), 1);
    assert_eq!(c.faults(FaultKind::Memory), 1);
    assert_eq!(c.faults(FaultKind::Trap), 3);
    assert_eq!(c.faults(FaultKind::BadVerdict), 2);
    assert_eq!(c.calls(), 14);
    // The import the guest called is named in the fault.
    let d = inst.verify(&mode_step(6.0));
    assert!(d.fault.unwrap().detail.contains("wasi:clocks"));
}

#[test]
fn wall_clock_deadline_stops_a_loop() {
    let reg = PolicyRegistry::in_memory(PolicyLimits {
        fuel_per_call: u64::MAX / 4,
        deadline: Duration::from_millis(50),
        epoch_tick: Duration::from_millis(5),
        ..limits()
    })
    .unwrap();
    let h = reg.register(None, &hostile("")).unwrap();
    let t = Instant::now();
    let d = h.instance().verify(&mode_step(1.0));
    assert_eq!(d.fault.map(|f| f.kind), Some(FaultKind::Timeout));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn bad_steps_are_faults_not_calls() {
    let reg = registry();
    let h = reg.resolve("threshold").unwrap();
    let mut inst = h.instance();
    let mut step = mode_step(0.0);
    step.params = h.resolve_params(&[]).unwrap();
    assert!(inst.verify(&step).fault.is_none());
    let good = step.clone();
    step.params[1] = f64::NAN;
    let d = inst.verify(&step);
    let f = d.fault.unwrap();
    assert_eq!(f.kind, FaultKind::BadStep);
    assert!(f.detail.contains("parameter #1 is NaN"), "{f}");
    assert_eq!(d.verdict, ref_strict(&step));
    step.params = good.params[..5].to_vec();
    let d = inst.verify(&step);
    let f = d.fault.unwrap();
    assert_eq!(f.kind, FaultKind::BadStep);
    assert!(f.detail.contains("5 parameter values"), "{f}");
    assert_eq!(d.verdict, ref_strict(&step));
    // Malformed positions: each is a fault naming the field, and strict accepts nothing on a
    // step it cannot read.
    type Breaker = fn(&mut Step);
    let cases: [(Breaker, &str); 5] = [
        (|s| s.clear_positions(), "no drafted positions"),
        (|s| s.entropies.truncate(s.k() - 1), "`entropies` has"),
        (|s| s.top_ids.truncate(s.top_ids.len() - 1), "`top_ids` has"),
        (|s| s.top_k = 0, "`top_k` is 0"),
        (|s| s.judge = Some(vec![0.5; s.k() + 1]), "`judge` has"),
    ];
    for (breaker, needle) in cases {
        let mut step = good.clone();
        breaker(&mut step);
        let d = inst.verify(&step);
        let f = d.fault.unwrap();
        assert_eq!(f.kind, FaultKind::BadStep);
        assert!(f.detail.contains(needle), "{needle}: {f}");
        assert_eq!(d.verdict.accepted, 0, "{needle}");
    }
    assert_eq!(h.counters().faults(FaultKind::BadStep), 7);
}

/// A component built against the previous contract (verdict:policy@0.1.0: the built-in strict
/// of that release, kept as a fixture) is refused with an error naming both versions.
#[test]
fn components_of_another_contract_version_are_refused() {
    let old = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/strict-policy-0.1.0.wasm"),
    )
    .unwrap();
    let reg = registry();
    let err = format!("{:#}", reg.register(Some("old"), &old).unwrap_err());
    assert!(
        err.contains("built against verdict:policy@0.1.0")
            && err.contains("speaks verdict:policy@0.2.0"),
        "{err}"
    );
    assert!(reg.resolve("old").is_err());
}

#[test]
fn bad_uploads_are_rejected_and_the_old_version_serves() {
    let reg = registry();
    reg.register(Some("victim"), &hostile("")).unwrap();
    let cases: [(&[u8], &str); 5] = [
        (&hostile("huge-info,v2"), "invalid policy name"),
        (&hostile("info-loop,v2"), "out_of_fuel"),
        (&hostile("bad-info,v2"), "default 5 is outside [0, 1]"),
        (b"not wasm at all", "not a valid policy component"),
        // A core module, not a component.
        (b"\0asm\x01\0\0\0", "not a valid policy component"),
    ];
    for (wasm, needle) in cases {
        let err = format!("{:#}", reg.register(Some("victim"), wasm).unwrap_err());
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(err.len() < 2000, "error too long: {} bytes", err.len());
        let h = reg.resolve("victim").unwrap();
        assert_eq!(h.version(), "1.0.0");
        assert!(h.instance().verify(&mode_step(0.0)).fault.is_none());
    }
    let err = reg
        .register(Some("strict"), &hostile(""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("built-in"), "{err}");
    let err = reg
        .register(Some("bad name!"), &hostile(""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid policy name"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// hot swap

#[test]
fn hot_swap_under_concurrent_callers() {
    let reg = Arc::new(registry());
    let v1 = hostile("");
    let v2 = hostile("v2");
    let huge = hostile("huge-info,v2");
    reg.register(Some("hs"), &v1).unwrap();

    // A request that started on v1 keeps v1 for all its steps.
    let pinned = reg.resolve("hs").unwrap();
    let mut pinned_inst = pinned.instance();

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (reg, stop, calls, seen) = (reg.clone(), stop.clone(), calls.clone(), seen.clone());
            std::thread::spawn(move || {
                let step = mode_step(0.0);
                while !stop.load(Ordering::Relaxed) {
                    let h = reg.resolve("hs").expect("resolve never fails during swaps");
                    let tag = match h.version() {
                        "1.0.0" => 1,
                        "2.0.0" => 2,
                        v => panic!("worker {w}: unexpected version {v}"),
                    };
                    let mut inst = h.instance();
                    // Several steps of one request: all on the version resolved above.
                    for _ in 0..3 {
                        let d = inst.verify(&step);
                        assert!(d.fault.is_none(), "worker {w}: {:?}", d.fault);
                        assert_eq!(d.verdict.correction, Correction::Token(tag), "worker {w}");
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    seen[tag as usize - 1].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(30));
        let wasm = if round % 2 == 0 { &v2 } else { &v1 };
        let t = Instant::now();
        reg.register(Some("hs"), wasm).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        // A bad upload in the middle changes nothing.
        if round == 3 {
            assert!(reg.register(Some("hs"), &huge).is_err());
        }
    }
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker panicked");
    }
    assert!(calls.load(Ordering::Relaxed) > 100);
    assert!(seen[0].load(Ordering::Relaxed) > 0 && seen[1].load(Ordering::Relaxed) > 0);
    assert_eq!(reg.resolve("hs").unwrap().version(), "1.0.0");
    // Both versions are loaded; each can be asked for by name@version.
    assert_eq!(reg.resolve("hs@2.0.0").unwrap().version(), "2.0.0");

    let d = pinned_inst.verify(&mode_step(0.0));
    assert_eq!(d.verdict.correction, Correction::Token(1));
    let c = reg.resolve("hs").unwrap().counters().clone();
    assert_eq!(c.total_faults(), 0);
}

// ---------------------------------------------------------------------------------------------
// persistence

#[test]
fn registry_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let reg = PolicyRegistry::open(dir.path(), limits()).unwrap();
        reg.register(None, &hostile("")).unwrap();
        reg.register(None, &hostile("v2")).unwrap();
        reg.register(Some("other"), &hostile("")).unwrap();
    }
    let cache_files = walk(&dir.path().join("cache"), "cwasm");
    assert_eq!(cache_files, 2, "one artifact per distinct component");
    {
        let reg = PolicyRegistry::open(dir.path(), limits()).unwrap();
        assert!(reg.load_errors().is_empty(), "{:?}", reg.load_errors());
        let rows: Vec<(String, Vec<String>)> = reg
            .list()
            .into_iter()
            .filter(|r| !r.builtin)
            .map(|r| (r.name, r.versions))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "hostile".to_string(),
                    vec!["1.0.0".to_string(), "2.0.0".to_string()]
                ),
                ("other".to_string(), vec!["1.0.0".to_string()]),
            ]
        );
        assert_eq!(reg.resolve("hostile").unwrap().version(), "2.0.0");
        reg.remove("hostile@2.0.0").unwrap();
        assert_eq!(reg.resolve("hostile").unwrap().version(), "1.0.0");
        reg.remove("other").unwrap();
        assert!(reg.resolve("other").is_err());
        let err = reg.remove("strict").unwrap_err().to_string();
        assert!(err.contains("built-in"), "{err}");
    }
    let reg = PolicyRegistry::open(dir.path(), limits()).unwrap();
    assert_eq!(reg.resolve("hostile").unwrap().version(), "1.0.0");
    assert!(reg.resolve("hostile@2.0.0").is_err());
    assert_eq!(walk(&dir.path().join("components"), "wasm"), 1);

    // A damaged manifest is a clear error naming the file.
    std::fs::write(dir.path().join("manifest.json"), "{ nope").unwrap();
    let err = format!(
        "{:#}",
        PolicyRegistry::open(dir.path(), limits()).err().unwrap()
    );
    assert!(
        err.contains("manifest.json") && err.contains("not a valid policy manifest"),
        "{err}"
    );
}

fn walk(dir: &Path, ext: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walk(&p, ext);
        } else if p.extension().is_some_and(|x| x == ext) {
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// parameters, traces

#[test]
fn params_are_validated() {
    let reg = registry();
    let h = reg.resolve("threshold").unwrap();
    let defaults = h.resolve_params(&[]).unwrap();
    assert_eq!(defaults, [0.0, 0.09, 0.3, 8.0, 0.5, 0.1]);
    let p = h
        .resolve_params(&[("delta".into(), 0.5), ("rule".into(), 2.0)])
        .unwrap();
    assert_eq!(p, [2.0, 0.09, 0.5, 8.0, 0.5, 0.1]);
    let cases: [(&str, f64, &str); 5] = [
        (
            "epsilon",
            0.1,
            "has no parameter `epsilon` (its parameters: rule, eps",
        ),
        ("eps", 1.5, "`eps` = 1.5 is outside its range [0, 1]"),
        ("eps", f64::NAN, "must be a finite number"),
        ("rule", 1.5, "must be an integer"),
        ("topk", 0.0, "outside its range [1, 8]"),
    ];
    for (name, v, needle) in cases {
        let err = h
            .resolve_params(&[(name.into(), v)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{name}={v}: {err}");
    }
    let err = h
        .resolve_params(&[("eps".into(), 0.1), ("eps".into(), 0.2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("twice"), "{err}");
}

#[test]
fn trace_round_trip_and_replay() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let steps: Vec<Step> = (0..200)
        .map(|_| random_step(&mut rng, 8, vec![0.0, 0.09]))
        .collect();
    let mut buf = Vec::new();
    for s in &steps {
        trace::write_step(&mut buf, s).unwrap();
    }
    let text = String::from_utf8(buf.clone()).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["params"], serde_json::json!([0.0, 0.09]), "{first}");
    assert_eq!(first["top_k"], 8, "{first}");
    let k = first["tokens"].as_array().unwrap().len();
    assert_eq!(first["top_ids"].as_array().unwrap().len(), 8 * k, "{first}");
    let back = trace::parse_trace(&buf[..], "mem").unwrap();
    assert_eq!(back, steps);

    let reg = registry();
    let h = reg.resolve("strict").unwrap();
    let report = trace::replay(&h, &[], &steps);
    assert_eq!(report.faults, 0);
    for (s, r) in steps.iter().zip(&report.steps) {
        assert_eq!(r.accepted, ref_strict(s).accepted);
        assert_eq!(r.tokens.len(), r.accepted as usize);
    }
    let total_acc: u64 = report.per_position.iter().map(|p| p.0).sum();
    let sum_acc: u64 = report.steps.iter().map(|s| s.accepted as u64).sum();
    assert_eq!(total_acc, sum_acc);
    assert_eq!(report.per_position[0].1, 200);

    let err = format!(
        "{:#}",
        trace::parse_trace(
            &b"{\"tokens\":[1],\"draft_probs\":[1],\"target_probs\":[1],\"entropies\":[1],\
               \"uniforms\":[0.5],\"top_k\":2,\"top_ids\":[1],\"top_probs\":[1],\
               \"temperature\":1,\"vocab_size\":9}\n"[..],
            "t.jsonl"
        )
        .unwrap_err()
    );
    assert!(
        err.contains("t.jsonl:1: malformed step: `top_ids` has 1 entries but k * top_k"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        trace::parse_trace(&b"\n{\"temperature\":1}\n"[..], "t.jsonl").unwrap_err()
    );
    assert!(
        err.contains("t.jsonl:2: not a step") && err.contains("tokens"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// CLI

/// The `verdict` binary of this build. Several checkouts sharing one CARGO_TARGET_DIR overwrite
/// each other's uplifted `target/debug/verdict`; then fall back to the newest hashed copy in
/// `deps/` that has the `policy` command.
fn verdict_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let has_policy = |p: &Path| {
            Command::new(p)
                .args(["policy", "--help"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let main = PathBuf::from(env!("CARGO_BIN_EXE_verdict"));
        if has_policy(&main) {
            return main;
        }
        let deps = main.parent().expect("bin dir").join("deps");
        let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("verdict-") && !n.contains('.'))
            })
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .rev()
            .map(|(_, p)| p)
            .find(|p| has_policy(p))
            .unwrap_or(main)
    })
    .clone()
}

fn verdict_cmd(dir: &Path) -> Command {
    let mut c = Command::new(verdict_bin());
    c.env("VERDICT_POLICY_DIR", dir);
    c
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run verdict");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_list_check_add_replay() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hostile.wasm");
    std::fs::write(&wasm, hostile("")).unwrap();

    let (ok, out, err) = output(verdict_cmd(dir.path()).args(["policy", "check"]).arg(&wasm));
    assert!(ok, "{err}");
    assert!(
        out.contains("name:        hostile") && out.contains("mode"),
        "{out}"
    );

    let (ok, _, err) =
        output(verdict_cmd(dir.path()).args(["policy", "check", "/nonexistent.wasm"]));
    assert!(!ok);
    assert!(
        err.starts_with("error: cannot read /nonexistent.wasm"),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let (ok, out, err) = output(verdict_cmd(dir.path()).args(["policy", "add"]).arg(&wasm));
    assert!(ok, "{err}");
    assert!(out.contains("registered hostile@1.0.0"), "{out}");

    let (ok, out, err) = output(verdict_cmd(dir.path()).args(["policy", "list"]));
    assert!(ok, "{err}");
    for name in ["strict", "judge", "threshold", "hostile"] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }

    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let trace_path = dir.path().join("steps.jsonl");
    let mut buf = Vec::new();
    for _ in 0..50 {
        trace::write_step(&mut buf, &random_step(&mut rng, 8, Vec::new())).unwrap();
    }
    std::fs::write(&trace_path, &buf).unwrap();
    let (ok, out, err) = output(
        verdict_cmd(dir.path())
            .args([
                "policy",
                "replay",
                "threshold",
                "--param",
                "rule=1",
                "--trace",
            ])
            .arg(&trace_path),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("policy threshold@0.1.0") && out.contains("rule=1"),
        "{out}"
    );
    assert!(
        out.contains("tokens/step") && out.contains("position"),
        "{out}"
    );
    // A registered name works too, and a bad parameter is an error naming it.
    let (ok, _, err) = output(
        verdict_cmd(dir.path())
            .args([
                "policy", "replay", "hostile", "--param", "mode=9", "--trace",
            ])
            .arg(&trace_path),
    );
    assert!(
        !ok && err.contains("`mode` = 9 is outside its range [0, 7]"),
        "{err}"
    );
}

/// `verdict policy new` scaffolds a crate outside the repository that builds with plain cargo,
/// and the example in examples/custom-policy builds and validates; both share a target dir.
#[test]
fn scaffold_and_example_build_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my-rule");
    let (ok, out, err) = output(
        verdict_cmd(dir.path())
            .args(["policy", "new", "my-rule", "--path"])
            .arg(&crate_dir),
    );
    assert!(ok, "{err}");
    assert!(out.contains("cargo build --release"), "{out}");
    let target = target_root().join("policy-crates");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/custom-policy");
    for (krate, file) in [
        (&crate_dir, "my_rule.wasm"),
        (&example, "custom_policy.wasm"),
    ] {
        let mut cmd = cargo_wasm();
        cmd.current_dir(krate)
            .args(["build", "--release", "--target-dir"])
            .arg(&target);
        run_ok(&mut cmd, &format!("cargo build in {}", krate.display()));
        let wasm = target.join("wasm32-wasip2/release").join(file);
        let (ok, out, err) = output(verdict_cmd(dir.path()).args(["policy", "check"]).arg(&wasm));
        assert!(ok, "{err}");
        assert!(out.starts_with("ok: "), "{out}");
    }
    // The example's rule, on a step built for it: accepted while in the target's top-K and
    // below the entropy bound.
    let reg = registry();
    let h = reg
        .register(
            None,
            &std::fs::read(target.join("wasm32-wasip2/release/custom_policy.wasm")).unwrap(),
        )
        .unwrap();
    assert_eq!(h.name(), "topk-entropy");
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let params = h.resolve_params(&[]).unwrap();
    let declared = |name| h.info().params.iter().position(|p| p.name == name).unwrap();
    let bound = params[declared("max_entropy")] as f32;
    let k = params[declared("k")] as usize;
    let mut inst = h.instance();
    for _ in 0..500 {
        let step = random_step(&mut rng, 8, params.clone());
        let want = prefix(&step, |p| {
            p.entropy < bound && p.top.iter().take(k).any(|&(id, _)| id == p.token)
        });
        let d = inst.verify(&step);
        assert!(d.fault.is_none());
        assert_eq!(d.verdict.accepted, want);
    }
}

#[test]
fn refresh_picks_up_changes_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let server = PolicyRegistry::open(dir.path(), limits()).unwrap();
    server.register(None, &hostile("")).unwrap();
    let kept = server.resolve("hostile").unwrap();
    // Another process (e.g. `verdict policy add`, or a replica on shared storage) adds v2.
    {
        let other = PolicyRegistry::open(dir.path(), limits()).unwrap();
        other.register(None, &hostile("v2")).unwrap();
    }
    assert_eq!(server.resolve("hostile").unwrap().version(), "1.0.0");
    assert!(server.refresh().unwrap().is_empty());
    assert_eq!(server.resolve("hostile").unwrap().version(), "2.0.0");
    // The already-loaded v1 was reused, not reloaded.
    let v1 = server.resolve("hostile@1.0.0").unwrap();
    assert_eq!(v1.sha256(), kept.sha256());
    assert_eq!(v1.counters().calls(), kept.counters().calls());
}
