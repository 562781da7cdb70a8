//! The step kernels (kernels/step.cu through host/verify/cuda.rs) against their CPU twin (the
//! functions `verify::verify` and the engine's corrections use) on random rows: within 1e-4
//! relative, top-K ids and draws equal except where the CPU's own numbers are a near-tie.
//!
//! Needs the `cuda` feature (`scripts/build-cuda tests` builds this binary) and a CUDA device.
//! Also holds tests/greedy.rs as `greedy::`, run on the GPU by bench/gpu.sh.
//! Without a device the GPU test says SKIPPED on stderr and passes; the checks that need no
//! device (errors instead of panics) run everywhere.
#![cfg(feature = "cuda")]

use std::io::Write;

// The real-model greedy checks ride along in this binary (one test binary travels to the GPU
// machine; bench/gpu.sh runs `greedy::` with VERDICT_TEST_DEVICE=cuda).
#[path = "greedy.rs"]
mod greedy;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use verdict::decide::Step;
use verdict::sample::{self, SamplingParams};
use verdict::verify::cuda::{self, Draw, JudgeInput, StepInput, StepKernels};
use verdict::verify::judge::TargetIdentity;
use verdict::verify::{self, JudgeHead, JudgeScorer};

/// `a` equals the reference `b` within 1e-4 relative (1e-7 absolute near zero, where a relative
/// bound means nothing: entropies of near one-hot rows, probabilities that underflow).
fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * b.abs() + 1e-7
}

fn skip(why: &str) {
    // Straight to stderr, past the test harness's capture, so a skipped run says so.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED step kernels vs CPU: {why} (needs a CUDA device)"
    );
}

struct Case {
    name: &'static str,
    rows: usize,
    vocab: usize,
    hidden: usize,
    temperature: f32,
    top_k: usize,
    with_q: bool,
    /// Hand-made rows first: ties, -inf, all -inf, near one-hot.
    special: bool,
}

fn random_logits(rng: &mut StdRng, case: &Case) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = (0..case.rows)
        .map(|_| {
            (0..case.vocab)
                .map(|_| rng.random_range(-8.0f32..8.0))
                .collect()
        })
        .collect();
    if case.special {
        let v = case.vocab;
        rows[0] = vec![0.5; v]; // every p equal: top-K and argmax by id
        rows[1][3] = f32::NEG_INFINITY;
        rows[1][v - 1] = 9.0;
        rows[1][7] = 9.0; // duplicated maximum
        rows[2] = vec![f32::NEG_INFINITY; v]; // no finite maximum: one-hot at id 0
        rows[3][v / 2] = 60.0; // near one-hot: entropy ~ 0
    }
    rows
}

fn random_probs(rng: &mut StdRng, vocab: usize) -> Vec<f32> {
    let l: Vec<f32> = (0..vocab).map(|_| rng.random_range(-6.0f32..6.0)).collect();
    sample::probabilities(&l, &params(1.0))
}

fn params(t: f32) -> SamplingParams {
    SamplingParams {
        temperature: t,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    }
}

/// The CPU's walk to the token `sample::sample` picked and the one the GPU picked: they may part
/// only where u * total sits on a boundary between them, within rounding.
fn assert_draw(weights: &[f32], u: f32, cpu: u32, gpu: u32, what: &str) {
    if cpu == gpu {
        return;
    }
    let total: f64 = weights.iter().map(|&x| x.max(0.0) as f64).sum();
    let target = u.clamp(0.0, 1.0) as f64 * total;
    let lo = cpu.min(gpu) as usize;
    let cum: f64 = weights[..=lo]
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x as f64)
        .sum();
    assert!(
        (cum - target).abs() <= 1e-5 * total,
        "{what}: CPU drew {cpu}, GPU {gpu} at u = {u}, not at a boundary \
         (mass up to {lo}: {cum}, u * total: {target})"
    );
}

