//! The speculation engine on tiny random models: strict speculation is lossless (greedy output
//! identical to autoregressive; sampled output follows the target's distribution), rollback is
//! exact, statistics add up, and bad requests are refused with the field named.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use verdict::decide::{PolicyLimits, PolicyRegistry};
use verdict::draft::DrafterSpec;
use verdict::engine::{Engine, EngineConfig, GenerateRequest, Speculation};
use verdict::models::testing::{TinySpec, write_tiny_gguf};
use verdict::models::tokenizer::Tokenizer;
use verdict::models::{Model, Rows};
use verdict::sample::{Constraint, GrammarSpec, Grammars, Penalizer, Penalties, SamplingParams};
use verdict::verify::JudgeHead;
use verdict::verify::judge::TargetIdentity;

fn tiny(dir: &Path, name: &str, spec: TinySpec) -> Model {
    let path: PathBuf = dir.join(name);
    write_tiny_gguf(&path, &spec).unwrap();
    Model::load_gguf(&path, &candle_core::Device::Cpu).unwrap()
}

/// Sharper than the default random model so that sampling tests have structure to find.
fn spec(seed: u64, layers: usize) -> TinySpec {
    TinySpec {
        seed,
        layers,
        vocab: 300,
        ..TinySpec::default()
    }
}

fn engine(target: Model, draft: Option<Model>, drafter: Option<DrafterSpec>, k: usize) -> Engine {
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default()).unwrap());
    Engine::new(EngineConfig {
        judge: None,
        target,
        draft,
        registry,
        default_policy: "strict".into(),
        default_drafter: drafter,
        default_k: k,
        adaptive: false,
        synthetic_acceptance: None,
    })
    .unwrap()
}

fn run(engine: &Engine, req: GenerateRequest) -> (Vec<u32>, verdict::engine::SpecStats) {
    let mut g = engine.start(req).unwrap();
    while g.finished().is_none() {
        g.step().unwrap();
    }
    (g.output().to_vec(), g.stats().clone())
}

/// `req` speculated by every drafter at every k: each run's name, output and statistics.
fn each_drafter(
    target: &Model,
    drafters: &[(Option<Model>, DrafterSpec)],
    ks: &[usize],
    req: impl Fn() -> GenerateRequest,
) -> Vec<(String, Vec<u32>, verdict::engine::SpecStats)> {
    let mut runs = Vec::new();
    for (draft, spec) in drafters {
        for &k in ks {
            let e = engine(target.clone(), draft.clone(), Some(spec.clone()), k);
            let (out, stats) = run(&e, req());
            runs.push((format!("drafter {spec:?}, k = {k}"), out, stats));
        }
    }
    runs
}

/// 30 greedy tokens after `prompt` speculated by every kind of drafter (`draft` as the draft
/// model, the target's first layer, prompt lookup) at k = 3 and 8 are `reference`, the target's
/// autoregressive ones.
fn assert_each_drafter_emits(
    what: &str,
    target: &Model,
    draft: Model,
    prompt: &[u32],
    reference: &[u32],
) {
    let drafters = [
        (Some(draft), DrafterSpec::Model),
        (None, DrafterSpec::SelfDraft(1)),
        (None, DrafterSpec::PromptLookup(None)),
    ];
    for (how, out, stats) in each_drafter(target, &drafters, &[3, 8], || {
        greedy(prompt, 30, Speculation::Default)
    }) {
        assert_eq!(out, reference, "{what}: {how}");
        assert!(stats.steps >= 1 && stats.tokens == 30, "{what}: {how}");
    }
}

fn greedy(prompt: &[u32], max_tokens: usize, speculation: Speculation) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        seed: Some(1),
        speculation,
        ..Default::default()
    }
}

const PROMPTS: [&[u32]; 3] = [&[1, 2, 3], &[40, 41, 42, 40, 41], &[7; 9]];

#[test]
fn a_draft_model_reads_the_prompt_in_the_prefill() {
    use verdict::draft::{Drafter, ModelDrafter};
    use verdict::sample::Rng64;
    let dir = tempfile::tempdir().unwrap();
    let d = tiny(dir.path(), "d.gguf", spec(2, 1));
    let prompt = [40, 41, 42, 40, 41];
    let mut early = ModelDrafter::new("model", d.session());
    early.prefill(&prompt).unwrap();
    assert_eq!(
        early.cached(),
        prompt.len(),
        "the prompt is in the draft's cache"
    );
    early.prefill(&prompt).unwrap();
    assert_eq!(
        early.cached(),
        prompt.len(),
        "a second prefill reads nothing"
    );
    // The proposals after the first target token are the same as without the prefill (q up to
    // the f32 matmul's rounding, which depends on how many rows a forward has), and only that
    // token is fed.
    let mut late = ModelDrafter::new("model", d.session());
    let ctx = [&prompt[..], &[7]].concat();
    let s = SamplingParams::greedy();
    let a = early.propose(&ctx, 4, &s, &mut Rng64::new(1)).unwrap();
    let b = late.propose(&ctx, 4, &s, &mut Rng64::new(1)).unwrap();
    assert_eq!(a.tokens, b.tokens);
    for (x, y) in a.q_token.iter().zip(&b.q_token) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "q {x} vs {y}");
    }
    assert_eq!(early.cached(), ctx.len() + 3);
}

#[test]
fn strict_greedy_speculation_equals_autoregressive_for_every_drafter() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    let drafters = [
        (Some(other.clone()), DrafterSpec::Model),
        (Some(target.clone()), DrafterSpec::Model), // a perfect draft: every step takes the bonus path
        (None, DrafterSpec::PromptLookup(None)),
        (None, DrafterSpec::SelfDraft(1)),
        (None, DrafterSpec::SelfDraft(2)),
        (Some(other.clone()), DrafterSpec::Auto),
        (None, DrafterSpec::Auto), // prompt lookup as the only candidate
    ];
    let plain = engine(target.clone(), None, None, 4);
    for prompt in PROMPTS {
        let (reference, _) = run(&plain, greedy(prompt, 40, Speculation::Off));
        assert_eq!(reference.len(), 40);
        for (draft, spec) in &drafters {
            for k in [1, 3, 8] {
                let e = engine(target.clone(), draft.clone(), Some(spec.clone()), k);
                let (out, stats) = run(&e, greedy(prompt, 40, Speculation::Default));
                assert_eq!(
                    out, reference,
                    "drafter {spec:?}, k = {k}, prompt {prompt:?}"
                );
                // Every emitted token after the first came from a step: accepted + 1 per step.
                assert!(stats.accepted <= stats.drafted);
                assert!(stats.steps >= 1 && stats.tokens == 40);
                assert!(
                    stats.accepted + stats.steps >= 39,
                    "{stats:?}: steps must account for the tokens"
                );
                for w in stats.accepted_per_position.windows(2) {
                    assert!(
                        w[0] >= w[1],
                        "acceptance per position is a prefix count: {stats:?}"
                    );
                }
            }
        }
    }
    // A perfect draft is accepted in full.
    let e = engine(
        target.clone(),
        Some(target.clone()),
        Some(DrafterSpec::Model),
        4,
    );
    let t = std::time::Instant::now();
    let (_, stats) = run(&e, greedy(PROMPTS[0], 41, Speculation::Default));
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(stats.accepted, stats.drafted, "{stats:?}");
    assert_eq!(stats.steps, 8, "40 tokens in steps of 5: {stats:?}");
    // Every step was speculative, and its time is split into phases that fit in the run.
    let p = &stats.spec_phases;
    assert_eq!((p.steps, stats.plain_phases.steps), (8, 0), "{stats:?}");
    let phases = [
        p.draft_s,
        p.forward_s,
        p.logits_s,
        p.features_s,
        p.policy_s,
        p.commit_s,
        p.emit_s,
    ];
    assert!(phases.iter().all(|&s| s >= 0.0), "{p:?}");
    assert!(
        p.draft_s > 0.0 && p.forward_s > 0.0 && p.features_s > 0.0,
        "{p:?}"
    );
    assert!(phases.iter().sum::<f64>() <= wall, "{p:?} in {wall} s");
}

/// Every architecture and rotary variant (the models `tests/models.rs` checks against
/// llama.cpp) speculates losslessly: rollback truncates caches that sliding windows, soft caps,
/// NoPE layers, fused or partial rotations read, and a k-token verification equals k
/// single-token forwards on each. Past Gemma's window of 8, so its local layers roll back too.
#[test]
fn strict_greedy_speculation_is_lossless_on_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = [5u32, 77, 140, 12, 3, 77, 140, 9];
    for (name, spec) in verdict::models::testing::peer_specs() {
        let target = tiny(dir.path(), &format!("{name}.gguf"), spec.clone());
        let draft = tiny(
            dir.path(),
            &format!("{name}-draft.gguf"),
            family_draft(&spec),
        );
        let plain = engine(target.clone(), None, None, 4);
        let (reference, _) = run(&plain, greedy(&prompt, 30, Speculation::Off));
        assert_each_drafter_emits(name, &target, draft, &prompt, &reference);
    }
}

/// Another model of `spec`'s family, with the same tokenizer: a draft for it.
fn family_draft(spec: &TinySpec) -> TinySpec {
    TinySpec {
        seed: spec.seed + 100,
        layers: (spec.layers - 1).max(1),
        ..spec.clone()
    }
}

/// With f16, bf16 or Q8_0 KV caches (target and draft) strict speculation still emits the
/// target's autoregressive greedy tokens on the same cache type, on every architecture (sliding
/// windows rolled back, sinks, soft caps), for each kind of drafter. Q8_0 runs where the heads
/// have a multiple of 32 values, and on each architecture with its heads made 32 wide.
#[test]
fn strict_greedy_speculation_is_lossless_with_narrow_caches() {
    use verdict::models::KvDtype;
    let dir = tempfile::tempdir().unwrap();
    let prompt = [5u32, 77, 140, 12, 3, 77, 140, 9];
    for (i, (name, spec)) in verdict::models::testing::peer_specs()
        .into_iter()
        .enumerate()
    {
        // Every type on the first architectures, two on the rest (the run stays short).
        let types: &[KvDtype] = match i {
            0 | 1 => &[KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0],
            _ if i % 2 == 0 => &[KvDtype::F16, KvDtype::Q8_0],
            _ => &[KvDtype::Bf16, KvDtype::Q8_0],
        };
        for &dt in types {
            let spec = match dt {
                KvDtype::Q8_0 if spec.head_dim() % 32 != 0 => TinySpec {
                    head_dim: Some(32),
                    rope_dims: spec.rope_dims.map(|r| r.min(32)),
                    ..spec.clone()
                },
                _ => spec.clone(),
            };
            let base = tiny(dir.path(), &format!("{name}-{dt}.gguf"), spec.clone());
            let draft = tiny(
                dir.path(),
                &format!("{name}-{dt}-draft.gguf"),
                family_draft(&spec),
            );
            let target = base.with_kv_cache_dtype(dt).unwrap();
            let draft = draft.with_kv_cache_dtype(dt).unwrap();
            let plain = engine(target.clone(), None, None, 4);
            let (reference, _) = run(&plain, greedy(&prompt, 30, Speculation::Off));
            assert_each_drafter_emits(
                &format!("{name}, {dt}"),
                &target,
                draft,
                &prompt,
                &reference,
            );
        }
    }
}

