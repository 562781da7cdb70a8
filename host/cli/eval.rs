//! `verdict eval humaneval`: policies side by side on held-out HumanEval (see `crate::judge::eval`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};

use super::bench::ModelPair;

use crate::decide::{PolicyLimits, PolicyRegistry};
use crate::draft::DrafterSpec;
use crate::engine::{Engine, EngineConfig};
use crate::judge::eval::{self, EvalConfig, Evaluator};
use crate::judge::humaneval::{self, Sandbox};
use crate::models::Model;
use crate::verify::HeadChoice;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// pass@1, tokens per step, tokens/s and target log-likelihood per policy on HumanEval.
    Humaneval(HumanevalArgs),
}

#[derive(ClapArgs, Debug)]
pub struct HumanevalArgs {
    #[command(flatten)]
    pub pair: ModelPair,
    /// Problems file (HumanEval's format); default: the fetched HumanEval.jsonl.gz.
    #[arg(long)]
    pub problems: Option<PathBuf>,
    /// Lines of the problems file, `A..B` (default: the held-out half, never mined).
    #[arg(long, default_value = "82..164")]
    pub range: String,
    /// Evaluate only the first N problems of the range.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Configurations, comma separated between `;`: `target` (autoregressive) or
    /// `POLICY[:name=value,...]`, e.g. `target;strict;judge:threshold=0.5;threshold:rule=0`.
    #[arg(
        long,
        default_value = "target;strict;judge:threshold=0.3;judge:threshold=0.5;judge:threshold=0.7;threshold:rule=0"
    )]
    pub configs: String,
    /// Speculation length (fixed).
    #[arg(long, default_value_t = 16)]
    pub k: usize,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Judge head: `auto` (the shipped head for this target), `none`, or a file.
    #[arg(long, default_value = "auto")]
    pub judge_head: String,
    /// Seconds before a test run is killed.
    #[arg(long, default_value_t = 10)]
    pub test_timeout: u64,
    /// Write every configuration's results (per problem) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the pass@1 vs tokens/step plot (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Humaneval(a) => run_humaneval(a),
    }
}

fn run_humaneval(a: HumanevalArgs) -> Result<()> {
    let dir = super::bench::models_dir();
    let device = candle_core::Device::Cpu;
    let (target_path, draft_path) = a.pair.paths();
    let problems_path = a.problems.unwrap_or_else(|| dir.join("HumanEval.jsonl.gz"));
    let range = super::judge::parse_range(&a.range).context("--range")?;
    let configs: Vec<EvalConfig> = a
        .configs
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(EvalConfig::parse)
        .collect::<Result<_>>()
        .context("--configs")?;
    if configs.is_empty() {
        bail!("--configs: give at least one configuration");
    }
    if a.k == 0 || a.k > crate::engine::MAX_K {
        bail!("--k must be in 1..={}", crate::engine::MAX_K);
    }
    let mut problems = humaneval::load(&problems_path, range)?;
    if let Some(n) = a.limit {
        problems.truncate(n);
    }
    if problems.is_empty() {
        bail!(
            "no problems to evaluate in {} lines {}",
            problems_path.display(),
            a.range
        );
    }
    humaneval::check_python()?;
    let target = Model::load_gguf(&target_path, &device)
        .with_context(|| format!("loading the target {}", target_path.display()))?;
    let draft = Model::load_gguf(&draft_path, &device)
        .with_context(|| format!("loading the draft {}", draft_path.display()))?;
    // Lazy kernel set-up would otherwise slow whichever configuration runs first.
    target.warm_up()?;
    draft.warm_up()?;
    let judge = HeadChoice::parse(&a.judge_head).load(&target)?;
    let needs_judge = configs.iter().any(|c| c.policy.as_deref() == Some("judge"));
    if needs_judge && judge.is_none() {
        bail!(
            "a `judge` configuration needs a judge head and none matches {} (pass --judge-head FILE)",
            target_path.display()
        );
    }
    let (tokenizer, template) = super::judge::text_tools(&target)?;
    let engine = Engine::new(EngineConfig {
        target,
        draft: Some(draft),
        registry: Arc::new(PolicyRegistry::in_memory(PolicyLimits::default())?),
        default_policy: "strict".into(),
        default_drafter: Some(DrafterSpec::Model),
        default_k: a.k,
        adaptive: false,
        synthetic_acceptance: None,
        judge,
    })?;
    let ev = Evaluator {
        engine: &engine,
        tokenizer: &tokenizer,
        template: &template,
        sandbox: Sandbox {
            timeout: Duration::from_secs(a.test_timeout.max(1)),
            ..Sandbox::default()
        },
        k: a.k,
        max_tokens: a.max_tokens,
    };
    let mut rows = Vec::new();
    for c in &configs {
        rows.push(ev.run(c, &problems)?);
    }
    let title = format!(
        "HumanEval {} ({} problems), k = {}, T = 0",
        a.range,
        problems.len(),
        a.k
    );
    println!("{title}\n");
    print!("{}", eval::table(&rows));
    if let Some(p) = &a.json {
        let json = serde_json::to_vec_pretty(&rows)?;
        crate::files::write_atomic(p, &json)?;
    }
    if let Some(p) = &a.svg {
        crate::files::write_atomic(p, eval::svg(&rows, &title).as_bytes())?;
    }
    Ok(())
}