#[test]
fn step_kernels_match_the_cpu() {
    let device = match cuda::device() {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let kernels = StepKernels::new(&device).expect("loading the step kernels");
    let cases = [
        Case {
            name: "qwen2.5 vocab, k = 8, with q and judge",
            rows: 9,
            vocab: 151_936,
            hidden: 1536,
            temperature: 1.0,
            top_k: 8,
            with_q: true,
            special: false,
        },
        Case {
            name: "smollm2 vocab, k = 16, T = 0.7, no q",
            rows: 17,
            vocab: 49_152,
            hidden: 576,
            temperature: 0.7,
            top_k: 20,
            with_q: false,
            special: false,
        },
        Case {
            name: "hand-made rows",
            rows: 6,
            vocab: 3000,
            hidden: 64,
            temperature: 1.3,
            top_k: 5,
            with_q: true,
            special: true,
        },
        Case {
            name: "vocab below one block, K above it",
            rows: 2,
            vocab: 5,
            hidden: 3,
            temperature: 1.0,
            top_k: 9,
            with_q: false,
            special: false,
        },
    ];
    let mut rng = StdRng::seed_from_u64(7);
    for case in &cases {
        check_case(&kernels, &device, case, &mut rng);
    }
}

fn check_case(kernels: &StepKernels, device: &Device, case: &Case, rng: &mut StdRng) {
    let name = case.name;
    let (rows, v) = (case.rows, case.vocab);
    let drafted = rows - 1;
    let logits = random_logits(rng, case);
    let tokens: Vec<u32> = (0..drafted)
        .map(|i| {
            // Mostly the argmax (the common case), else anything.
            if i % 3 == 0 {
                sample::argmax(&logits[i])
            } else {
                rng.random_range(0..v as u32)
            }
        })
        .collect();
    let q: Option<Vec<Vec<f32>>> = case
        .with_q
        .then(|| (0..drafted).map(|_| random_probs(rng, v)).collect());
    let hidden: Vec<f32> = (0..rows * case.hidden)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let head = JudgeHead {
        weight: (0..case.hidden)
            .map(|_| rng.random_range(-0.1f32..0.1))
            .collect(),
        bias: 0.3,
        mean: (0..case.hidden)
            .map(|_| rng.random_range(-0.5f32..0.5))
            .collect(),
        scale: (0..case.hidden)
            .map(|_| rng.random_range(0.5f32..2.0))
            .collect(),
        threshold: 0.5,
        target: TargetIdentity {
            architecture: "test".into(),
            hidden_size: case.hidden,
            sha256: String::new(),
        },
        provenance: Default::default(),
    };

    let flat = |rows: &[Vec<f32>]| rows.concat();
    let logits_t = Tensor::from_vec(flat(&logits), (rows, v), device).unwrap();
    let q_t = q
        .as_ref()
        .map(|q| Tensor::from_vec(flat(q), (drafted, v), device).unwrap());
    let hidden_t = Tensor::from_vec(hidden.clone(), (rows, case.hidden), device).unwrap();
    let scorer = JudgeScorer::new(&head, device).unwrap();
    let f = kernels
        .features(&StepInput {
            logits: &logits_t,
            temperature: case.temperature,
            tokens: &tokens,
            top_k: case.top_k,
            q: q_t.as_ref(),
            judge: Some(JudgeInput {
                hidden: &hidden_t,
                row0: 1,
                weight: scorer.weight(),
                bias: scorer.bias(),
            }),
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));

    // The judge: the CPU scorer's folded weights, summed in f64.
    let w_eff: Vec<f32> = scorer
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let judge = f.judge.as_ref().expect("judge logits");
    for i in 0..drafted {
        let h = &hidden[(i + 1) * case.hidden..(i + 2) * case.hidden];
        let want = h
            .iter()
            .zip(&w_eff)
            .map(|(&x, &w)| x as f64 * w as f64)
            .sum::<f64>()
            + scorer.bias() as f64;
        assert!(
            close(judge[i], want as f32),
            "{name}: judge[{i}] {} vs {want}",
            judge[i]
        );
        // and the unfolded head, as trained
        let unfolded = head.logit(h);
        assert!(
            (judge[i] - unfolded).abs() <= 1e-3 * unfolded.abs().max(1.0),
            "{name}: judge[{i}] {} vs head {unfolded}",
            judge[i]
        );
    }

    let k = f.top_k;
    assert_eq!(k, case.top_k.min(v), "{name}: K");
    let mut cpu_step = Step::new(k, case.temperature, v as u32, Vec::new());
    let mut gpu_step = cpu_step.clone();
    let uniforms: Vec<f32> = (0..drafted).map(|_| rng.random::<f32>()).collect();
    let q_token: Vec<f32> = (0..drafted).map(|i| 0.25 + i as f32 * 0.01).collect();
    let mut draws = Vec::new();
    let mut cpu_weights = Vec::new();
    for r in 0..rows {
        let row = &logits[r];
        let p = sample::probabilities(row, &params(case.temperature));
        assert_eq!(f.argmax[r], sample::argmax(row), "{name}: argmax row {r}");
        // The log-likelihood pieces: max, ln sum exp at T = 1, the drafted token's logit.
        let m = sample::max(row);
        assert_eq!(f.max_logit[r], m, "{name}: max logit row {r}");
        if m.is_finite() {
            let lse = sample::log_sum_exp(row, m);
            let got = m as f64 + f.log_z[r] as f64;
            assert!(
                (got - lse).abs() <= 1e-5 * lse.abs().max(1.0),
                "{name}: log-sum-exp row {r}: {got} vs {lse}"
            );
        }
        if r < drafted {
            assert_eq!(
                f.token_logit[r], row[tokens[r] as usize],
                "{name}: token logit row {r}"
            );
        }
        let gp = f.probs_row(r).unwrap();
        for (j, (&a, &b)) in gp.iter().zip(&p).enumerate() {
            assert!(close(a, b), "{name}: p[{r}][{j}] {a} vs {b}");
        }
        let h = verify::entropy(&p);
        assert!(
            close(f.entropy[r], h),
            "{name}: entropy row {r}: {} vs {h}",
            f.entropy[r]
        );
        let top = verify::top_entries(&p, k);
        for (j, &(id, tp)) in top.iter().enumerate() {
            let (gid, gprob) = (f.top_ids[r * k + j], f.top_probs[r * k + j]);
            assert!(close(gprob, tp), "{name}: top[{r}][{j}] p {gprob} vs {tp}");
            // Ids part only at a near-tie of the CPU's own probabilities.
            assert!(
                gid == id || close(p[gid as usize], tp),
                "{name}: top[{r}][{j}] id {gid} (p {}) vs {id} (p {tp})",
                p[gid as usize]
            );
        }
        if r < drafted {
            let x = tokens[r];
            let dp = q.as_ref().map_or(q_token[r], |q| q[r][x as usize]);
            let cpu = verify::features(&p, x, dp, uniforms[r]);
            assert!(
                close(f.target_prob[r], cpu.target_prob),
                "{name}: p(x) row {r}: {} vs {}",
                f.target_prob[r],
                cpu.target_prob
            );
            if let Some(d) = &f.draft_prob {
                assert_eq!(d[r], dp, "{name}: q(x) row {r}");
            }
            let mut with_judge = cpu;
            with_judge.judge = Some(judge[r]);
            cpu_step.push(with_judge, &top);
        }
        // Draws: p (bonus / sample), and on drafted rows the residuals.
        for u in [0.0, 0.37, rng.random::<f32>(), 0.999_999] {
            draws.push((r, Draw::P, u));
            cpu_weights.push(p.clone());
            if r < drafted {
                let x = tokens[r];
                let mut one_hot = vec![0f32; v];
                one_hot[x as usize] = 1.0;
                draws.push((r, Draw::ResidualOneHot(x), u));
                cpu_weights.push(sample::residual(&p, &one_hot));
                if let Some(q) = &q {
                    draws.push((r, Draw::Residual(r), u));
                    cpu_weights.push(sample::residual(&p, &q[r]));
                }
            }
        }
    }

    // The step a policy would see.
    f.push_into(&mut gpu_step, &q_token, &uniforms).unwrap();
    gpu_step.check().unwrap();
    assert_eq!(gpu_step.tokens, cpu_step.tokens, "{name}: step tokens");
    assert_eq!(gpu_step.draft_probs, cpu_step.draft_probs, "{name}");
    assert_eq!(gpu_step.uniforms, cpu_step.uniforms, "{name}");
    assert_eq!(gpu_step.judge, cpu_step.judge, "{name}");
    for (a, b) in gpu_step.target_probs.iter().zip(&cpu_step.target_probs) {
        assert!(close(*a, *b), "{name}: step target prob {a} vs {b}");
    }

    let got = kernels.sample(&f, q_t.as_ref(), &draws).unwrap();
    assert_eq!(got.len(), draws.len());
    for ((&(r, draw, u), w), &g) in draws.iter().zip(&cpu_weights).zip(&got) {
        let cpu = sample::sample(w, u);
        assert_draw(w, u, cpu, g, &format!("{name}: row {r} {draw:?}"));
    }
}

#[test]
fn kernels_refuse_a_cpu_device() {
    let err = StepKernels::new(&Device::Cpu).err().expect("a CPU device");
    assert!(format!("{err:#}").contains("CUDA device"), "{err:#}");
}

#[test]
fn device_probe_never_panics() {
    // On a machine without a driver this is the skip path; with one it opens device 0.
    match cuda::device() {
        Ok(d) => assert!(d.is_cuda()),
        Err(why) => assert!(why.contains("CUDA"), "{why}"),
    }
}

/// The largest |a - b| over two `[rows, n]` tensors, and the largest |b|.
fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> (f32, f32) {
    let a = a.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a.len(), b.len(), "{what}: row counts");
    let (mut d, mut m) = (0f32, 0f32);
    for (ra, rb) in a.iter().zip(&b) {
        assert_eq!(ra.len(), rb.len(), "{what}: row widths");
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite(), "{what}: non-finite value {x} on the GPU");
            d = d.max((x - y).abs());
            m = m.max(y.abs());
        }
    }
    (d, m)
}