/// A context cap (`Model::with_max_context`) bounds requests: a prompt that fills it is refused
/// naming the prompt, and generation stops at it with finish reason length, speculating or not,
/// after the same tokens as the uncapped target's.
#[test]
fn a_context_cap_ends_generation_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny(dir.path(), "t.gguf", spec(1, 2));
    let capped = full.with_max_context(20).unwrap();
    let prompt = [40u32, 41, 42, 40, 41];
    let (reference, _) = run(
        &engine(full.clone(), None, None, 4),
        greedy(&prompt, 40, Speculation::Off),
    );
    for drafter in [
        None,
        Some(DrafterSpec::PromptLookup(None)),
        Some(DrafterSpec::SelfDraft(1)),
    ] {
        let e = engine(capped.clone(), None, drafter.clone(), 4);
        let mut g = e.start(greedy(&prompt, 40, Speculation::Default)).unwrap();
        while g.finished().is_none() {
            g.step().unwrap();
        }
        let out = g.output().to_vec();
        assert_eq!(
            g.finished(),
            Some(verdict::engine::FinishReason::Length),
            "{drafter:?}"
        );
        // The last position is the cap's: 20 - 5 prompt tokens.
        assert_eq!(out.len(), 15, "{drafter:?}");
        assert_eq!(out, reference[..15], "{drafter:?}");
        let long: Vec<u32> = (0..20).collect();
        let e = e
            .start(greedy(&long, 4, Speculation::Default))
            .map(|_| ())
            .unwrap_err();
        assert!(
            e.to_string().contains("prompt") && e.to_string().contains("20"),
            "{e}"
        );
    }
}

/// A target with a LoRA adapter (`Model::with_lora`) speculates losslessly too: every drafter
/// (the base as its draft, the adapted target's own first layer, prompt lookup) emits the
/// adapted target's autoregressive greedy tokens, which differ from the base's.
#[test]
fn strict_greedy_speculation_is_lossless_with_a_lora_target() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = [5u32, 77, 140, 12, 3, 77, 140, 9];
    for (name, lora) in verdict::models::testing::peer_loras() {
        let spec = TinySpec {
            dtype: candle_core::quantized::GgmlDType::Q8_0,
            ..verdict::models::testing::peer_spec(name).unwrap()
        };
        let base = tiny(dir.path(), &format!("{name}.gguf"), spec.clone());
        let adapter = dir.path().join(format!("lora-{name}.gguf"));
        verdict::models::testing::write_tiny_lora_gguf(&adapter, &spec, &lora).unwrap();
        let adapter = verdict::models::LoraAdapter::load(&adapter, 1.0).unwrap();
        let target = base.with_lora(&[adapter]).unwrap();
        let (reference, _) = run(
            &engine(target.clone(), None, None, 4),
            greedy(&prompt, 30, Speculation::Off),
        );
        let (plain, _) = run(
            &engine(base.clone(), None, None, 4),
            greedy(&prompt, 30, Speculation::Off),
        );
        assert_ne!(reference, plain, "{name}: the adapter changed nothing");
        assert_each_drafter_emits(name, &target, base.clone(), &prompt, &reference);
    }
}

/// Past the point where sliding-window layers drop old keys (a 600-token prompt, window 8), each
/// drafter's speculation still emits the autoregressive greedy tokens, and a later turn of the
/// conversation reads its prefix from the prompt cache (within the kept slack) and changes no
/// output; a prompt sharing only an early part of it is prefilled instead.
#[test]
fn speculation_and_the_prompt_cache_past_a_sliding_window() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        dtype: candle_core::quantized::GgmlDType::Q8_0,
        context_length: 2048,
        ..verdict::models::testing::peer_spec("gemma2").unwrap()
    };
    let target = tiny(dir.path(), "g.gguf", spec.clone());
    let draft = tiny(
        dir.path(),
        "gd.gguf",
        TinySpec {
            seed: 9,
            layers: 2,
            ..spec
        },
    );
    let prompt: Vec<u32> = (0..600)
        .map(|i| [5u32, 77, 140, 12, 3, 9][i % 6] + (i / 90) as u32)
        .collect();
    let plain = engine(target.clone(), None, None, 4);
    let (reference, _) = run(&plain, greedy(&prompt, 40, Speculation::Off));
    let drafters = [
        (Some(draft.clone()), DrafterSpec::Model),
        (None, DrafterSpec::SelfDraft(2)),
        (None, DrafterSpec::PromptLookup(None)),
    ];
    for (what, out, stats) in each_drafter(&target, &drafters, &[8], || {
        greedy(&prompt, 40, Speculation::Default)
    }) {
        assert_eq!(out, reference, "{what}");
        assert!(stats.steps < 40, "{what}: {stats:?}");
    }
    let cached =
        engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 8).with_prompt_cache(4000);
    let req = |p: &[u32]| greedy(p, 20, Speculation::Default);
    let (first, _, hit) = run_logged(&cached, req(&prompt));
    assert_eq!(hit, 0);
    let second = [&prompt[..], &first, &[7, 8, 9]].concat();
    let (out2, _, hit2) = run_logged(&cached, req(&second));
    assert_eq!(hit2, prompt.len() + first.len() - 1);
    assert_eq!(out2, run(&plain, req(&second)).0);
    // Only the first 300 tokens shared: the local layers no longer hold their keys.
    let third = [&prompt[..300], &[11, 12, 13]].concat();
    let (out3, _, hit3) = run_logged(&cached, req(&third));
    assert_eq!(hit3, 0);
    assert_eq!(out3, run(&plain, req(&third)).0);
}

/// `auto` picks prompt lookup or the draft model per step from their measured payoff; under
/// strict at T = 0 whatever it picks emits the target's own greedy tokens.
#[test]
fn auto_drafter_picks_per_step_and_stays_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let plain = engine(target.clone(), None, None, 4);
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default()).unwrap());
    // Adaptive, with the target itself as a (perfect, costly) draft model.
    let auto = Engine::new(EngineConfig {
        judge: None,
        target: target.clone(),
        draft: Some(target.clone()),
        registry,
        default_policy: "strict".into(),
        default_drafter: Some(DrafterSpec::Auto),
        default_k: 8,
        adaptive: true,
        synthetic_acceptance: None,
    })
    .unwrap();
    for prompt in PROMPTS {
        let (reference, _) = run(&plain, greedy(prompt, 60, Speculation::Off));
        let mut req = greedy(prompt, 60, Speculation::Default);
        req.seed = None; // a seed would fix the choices; let it adapt
        let (out, stats) = run(&auto, req);
        assert_eq!(out, reference, "prompt {prompt:?}");
        assert_eq!(stats.drafter.as_deref(), Some("auto"));
        let by: u64 = stats.drafter_steps.values().sum();
        assert!(by >= 1 && by <= stats.steps, "{stats:?}");
        assert!(
            stats
                .drafter_steps
                .keys()
                .all(|k| k == "model" || k == "prompt-lookup"),
            "{stats:?}"
        );
        // The perfect model draft always has a proposal, so it drafts at least once.
        assert!(
            stats.drafter_steps.get("model").copied().unwrap_or(0) >= 1,
            "{stats:?}"
        );
    }
}

#[test]
fn rollback_leaves_the_target_cache_as_if_only_accepted_tokens_were_fed() {
    // After a speculative generation, the next-token logits equal those of a fresh session fed the
    // same tokens: what the rejected drafts wrote into the cache is gone.
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(3, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(4, 1));
    let e = engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 6);
    let (out, stats) = run(&e, greedy(&[5, 6, 7], 25, Speculation::Default));
    assert!(
        stats.drafted > stats.accepted,
        "the test needs rejections: {stats:?}"
    );
    let mut all = vec![5, 6, 7];
    all.extend(&out);
    let mut fresh = target.session();
    let a = fresh.forward(&all, Rows::Last).unwrap().logits;
    let mut stepwise = target.session();
    stepwise.forward(&all[..10], Rows::All).unwrap();
    stepwise.forward(&[1, 2, 3, 4], Rows::All).unwrap();
    stepwise.truncate(10).unwrap();
    let b = stepwise.forward(&all[10..], Rows::Last).unwrap().logits;
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "max diff {d}");
}

/// Exact distribution of the second generated token: sum over the first.
fn second_token_distribution(target: &Model, prompt: &[u32], s: &SamplingParams) -> Vec<f64> {
    second_token_distribution_with(target, prompt, s, &Penalties::default())
}

/// [`second_token_distribution`] with penalties: the second token's logits see the first as
/// generated.
fn second_token_distribution_with(
    target: &Model,
    prompt: &[u32],
    s: &SamplingParams,
    pens: &Penalties,
) -> Vec<f64> {
    let z = Penalizer::new(pens.clone(), prompt, &[]);
    let adjusted = |l: candle_core::Tensor, pending: &[u32]| {
        let mut row = l.to_vec1::<f32>().unwrap();
        if let Some(z) = &z {
            z.apply(&mut row, pending);
        }
        row
    };
    let mut sess = target.session();
    let l1 = sess
        .forward(prompt, Rows::Last)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap();
    let p1 = verdict::sample::probabilities(&adjusted(l1, &[]), s);
    let mut out = vec![0f64; p1.len()];
    for (t1, &w) in p1.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        sess.truncate(prompt.len()).unwrap();
        let l2 = sess
            .forward(&[t1 as u32], Rows::Last)
            .unwrap()
            .logits
            .squeeze(0)
            .unwrap();
        let p2 = verdict::sample::probabilities(&adjusted(l2, &[t1 as u32]), s);
        for (o, &p) in out.iter_mut().zip(&p2) {
            *o += w as f64 * p as f64;
        }
    }
    out
}

