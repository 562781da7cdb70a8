//! The judge head's pipeline on tiny random models: mining finds exactly the positions where the
//! teacher-forced draft disagrees with the target and records the target's hidden state at the
//! drafted token; the labelling rules; training on mined data; the CLI's bad-input errors
//! (another model's head, corrupt files, nothing to mine), and no half-written outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use verdict::judge::humaneval::{self, Problem, Sandbox};
use verdict::judge::mine::{self, Dataset, MineConfig, Miner, Rule};
use verdict::judge::train::{self, TrainConfig};
use verdict::models::chat::ChatTemplate;
use verdict::models::testing::{TinySpec, write_tiny_gguf};
use verdict::models::tokenizer::Tokenizer;
use verdict::models::{Model, Rows};
use verdict::sample::argmax;

fn tiny(dir: &Path, name: &str, seed: u64, layers: usize) -> (PathBuf, Model) {
    let path = dir.join(name);
    let spec = TinySpec {
        seed,
        layers,
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec).unwrap();
    let m = Model::load_gguf(&path, &candle_core::Device::Cpu).unwrap();
    (path, m)
}

fn problem(i: usize, test: &str) -> Problem {
    Problem {
        task_id: format!("toy/{i}"),
        prompt: format!("def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n"),
        test: test.into(),
        entry_point: format!("f{i}"),
    }
}

fn text_tools(m: &Model) -> (Tokenizer, ChatTemplate) {
    let content = m.gguf_metadata().unwrap();
    let tok = Tokenizer::from_gguf(content).unwrap();
    let t = ChatTemplate::from_gguf(content, &tok).unwrap();
    (tok, t)
}

fn miner<'a>(
    target: &'a Model,
    draft: &'a Model,
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    rule: Rule,
) -> Miner<'a> {
    Miner {
        target,
        draft,
        tokenizer: tok,
        template,
        cfg: MineConfig {
            rule,
            max_tokens: 24,
            max_per_prompt: 0,
            draft_temperature: 0.0,
            seed: 0,
            sandbox: Sandbox::default(),
        },
    }
}

#[test]
fn mining_records_every_mismatch_with_the_hidden_state_at_the_drafted_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = tiny(dir.path(), "t.gguf", 1, 2);
    let (_, draft) = tiny(dir.path(), "d.gguf", 2, 1);
    let (tok, template) = text_tools(&target);
    let m = miner(&target, &draft, &tok, &template, Rule::Rejoin { m: 4 });
    let problems: Vec<Problem> = (0..3)
        .map(|i| problem(i, "def check(c):\n    pass\n"))
        .collect();
    let data = mine::mine_all(&m, &problems).unwrap();
    assert!(
        data.len() > 3,
        "random models disagree often: {}",
        data.len()
    );
    assert_eq!(data.hidden.len(), data.len() * target.config().hidden_size);
    // Recompute each prompt's greedy continuation and the draft's teacher-forced choices.
    let stop = tok.eos_ids().to_vec();
    let mut seen = 0;
    for (g, p) in problems.iter().enumerate() {
        let prompt = humaneval::prompt_ids(p, &template, &tok).unwrap();
        let mut s = target.session();
        let mut seq = prompt.clone();
        let mut cont = Vec::new();
        let mut row = s
            .forward(&prompt, Rows::Last)
            .unwrap()
            .logits
            .to_vec2::<f32>()
            .unwrap();
        for _ in 0..24 {
            let t = argmax(&row[0]);
            cont.push(t);
            if stop.contains(&t) {
                break;
            }
            seq.push(t);
            row = s
                .forward(&[t], Rows::Last)
                .unwrap()
                .logits
                .to_vec2::<f32>()
                .unwrap();
        }
        let mut ds = draft.session();
        let input: Vec<u32> = prompt
            .iter()
            .chain(&cont[..cont.len() - 1])
            .copied()
            .collect();
        let rows = ds
            .forward(&input, Rows::All)
            .unwrap()
            .logits
            .to_vec2::<f32>()
            .unwrap();
        let n = prompt.len();
        let mismatches: Vec<usize> = (0..cont.len())
            .filter(|&i| argmax(&rows[n - 1 + i]) != cont[i])
            .collect();
        let mine: Vec<usize> = (0..data.len())
            .filter(|&j| data.group[j] == g as u32)
            .collect();
        assert_eq!(mine.len(), mismatches.len(), "{}", p.task_id);
        for (&j, &i) in mine.iter().zip(&mismatches) {
            let d = argmax(&rows[n - 1 + i]);
            assert_eq!((data.draft_token[j], data.target_token[j]), (d, cont[i]));
            // The judge's input: the hidden state where the drafted token is fed.
            let mut fresh = target.session();
            let forced: Vec<u32> = prompt
                .iter()
                .chain(&cont[..i])
                .chain([&d])
                .copied()
                .collect();
            let h = fresh
                .forward(&forced, Rows::Last)
                .unwrap()
                .hidden
                .to_vec2::<f32>()
                .unwrap();
            let max_diff = h[0]
                .iter()
                .zip(data.row(j))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max_diff < 1e-3, "{} position {i}: {max_diff}", p.task_id);
            seen += 1;
        }
    }
    assert_eq!(seen, data.len());
    // Saved and loaded unchanged; metadata names the target and the rule.
    let path = dir.path().join("mined.safetensors");
    data.save(&path).unwrap();
    let back = Dataset::load(&path).unwrap();
    assert_eq!(back, data);
    assert_eq!(back.meta["rule"], "rejoin:m=4");
    assert_eq!(
        back.meta["target.sha256"],
        verdict::verify::judge::weights_sha256(target.source()).unwrap()
    );
}