/// The CUDA decode path (kernels/decode.cu via host/models/cuda_fast.rs) against the CPU forward
/// of the same weights dequantized to f32: the path dequantizes exactly and multiplies in f32, so
/// the two differ only by summation order. Covers every stored type the path reads, both rotary
/// layouts, qkv biases, tied embeddings, prompts longer than one pass of 32 rows, single-token
/// steps (graph replays), rollback and verification rows, forks, and a cache that grows past its
/// first 1024 positions with attention over several 256-key tiles.
#[test]
fn decode_path_matches_the_cpu() {
    use candle_core::quantized::GgmlDType;
    use verdict::models::testing::{TinySpec, write_tiny_gguf};
    use verdict::models::{Arch, Model, Rows};
    let device = match cuda::device() {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (Arch::Qwen2, GgmlDType::F32),
        (Arch::Qwen2, GgmlDType::F16),
        (Arch::Qwen2, GgmlDType::BF16),
        (Arch::Qwen2, GgmlDType::Q4_0),
        (Arch::Llama, GgmlDType::Q4_1),
        (Arch::Qwen2, GgmlDType::Q5_0),
        (Arch::Qwen2, GgmlDType::Q8_0),
        (Arch::Qwen2, GgmlDType::Q4K),
        (Arch::Llama, GgmlDType::Q5K),
        (Arch::Qwen2, GgmlDType::Q6K),
    ];
    let mut rng = StdRng::seed_from_u64(11);
    for (i, &(arch, dtype)) in cases.iter().enumerate() {
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        let spec = TinySpec {
            arch,
            dtype,
            // Not a multiple of a matvec block's outputs (4, 8 or 16): its last block has warps
            // past the end, which still join the staged kernels' barriers.
            vocab: 403,
            // Block counts per row that leave the device rows padded (32-value types: 9 and
            // 17 blocks; a Q6_K block is padded anyway).
            hidden: if k_quant { 256 } else { 288 },
            intermediate: if k_quant { 512 } else { 544 },
            heads: 4,
            kv_heads: 2,
            layers: 2,
            context_length: 1400,
            tied: i % 3 == 0,
            seed: i as u64,
            ..TinySpec::default()
        };
        let path = dir.path().join(format!("tiny-{i}.gguf"));
        write_tiny_gguf(&path, &spec).unwrap();
        let cpu = Model::load_gguf(&path, &Device::Cpu)
            .unwrap()
            .dequantized()
            .unwrap();
        let gpu = Model::load_gguf(&path, &device).unwrap();
        let (mut a, mut b) = (cpu.session(), gpu.session());
        let mut worst = 0f32;
        let mut check = |a: &mut verdict::models::Session,
                         b: &mut verdict::models::Session,
                         tokens: &[u32],
                         rows: Rows,
                         what: &str| {
            let what = format!("{arch:?} {dtype:?}: {what}");
            let fa = a.forward(tokens, rows).unwrap();
            let fb = b
                .forward(tokens, rows)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(a.len(), b.len(), "{what}: lengths");
            let (d, m) = max_diff(&fb.logits, &fa.logits, &format!("{what}, logits"));
            assert!(
                d <= 1e-3 * m.max(1.0),
                "{what}: logits differ by {d} (largest {m})"
            );
            let (dh, mh) = max_diff(&fb.hidden, &fa.hidden, &format!("{what}, hidden"));
            assert!(
                dh <= 1e-3 * mh.max(1.0),
                "{what}: hidden states differ by {dh} (largest {mh})"
            );
            worst = worst.max(d / m.max(1.0));
        };
        let mut toks =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..400)).collect() };
        check(
            &mut a,
            &mut b,
            &toks(40),
            Rows::All,
            "a 40-token prompt, every row",
        );
        for s in 0..5 {
            check(
                &mut a,
                &mut b,
                &toks(1),
                Rows::Last,
                &format!("decode step {s}"),
            );
        }
        let back = a.len() - 3;
        a.truncate(back).unwrap();
        b.truncate(back).unwrap();
        check(
            &mut a,
            &mut b,
            &toks(4),
            Rows::All,
            "4 verification rows after a rollback",
        );
        check(
            &mut a,
            &mut b,
            &toks(4),
            Rows::All,
            "the same shape again (a replay)",
        );
        let (mut af, mut bf) = (a.fork().unwrap(), b.fork().unwrap());
        let t = toks(1);
        check(&mut af, &mut bf, &t, Rows::Last, "a fork's first step");
        check(
            &mut a,
            &mut b,
            &t,
            Rows::Last,
            "the original after the fork",
        );
        // A prompt-cache copy of the first positions, taken back by the model and continued.
        let keep = a.len() - 5;
        let mut ac = cpu.adopt(a.copy_prefix(keep).unwrap()).unwrap();
        let mut bc = gpu.adopt(b.copy_prefix(keep).unwrap()).unwrap();
        check(
            &mut ac,
            &mut bc,
            &toks(3),
            Rows::All,
            "a prompt-cache copy continued",
        );
        check(
            &mut a,
            &mut b,
            &toks(1100),
            Rows::Last,
            "1100 more tokens (the cache grows)",
        );
        check(
            &mut a,
            &mut b,
            &toks(1),
            Rows::Last,
            "one more step after them",
        );
        let Err(err) = b.forward(&toks(300), Rows::Last) else {
            panic!("{arch:?} {dtype:?}: a forward past the context succeeded");
        };
        assert!(err.to_string().contains("context"), "{err}");
        eprintln!(
            "decode path, {arch:?} {dtype:?}: largest logit difference {worst:.2e} of the row maximum"
        );
    }
}