/// How often each token came second in `n` seeded speculative runs (the prefill gives the
/// first, the first speculative step the second), and in how many runs that step rejected a
/// draft.
fn second_token_counts(
    e: &Engine,
    prompt: &[u32],
    s: &SamplingParams,
    pens: &Penalties,
    n: u64,
) -> (Vec<u64>, u64) {
    second_token_counts_with(
        e,
        prompt,
        s,
        |_| GenerateRequest {
            penalties: pens.clone(),
            ..Default::default()
        },
        n,
    )
}

/// [`second_token_counts`] of the requests `base(seed)` with the prompt, sampling and seed set.
fn second_token_counts_with(
    e: &Engine,
    prompt: &[u32],
    s: &SamplingParams,
    base: impl Fn(u64) -> GenerateRequest,
    n: u64,
) -> (Vec<u64>, u64) {
    let vocab = e.target().config().vocab_size;
    let (mut counts, mut rejected) = (vec![0u64; vocab], 0);
    for seed in 0..n {
        let mut g = e
            .start(GenerateRequest {
                prompt: prompt.to_vec(),
                max_tokens: 4,
                sampling: *s,
                seed: Some(seed),
                ..base(seed)
            })
            .unwrap();
        g.step().unwrap();
        g.step().unwrap();
        counts[g.output()[1] as usize] += 1;
        let st = g.stats();
        rejected += u64::from(st.drafted > st.accepted);
    }
    (counts, rejected)
}

/// Pearson chi-square of counts against probabilities, bins with expected < 5 pooled; returns
/// (statistic, degrees of freedom).
fn chi_square(counts: &[u64], p: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&c, &pi) in counts.iter().zip(p) {
        let e = pi * n as f64;
        if e < 5.0 {
            pool_o += c as f64;
            pool_e += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        bins += 1;
    }
    (stat, bins.saturating_sub(1))
}

/// Upper 0.1% point of chi-square with `dof` degrees of freedom (Wilson-Hilferty).
/// The counts fit `exact` (chi-square under the 0.1% critical value, at least 5 degrees of
/// freedom) and not `wrong` (`what`): the test has the power to tell them apart.
fn assert_fits_not(counts: &[u64], exact: &[f64], wrong: &[f64], what: &str) {
    let (stat, dof) = chi_square(counts, exact);
    assert!(dof >= 5, "dof {dof}");
    assert!(
        stat < chi2_critical(dof),
        "chi-square {stat:.1} with {dof} dof"
    );
    let (stat_wrong, dof_wrong) = chi_square(counts, wrong);
    assert!(
        stat_wrong > chi2_critical(dof_wrong),
        "chi-square vs {what} {stat_wrong:.1}: the test has no power"
    );
}

fn chi2_critical(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.09;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Plain sampling at temperature `t` (no top-k, top-p or min-p).
fn at_temperature(t: f32) -> SamplingParams {
    SamplingParams {
        temperature: t,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    }
}

#[test]
fn speculative_sampling_follows_the_target_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(5, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(6, 1));
    let prompt = [10u32, 11, 12];
    // A low temperature sharpens the random models so p and q really differ.
    let s = at_temperature(0.15);
    let draft_model = tiny(dir.path(), "d2.gguf", spec(6, 1));
    assert_draws_follow_the_target(&target, draft, &draft_model, &prompt, &s, "the draft's q");
}

/// 3000 seeded speculative runs of `prompt` with `draft`: the second token's frequencies fit
/// the target's exact distribution and not `wrong`'s (`what`), and enough drafts were rejected
/// for that to mean something.
fn assert_draws_follow_the_target(
    target: &Model,
    draft: Model,
    wrong: &Model,
    prompt: &[u32],
    s: &SamplingParams,
    what: &str,
) {
    let exact = second_token_distribution(target, prompt, s);
    let e = engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 3);
    let n = 3000u64;
    let (counts, drafted_but_rejected) =
        second_token_counts(&e, prompt, s, &Penalties::default(), n);
    assert!(
        drafted_but_rejected > n / 10,
        "p and q must differ for this test to mean anything"
    );
    let wrong = second_token_distribution(wrong, prompt, s);
    assert_fits_not(&counts, &exact, &wrong, what);
}

/// With min-p, speculative sampling draws from the truncated distribution: the second token's
/// frequencies match the exact mixture with min-p, and not the one without it.
#[test]
fn speculative_sampling_follows_min_p() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(5, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(6, 1));
    let prompt = [10u32, 11, 12];
    let s = SamplingParams {
        temperature: 0.5,
        min_p: 0.2,
        ..SamplingParams::default()
    };
    let exact = second_token_distribution(&target, &prompt, &s);
    let e = engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 3);
    let (counts, rejected) = second_token_counts(&e, &prompt, &s, &Penalties::default(), 2000);
    assert!(rejected > 200, "{rejected} rejections");
    let untruncated =
        second_token_distribution(&target, &prompt, &SamplingParams { min_p: 0.0, ..s });
    assert_fits_not(&counts, &exact, &untruncated, "no min-p");
}

/// Greedy decoding of `target`, one single-token forward per token, each row changed by
/// `adjust(row, output so far)` before its argmax.
fn reference_greedy(
    target: &Model,
    prompt: &[u32],
    n: usize,
    mut adjust: impl FnMut(&mut [f32], &[u32]),
) -> Vec<u32> {
    let mut sess = target.session();
    let mut logits = sess.forward(prompt, Rows::Last).unwrap().logits;
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..n {
        let mut row = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        adjust(&mut row, &out);
        let next = verdict::sample::argmax(&row);
        out.push(next);
        logits = sess.forward(&[next], Rows::Last).unwrap().logits;
    }
    out
}

/// Greedy decoding of `target` with the penalties applied by this loop's own arithmetic (the
/// order and operations `Penalties` documents).
fn reference_penalized_greedy(target: &Model, prompt: &[u32], n: usize, p: &Penalties) -> Vec<u32> {
    reference_greedy(target, prompt, n, |row, out| {
        for &(t, b) in &p.logit_bias {
            row[t as usize] += b;
        }
        for (t, x) in row.iter_mut().enumerate() {
            let t = t as u32;
            let c = out.iter().filter(|&&u| u == t).count();
            if c > 0 || prompt.contains(&t) {
                *x = if *x > 0.0 {
                    *x / p.repetition
                } else {
                    *x * p.repetition
                };
            }
            if c > 0 {
                *x -= c as f32 * p.frequency + p.presence;
            }
        }
    })
}

/// Penalties and a logit bias change the target's distribution, and speculation follows the
/// changed one: at T = 0 every drafter emits what plain decoding with the same penalties
/// emits, which is what a reference loop computing the penalties itself gives.
#[test]
fn penalties_adjust_the_target_and_strict_speculation_stays_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    // Strong penalties change the output; light ones leave repeats for prompt lookup to copy.
    let strong = Penalties {
        frequency: 0.7,
        presence: 0.4,
        repetition: 1.3,
        logit_bias: vec![(5, 1.5), (9, -100.0)],
        ..Penalties::default()
    };
    let light = Penalties {
        frequency: 0.02,
        logit_bias: vec![(9, -100.0)],
        ..Penalties::default()
    };
    let drafters = [
        (Some(other.clone()), DrafterSpec::Model),
        (Some(target.clone()), DrafterSpec::Model),
        (None, DrafterSpec::PromptLookup(None)),
        (None, DrafterSpec::SelfDraft(1)),
        (Some(other.clone()), DrafterSpec::Auto),
    ];
    let plain = engine(target.clone(), None, None, 4);
    let mut drafted = vec![0; drafters.len()];
    for (pens, prompt) in [&strong, &light]
        .into_iter()
        .flat_map(|p| PROMPTS.map(|prompt| (p, prompt)))
    {
        let penalized = |speculation| GenerateRequest {
            penalties: pens.clone(),
            ..greedy(prompt, 40, speculation)
        };
        let reference = reference_penalized_greedy(&target, prompt, 40, pens);
        let (out, _) = run(&plain, penalized(Speculation::Off));
        assert_eq!(
            out, reference,
            "plain decoding, {pens:?}, prompt {prompt:?}"
        );
        if pens == &strong {
            let (unpenalized, _) = run(&plain, greedy(prompt, 40, Speculation::Off));
            assert_ne!(
                out, unpenalized,
                "the penalties must change the output here"
            );
        }
        assert!(!out.contains(&9), "a -100 bias bans the token");
        for (i, d) in drafters.iter().enumerate() {
            let runs = each_drafter(&target, std::slice::from_ref(d), &[1, 4, 8], || {
                penalized(Speculation::Default)
            });
            for (name, out, stats) in runs {
                assert_eq!(out, reference, "{name}, prompt {prompt:?}");
                drafted[i] += stats.drafted;
            }
        }
    }
    // Penalized text repeats less, so prompt lookup finds fewer matches, but every drafter
    // was verified somewhere.
    assert!(drafted.iter().all(|&n| n > 0), "{drafted:?}");
    // A +100 bias forces its token everywhere, through verification too.
    let forced = Penalties {
        logit_bias: vec![(42, 100.0)],
        ..Penalties::default()
    };
    let e = engine(target.clone(), Some(other), Some(DrafterSpec::Model), 4);
    let (o, _) = run(
        &e,
        GenerateRequest {
            penalties: forced,
            ..greedy(PROMPTS[0], 12, Speculation::Default)
        },
    );
    assert_eq!(o, vec![42; 12]);
}

/// At T > 0 speculative sampling draws from the penalized distribution: the second token's
/// frequencies match the exact mixture with the first token counted as generated, and not the
/// unpenalized one.
#[test]
fn speculative_sampling_follows_the_penalized_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(5, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(6, 1));
    let prompt = [10u32, 11, 12];
    let s = at_temperature(0.15);
    let pens = Penalties {
        presence: 1.0,
        frequency: 0.5,
        repetition: 1.5,
        // 107 is the unpenalized second token in ~84% of draws: a small bias moves much mass.
        logit_bias: vec![(3, 0.3), (107, -0.2)],
        ..Penalties::default()
    };
    let exact = second_token_distribution_with(&target, &prompt, &s, &pens);
    let e = engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 3);
    let (counts, _) = second_token_counts(&e, &prompt, &s, &pens, 3000);
    let plain = second_token_distribution(&target, &prompt, &s);
    assert_fits_not(&counts, &exact, &plain, "the unpenalized target");
}