#[test]
fn the_tests_rule_labels_by_the_unit_tests_and_skips_prompts_the_target_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = tiny(dir.path(), "t.gguf", 3, 2);
    let (_, draft) = tiny(dir.path(), "d.gguf", 4, 1);
    let (tok, template) = text_tools(&target);
    let m = miner(&target, &draft, &tok, &template, Rule::Tests);
    // The reply lands inside a string literal, so any reply gives a valid program; tests that
    // pass whatever it says make every mismatch acceptable.
    let boxed = |i: usize, check: &str| Problem {
        prompt: format!("def f{i}(x):\n    return x\n\nNOTE = \"\"\"\n"),
        test: format!("\"\"\"\n\ndef check(c):\n    {check}\n"),
        ..problem(i, "")
    };
    let always = boxed(0, "pass");
    let mut d = m.dataset().unwrap();
    let r = m.mine(&always, 0, &mut d).unwrap();
    assert!(r.skipped.is_none());
    assert!(r.labelled > 0 && r.acceptable == r.labelled, "{r:?}");
    // Tests that never hold: the target's own answer fails, so the prompt teaches nothing.
    let never = boxed(1, "assert False");
    let r = m.mine(&never, 1, &mut d).unwrap();
    assert!(r.skipped.unwrap().contains("does not pass"));
    let err = mine::mine_all(&m, &[never]).unwrap_err();
    assert!(format!("{err:#}").contains("skipped"), "{err:#}");
}

#[test]
fn a_draft_that_always_agrees_has_nothing_to_mine() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = tiny(dir.path(), "t.gguf", 5, 2);
    let (tok, template) = text_tools(&target);
    let m = miner(&target, &target, &tok, &template, Rule::Rejoin { m: 4 });
    let err = mine::mine_all(&m, &[problem(0, "def check(c):\n    pass\n")]).unwrap_err();
    assert!(format!("{err:#}").contains("no mismatches"), "{err:#}");
}

#[test]
fn a_draft_at_a_temperature_mines_its_draws_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = tiny(dir.path(), "t.gguf", 5, 2);
    let (tok, template) = text_tools(&target);
    // The target drafting for itself agrees everywhere at T = 0 (the test above); its draws
    // at T = 1.5 part from its argmax, and each parting is a sample.
    let mut m = miner(&target, &target, &tok, &template, Rule::Rejoin { m: 4 });
    m.cfg.draft_temperature = 1.5;
    m.cfg.seed = 7;
    let problems: Vec<Problem> = (0..2)
        .map(|i| problem(i, "def check(c):\n    pass\n"))
        .collect();
    let a = mine::mine_all(&m, &problems).unwrap();
    assert!(a.len() >= 2, "draws part from the argmax: {}", a.len());
    assert!((0..a.len()).all(|j| a.draft_token[j] != a.target_token[j]));
    assert_eq!(a.meta["draft_temperature"], "1.5");
    assert_eq!(
        mine::mine_all(&m, &problems).unwrap(),
        a,
        "same seed, same data"
    );
    m.cfg.seed = 8;
    let b = mine::mine_all(&m, &problems).unwrap();
    assert_ne!(
        (&b.draft_token, &b.group),
        (&a.draft_token, &a.group),
        "another seed draws other tokens"
    );
    // A cap labels that many per prompt, spread over the mismatches.
    m.cfg.max_per_prompt = 1;
    let c = mine::mine_all(&m, &problems).unwrap();
    for g in 0..2u32 {
        let n = c.group.iter().filter(|&&x| x == g).count();
        assert!(n <= 1, "group {g}: {n} samples");
    }
    assert!(!c.is_empty());
}