/// The engine with the step kernels (features, draws and the emitted tokens' log-likelihood on
/// the GPU, `verify::cuda::DeviceRows`) against the same engine with them on the host: the same
/// tokens, acceptances and log-likelihood, greedy and seeded sampling, for a draft model, a
/// self-draft, the judge policy (its logits on the device) and plain decoding.
#[test]
fn the_engine_decides_on_the_gpu_as_on_the_host() {
    use std::sync::Arc;
    use verdict::decide::{PolicyLimits, PolicyRegistry};
    use verdict::draft::DrafterSpec;
    use verdict::engine::{Engine, EngineConfig, GenerateRequest, Speculation};
    use verdict::models::Model;
    use verdict::models::testing::{TinySpec, write_tiny_gguf};
    let device = match cuda::device() {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, seed: u64, layers: usize| {
        let path = dir.path().join(name);
        let spec = TinySpec {
            seed,
            layers,
            vocab: 300,
            ..TinySpec::default()
        };
        write_tiny_gguf(&path, &spec).unwrap();
        Model::load_gguf(&path, &device).unwrap()
    };
    let target = load("target.gguf", 3, 3);
    let draft = load("draft.gguf", 4, 1);
    let h = target.config().hidden_size;
    let head = JudgeHead {
        weight: (0..h).map(|i| (i as f32 * 0.618).sin()).collect(),
        bias: 0.5,
        mean: vec![0.0; h],
        scale: vec![1.0; h],
        threshold: 0.5,
        target: TargetIdentity::of(&target).unwrap(),
        provenance: Default::default(),
    };
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default()).unwrap());
    let gpu = Engine::new(EngineConfig {
        judge: Some(head),
        target,
        draft: Some(draft),
        registry,
        default_policy: "strict".into(),
        default_drafter: Some(DrafterSpec::Model),
        default_k: 4,
        adaptive: false,
        synthetic_acceptance: None,
    })
    .unwrap();
    assert!(
        gpu.features_on_device(),
        "the step kernels serve a CUDA target"
    );
    let host = gpu.clone().host_features();
    assert!(!host.features_on_device());
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[40, 41, 42, 40, 41], &[7; 9]];
    let drafters = [
        Speculation::Off,
        Speculation::Draft {
            drafter: Some(DrafterSpec::Model),
            k: Some(4),
        },
        Speculation::Draft {
            drafter: Some(DrafterSpec::SelfDraft(1)),
            k: Some(3),
        },
    ];
    let mut compared = 0;
    for prompt in prompts {
        for (d, speculation) in drafters.iter().enumerate() {
            for temperature in [0.0, 0.8] {
                for policy in ["strict", "judge"] {
                    let req = || GenerateRequest {
                        prompt: prompt.to_vec(),
                        max_tokens: 24,
                        sampling: SamplingParams {
                            temperature,
                            top_k: 0,
                            top_p: 1.0,
                            min_p: 0.0,
                        },
                        seed: Some(5 + d as u64),
                        speculation: speculation.clone(),
                        policy: Some(policy.into()),
                        ..Default::default()
                    };
                    let run = |e: &Engine| {
                        let mut g = e.start(req()).unwrap();
                        while g.finished().is_none() {
                            g.step().unwrap();
                        }
                        (g.output().to_vec(), g.stats().clone())
                    };
                    let what =
                        format!("prompt {prompt:?}, {speculation:?}, T={temperature}, {policy}");
                    let (a, sa) = run(&gpu);
                    let (b, sb) = run(&host);
                    assert_eq!(a, b, "{what}: tokens");
                    assert_eq!(sa.accepted, sb.accepted, "{what}: accepted");
                    assert_eq!(sa.drafted, sb.drafted, "{what}: drafted");
                    let (la, lb) = (sa.target_logprob, sb.target_logprob);
                    assert!(
                        (la - lb).abs() <= 1e-4 * lb.abs().max(1.0),
                        "{what}: log-likelihood {la} vs {lb}"
                    );
                    compared += 1;
                }
            }
        }
    }
    eprintln!("engine on the GPU vs the host: {compared} runs agree");
}