/// `min_tokens` keeps the stop tokens out of the first tokens, counting the drafts under
/// verification: with a bias that makes the stop token the argmax wherever it is allowed, the
/// output is exactly `min_tokens` long, however the speculation steps straddle that point.
#[test]
fn min_tokens_hold_back_the_stop_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    let plain = engine(target.clone(), None, None, 4);
    let stop = 7;
    let req = |min_tokens, speculation| GenerateRequest {
        stop_tokens: vec![stop],
        penalties: Penalties {
            min_tokens,
            logit_bias: vec![(stop, 30.0)],
            ..Penalties::default()
        },
        ..greedy(PROMPTS[1], 40, speculation)
    };
    assert!(run(&plain, req(0, Speculation::Off)).0.is_empty());
    for min in [1, 5, 12] {
        let (held, _) = run(&plain, req(min, Speculation::Off));
        assert_eq!(held.len(), min, "{held:?}");
        assert!(!held.contains(&stop), "{held:?}");
        let drafters = [
            (Some(other.clone()), DrafterSpec::Model),
            (Some(target.clone()), DrafterSpec::Model),
            (None, DrafterSpec::PromptLookup(None)),
        ];
        let runs = each_drafter(&target, &drafters, &[3, 8], || {
            req(min, Speculation::Default)
        });
        for (name, out, stats) in runs {
            assert_eq!(out, held, "{name}, min_tokens = {min}: {stats:?}");
        }
    }
    let too_many = plain.start(GenerateRequest {
        max_tokens: 5,
        ..req(6, Speculation::Off)
    });
    assert_eq!(
        too_many.err().and_then(|e| e.param).as_deref(),
        Some("min_tokens")
    );
}

/// Greedy decoding with vLLM's `bad_words` and `allowed_token_ids` masks computed by this
/// loop itself: a word's last token is barred where the output ends with its other tokens,
/// and (when `allowed` is not empty) every token outside `allowed` is barred.
fn reference_masked_greedy(
    target: &Model,
    prompt: &[u32],
    n: usize,
    bad: &[Vec<u32>],
    allowed: &[u32],
) -> Vec<u32> {
    reference_greedy(target, prompt, n, |row, out| {
        for w in bad {
            let (last, before) = w.split_last().unwrap();
            if out.ends_with(before) {
                row[*last as usize] = f32::NEG_INFINITY;
            }
        }
        if !allowed.is_empty() {
            for (t, x) in row.iter_mut().enumerate() {
                if !allowed.contains(&(t as u32)) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    })
}

/// `bad_words` and `allowed_token_ids` mask the target's rows, and speculation verifies
/// against the masked rows: at T = 0 every drafter emits what the reference loop masking by
/// itself emits, so strict stays lossless, and no banned sequence or outside token appears.
/// A request whose masks leave no token at all fails by name instead of emitting one.
#[test]
fn bad_words_and_allowed_tokens_mask_the_target_and_strict_stays_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    let plain = engine(target.clone(), None, None, 4);
    let drafters = [
        (Some(other.clone()), DrafterSpec::Model),
        (Some(target.clone()), DrafterSpec::Model),
        (None, DrafterSpec::PromptLookup(None)),
        (None, DrafterSpec::SelfDraft(1)),
    ];
    let mut drafted = 0;
    for prompt in PROMPTS {
        let (free, _) = run(&plain, greedy(prompt, 40, Speculation::Off));
        // A one-token word (barred everywhere) and a two-token word the free output holds.
        let bad = vec![vec![free[1]], vec![free[4], free[5]]];
        // The free output's other tokens, but not its first one, and two more.
        let mut allowed: Vec<u32> = free.iter().copied().filter(|&t| t != free[0]).collect();
        allowed.extend([5, 9]);
        allowed.sort();
        allowed.dedup();
        assert!(allowed.len() > 2, "{free:?}");
        for (bad, allowed) in [
            (bad.clone(), vec![]),
            (vec![], allowed.clone()),
            (bad, allowed),
        ] {
            let masked = |speculation| GenerateRequest {
                penalties: Penalties {
                    bad_words: bad.clone(),
                    allowed: allowed.clone(),
                    ..Penalties::default()
                },
                ..greedy(prompt, 40, speculation)
            };
            let reference = reference_masked_greedy(&target, prompt, 40, &bad, &allowed);
            let (out, _) = run(&plain, masked(Speculation::Off));
            assert_eq!(
                out, reference,
                "plain, {bad:?} / {allowed:?}, prompt {prompt:?}"
            );
            assert_ne!(out, free, "the masks must change the output here");
            for w in &bad {
                assert!(
                    !out.windows(w.len()).any(|x| x == w.as_slice()),
                    "{w:?} in {out:?}"
                );
            }
            if !allowed.is_empty() {
                assert!(out.iter().all(|t| allowed.contains(t)), "{out:?}");
            }
            for (name, o, stats) in each_drafter(&target, &drafters, &[1, 4, 8], || {
                masked(Speculation::Default)
            }) {
                assert_eq!(
                    o, reference,
                    "{name}, {bad:?} / {allowed:?}, prompt {prompt:?}"
                );
                drafted += stats.drafted;
            }
        }
    }
    assert!(drafted > 0);
    // A lossy policy that accepts every draft (threshold's floor at 0) still emits no barred
    // token: the target itself drafts, proposing the barred tokens it favours unmasked.
    let accept_all = engine(
        target.clone(),
        Some(target.clone()),
        Some(DrafterSpec::Model),
        4,
    );
    for prompt in PROMPTS {
        let (free, _) = run(&plain, greedy(prompt, 40, Speculation::Off));
        let bad = vec![vec![free[1]], vec![free[4], free[5]]];
        let allowed: Vec<u32> = (0..64)
            .chain(free.iter().copied())
            .filter(|&t| t != free[2])
            .collect();
        let (out, stats) = run(
            &accept_all,
            GenerateRequest {
                policy: Some("threshold".into()),
                policy_params: vec![("rule".into(), 2.0), ("floor".into(), 0.0)],
                penalties: Penalties {
                    bad_words: bad.clone(),
                    allowed: allowed.clone(),
                    ..Penalties::default()
                },
                ..greedy(prompt, 40, Speculation::Default)
            },
        );
        assert!(stats.drafted > 0 && stats.accepted > 0, "{stats:?}");
        for w in &bad {
            assert!(
                !out.windows(w.len()).any(|x| x == w.as_slice()),
                "{w:?} in {out:?}"
            );
        }
        assert!(out.iter().all(|t| allowed.contains(t)), "{out:?}");
    }
    // The only allowed token is a stop token that min_tokens holds back: nothing may come.
    let mut g = plain
        .start(GenerateRequest {
            stop_tokens: vec![7],
            penalties: Penalties {
                allowed: vec![7],
                min_tokens: 2,
                ..Penalties::default()
            },
            ..greedy(PROMPTS[0], 8, Speculation::Off)
        })
        .unwrap();
    let e = g.step().unwrap_err();
    let why = e
        .chain()
        .find_map(|c| c.downcast_ref::<verdict::sample::NoTokenAllowed>())
        .unwrap_or_else(|| panic!("{e:#}"));
    assert_eq!(why.position, Some(0), "{e:#}");
    assert!(g.output().is_empty());
    // Ids outside the vocabulary, and an empty word, are named.
    for (p, field) in [
        (
            Penalties {
                allowed: vec![1, 1 << 20],
                ..Penalties::default()
            },
            "allowed_token_ids",
        ),
        (
            Penalties {
                bad_words: vec![vec![3], vec![]],
                ..Penalties::default()
            },
            "bad_words",
        ),
    ] {
        let e = plain
            .start(GenerateRequest {
                penalties: p,
                ..greedy(PROMPTS[0], 8, Speculation::Off)
            })
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
    }
}

#[test]
fn seeded_requests_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(7, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(8, 1));
    let e = engine(target, Some(draft), Some(DrafterSpec::Model), 4);
    let req = |seed| GenerateRequest {
        prompt: vec![1, 2, 3],
        max_tokens: 30,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
        },
        seed: Some(seed),
        ..Default::default()
    };
    let a = run(&e, req(9)).0;
    assert_eq!(a, run(&e, req(9)).0);
    assert_ne!(a, run(&e, req(10)).0);
}

#[test]
fn stop_tokens_and_max_tokens_end_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let e = engine(target.clone(), Some(target), Some(DrafterSpec::Model), 8);
    let (full, _) = run(&e, greedy(&[1, 2, 3], 20, Speculation::Default));
    let stop = full[6];
    let first = full.iter().position(|&t| t == stop).unwrap();
    let mut req = greedy(&[1, 2, 3], 20, Speculation::Default);
    req.stop_tokens = vec![stop];
    let mut g = e.start(req).unwrap();
    while g.finished().is_none() {
        g.step().unwrap();
    }
    assert_eq!(g.output(), &full[..first]);
    assert_eq!(g.finished(), Some(verdict::engine::FinishReason::Stop));
    let (three, _) = run(&e, greedy(&[1, 2, 3], 3, Speculation::Default));
    assert_eq!(three, full[..3]);
}

#[test]
fn bad_requests_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    let e = engine(target, None, None, 4);
    let err = |req: GenerateRequest| e.start(req).err().expect("must be refused");
    let base = || greedy(&[1, 2], 5, Speculation::Off);

    let r = err(GenerateRequest {
        prompt: vec![],
        ..base()
    });
    assert_eq!(r.param.as_deref(), Some("prompt"));
    let r = err(GenerateRequest {
        prompt: vec![1; 300],
        ..base()
    });
    assert!(
        r.message.contains("300 tokens") && r.message.contains("256"),
        "{r:?}"
    );
    let r = err(GenerateRequest {
        prompt: vec![1, 99_999],
        ..base()
    });
    assert!(r.message.contains("99999"), "{r:?}");
    let r = err(GenerateRequest {
        max_tokens: 0,
        ..base()
    });
    assert_eq!(r.param.as_deref(), Some("max_tokens"));
    let mut bad_t = base();
    bad_t.sampling.temperature = -1.0;
    assert_eq!(err(bad_t).param.as_deref(), Some("temperature"));
    let spec_k = |k| Speculation::Draft {
        drafter: Some(DrafterSpec::PromptLookup(None)),
        k: Some(k),
    };
    for k in [0, 65] {
        let r = err(GenerateRequest {
            speculation: spec_k(k),
            ..base()
        });
        assert_eq!(r.param.as_deref(), Some("speculation.k"), "{r:?}");
    }
    let r = err(GenerateRequest {
        speculation: Speculation::Draft {
            drafter: Some(DrafterSpec::Model),
            k: None,
        },
        ..base()
    });
    assert!(r.message.contains("no draft model"), "{r:?}");
    let r = err(GenerateRequest {
        speculation: Speculation::Draft {
            drafter: Some(DrafterSpec::SelfDraft(2)),
            k: None,
        },
        ..base()
    });
    assert!(r.message.contains("self:2"), "{r:?}");
    let r = err(GenerateRequest {
        speculation: spec_k(4),
        policy: Some("nonesuch".into()),
        ..base()
    });
    assert_eq!(r.param.as_deref(), Some("policy"));
    assert!(r.message.contains("nonesuch"), "{r:?}");
    let r = err(GenerateRequest {
        speculation: spec_k(4),
        policy: Some("threshold".into()),
        policy_params: vec![("no_such_param".into(), 1.0)],
        ..base()
    });
    assert_eq!(r.param.as_deref(), Some("policy_params"));
    assert!(r.message.contains("no_such_param"), "{r:?}");
}

