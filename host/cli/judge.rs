//! `verdict judge mine|train`: make a judge head for a target (see `crate::judge`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};

use super::bench::ModelPair;

use crate::judge::humaneval::{self, Sandbox};
use crate::judge::mine::{self, Dataset, MineConfig, Miner, Rule};
use crate::judge::train::{self, TrainConfig};
use crate::models::Model;
use crate::models::chat::ChatTemplate;
use crate::models::tokenizer::Tokenizer;

#[derive(Subcommand, Debug)]
pub enum JudgeCommand {
    /// Mine labelled hidden states where the draft disagrees with the target.
    Mine(MineArgs),
    /// Train a head (logistic regression) on mined datasets.
    Train(TrainArgs),
}

#[derive(ClapArgs, Debug)]
pub struct MineArgs {
    #[command(flatten)]
    pub pair: ModelPair,
    /// Problems file in HumanEval's format (task_id, prompt, test, entry_point; .jsonl or .gz).
    /// Default: the fetched HumanEval.jsonl.gz.
    #[arg(long)]
    pub problems: Option<PathBuf>,
    /// Which lines of the problems file, `A..B`. The default is HumanEval's training half;
    /// 82..164 is held out for `verdict eval humaneval` and refused here for HumanEval.
    #[arg(long, default_value = "0..82")]
    pub range: String,
    /// Labelling rule: `tests` (the answer with the draft token forced still passes the unit
    /// tests) or `rejoin` (the forced text re-joins the original within --m tokens).
    #[arg(long, default_value = "tests")]
    pub rule: String,
    /// Window of the rejoin rule, tokens.
    #[arg(long, default_value_t = 8)]
    pub m: usize,
    /// Answer length cap, tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Label at most this many mismatches per prompt, spread evenly over the answer (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_per_prompt: usize,
    /// The draft proposes its argmax at 0 (what T = 0 speculation sees), else a draw from its
    /// softmax at this temperature: more mismatches, and more unacceptable ones.
    #[arg(long, default_value_t = 0.0)]
    pub draft_temperature: f32,
    /// Seed of the draft's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds before a test run is killed.
    #[arg(long, default_value_t = 10)]
    pub test_timeout: u64,
    /// Output dataset (safetensors), written atomically at the end.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(ClapArgs, Debug)]
pub struct TrainArgs {
    /// Mined datasets (comma separated), all from the same target.
    #[arg(long, value_delimiter = ',', required = true)]
    pub data: Vec<PathBuf>,
    /// Output head (safetensors), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// The threshold is the lowest whose validation precision reaches this.
    #[arg(long, default_value_t = 0.9)]
    pub precision: f64,
    /// Share of prompts held out for validation.
    #[arg(long, default_value_t = 0.25)]
    pub validation: f64,
    #[arg(long, default_value_t = 400)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// L2 regularisation (AdamW weight decay). Several, comma separated, are each scored by
    /// cross-validation over the training prompts and the best one trains the head.
    #[arg(long, value_delimiter = ',', default_value = "0.05")]
    pub weight_decay: Vec<f64>,
    /// Folds of that cross-validation (by prompt).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: JudgeCommand) -> Result<()> {
    match cmd {
        JudgeCommand::Mine(a) => run_mine(a),
        JudgeCommand::Train(a) => run_train(a),
    }
}

/// `A..B` as a range.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("range `{s}`: expected A..B, e.g. 0..82"))?;
    let a: usize = a
        .trim()
        .parse()
        .with_context(|| format!("range `{s}`: `{a}` is not a number"))?;
    let b: usize = b
        .trim()
        .parse()
        .with_context(|| format!("range `{s}`: `{b}` is not a number"))?;
    if a >= b {
        bail!("range `{s}` is empty");
    }
    Ok(a..b)
}

/// The target's tokenizer and chat template.
pub fn text_tools(target: &Model) -> Result<(Tokenizer, ChatTemplate)> {
    let content = target.gguf_metadata().with_context(|| {
        format!(
            "{}: no GGUF metadata (tokenizer)",
            target.source().display()
        )
    })?;
    let tok = Tokenizer::from_gguf(content)?;
    let template = ChatTemplate::from_gguf(content, &tok)?;
    Ok((tok, template))
}