/// The NCCL communicator of GPU shards (host/models/nccl.rs). On one GPU: the library loads,
/// a one-rank group's sum is the tensor itself (the op runs on the rank's stream), and two
/// shards on one GPU are refused clearly (NCCL itself would fail with "Duplicate GPU"). With two
/// or more GPUs: a tiny model split over GPUs 0 and 1 gives the one-GPU model's logits through
/// a prefill, a 4-token step, a rollback, single steps and a fork.
#[test]
fn shards_on_gpus_sum_through_nccl() {
    use candle_core::quantized::GgmlDType;
    use verdict::models::nccl::{self, NcclGroup};
    use verdict::models::shard::Communicator;
    use verdict::models::testing::{TinySpec, write_tiny_gguf};
    use verdict::models::{Arch, Model, Rows};
    let device = match cuda::device() {
        Ok(d) => d,
        Err(why) => return skip(&why),
    };
    match nccl::available() {
        Ok(v) => eprintln!("NCCL {v}"),
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED NCCL shards: {why}");
            return;
        }
    }
    let one = NcclGroup::new(std::slice::from_ref(&device)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 40), &device).unwrap();
    let y = one.rank(0).all_reduce_sum(&x).unwrap();
    let d = (&y - &x).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(
        d.to_scalar::<f32>().unwrap(),
        0.0,
        "one rank's sum is itself"
    );
    let err = NcclGroup::new(&[device.clone(), device.clone()]).unwrap_err();
    assert!(err.to_string().contains("two shards on GPU"), "{err}");
    let gpus = match nccl::rank_devices(&device, 2) {
        Ok(g) => g,
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the sharded forward over GPUs: {why}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        let spec = TinySpec {
            arch: Arch::Qwen2,
            dtype,
            hidden: 96,
            heads: 6,
            kv_heads: 2,
            intermediate: 192,
            ..TinySpec::default()
        };
        write_tiny_gguf(&path, &spec).unwrap();
        let full = Model::load_gguf(&path, &device).unwrap();
        let sharded = full.shard_across(&gpus).unwrap();
        assert_eq!(sharded.shards(), 2);
        let rows = |s: &mut verdict::models::Session, t: &[u32], r: Rows| -> Vec<Vec<f32>> {
            s.forward(t, r).unwrap().logits.to_vec2::<f32>().unwrap()
        };
        let rel = |a: Vec<Vec<f32>>, b: Vec<Vec<f32>>| -> f32 {
            let (mut d, mut m) = (0f32, 0f32);
            for (x, y) in a.iter().zip(&b) {
                for (p, q) in x.iter().zip(y) {
                    d = d.max((p - q).abs());
                    m = m.max(q.abs());
                }
            }
            d / m
        };
        let (mut a, mut b) = (full.session(), sharded.session());
        let prompt = [5u32, 17, 250, 3, 99, 260, 7, 1, 42];
        let mut worst = rel(
            rows(&mut b, &prompt, Rows::All),
            rows(&mut a, &prompt, Rows::All),
        );
        let more = [11u32, 12, 13, 14, 15, 16];
        worst = worst.max(rel(
            rows(&mut b, &more[..4], Rows::All),
            rows(&mut a, &more[..4], Rows::All),
        ));
        a.truncate(prompt.len() + 1).unwrap();
        b.truncate(prompt.len() + 1).unwrap();
        for &t in &more[4..] {
            worst = worst.max(rel(
                rows(&mut b, &[t], Rows::Last),
                rows(&mut a, &[t], Rows::Last),
            ));
        }
        let (mut fa, mut fb) = (a.fork().unwrap(), b.fork().unwrap());
        worst = worst.max(rel(
            rows(&mut fb, &more[..2], Rows::All),
            rows(&mut fa, &more[..2], Rows::All),
        ));
        let bound = if dtype == GgmlDType::F32 { 1e-4 } else { 2e-2 };
        eprintln!("{dtype:?} over 2 GPUs: max relative logit difference {worst:e}");
        assert!(worst < bound, "{dtype:?}: {worst:e} (bound {bound:e})");
    }
}