#[test]
fn a_draft_with_another_tokenizer_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    let draft = tiny(
        dir.path(),
        "d.gguf",
        TinySpec {
            vocab: 290,
            ..spec(2, 1)
        },
    );
    let err = engine_with_head(target, draft, None)
        .err()
        .expect("a vocabulary mismatch must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("290") && msg.contains("300") && msg.contains("d.gguf"),
        "{msg}"
    );
}

/// A `Write` into shared memory, for capturing a trace.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_policy_that_faults_every_step_falls_back_to_strict_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let draft = tiny(dir.path(), "d.gguf", spec(2, 1));
    let plain = engine(target.clone(), None, None, 4);
    let (reference, _) = run(&plain, greedy(PROMPTS[1], 30, Speculation::Off));
    let e = engine(target, Some(draft), Some(DrafterSpec::Model), 4);
    e.registry().register(None, &common::hostile("")).unwrap();
    // mode 3 traps, 4 answers accepted > k, 5 a token outside the vocabulary.
    for mode in [3.0, 4.0, 5.0] {
        let mut req = greedy(PROMPTS[1], 30, Speculation::Default);
        req.policy = Some("hostile".into());
        req.policy_params = vec![("mode".into(), mode)];
        let (out, stats) = run(&e, req);
        assert_eq!(out, reference, "mode {mode}: the fallback must be strict");
        assert!(stats.steps > 0);
        assert_eq!(
            stats.policy_faults, stats.drafted_per_position[0],
            "mode {mode}: every step faulted and was counted: {stats:?}"
        );
    }
}

#[test]
fn the_trace_replays_to_the_same_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(3, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(4, 1));
    let e = engine(target, Some(draft), Some(DrafterSpec::Model), 5);
    let buf = Shared::default();
    let mut req = greedy(&[9, 8, 7], 30, Speculation::Default);
    req.sampling.temperature = 0.7;
    req.trace = Some(Box::new(buf.clone()));
    let (_, stats) = run(&e, req);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let steps = verdict::decide::trace::parse_trace(text.as_bytes(), "trace").unwrap();
    // One line per speculative step (a final one-token step is plain: nothing left to draft).
    assert_eq!(
        steps.len() as u64,
        stats.drafted_per_position[0],
        "{stats:?}"
    );
    let strict = e.registry().resolve("strict").unwrap();
    let mut inst = strict.instance();
    let mut accepted = 0u64;
    for s in &steps {
        assert!((s.temperature - 0.7).abs() < 1e-6);
        let d = inst.verify(s);
        assert!(d.fault.is_none());
        accepted += d.verdict.accepted as u64;
    }
    assert_eq!(
        accepted, stats.accepted,
        "replaying strict over the trace gives the same acceptances"
    );
}

fn engine_with_head(
    target: Model,
    draft: Model,
    head: Option<JudgeHead>,
) -> anyhow::Result<Engine> {
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default()).unwrap());
    Engine::new(EngineConfig {
        judge: head,
        target,
        draft: Some(draft),
        registry,
        default_policy: "strict".into(),
        default_drafter: Some(DrafterSpec::Model),
        default_k: 4,
        adaptive: false,
        synthetic_acceptance: None,
    })
}

/// A head for `model` with a fixed pseudo-random direction and the given bias.
fn head_for(model: &Model, bias: f32, threshold: f32) -> JudgeHead {
    let h = model.config().hidden_size;
    JudgeHead {
        weight: (0..h).map(|i| (i as f32 * 0.618).sin()).collect(),
        bias,
        mean: (0..h).map(|i| (i as f32 * 0.3).cos() * 0.1).collect(),
        scale: (0..h).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect(),
        threshold,
        target: TargetIdentity::of(model).unwrap(),
        provenance: Default::default(),
    }
}

#[test]
fn judge_logits_are_the_head_applied_to_the_drafted_tokens_hidden_states() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(11, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(12, 1));
    let head = head_for(&target, 0.0, 0.6);
    let e = engine_with_head(target.clone(), draft, Some(head.clone())).unwrap();
    let buf = Shared::default();
    let prompt = [5u32, 6, 7, 8];
    let mut req = greedy(&prompt, 24, Speculation::Default);
    req.policy = Some("judge".into());
    req.trace = Some(Box::new(buf.clone()));
    let (out, _) = run(&e, req);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let steps = verdict::decide::trace::parse_trace(text.as_bytes(), "trace").unwrap();
    assert!(!steps.is_empty());
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    let judge = e.registry().resolve("judge").unwrap();
    let mut inst = judge.instance();
    // The committed length before each step: the prompt plus the prefill's token.
    let mut len = prompt.len() + 1;
    for (s, step) in steps.iter().enumerate() {
        // The judge policy declares one parameter, `threshold`.
        assert!(
            step.params.len() == 1 && (step.params[0] - 0.6).abs() < 1e-6,
            "the head's threshold is the policy's default: {:?}",
            step.params
        );
        let drafts: Vec<u32> = step.tokens.clone();
        let mut session = target.session();
        let input: Vec<u32> = all[..len].iter().chain(&drafts).copied().collect();
        let f = session.forward(&input, Rows::All).unwrap();
        let hidden = f.hidden.to_vec2::<f32>().unwrap();
        let judge = step.judge.as_ref().expect("judge logits");
        assert_eq!(judge.len(), drafts.len());
        for (i, &got) in judge.iter().enumerate() {
            let want = head.logit(&hidden[len + i]);
            assert!(
                (got - want).abs() < 1e-3,
                "step {s} position {i}: {got} vs {want}"
            );
        }
        len += inst.verify(step).verdict.accepted as usize + 1;
    }
}

#[test]
fn a_judge_that_accepts_everything_overturns_strict_and_one_that_accepts_nothing_is_strict() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(21, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(22, 1));
    let prompt = [3u32, 1, 4, 1, 5];
    let plain = engine(target.clone(), None, None, 4);
    let (reference, _) = run(&plain, greedy(&prompt, 30, Speculation::Off));
    let mut outputs = Vec::new();
    for bias in [-100.0, 100.0] {
        let e = engine_with_head(
            target.clone(),
            draft.clone(),
            Some(head_for(&target, bias, 0.5)),
        )
        .unwrap();
        let mut req = greedy(&prompt, 30, Speculation::Default);
        req.policy = Some("judge".into());
        let (out, stats) = run(&e, req);
        outputs.push((out, stats));
    }
    let (never, never_stats) = &outputs[0];
    assert_eq!(
        never, &reference,
        "a judge that never accepts leaves strict's output"
    );
    assert_eq!(never_stats.accepted_off_argmax, 0);
    let (always, always_stats) = &outputs[1];
    assert_eq!(
        always_stats.accepted, always_stats.drafted,
        "{always_stats:?}"
    );
    assert!(always_stats.accepted_off_argmax > 0, "{always_stats:?}");
    assert_eq!(always_stats.rejections, 0);
    assert!((always_stats.overturned_share() - 1.0).abs() < 1e-9);
    assert_ne!(
        always, &reference,
        "the random draft disagrees with the target somewhere"
    );
}

#[test]
fn a_head_for_another_target_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(31, 2));
    let other = tiny(dir.path(), "o.gguf", spec(32, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(33, 1));
    let err = engine_with_head(
        target.clone(),
        draft.clone(),
        Some(head_for(&other, 0.0, 0.5)),
    )
    .err()
    .expect("a head trained on other weights is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("sha256") && msg.contains("t.gguf"), "{msg}");
    let mut wrong_size = head_for(&target, 0.0, 0.5);
    wrong_size.target.hidden_size = 128;
    wrong_size.weight = vec![0.1; 128];
    wrong_size.mean = vec![0.0; 128];
    wrong_size.scale = vec![1.0; 128];
    let err = engine_with_head(target, draft, Some(wrong_size))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("hidden size 128"), "{err:#}");
}

#[test]
fn the_target_log_likelihood_of_the_output_is_accounted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(41, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(42, 1));
    let prompt = [2u32, 7, 1, 8];
    let plain = engine(target.clone(), None, None, 4);
    let (out, stats) = run(&plain, greedy(&prompt, 20, Speculation::Off));
    // Reference: one forward over prompt + output, log-softmax at each generated position.
    let input: Vec<u32> = prompt
        .iter()
        .chain(&out[..out.len() - 1])
        .copied()
        .collect();
    let rows = target
        .session()
        .forward(&input, Rows::All)
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap();
    let want: f64 = out
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = &rows[prompt.len() - 1 + i];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            row[t as usize] as f64 - max - z.ln()
        })
        .sum();
    assert!(want < 0.0);
    assert!(
        (stats.target_logprob - want).abs() < 1e-3,
        "{} vs {want}",
        stats.target_logprob
    );
    // Strict speculation emits the same tokens, so the same likelihood.
    let spec_e = engine(target, Some(draft), Some(DrafterSpec::Model), 4);
    let (out2, stats2) = run(&spec_e, greedy(&prompt, 20, Speculation::Default));
    assert_eq!(out2, out);
    assert!((stats2.target_logprob - want).abs() < 1e-3);
    assert!((stats2.mean_target_logprob() - want / out.len() as f64).abs() < 1e-4);
}