fn run_mine(a: MineArgs) -> Result<()> {
    let dir = super::bench::models_dir();
    let device = candle_core::Device::Cpu;
    let (target_path, draft_path) = a.pair.paths();
    let problems_path = a.problems.unwrap_or_else(|| dir.join("HumanEval.jsonl.gz"));
    let range = parse_range(&a.range).context("--range")?;
    let rule = match a.rule.as_str() {
        "tests" => Rule::Tests,
        "rejoin" if a.m > 0 => Rule::Rejoin { m: a.m },
        "rejoin" => bail!("--m must be at least 1"),
        r => bail!("--rule: `{r}` is not a rule (tests or rejoin)"),
    };
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !a.draft_temperature.is_finite() || a.draft_temperature < 0.0 {
        bail!(
            "--draft-temperature must be a finite number >= 0, got {}",
            a.draft_temperature
        );
    }
    let problems = humaneval::load(&problems_path, range.clone())?;
    if problems.is_empty() {
        bail!(
            "{}: no problems in lines {range:?}",
            problems_path.display()
        );
    }
    if problems.iter().any(|p| {
        p.task_id
            .strip_prefix("HumanEval/")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= humaneval::HELD_OUT_FROM)
    }) {
        bail!(
            "--range {}: HumanEval/{}.. is held out for evaluation; mine on 0..{} or other prompts",
            a.range,
            humaneval::HELD_OUT_FROM,
            humaneval::HELD_OUT_FROM
        );
    }
    let target = Model::load_gguf(&target_path, &device)
        .with_context(|| format!("loading the target {}", target_path.display()))?;
    let draft = Model::load_gguf(&draft_path, &device)
        .with_context(|| format!("loading the draft {}", draft_path.display()))?;
    crate::engine::check_same_tokenizer(&target, &draft)?;
    let (tokenizer, template) = text_tools(&target)?;
    let miner = Miner {
        target: &target,
        draft: &draft,
        tokenizer: &tokenizer,
        template: &template,
        cfg: MineConfig {
            rule,
            max_tokens: a.max_tokens,
            max_per_prompt: a.max_per_prompt,
            draft_temperature: a.draft_temperature,
            seed: a.seed,
            sandbox: Sandbox {
                timeout: Duration::from_secs(a.test_timeout.max(1)),
                ..Sandbox::default()
            },
        },
    };
    let mut data = mine::mine_all(&miner, &problems)?;
    data.meta.insert(
        "problems".into(),
        format!(
            "{} lines {}",
            problems_path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            a.range
        ),
    );
    data.meta
        .insert("max_tokens".into(), a.max_tokens.to_string());
    data.save(&a.out)?;
    println!(
        "wrote {}: {} samples ({} acceptable) from {} prompts",
        a.out.display(),
        data.len(),
        data.positives(),
        problems.len()
    );
    Ok(())
}

fn run_train(a: TrainArgs) -> Result<()> {
    let mut data = Dataset::default();
    for p in &a.data {
        let d = Dataset::load(p)?;
        data.extend(&d, &p.display().to_string())?;
    }
    if !(0.0..1.0).contains(&a.validation) {
        bail!("--validation must be in [0, 1), got {}", a.validation);
    }
    if a.weight_decay.iter().any(|w| !w.is_finite() || *w < 0.0) {
        bail!("--weight-decay: each must be a finite number >= 0");
    }
    if a.folds < 2 {
        bail!("--folds must be at least 2");
    }
    if !(0.0..=1.0).contains(&a.precision) {
        bail!("--precision must be in [0, 1], got {}", a.precision);
    }
    let cfg = TrainConfig {
        validation: a.validation,
        target_precision: a.precision,
        epochs: a.epochs,
        lr: a.lr,
        weight_decays: a.weight_decay.clone(),
        folds: a.folds,
        seed: a.seed,
    };
    let mut t = train::train(&data, &cfg)?;
    for (wd, auc) in &t.cv {
        println!("cv: weight_decay={wd} auc={auc:.3}");
    }
    println!("weight_decay: {}", t.weight_decay);
    println!("train:      {}", t.train);
    println!("validation: {}", t.validation);
    let names: Vec<String> = a.data.iter().map(|p| p.display().to_string()).collect();
    let prov = &mut t.head.provenance;
    prov.insert("data".into(), names.join(","));
    for (k, v) in &data.meta {
        prov.insert(format!("data.{k}"), v.clone());
    }
    prov.insert(
        "train".into(),
        format!(
            "precision={} validation={} epochs={} lr={} weight_decay={} seed={}",
            a.precision, a.validation, a.epochs, a.lr, t.weight_decay, a.seed
        ),
    );
    if !t.cv.is_empty() {
        let cv: Vec<String> = t.cv.iter().map(|(w, a)| format!("{w}:{a:.3}")).collect();
        prov.insert(
            "metrics.cv".into(),
            format!("{}-fold auc by weight_decay {}", a.folds, cv.join(" ")),
        );
    }
    prov.insert("metrics.train".into(), t.train.to_string());
    prov.insert("metrics.validation".into(), t.validation.to_string());
    t.head.save(&a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