#[test]
fn a_head_trained_on_mined_data_scores_like_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (_, target) = tiny(dir.path(), "t.gguf", 6, 2);
    let (_, draft) = tiny(dir.path(), "d.gguf", 7, 1);
    let (tok, template) = text_tools(&target);
    let m = miner(&target, &draft, &tok, &template, Rule::Rejoin { m: 4 });
    let problems: Vec<Problem> = (0..6)
        .map(|i| problem(i, "def check(c):\n    pass\n"))
        .collect();
    let mut data = mine::mine_all(&m, &problems).unwrap();
    if data.positives() == 0 || data.positives() == data.len() {
        // Random models rarely re-join; give the trainer both classes by a known rule so the
        // pipeline (not the random labels) is what is tested.
        for i in 0..data.len() {
            data.label[i] = (data.row(i)[0] > 0.0) as u8;
        }
    }
    let t = train::train(&data, &TrainConfig::default()).unwrap();
    assert!(t.train.auc > 0.8, "{}", t.train);
    let path = dir.path().join("head.safetensors");
    t.head.save(&path).unwrap();
    let head = verdict::verify::JudgeHead::load(&path).unwrap();
    head.check_target(&target, "head").unwrap();
    assert!(head.check_target(&draft, "head").is_err());
}

fn verdict_bin() -> &'static str {
    env!("CARGO_BIN_EXE_verdict")
}

#[test]
fn cli_errors_are_clear_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (tpath, target) = tiny(dir.path(), "t.gguf", 8, 2);
    let (dpath, _) = tiny(dir.path(), "d.gguf", 9, 1);
    let (opath, other) = tiny(dir.path(), "o.gguf", 10, 2);
    let problems = dir.path().join("p.jsonl");
    std::fs::write(
        &problems,
        serde_json::to_string(&serde_json::json!({"task_id": "toy/0",
            "prompt": "def f(x):\n    \"\"\"x\"\"\"\n", "test": "def check(c):\n    pass\n",
            "entry_point": "f"}))
        .unwrap()
            + "\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(verdict_bin()).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Mining with a draft identical to the target finds nothing and writes nothing.
    let out = dir.path().join("none.safetensors");
    let (ok, err) = run(&[
        "judge",
        "mine",
        "--target",
        &s(&tpath),
        "--draft",
        &s(&tpath),
        "--problems",
        &s(&problems),
        "--range",
        "0..1",
        "--rule",
        "rejoin",
        "--max-tokens",
        "8",
        "--out",
        &s(&out),
    ]);
    assert!(!ok && err.contains("no mismatches"), "{err}");
    assert!(!out.exists());
    // The held-out half is refused for mining.
    let (ok, err) = run(&["judge", "mine", "--range", "80..90", "--out", &s(&out)]);
    assert!(!ok && err.contains("held out"), "{err}");
    let (ok, err) = run(&["judge", "mine", "--draft-temperature=-1", "--out", &s(&out)]);
    assert!(!ok && err.contains("--draft-temperature"), "{err}");
    // A head for another model, and a corrupt head, refused by generate.
    let mut head = verdict::verify::JudgeHead {
        weight: vec![0.1; other.config().hidden_size],
        bias: 0.0,
        mean: vec![0.0; other.config().hidden_size],
        scale: vec![1.0; other.config().hidden_size],
        threshold: 0.5,
        target: verdict::verify::judge::TargetIdentity::of(&other).unwrap(),
        provenance: Default::default(),
    };
    let hpath = dir.path().join("h.safetensors");
    head.save(&hpath).unwrap();
    let generate = |h: &Path| {
        run(&[
            "generate",
            "--model",
            &s(&tpath),
            "--draft",
            &s(&dpath),
            "--policy",
            "judge",
            "--judge-head",
            &s(h),
            "--max-tokens",
            "4",
            "--prompt",
            "hi",
        ])
    };
    let (ok, err) = generate(&hpath);
    assert!(
        !ok && err.contains("sha256") && err.contains("t.gguf"),
        "{err}"
    );
    head.target = verdict::verify::judge::TargetIdentity::of(&target).unwrap();
    head.save(&hpath).unwrap();
    let (ok, err) = generate(&hpath);
    assert!(ok, "the matching head works: {err}");
    let bytes = std::fs::read(&hpath).unwrap();
    std::fs::write(&hpath, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = generate(&hpath);
    assert!(!ok && err.contains("h.safetensors"), "{err}");
    let _ = opath;
    // Training on a file that is not a dataset.
    let (ok, err) = run(&["judge", "train", "--data", &s(&hpath), "--out", &s(&out)]);
    assert!(
        !ok && err.contains("not a safetensors file") || err.contains("dataset"),
        "{err}"
    );
    assert!(!out.exists());
}