/// Rewrites a GGUF with two vocabulary entries swapped: same size, different tokenizer.
fn swap_two_tokens(src: &Path, dst: &Path) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in meta.iter_mut() {
        if let (true, gguf_file::Value::Array(tokens)) = (k == "tokenizer.ggml.tokens", v) {
            tokens.swap(70, 80);
        }
    }
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content
                .tensor(&mut f, name, &candle_core::Device::Cpu)
                .unwrap();
            (name.clone(), t)
        })
        .collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn a_draft_with_the_same_vocabulary_size_but_other_tokens_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    write_tiny_gguf(&dir.path().join("d0.gguf"), &spec(2, 1)).unwrap();
    swap_two_tokens(&dir.path().join("d0.gguf"), &dir.path().join("d.gguf"));
    let draft = Model::load_gguf(&dir.path().join("d.gguf"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(draft.config().vocab_size, target.config().vocab_size);
    let err = engine_with_head(target, draft, None)
        .err()
        .expect("a different tokenizer of the same size must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("tokenizer") && msg.contains("d.gguf"), "{msg}");
}

/// `bench spec --synthetic-acceptance`: the rate replaces the verdict (a random draft against
/// a random target keeps everything at 1, nothing at 0, about `rate` per position between), and
/// a step still drafts, verifies and rolls back like any other.
#[test]
fn synthetic_acceptance_replaces_the_verdict_for_speed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    let with_rate = |rate: f64| {
        let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default()).unwrap());
        Engine::new(EngineConfig {
            judge: None,
            target: target.clone(),
            draft: Some(other.clone()),
            registry,
            default_policy: "strict".into(),
            default_drafter: Some(DrafterSpec::Model),
            default_k: 4,
            adaptive: false,
            synthetic_acceptance: Some(rate),
        })
        .unwrap()
    };
    let req = || greedy(&[1, 2, 3], 61, Speculation::Default);
    let plain = engine(
        target.clone(),
        Some(other.clone()),
        Some(DrafterSpec::Model),
        4,
    );
    let (_, real) = run(&plain, req());
    assert!(
        real.accepted < real.drafted,
        "the random pair must disagree somewhere for this test to mean anything: {real:?}"
    );
    let (out, all) = run(&with_rate(1.0), req());
    assert_eq!(out.len(), 61);
    assert_eq!(all.accepted, all.drafted);
    assert_eq!(all.steps, 12, "5 tokens per step after the first: {all:?}");
    let (_, none) = run(&with_rate(0.0), req());
    assert_eq!(none.accepted, 0);
    assert_eq!(none.steps, 60);
    // Per step of 4 drafts, E[accepted] = 0.5 + 0.25 + 0.125 + 0.0625; ~300 steps.
    let half = with_rate(0.5);
    let (mut accepted, mut steps) = (0, 0);
    for (i, p) in PROMPTS.iter().enumerate() {
        let mut r = greedy(p, 200, Speculation::Default);
        r.seed = Some(i as u64);
        let (_, s) = run(&half, r);
        assert!(s.accepted < s.drafted && s.accepted > 0, "{s:?}");
        accepted += s.accepted;
        steps += s.steps;
    }
    let per_step = accepted as f64 / steps as f64;
    assert!(
        (per_step - 0.9375).abs() < 0.2,
        "{per_step} accepted per step"
    );
}

/// Runs `req` to the end; returns the output, its logprobs and the prompt tokens read from the
/// prompt cache.
fn run_logged(
    engine: &Engine,
    req: GenerateRequest,
) -> (Vec<u32>, Vec<verdict::engine::TokenLogprob>, usize) {
    let mut g = engine.start(req).unwrap();
    let mut logprobs = Vec::new();
    while g.finished().is_none() {
        g.step().unwrap();
        logprobs.extend(g.take_logprobs());
    }
    (g.output().to_vec(), logprobs, g.cached_prompt_tokens())
}

#[test]
fn the_prompt_cache_skips_a_shared_prefix_and_changes_no_output() {
    use verdict::engine::PrefixStats;
    let dir = tempfile::tempdir().unwrap();
    // Quantized weights: each row is scored on its own, so a prompt prefilled in two pieces
    // gives the logits of one piece bit for bit.
    let q8 = |seed, layers| TinySpec {
        dtype: candle_core::quantized::GgmlDType::Q8_0,
        ..spec(seed, layers)
    };
    let target = tiny(dir.path(), "t.gguf", q8(1, 3));
    let draft = tiny(dir.path(), "d.gguf", q8(2, 1));
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.0,
    };
    for (drafter, sampling) in [
        (Some(DrafterSpec::Model), SamplingParams::greedy()),
        (Some(DrafterSpec::Auto), sampled),
        (
            Some(DrafterSpec::PromptLookup(None)),
            SamplingParams::greedy(),
        ),
        (None, sampled),
    ] {
        let what = format!("{drafter:?} at T = {}", sampling.temperature);
        let fresh = engine(target.clone(), Some(draft.clone()), drafter.clone(), 4);
        let cached =
            engine(target.clone(), Some(draft.clone()), drafter, 4).with_prompt_cache(1000);
        let req = |prompt: &[u32]| GenerateRequest {
            prompt: prompt.to_vec(),
            max_tokens: 24,
            sampling,
            seed: Some(5),
            logprobs: Some(3),
            ..Default::default()
        };
        // A first turn, then a second that sends it back with more text (a chat).
        let first: Vec<u32> = (40..52).collect();
        let (out1, lp1, hit1) = run_logged(&cached, req(&first));
        assert_eq!(hit1, 0, "{what}: nothing is cached yet");
        assert_eq!((out1.clone(), lp1), {
            let (o, l, _) = run_logged(&fresh, req(&first));
            (o, l)
        });
        let second = [&first[..], &out1, &[7, 8, 9]].concat();
        let (out2, lp2, hit2) = run_logged(&cached, req(&second));
        // The target's cache held all but the last emitted token.
        assert_eq!(
            hit2,
            first.len() + out1.len() - 1,
            "{what}: the first turn is read from the cache"
        );
        let (fresh2, fresh_lp2, _) = run_logged(&fresh, req(&second));
        assert_eq!(out2, fresh2, "{what}: same output");
        assert_eq!(lp2, fresh_lp2, "{what}: same logprobs, bit for bit");
        // The second turn extends the first: one entry is left.
        assert_eq!(cached.prompt_cache_stats().unwrap().entries, 1, "{what}");
        // The same prompt again: all but its last token come from the cache.
        let (again, _, hit3) = run_logged(&cached, req(&second));
        assert_eq!((again, hit3), (out2, second.len() - 1), "{what}");
        // A prompt that shares nothing misses, and a shorter shared prefix is a partial hit.
        assert_eq!(run_logged(&cached, req(&[100, 101, 102])).2, 0, "{what}");
        let partial = [&first[..5], &[200, 201]].concat();
        let (p_out, p_lp, hit4) = run_logged(&cached, req(&partial));
        assert_eq!(hit4, 5, "{what}");
        let (f_out, f_lp, _) = run_logged(&fresh, req(&partial));
        assert_eq!((p_out, p_lp), (f_out, f_lp), "{what}");
        assert_eq!(fresh.prompt_cache_stats(), None::<PrefixStats>);
    }
}

/// vLLM's `cache_salt`: a request finds only what requests with its salt left (none: what
/// unsalted ones left), so one tenant's prompts cannot speed up another's; the output is the
/// same either way.
#[test]
fn the_prompt_cache_is_shared_only_under_one_salt() {
    let dir = tempfile::tempdir().unwrap();
    // Quantized: a prompt read in two pieces gives the same logits, bit for bit.
    let q8 = |seed, layers| TinySpec {
        dtype: candle_core::quantized::GgmlDType::Q8_0,
        ..spec(seed, layers)
    };
    let target = tiny(dir.path(), "t.gguf", q8(1, 2));
    let draft = tiny(dir.path(), "d.gguf", q8(2, 1));
    let e = engine(target, Some(draft), Some(DrafterSpec::Model), 4).with_prompt_cache(1000);
    let prompt: Vec<u32> = (40..52).collect();
    let req = |salt: Option<&str>| GenerateRequest {
        cache_salt: salt.map(str::to_string),
        ..greedy(&prompt, 8, Speculation::Default)
    };
    let (out, _, hit) = run_logged(&e, req(Some("tenant-a")));
    assert_eq!(hit, 0);
    // Another salt, or none, misses what tenant a left...
    let (out_b, _, hit_b) = run_logged(&e, req(Some("tenant-b")));
    assert_eq!((hit_b, &out_b), (0, &out));
    let (_, _, hit_none) = run_logged(&e, req(None));
    assert_eq!(hit_none, 0);
    // ...which its own salt finds; each salt's entry is kept apart.
    let (out_a, _, hit_a) = run_logged(&e, req(Some("tenant-a")));
    assert_eq!((hit_a, &out_a), (prompt.len() - 1, &out));
    assert_eq!(e.prompt_cache_stats().unwrap().entries, 3);
    assert_eq!(run_logged(&e, req(None)).2, prompt.len() - 1);
}

/// OpenAI's predicted outputs: a prediction drafts where the output follows it, and with
/// strict the output is the target's greedy one whatever the prediction says (right, edited,
/// or unrelated); the tokens drafted from it are counted accepted or rejected; off the
/// prediction the request's own drafter proposes; with speculation off it is not used.
#[test]
fn a_predicted_output_drafts_and_changes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(2, 1));
    let prompt = [3, 1, 4, 1, 5];
    let plain_engine = engine(target.clone(), None, None, 8);
    let (want, _) = run(&plain_engine, greedy(&prompt, 40, Speculation::Off));
    assert_eq!(want.len(), 40);
    let mut edited = want.clone();
    for i in [12, 13, 25] {
        edited[i] = (edited[i] + 7) % 50;
    }
    let unrelated: Vec<u32> = (0..40).map(|i| (i * 13 + 5) % 97).collect();
    for (what, e) in [
        ("no drafter", plain_engine),
        (
            "a draft model",
            engine(
                target.clone(),
                Some(draft.clone()),
                Some(DrafterSpec::Model),
                8,
            ),
        ),
    ] {
        for (name, prediction) in [
            ("exact", &want),
            ("edited", &edited),
            ("unrelated", &unrelated),
        ] {
            let req = GenerateRequest {
                prediction: Some(prediction.clone()),
                ..greedy(&prompt, 40, Speculation::Default)
            };
            let (out, st) = run(&e, req);
            assert_eq!(out, want, "{what}, {name} prediction");
            assert!(st.prediction);
            let from_prediction = st.drafter_steps.get("prediction").copied().unwrap_or(0);
            match name {
                // Every drafted token right: a few steps of k + 1 tokens.
                "exact" => {
                    assert_eq!(st.prediction_rejected, 0, "{what}: {st:?}");
                    assert_eq!(st.prediction_accepted, st.accepted);
                    assert!(st.steps <= 6, "{what}: {st:?}");
                }
                // Rejected at the edits, and back on the prediction after each (two output
                // tokens past an edit re-anchor): 40 tokens in a quarter of the steps.
                "edited" => {
                    assert!(st.prediction_rejected >= 2, "{what}: {st:?}");
                    assert!(st.prediction_accepted >= 25, "{what}: {st:?}");
                    assert!(from_prediction >= 3 && st.steps <= 12, "{what}: {st:?}");
                }
                _ => assert!(st.prediction_accepted <= 2, "{what}: {st:?}"),
            }
            // Off the prediction, the draft model proposes.
            if what == "a draft model" && name == "unrelated" {
                assert!(
                    st.drafter_steps.get("model").copied().unwrap_or(0) > 0,
                    "{st:?}"
                );
            }
        }
    }
    // Speculation off: the prediction is not used.
    let e = engine(target, None, None, 8);
    let req = GenerateRequest {
        prediction: Some(want.clone()),
        ..greedy(&prompt, 40, Speculation::Off)
    };
    let (out, st) = run(&e, req);
    assert_eq!((out, st.prediction, st.drafted), (want, false, 0));
}

#[test]
fn the_prompt_cache_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(2, 1));
    // Each request leaves ~2 x 20 positions (target and draft model).
    let e = engine(target, Some(draft), Some(DrafterSpec::Model), 4).with_prompt_cache(100);
    for i in 0..10u32 {
        let (out, _, _) = run_logged(&e, greedy(&[60 + i, 1, 2, 3, 4], 16, Speculation::Default));
        assert_eq!(out.len(), 16);
        let s = e.prompt_cache_stats().unwrap();
        assert!(s.positions <= 100, "{s:?}");
        assert!(s.entries >= 1, "the newest request is kept: {s:?}");
    }
    // The least recently used went first: the last request's prompt still hits.
    assert_eq!(
        run_logged(&e, greedy(&[69, 1, 2, 3, 4, 5], 4, Speculation::Default)).2,
        5
    );
    assert_eq!(
        run_logged(&e, greedy(&[60, 1, 2, 3, 4, 5], 4, Speculation::Default)).2,
        0
    );
    // A sequence larger than the whole budget is not kept.
    let tiny_budget =
        engine(tiny(dir.path(), "t2.gguf", spec(1, 2)), None, None, 4).with_prompt_cache(8);
    run_logged(
        &tiny_budget,
        greedy(&[1, 2, 3, 4, 5, 6], 8, Speculation::Off),
    );
    assert_eq!(tiny_budget.prompt_cache_stats().unwrap().entries, 0);
}

/// A Lark grammar may name a special token (`<|im_start|>`, unquoted): it then forces that
/// token, not its characters (how a forced harmony call asks for gpt-oss's markers); quoted,
/// the same text is spelled in ordinary tokens.
#[test]
fn a_lark_grammar_names_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), "t.gguf", spec(1, 1));
    let tok = Tokenizer::from_gguf(model.gguf_metadata().unwrap()).unwrap();
    let im_start = tok.token_id("<|im_start|>").unwrap();
    let stops = tok.eos_ids().to_vec();
    let mut bare = constraint(
        &model,
        GrammarSpec::Lark("start: <|im_start|> \"ab\"".into()),
        &stops,
    );
    assert_eq!(bare.forced().first(), Some(&im_start));
    let mut quoted = constraint(
        &model,
        GrammarSpec::Lark("start: \"<|im_start|>\" \"ab\"".into()),
        &stops,
    );
    let spelled = quoted.forced();
    assert!(!spelled.contains(&im_start), "{spelled:?}");
    assert!(text(&model, &spelled).starts_with("<|im_start|>"));
}

/// The tiny model's tokenizer's grammar for `spec`, ended by `stops`.
fn constraint(model: &Model, spec: GrammarSpec, stops: &[u32]) -> Constraint {
    let tok = Tokenizer::from_gguf(model.gguf_metadata().unwrap()).unwrap();
    Grammars::new(&tok).unwrap().compile(&spec, stops).unwrap()
}

fn text(model: &Model, ids: &[u32]) -> String {
    let tok = Tokenizer::from_gguf(model.gguf_metadata().unwrap()).unwrap();
    tok.decode(ids, false).unwrap()
}

/// Greedy decoding under a grammar by this loop: one single-token forward per token, each row
/// masked from a parser fed only the committed tokens (no drafts, no rollback).
fn reference_constrained_greedy(
    target: &Model,
    prompt: &[u32],
    n: usize,
    mut c: Constraint,
) -> Vec<u32> {
    let mut sess = target.session();
    let mut logits = sess.forward(prompt, Rows::Last).unwrap().logits;
    let mut out: Vec<u32> = Vec::new();
    while out.len() < n {
        let mut rows = vec![logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()];
        assert_eq!(c.mask_rows(&mut rows, &[]).unwrap(), 0);
        let next = verdict::sample::argmax(&rows[0]);
        if c.ends(next) {
            break;
        }
        c.push(next).unwrap();
        out.push(next);
        logits = sess.forward(&[next], Rows::Last).unwrap().logits;
    }
    out
}

const STOP: u32 = 299;

/// The grammars of the structured-output tests, with a check of the text each must give.
#[allow(clippy::type_complexity)]
fn grammar_cases() -> Vec<(GrammarSpec, Box<dyn Fn(&str) -> bool>)> {
    vec![
        (
            GrammarSpec::Regex("[a-f]{3,12}z".into()),
            Box::new(|t: &str| {
                t.ends_with('z')
                    && (3..=12).contains(&(t.len() - 1))
                    && t[..t.len() - 1].bytes().all(|b| (b'a'..=b'f').contains(&b))
            }),
        ),
        (
            GrammarSpec::Choice(vec!["alpha".into(), "beta".into(), "gamma delta".into()]),
            Box::new(|t: &str| ["alpha", "beta", "gamma delta"].contains(&t)),
        ),
        (
            GrammarSpec::JsonSchema(serde_json::json!({
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tag": {"enum": ["x", "y"]}
                },
                "required": ["n", "tag"],
                "additionalProperties": false
            })),
            Box::new(|t: &str| {
                serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| {
                    v["n"].as_u64().is_some_and(|n| n <= 999)
                        && (v["tag"] == "x" || v["tag"] == "y")
                        && v.as_object().unwrap().len() == 2
                })
            }),
        ),
    ]
}

/// The cut of a copied draft (`Constraint::fitting`, no mask computed) finds exactly the
/// drafts the verification's masked rows allow, at every point of each grammar's output, for
/// the output's own continuation (which fits, then ends with the stop token) and for
/// continuations that part from it at each position.
#[test]
fn a_drafts_cut_agrees_with_the_masked_rows() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let vocab = target.config().vocab_size;
    // Other tokens, from a fixed xorshift.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut other = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab as u64) as u32
    };
    let mut checked = [0usize; 2];
    for (spec, _) in grammar_cases() {
        let mut c = constraint(&target, spec.clone(), &[STOP]);
        let mut out = reference_constrained_greedy(&target, PROMPTS[0], 200, c.clone());
        out.push(STOP);
        for at in 0..out.len() {
            let rest = &out[at..out.len().min(at + 8)];
            for part in 0..=rest.len() + 1 {
                // The continuation itself, or a part of it and then other tokens.
                let drafts = if part > rest.len() {
                    rest.to_vec()
                } else {
                    let mut d = rest[..part].to_vec();
                    d.extend((0..3).map(|_| other()));
                    d.push(STOP);
                    d
                };
                let mut rows = vec![vec![0.0f32; vocab]; drafts.len() + 1];
                let want = c.mask_rows(&mut rows, &drafts).unwrap();
                assert_eq!(
                    c.fitting(&drafts).unwrap(),
                    want,
                    "{spec:?} at {at}: {drafts:?}"
                );
                checked[usize::from(want < drafts.len())] += 1;
            }
            if out[at] != STOP {
                c.push(out[at]).unwrap();
            }
        }
    }
    // Both ways happened: drafts cut, and drafts that fit to their end.
    assert!(checked[0] > 0 && checked[1] > 0, "{checked:?}");
}

/// Structured outputs keep strict lossless: under a grammar, every drafter at every k gives
/// exactly the greedy output of a plain loop that masks each row itself; that output matches
/// the grammar and ends there (a stop, not max_tokens), where the unconstrained model would
/// have gone on to something else.
#[test]
fn greedy_speculation_under_a_grammar_equals_constrained_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let other = tiny(dir.path(), "d.gguf", spec(2, 1));
    let drafters = [
        (Some(other.clone()), DrafterSpec::Model),
        (Some(target.clone()), DrafterSpec::Model),
        (None, DrafterSpec::PromptLookup(None)),
        (None, DrafterSpec::SelfDraft(1)),
    ];
    let plain = engine(target.clone(), None, None, 4);
    let (mut drafted, mut by_grammar, mut lookup_cuts) = (0, 0, 0);
    for (spec, valid) in grammar_cases() {
        for prompt in PROMPTS {
            let req = |speculation| GenerateRequest {
                stop_tokens: vec![STOP],
                grammar: Some(constraint(&target, spec.clone(), &[STOP])),
                ..greedy(prompt, 200, speculation)
            };
            let reference = reference_constrained_greedy(
                &target,
                prompt,
                200,
                constraint(&target, spec.clone(), &[STOP]),
            );
            let t = text(&target, &reference);
            assert!(valid(&t), "{spec:?}: {t:?}");
            let mut g = plain.start(req(Speculation::Off)).unwrap();
            while g.finished().is_none() {
                g.step().unwrap();
            }
            assert_eq!(g.output(), reference, "plain decoding, {spec:?}");
            assert_eq!(g.finished(), Some(verdict::engine::FinishReason::Stop));
            let (free, _) = run(&plain, greedy(prompt, 200, Speculation::Off));
            assert!(
                !valid(&text(&target, &free)),
                "the grammar must matter here"
            );
            for (name, out, stats) in
                each_drafter(&target, &drafters, &[1, 4, 8], || req(Speculation::Default))
            {
                assert_eq!(out, reference, "{name}, {spec:?}, prompt {prompt:?}");
                drafted += stats.drafted;
                by_grammar += stats.drafter_steps.get("grammar").copied().unwrap_or(0);
                // Model drafters draft from their q masked by the grammar: it cuts none of
                // their drafts. Prompt lookup's copies it does cut.
                if name.contains("PromptLookup") {
                    lookup_cuts += stats.grammar_cuts;
                } else {
                    assert_eq!(stats.grammar_cuts, 0, "{name}, {spec:?}, prompt {prompt:?}");
                }
            }
        }
    }
    assert!(drafted > 0);
    // The text the grammars force (the rest of a choice, JSON keys) was drafted by them.
    assert!(by_grammar > 0);
    assert!(lookup_cuts > 0);
}

/// A lossy policy may accept what the target would not say, never what the grammar bars:
/// `threshold` with rule 2 and floor 0 accepts every drafted token, yet the output still
/// matches each grammar: prompt lookup's copies are cut where the grammar refuses them.
#[test]
fn no_policy_accepts_a_token_outside_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    // Prompt lookup: its copies are not drafted under the grammar (a model drafter's are).
    let e = engine(
        target.clone(),
        None,
        Some(DrafterSpec::PromptLookup(Some(1))),
        8,
    );
    let mut capped = 0;
    for (spec, valid) in grammar_cases() {
        for prompt in PROMPTS {
            let req = GenerateRequest {
                stop_tokens: vec![STOP],
                grammar: Some(constraint(&target, spec.clone(), &[STOP])),
                policy: Some("threshold".into()),
                policy_params: vec![("rule".into(), 2.0), ("floor".into(), 0.0)],
                ..greedy(prompt, 200, Speculation::Default)
            };
            let (out, stats) = run(&e, req);
            let t = text(&target, &out);
            assert!(valid(&t), "{spec:?}, prompt {prompt:?}: {t:?}");
            // The grammar cut the copies before verification, so the policy, which refuses
            // nothing, accepted every verified draft. (The engine also caps acceptance at the
            // first refused row, a second line this test cannot reach once the cut is made.)
            assert_eq!(stats.rejections, 0, "{spec:?}, prompt {prompt:?}");
            capped += stats.grammar_cuts;
        }
    }
    assert!(capped > 0);
}

/// At T > 0 speculative sampling under a grammar draws from the masked distribution: the
/// second token's frequencies match the exact mixture (the second row masked after the first
/// token), and not the unmasked target's.
#[test]
fn speculative_sampling_follows_the_masked_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(5, 2));
    let draft = tiny(dir.path(), "d.gguf", spec(6, 1));
    let prompt = [10u32, 11, 12];
    let s = at_temperature(0.6);
    let g = constraint(&target, GrammarSpec::Regex("[a-z]{2,}[0-9]".into()), &[]);
    let mut sess = target.session();
    let row = |sess: &mut verdict::models::Session, input: &[u32], pending: &[u32]| {
        let mut c = g.clone();
        for &t in pending {
            c.push(t).unwrap();
        }
        let mut rows = vec![
            sess.forward(input, Rows::Last)
                .unwrap()
                .logits
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        ];
        c.mask_rows(&mut rows, &[]).unwrap();
        verdict::sample::probabilities(&rows[0], &s)
    };
    let p1 = row(&mut sess, &prompt, &[]);
    let mut exact = vec![0f64; p1.len()];
    for (t1, &w) in p1.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        sess.truncate(prompt.len()).unwrap();
        let p2 = row(&mut sess, &[t1 as u32], &[t1 as u32]);
        for (o, &p) in exact.iter_mut().zip(&p2) {
            *o += w as f64 * p as f64;
        }
    }
    let e = engine(target.clone(), Some(draft), Some(DrafterSpec::Model), 3);
    let (counts, rejected) = second_token_counts_with(
        &e,
        &prompt,
        &s,
        |_| GenerateRequest {
            grammar: Some(g.clone()),
            ..Default::default()
        },
        2000,
    );
    assert!(
        rejected > 100,
        "the drafts must be tested: {rejected} rejections"
    );
    let plain = second_token_distribution(&target, &prompt, &s);
    assert_fits_not(&counts, &exact, &plain, "the unmasked target");
}

/// A grammar that is done ends the output even when `min_tokens` bars the stop tokens (the
/// grammar wins), and a stop token is no way out of a grammar that is not done.
#[test]
fn a_finished_grammar_ends_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let e = engine(
        target.clone(),
        Some(target.clone()),
        Some(DrafterSpec::Model),
        4,
    );
    let choice = GrammarSpec::Choice(vec!["ab".into()]);
    let (out, _) = run(
        &e,
        GenerateRequest {
            stop_tokens: vec![STOP],
            grammar: Some(constraint(&target, choice.clone(), &[STOP])),
            penalties: Penalties {
                min_tokens: 10,
                logit_bias: vec![(STOP, 100.0)],
                ..Penalties::default()
            },
            ..greedy(PROMPTS[0], 30, Speculation::Default)
        },
    );
    assert_eq!(text(&target, &out), "ab");
    // The stop token's +100 bias does not end a grammar before it is done.
    let (out, _) = run(
        &e,
        GenerateRequest {
            stop_tokens: vec![STOP],
            grammar: Some(constraint(
                &target,
                GrammarSpec::Regex("[xy]{4}".into()),
                &[STOP],
            )),
            penalties: Penalties {
                logit_bias: vec![(STOP, 100.0)],
                ..Penalties::default()
            },
            ..greedy(PROMPTS[0], 30, Speculation::Default)
        },
    );
    let t = text(&target, &out);
    assert!(
        t.len() == 4 && t.bytes().all(|b| b == b'x' || b == b'y'),
        "{t:?}"
    );
}

/// A draft model whose lm_head is cut to part of the vocabulary (`Model::with_draft_vocab`,
/// `--draft-vocab`): its logits are the whole head's at the ids it keeps and -inf elsewhere;
/// strict speculation with it still emits exactly the target's greedy tokens, and at T > 0 its
/// draws still follow the target's distribution.
#[test]
fn a_draft_with_a_cut_vocabulary_stays_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let target = tiny(dir.path(), "t.gguf", spec(1, 3));
    let whole = tiny(dir.path(), "d.gguf", spec(2, 1));
    let keep = |m: Model| m.with_draft_vocab(150, &[290, 291, 299, 7]).unwrap();
    let cut = keep(tiny(dir.path(), "d.gguf", spec(2, 1)));
    let kept = |i: usize| i < 150 || [290, 291, 299].contains(&i);
    for prompt in PROMPTS {
        let a = whole.session().forward(prompt, Rows::All).unwrap().logits;
        let b = cut.session().forward(prompt, Rows::All).unwrap().logits;
        assert_eq!(a.dims(), b.dims());
        for (ra, rb) in a
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .zip(b.to_vec2::<f32>().unwrap())
        {
            for (i, (&x, &y)) in ra.iter().zip(&rb).enumerate() {
                if kept(i) {
                    assert_eq!(x, y, "id {i}: the kept rows score as in the whole head");
                } else {
                    assert_eq!(y, f32::NEG_INFINITY, "id {i} is cut");
                }
            }
        }
    }
    // 0, or a size past the vocabulary, keeps the whole head; shared weights are refused.
    let same = tiny(dir.path(), "d.gguf", spec(2, 1))
        .with_draft_vocab(0, &[])
        .unwrap();
    let l = same.session().forward(&[1, 2], Rows::Last).unwrap().logits;
    assert!(l.to_vec2::<f32>().unwrap()[0].iter().all(|x| x.is_finite()));
    let shared = tiny(dir.path(), "d.gguf", spec(2, 1));
    let _other = shared.clone();
    let e = shared.with_draft_vocab(100, &[]).unwrap_err().to_string();
    assert!(e.contains("shared"), "{e}");

    // Strict at T = 0: the target's greedy tokens, with the cut random draft and with the
    // target itself cut (a draft right wherever it can propose the token at all).
    let plain = engine(target.clone(), None, None, 4);
    let self_cut = keep(tiny(dir.path(), "t.gguf", spec(1, 3)));
    for prompt in PROMPTS {
        let (reference, _) = run(&plain, greedy(prompt, 40, Speculation::Off));
        let outside = reference.iter().filter(|&&t| !kept(t as usize)).count();
        for (name, draft) in [("cut draft", &cut), ("cut target", &self_cut)] {
            for k in [1, 3, 8] {
                let e = engine(
                    target.clone(),
                    Some(draft.clone()),
                    Some(DrafterSpec::Model),
                    k,
                );
                let (out, stats) = run(&e, greedy(prompt, 40, Speculation::Default));
                assert_eq!(out, reference, "{name}, k = {k}, prompt {prompt:?}");
                if name == "cut target" && outside == 0 {
                    assert_eq!(stats.accepted, stats.drafted, "{stats:?}");
                }
            }
        }
        // The target cut can only miss where the target's token is cut (k = 1: each miss is
        // one drafted token rejected).
        let e = engine(
            target.clone(),
            Some(self_cut.clone()),
            Some(DrafterSpec::Model),
            1,
        );
        let (_, stats) = run(&e, greedy(prompt, 40, Speculation::Default));
        assert!(
            stats.drafted - stats.accepted <= outside as u64,
            "{stats:?}, {outside} of the target's tokens cut"
        );
    }

    // The ids a request's context holds come back: a cut draft proposes a cut token it has
    // seen in the context (here the target cut: its argmax), and cannot without it.
    {
        use verdict::draft::{Drafter, ModelDrafter};
        use verdict::sample::Rng64;
        let mut rng = Rng64::new(3);
        let (ctx, want) = (0..2000)
            .find_map(|_| {
                let ctx: Vec<u32> = (0..4)
                    .map(|_| 150 + (rng.uniform() * 140.0) as u32)
                    .collect();
                let l = target.session().forward(&ctx, Rows::Last).unwrap().logits;
                let row = l.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
                let x = verdict::sample::argmax(&row);
                ((150..290).contains(&x) && ctx.contains(&x)).then_some((ctx, x))
            })
            .expect("a context whose greedy next token is a cut id it holds");
        let s = SamplingParams::greedy();
        let mut d = ModelDrafter::new("model", self_cut.session());
        let p = d.propose(&ctx, 1, &s, &mut Rng64::new(1)).unwrap();
        assert_eq!(p.tokens, [want], "context {ctx:?}");
        // The same id, not in the context: the draft cannot propose it.
        let other: Vec<u32> = ctx
            .iter()
            .map(|&t| if t == want { 149 } else { t })
            .collect();
        let l = target.session().forward(&other, Rows::Last).unwrap().logits;
        let x = verdict::sample::argmax(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        if x == want {
            let mut d = ModelDrafter::new("model", self_cut.session());
            let p = d.propose(&other, 1, &s, &mut Rng64::new(1)).unwrap();
            assert_ne!(p.tokens, [want], "context {other:?}");
        }
    }

    // T > 0: the second token's frequencies fit the target's distribution, not the draft's.
    let target = tiny(dir.path(), "t5.gguf", spec(5, 2));
    let draft = tiny(dir.path(), "d6.gguf", spec(6, 1))
        .with_draft_vocab(120, &[])
        .unwrap();
    let prompt = [10u32, 11, 12];
    let s = at_temperature(0.15);
    assert_draws_follow_the_target(
        &target,
        draft.clone(),
        &draft,
        &prompt,
        &s,
        "the cut draft's q",
    );
}
