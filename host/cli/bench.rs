//! `verdict bench spec`: speculative vs autoregressive decoding side by side, in one run on one
//! machine, on HumanEval prompts. Prints a markdown table of tokens/s, tokens per step and the
//! speed ratio to autoregressive decoding for every drafter x policy x k asked for.
//! `verdict bench forward`: the cost of one forward over n new tokens (all rows' logits, as
//! verification needs), the figure speculation's speed rests on.
//! `verdict bench lookup`: prompt lookup's rules replayed on the target's greedy answers with
//! the measured forward costs (which rule to measure for real).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};

use crate::cli::generate::{DeviceArg, load_draft, parse_device};
use crate::decide::{PolicyLimits, PolicyRegistry};
use crate::draft::DrafterSpec;
use crate::engine::{AdaptiveK, Engine, EngineConfig, GenerateRequest, SpecPhases, Speculation};
use crate::models::chat::{ChatTemplate, Message};
use crate::models::synth::{self, SynthShape};
use crate::models::tokenizer::Tokenizer;
use crate::models::transformer::Rows;
use crate::models::{KvDtype, Model, Session};
use crate::sample::SamplingParams;
use candle_core::quantized::GgmlDType;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Speculative vs autoregressive decoding on HumanEval prompts.
    Spec(SpecArgs),
    /// The time of one forward over n new tokens after a context, logits for every row (the
    /// verification forward), per n.
    Forward(ForwardArgs),
    /// Prompt lookup's rules replayed on the target's greedy answers: strict at T = 0 keeps
    /// exactly the drafted tokens that equal the answer, so each rule's steps and verified rows
    /// follow from the answer alone; with the measured forward cost per row count, this predicts
    /// each rule's speed against autoregressive decoding (to choose which to measure).
    Lookup(LookupArgs),
    /// A GGUF with random weights at a real model's layout (GPU speed runs where the real
    /// weights cannot travel), or just the header of a GGUF (metadata, tokenizer, tensor infos).
    Synth(SynthArgs),
    /// Embeddings of many texts, one text per forward against texts batched into forwards of
    /// up to N tokens (what `/v1/embeddings` does with a request's texts), per text length.
    Embed(EmbedArgs),
    /// The CPU matrix kernels on random matrices out of cache: a product's time and rate per
    /// activation row count (one row is a decode step; 17 a k = 16 verification).
    Gemm(GemmArgs),
}

#[derive(ClapArgs, Debug)]
pub struct GemmArgs {
    /// The matrices' type (q4_k, q5_k, q6_k, q8_0, q5_0, q4_0, q4_1).
    #[arg(long, default_value = "q4_k", value_parser = parse_dtype)]
    pub dtype: GgmlDType,
    /// Matrix shapes, `NxK` (outputs x inputs), comma separated; the defaults are the 1.5B
    /// target's MLP up and down projections.
    #[arg(long, default_value = "8960x1536,1536x8960")]
    pub shape: String,
    /// Activation rows per product, comma separated.
    #[arg(long, default_value = "1,8,17,32")]
    pub rows: String,
    /// Copies of each matrix multiplied in turn, so none is in cache when it comes round again
    /// (as a forward's matrices are not).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub copies: u32,
    /// Timed rounds (over all the copies); min and median are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// CPU threads for the matrix kernels (default: one per physical core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
}

#[derive(ClapArgs, Debug)]
pub struct EmbedArgs {
    /// The model (GGUF; default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The texts: consecutive non-empty lines of this file (e.g. host/models/transformer.rs).
    #[arg(long)]
    pub file: PathBuf,
    /// Lines per text, comma separated (one table row each).
    #[arg(long, default_value = "1,12")]
    pub lines: String,
    /// Texts per run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub texts: u32,
    /// Batch sizes to time against one text per forward, in tokens, comma separated.
    #[arg(long, default_value = "512,2048")]
    pub batch_tokens: String,
    /// Timed runs of each (alternating order, after a warm-up); the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// CPU threads for the matrix kernels (default: one per physical core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
}

#[derive(ClapArgs, Debug)]
pub struct ForwardArgs {
    /// The model (GGUF).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub lora: crate::cli::generate::LoraArgs,
    /// New tokens per forward, comma separated.
    #[arg(long, default_value = "1,8,16")]
    pub tokens: String,
    /// Tokens in the KV cache before each timed forward.
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    /// Timed forwards per size, after one warm-up; the median is reported.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// KV cache types to compare, comma separated (f32, f16, bf16, q8_0): each size is timed on
    /// a sequence of each, one after the other.
    #[arg(long, value_name = "LIST", default_value = "f32")]
    pub kv_cache_dtype: String,
    /// CPU threads for the matrix kernels (default: one per physical core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
}

#[derive(ClapArgs, Debug)]
pub struct LookupArgs {
    /// The target (GGUF; default: the fetched Qwen2.5-Coder-1.5B-Instruct).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Prompts: one JSON object per line whose `prompt` is the user's message (e.g.
    /// bench/prompts/coding12.jsonl).
    #[arg(long)]
    pub prompts_file: PathBuf,
    /// Only the lines whose `kind` is this (e.g. `edit`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Greedy tokens per answer (answers also end at end of turn).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// The largest draft length to replay.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub k: u32,
    /// Timed forwards per row count (after one warm-up); the median is used.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// A JSON file of the prompts' tokens and their greedy answers: read when it exists (the
    /// answers are not generated again, and --max-tokens does not apply), written otherwise.
    /// Replays of new rules then cost only the timed forwards.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// CPU threads for the matrix kernels (default: one per physical core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
}

#[derive(ClapArgs, Debug)]
pub struct SynthArgs {
    /// A GGUF, or a header written by `--header-only`.
    #[arg(long)]
    pub from: PathBuf,
    /// Where to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Write only the header of --from (a few MB) instead of a model.
    #[arg(long)]
    pub header_only: bool,
    /// `like`: --from's own tensors; `llama-3.1-8b`: that model's dimensions (Q4_K) with
    /// --from's tokenizer.
    #[arg(long, default_value = "like", value_parser = parse_shape)]
    pub shape: SynthShape,
    /// The type of every matrix instead of the layout's (f32, f16, bf16, q8_0, q4_k, q6_k, ...).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<GgmlDType>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_dtype(s: &str) -> Result<GgmlDType, String> {
    synth::parse_dtype(s).ok_or_else(|| format!("`{s}`: unknown tensor type"))
}

fn parse_shape(s: &str) -> Result<SynthShape, String> {
    SynthShape::parse(s).ok_or_else(|| format!("`{s}`: expected like or llama-3.1-8b"))
}

#[derive(ClapArgs, Debug)]
pub struct SpecArgs {
    #[command(flatten)]
    pub pair: ModelPair,
    /// Drafters to compare, comma separated: model, prompt-lookup, prompt-lookup:N, self:N, auto.
    #[arg(long, default_value = "model,prompt-lookup")]
    pub drafters: String,
    /// Policies to compare, comma separated (name or name@version).
    #[arg(long, default_value = "strict")]
    pub policies: String,
    /// Speculation lengths, comma separated.
    #[arg(long, default_value = "4,8")]
    pub k: String,
    /// Also run each configuration with adaptive k (k_max = the largest k).
    #[arg(long)]
    pub adaptive: bool,
    /// How many HumanEval prompts (taken from the held-out second half).
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Tokens to generate per prompt (generation also stops at end of turn).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// HumanEval file (default: the fetched HumanEval.jsonl.gz).
    #[arg(long)]
    pub humaneval: Option<PathBuf>,
    /// Prompts from this JSONL file instead of HumanEval: one object per line whose `prompt`
    /// is sent as the user's message as it is (e.g. bench/prompts/coding12.jsonl); --prompts
    /// still caps how many.
    #[arg(long, conflicts_with = "humaneval")]
    pub prompts_file: Option<PathBuf>,
    /// Judge head for policies that need judge logits: `auto` (the shipped head when it matches
    /// the target), `none`, or a head file (safetensors, from `verdict judge train`).
    #[arg(long, value_name = "auto|none|PATH", default_value = "auto")]
    pub judge_head: String,
    /// Write one JSON object per configuration here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Rounds over all configurations, interleaved; each row reports its median round and the
    /// range over the rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// The draft model's lm_head cut to its first N ids and the special tokens (plus each
    /// request's own ids), comma separated; 0 keeps the whole vocabulary; the default is
    /// `serve`'s. Several values run the draft-model drafters once per value, side by side.
    #[arg(long, default_value_t = crate::cli::serve::DEFAULT_DRAFT_VOCAB.to_string())]
    pub draft_vocab: String,
    /// Speed runs on random weights (`verdict bench synth`) only: accept each drafted token
    /// with this probability instead of the policy's verdict, e.g. the rate measured on the
    /// real pair (vLLM and llama.cpp offer the same mode). The output is not the target's; the
    /// table labels these rows.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub synthetic_acceptance: Option<f64>,
    /// What the KV caches (target and draft model) store: f32, f16, bf16 or q8_0.
    #[arg(long, value_name = "f32|f16|bf16|q8_0", default_value = "f32", value_parser = KvDtype::parse)]
    pub kv_cache_dtype: KvDtype,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a probability in [0, 1]")),
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Spec(a) => spec(a),
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Lookup(a) => lookup(a),
        BenchCommand::Synth(a) => synth(a),
        BenchCommand::Embed(a) => embed(a),
        BenchCommand::Gemm(a) => gemm(a),
    }
}

fn gemm(a: GemmArgs) -> Result<()> {
    if let Some(n) = a.threads {
        crate::cli::generate::configure_threads(n);
    }
    let rows = counts(&a.rows, "--rows")?;
    let shapes = a
        .shape
        .split(',')
        .map(|s| {
            let dims = s.trim().split_once('x').and_then(|(n, k)| {
                Some((
                    n.trim().parse::<usize>().ok()?,
                    k.trim().parse::<usize>().ok()?,
                ))
            });
            match dims {
                Some((n, k)) if n >= 1 && k >= 1 => Ok((n, k)),
                _ => bail!("--shape: `{s}` is not NxK with positive N and K"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    println!(
        "{:?} products, {} copies per shape, {} rounds",
        a.dtype, a.copies, a.rounds
    );
    println!("| shape | rows | min us | median us | GMAC/s (median) |");
    println!("| --- | --- | --- | --- | --- |");
    for &(n, k) in &shapes {
        let block = a.dtype.block_size();
        if !k.is_multiple_of(block) {
            bail!(
                "--shape {n}x{k}: K must be whole {:?} blocks of {block} values",
                a.dtype
            );
        }
    }
    for (n, k) in shapes {
        let times = crate::models::time_products(
            a.dtype,
            (n, k),
            &rows,
            a.copies as usize,
            a.rounds as usize,
        )
        .with_context(|| format!("timing {n}x{k}"))?;
        let Some(times) = times else {
            bail!(
                "no CPU kernel for {:?} {n}x{k} here (the kernels need AVX-512 VNNI and whole blocks along K)",
                a.dtype
            );
        };
        for (m, mut t) in rows.iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            let rate = (m * n * k) as f64 / median / 1e3;
            println!("| {n}x{k} | {m} | {:.0} | {median:.0} | {rate:.1} |", t[0]);
        }
    }
    Ok(())
}

/// A comma-separated list of positive counts (`flag` names it in errors).
fn counts(list: &str, flag: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("{flag}: `{s}` is not a positive count"),
        })
        .collect()
}

/// Must run before anything starts a thread (see `--threads`).
fn embed(a: EmbedArgs) -> Result<()> {
    use crate::models::embed::{Pooling, embed_batch};
    if let Some(n) = a.threads {
        crate::cli::generate::configure_threads(n);
    }
    let lines = counts(&a.lines, "--lines")?;
    let sizes = counts(&a.batch_tokens, "--batch-tokens")?;
    let path = a
        .model
        .clone()
        .unwrap_or_else(|| models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let model = Model::load_gguf(&path, &a.device.open()?)
        .with_context(|| format!("loading {}", path.display()))?;
    let meta = model
        .gguf_metadata()
        .context("the model has no GGUF metadata")?;
    let tokenizer = Tokenizer::from_gguf(meta)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let source: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    model.warm_up()?;
    println!(
        "{}: {} texts of consecutive lines of {}, last-token pooling, median of {} rounds",
        path.display(),
        a.texts,
        a.file.display(),
        a.rounds
    );
    let mut head = "| lines per text | texts | tokens | one per forward (s) |".to_string();
    let mut rule = "| --- | --- | --- | --- |".to_string();
    for n in &sizes {
        head += &format!(" batched, {n} tokens (s) | speed-up |");
        rule += " --- | --- |";
    }
    println!("{head}\n{rule}");
    for &per in &lines {
        let texts = source
            .chunks(per)
            .take(a.texts as usize)
            .map(|c| tokenizer.encode(&c.join("\n"), false))
            .collect::<Result<Vec<_>>>()?;
        if texts.len() < a.texts as usize {
            bail!(
                "{} holds {} texts of {per} lines, fewer than --texts {}",
                a.file.display(),
                texts.len(),
                a.texts
            );
        }
        let tokens: usize = texts.iter().map(Vec::len).sum();
        // Batch size 0 is one text per forward.
        let runs: Vec<usize> = std::iter::once(0).chain(sizes.iter().copied()).collect();
        let mut seconds = vec![Vec::new(); runs.len()];
        for round in 0..=a.rounds {
            let order: Vec<usize> = match round % 2 {
                0 => (0..runs.len()).collect(),
                _ => (0..runs.len()).rev().collect(),
            };
            for i in order {
                let t0 = std::time::Instant::now();
                embed_batch(&model, &texts, Pooling::Last, runs[i], |_| true)?;
                // Round 0 warms up.
                if round > 0 {
                    seconds[i].push(t0.elapsed().as_secs_f64());
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = median(&mut seconds[0]);
        let mut row = format!("| {per} | {} | {tokens} | {base:.3} |", texts.len());
        for s in seconds.iter_mut().skip(1) {
            let m = median(s);
            row += &format!(" {m:.3} | {:.2}x |", base / m);
        }
        println!("{row}");
    }
    Ok(())
}

/// Must run before anything starts a thread (see `--threads`).
fn forward(a: ForwardArgs) -> Result<()> {
    if let Some(n) = a.threads {
        crate::cli::generate::configure_threads(n);
    }
    let sizes = counts(&a.tokens, "--tokens")?;
    let largest = sizes.iter().copied().max().unwrap_or(1);
    let device = a.device.open()?;
    let adapters = a.lora.load()?;
    let model = Model::load_gguf(&a.model, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let model = a.lora.apply(model, &adapters)?;
    let dtypes = list(&a.kv_cache_dtype)
        .iter()
        .map(|d| KvDtype::parse(d).map_err(|e| anyhow::anyhow!("--kv-cache-dtype {e}")))
        .collect::<Result<Vec<_>>>()?;
    if dtypes.is_empty() {
        bail!("--kv-cache-dtype: give at least one of f32, f16, bf16, q8_0");
    }
    model.warm_up().context("warming up the model")?;
    let max_len = model.max_context();
    if a.context + largest > max_len {
        bail!(
            "--context {} + {largest} new tokens exceeds the model's context of {max_len}",
            a.context,
        );
    }
    // Fixed, spread-out token ids: the cost does not depend on which tokens they are.
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..(a.context + largest) as u64)
        .map(|i| ((i * 2_654_435_761 + 17) % vocab) as u32)
        .collect();
    // One sequence per cache type, each holding the context.
    let mut sessions = Vec::new();
    for &d in &dtypes {
        let mut s = model.with_kv_cache_dtype(d)?.session();
        if a.context > 0 {
            s.forward(&ids[..a.context], Rows::Last)?;
        }
        sessions.push(s);
    }
    let with = adapters
        .iter()
        .map(|l| format!(" + LoRA {}", l.path().display()))
        .collect::<String>();
    println!(
        "{}{with}: forward over n new tokens after {} of context, logits for every row ({} rounds)",
        a.model.display(),
        a.context,
        a.rounds
    );
    println!("| new tokens | KV cache | median ms | min ms | max ms | ms per token |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &n in &sizes {
        for (s, d) in sessions.iter_mut().zip(&dtypes) {
            let ms = time_forward(s, &ids[a.context..a.context + n], a.rounds)?;
            let median = ms[ms.len() / 2];
            println!(
                "| {n} | {} | {median:.1} | {:.1} | {:.1} | {:.1} |",
                d,
                ms[0],
                ms[ms.len() - 1],
                median / n as f64
            );
        }
    }
    Ok(())
}

/// Each step of strict prompt lookup at T = 0 over `answer` (after `prompt`), drafting with
/// `rule`, as (drafted, accepted); the step verified drafted + 1 rows. The first answer token
/// comes from the prefill. `k(left, last)` gives each step's draft length from the answer tokens
/// still to come and the last step's (drafted, accepted): a fixed k, or the engine's adaptive k
/// fed what the engine would measure.
pub fn replay_lookup(
    rule: &crate::draft::PromptLookup,
    prompt: &[u32],
    answer: &[u32],
    mut k: impl FnMut(usize, Option<(usize, usize)>) -> usize,
) -> Vec<(usize, usize)> {
    let mut context = prompt.to_vec();
    context.extend_from_slice(answer);
    let mut steps = Vec::new();
    let mut last = None;
    let mut p = 1.min(answer.len());
    while p < answer.len() {
        let left = answer.len() - p;
        let draft = rule.draft(&context[..prompt.len() + p], k(left, last));
        let accepted = draft
            .iter()
            .zip(&answer[p..])
            .take_while(|(d, a)| d == a)
            .count();
        steps.push((draft.len(), accepted));
        last = Some((draft.len(), accepted));
        p += (accepted + 1).min(left);
    }
    steps
}

/// Least-squares (intercept, slope) of the points; a single point gives a flat line.
fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len().max(1) as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

/// Must run before anything starts a thread (see `--threads`).
fn lookup(a: LookupArgs) -> Result<()> {
    use crate::draft::PromptLookup;
    if let Some(n) = a.threads {
        crate::cli::generate::configure_threads(n);
    }
    let target_path = a
        .target
        .clone()
        .unwrap_or_else(|| models_dir().join("qwen2.5-coder-1.5b.gguf"));
    let device = a.device.open()?;
    let target = Model::load_gguf(&target_path, &device)
        .with_context(|| format!("loading {}", target_path.display()))?;
    target.warm_up()?;
    let messages = jsonl_prompts(&a.prompts_file, usize::MAX, a.kind.as_deref())?;
    let (prompts, eos) = chat_prompts(&target, messages)?;
    let k = a.k as usize;
    // The greedy answers, and the forward cost of 1..=k+1 rows after a prompt.
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default())?);
    let engine = Engine::new(EngineConfig {
        judge: None,
        target,
        draft: None,
        registry,
        default_policy: "strict".into(),
        default_drafter: None,
        default_k: k,
        adaptive: false,
        synthetic_acceptance: None,
    })?;
    let pairs = match a.answers.as_deref().filter(|p| p.exists()) {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let pairs: Vec<(Vec<u32>, Vec<u32>)> =
                serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{}: not a list of [prompt, answer] token lists",
                        path.display()
                    )
                })?;
            // Answers to other prompts (another prompts file, --kind or template) would replay
            // the wrong text.
            if pairs.len() != prompts.len() || pairs.iter().zip(&prompts).any(|(p, q)| &p.0 != q) {
                bail!(
                    "{}: its answers are for other prompts than {} gives (delete it to generate them again)",
                    path.display(),
                    a.prompts_file.display()
                );
            }
            pairs
        }
        None => {
            let mut pairs = Vec::new();
            for prompt in prompts {
                let mut g = engine
                    .start(greedy(&prompt, a.max_tokens, &eos, Speculation::Off))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                while g.finished().is_none() {
                    g.step()?;
                }
                eprintln!("lookup: answer of {} tokens", g.output().len());
                pairs.push((prompt, g.output().to_vec()));
            }
            if let Some(path) = &a.answers {
                crate::files::write_atomic(path, serde_json::to_string(&pairs)?.as_bytes())?;
            }
            pairs
        }
    };
    let mut s = engine.target().session();
    s.forward(&pairs[0].0, Rows::Last)?;
    let ids: Vec<u32> = pairs[0].1.iter().copied().cycle().take(k + 1).collect();
    let mut cost = vec![0f64; k + 2];
    for (n, c) in cost.iter_mut().enumerate().skip(1) {
        let ms = time_forward(&mut s, &ids[..n], a.rounds)?;
        *c = ms[ms.len() / 2];
    }
    println!(
        "forward ms by rows: {}",
        (1..=k + 1)
            .map(|n| format!("{n}: {:.1}", cost[n]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A line through the medians: single medians on a busy CPU are noisy (and not monotonic),
    // and one outlier would favour whichever draft length it happened to hit.
    let (a0, b0) = fit_line(&(1..=k + 1).map(|n| (n as f64, cost[n])).collect::<Vec<_>>());
    for (n, c) in cost.iter_mut().enumerate().skip(1) {
        *c = a0 + b0 * n as f64;
    }
    println!("fitted: {a0:.1} ms + {b0:.1} ms per row");
    let tokens: usize = pairs.iter().map(|(_, a)| a.len().saturating_sub(1)).sum();
    let plain = tokens as f64 * cost[1];
    let mut results = Vec::new();
    for min_ngram in 1..=3 {
        for max_ngram in [4, 8, 16] {
            for per_match in [0, 1, 2] {
                for kk in 1..=k {
                    let rule = PromptLookup {
                        min_ngram,
                        max_ngram,
                        per_match,
                    };
                    let (mut steps, mut drafted, mut ms) = (0usize, 0usize, 0f64);
                    for (prompt, answer) in &pairs {
                        for (d, _) in replay_lookup(&rule, prompt, answer, |left, _| kk.min(left)) {
                            steps += 1;
                            drafted += d;
                            ms += cost[d + 1];
                        }
                    }
                    results.push((plain / ms.max(1e-9), rule, kk, steps, drafted));
                }
            }
        }
    }
    results.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "{} prompts, {tokens} decode tokens; predicted speed of strict prompt lookup at T = 0",
        pairs.len()
    );
    // One line per replay of the default rule over all prompts: its steps, tokens per step and
    // predicted speed, each step priced by the fitted cost of the rows `rows` says it verified.
    let report = |label: String, steps: &[(usize, usize)], rows: fn(&(usize, usize)) -> usize| {
        let ms: f64 = steps.iter().map(|s| cost[rows(s)]).sum();
        println!(
            "default rule, {label}: {} steps, {:.2} tokens/step, predicted {:.2}x",
            steps.len(),
            tokens as f64 / steps.len().max(1) as f64,
            plain / ms.max(1e-9)
        );
    };
    // Adaptive k as the engine runs it, under the fitted costs (in seconds, as it measures).
    let secs: Vec<f64> = cost.iter().map(|c| c / 1e3).collect();
    for (name, fit) in [
        ("fitted verify slope", true),
        ("prior ratio, no fit", false),
    ] {
        let mut steps = Vec::new();
        for (prompt, answer) in &pairs {
            let mut a = if fit {
                AdaptiveK::new(k)
            } else {
                AdaptiveK::without_fit(k)
            };
            // As the engine: observe each step (a plain one too), cap k by what is left.
            steps.extend(replay_lookup(
                &PromptLookup::default(),
                prompt,
                answer,
                |left, last| {
                    if let Some((drafted, accepted)) = last {
                        a.observe(drafted, accepted, 0.0, secs[drafted + 1]);
                    }
                    a.next_k().min(left - 1)
                },
            ));
        }
        report(format!("adaptive k<={k}, {name}"), &steps, |&(d, _)| d + 1);
    }
    // The ceiling of any k rule for the default lookup: draft exactly the tokens the target
    // will keep (k <= --k), known only in hindsight. The gap to adaptive k is what a better
    // predictor of acceptance could still win; past it, only a cheaper verified row helps.
    let hindsight: Vec<_> = pairs
        .iter()
        .flat_map(|(prompt, answer)| {
            replay_lookup(&PromptLookup::default(), prompt, answer, |left, _| {
                k.min(left)
            })
        })
        .collect();
    report(
        format!("k<={k} chosen in hindsight (the ceiling of any k rule)"),
        &hindsight,
        |&(_, accepted)| accepted + 1,
    );
    println!(
        "| min n | max n | per match | k | steps | drafted | tokens/step | predicted vs autoregressive |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let default = PromptLookup::default();
    for (i, (speed, rule, kk, steps, drafted)) in results.iter().enumerate() {
        if i >= 15 && !(rule == &default && (*kk == 4 || *kk == k)) {
            continue;
        }
        println!(
            "| {} | {} | {} | {kk} | {steps} | {drafted} | {:.2} | {speed:.2}x{} |",
            rule.min_ngram,
            rule.max_ngram,
            rule.per_match,
            tokens as f64 / (*steps).max(1) as f64,
            if rule == &default { " (default)" } else { "" }
        );
    }
    Ok(())
}

/// Milliseconds of `rounds` forwards over `tokens` (all rows' logits) after the session's
/// context, sorted, after one warm-up; the session is truncated back after each.
fn time_forward(s: &mut Session, tokens: &[u32], rounds: u32) -> Result<Vec<f64>> {
    let context = s.len();
    let mut ms = Vec::with_capacity(rounds as usize);
    for round in 0..=rounds {
        let t = Instant::now();
        let f = s.forward(tokens, Rows::All)?;
        // Reading the logits back waits for the device.
        let _ = f.logits.flatten_all()?.get(0)?.to_scalar::<f32>()?;
        let dt = t.elapsed().as_secs_f64() * 1e3;
        s.truncate(context)?;
        if round > 0 {
            ms.push(dt);
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// A greedy, seeded request for `prompt` that stops at `eos` (what every bench run decodes).
fn greedy(
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    speculation: Speculation,
) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        seed: Some(0),
        stop_tokens: eos.to_vec(),
        speculation,
        ..Default::default()
    }
}

/// Each message as the user's turn in the target's chat template, as token ids, and the end
/// tokens generation stops at.
fn chat_prompts(target: &Model, messages: Vec<String>) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
    let content = target
        .gguf_metadata()
        .context("the target has no GGUF metadata")?;
    let tokenizer = Tokenizer::from_gguf(content)?;
    let template = ChatTemplate::from_gguf(content, &tokenizer)?;
    let prompts = messages
        .into_iter()
        .map(|m| tokenizer.encode(&template.render(&[Message::user(m)], true)?, true))
        .collect::<Result<_>>()?;
    Ok((prompts, tokenizer.eos_ids().to_vec()))
}

fn synth(a: SynthArgs) -> Result<()> {
    if a.header_only {
        let n = synth::write_header(&a.from, &a.out)?;
        eprintln!("synth: {} ({n} bytes of header)", a.out.display());
        return Ok(());
    }
    let t = Instant::now();
    let r = synth::synthesize(&a.from, &a.out, a.shape, a.dtype, a.seed)?;
    eprintln!(
        "synth: {} ({} tensors, {:.1} MB of random weights, {:.1}s)",
        a.out.display(),
        r.tensors,
        r.tensor_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The target and draft GGUFs of a benchmark or judge command; the default pair from the fetch
/// cache when not given.
#[derive(ClapArgs, Debug, Clone)]
pub struct ModelPair {
    /// Target GGUF (default: the fetched Qwen2.5-Coder-1.5B-Instruct).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Draft GGUF (default: the fetched Qwen2.5-Coder-0.5B-Instruct).
    #[arg(long)]
    pub draft: Option<PathBuf>,
}

impl ModelPair {
    /// (target, draft) paths.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        let dir = models_dir();
        (
            self.target
                .clone()
                .unwrap_or_else(|| dir.join("qwen2.5-coder-1.5b.gguf")),
            self.draft
                .clone()
                .unwrap_or_else(|| dir.join("qwen2.5-coder-0.5b.gguf")),
        )
    }
}

/// The fetch cache (scripts/fetch-models).
pub fn models_dir() -> PathBuf {
    std::env::var_os("VERDICT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/verdict/models")
        })
}

/// The `prompt` of each line of a JSONL file, the first `n` (of those whose `kind` is `kind`,
/// when given).
pub fn jsonl_prompts(path: &std::path::Path, n: usize, kind: Option<&str>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompts file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        if kind.is_some_and(|k| v["kind"].as_str() != Some(k)) {
            continue;
        }
        let p = v["prompt"].as_str().with_context(|| {
            format!("{}: line {} has no string `prompt`", path.display(), i + 1)
        })?;
        out.push(p.to_string());
        if out.len() == n {
            break;
        }
    }
    if out.is_empty() {
        match kind {
            Some(k) => bail!("{}: no prompts of kind `{k}`", path.display()),
            None => bail!("{}: no prompts", path.display()),
        }
    }
    Ok(out)
}

/// HumanEval prompts (`prompt` field) of the held-out half (task ids 82..163), in order.
pub fn humaneval_prompts(path: &std::path::Path, n: usize) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {} (run scripts/fetch-models humaneval)",
            path.display()
        )
    })?;
    let r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: cannot read line {}", path.display(), i + 1))?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        if i >= 82 {
            let p = v["prompt"]
                .as_str()
                .context("a HumanEval line without `prompt`")?;
            out.push(p.to_string());
        }
        if out.len() == n {
            break;
        }
    }
    Ok(out)
}

/// A comma-separated list of counts given to `flag`; empty is an error saying `if_empty`.
fn numbers(s: &str, flag: &str, if_empty: &str) -> Result<Vec<usize>> {
    let out = list(s)
        .iter()
        .map(|v| {
            v.parse::<usize>()
                .with_context(|| format!("{flag}: `{v}` is not a number"))
        })
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        bail!("{flag}: {if_empty}");
    }
    Ok(out)
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

struct Row {
    name: String,
    tokens: u64,
    seconds: f64,
    steps: u64,
    drafted: u64,
    accepted: u64,
}

fn spec(a: SpecArgs) -> Result<()> {
    let dir = models_dir();
    let (target_path, draft_path) = a.pair.paths();
    let device = a.device.open()?;
    let target = Model::load_gguf(&target_path, &device)?.with_kv_cache_dtype(a.kv_cache_dtype)?;
    let drafters: Vec<DrafterSpec> = list(&a.drafters)
        .iter()
        .map(|d| DrafterSpec::parse(d))
        .collect::<Result<_>>()?;
    let vocabs = numbers(
        &a.draft_vocab,
        "--draft-vocab",
        "give at least one value (0: the whole vocabulary)",
    )?;
    let uses_draft = drafters
        .iter()
        .any(|d| matches!(d, DrafterSpec::Model | DrafterSpec::Auto));
    let specials = Tokenizer::from_gguf(
        target
            .gguf_metadata()
            .context("the target has no GGUF metadata")?,
    )?
    .special_ids();
    // One draft model per vocabulary size (each its own copy of the weights).
    let mut drafts = Vec::new();
    for &v in &vocabs {
        drafts.push(if uses_draft {
            Some(load_draft(
                &draft_path,
                &device,
                v,
                &specials,
                a.kv_cache_dtype,
            )?)
        } else {
            None
        });
    }
    // Lazy kernel set-up (candle's Q4_K packing, seconds) would otherwise land in whichever
    // configuration first runs each matrix size.
    for m in std::iter::once(&target).chain(drafts.iter().flatten()) {
        m.warm_up()?;
    }
    let ks = numbers(&a.k, "--k", "give at least one speculation length")?;
    let messages: Vec<String> = match &a.prompts_file {
        Some(f) => jsonl_prompts(f, a.prompts, None)?,
        None => {
            let he = a
                .humaneval
                .clone()
                .unwrap_or_else(|| dir.join("HumanEval.jsonl.gz"));
            humaneval_prompts(&he, a.prompts)?
                .iter()
                .map(|p| {
                    format!(
                        "Complete this Python function. Reply with code only.\n```python\n{p}```"
                    )
                })
                .collect()
        }
    };
    let (prompts, eos) = chat_prompts(&target, messages)?;
    let registry = Arc::new(PolicyRegistry::in_memory(PolicyLimits::default())?);
    let mut engines = Vec::with_capacity(drafts.len());
    for draft in drafts {
        engines.push(Engine::new(EngineConfig {
            judge: crate::verify::HeadChoice::parse(&a.judge_head).load(&target)?,
            target: target.clone(),
            draft,
            registry: registry.clone(),
            default_policy: "strict".into(),
            default_drafter: None,
            default_k: *ks.iter().max().unwrap_or(&8),
            adaptive: false,
            synthetic_acceptance: a.synthetic_acceptance,
        })?);
    }

    // (label, speculation, policy, adaptive k, engine)
    let mut configs: Vec<(String, Speculation, Option<String>, bool, usize)> =
        vec![("autoregressive".into(), Speculation::Off, None, false, 0)];
    for d in &drafters {
        let with_draft = matches!(d, DrafterSpec::Model | DrafterSpec::Auto);
        for (e, &v) in vocabs.iter().enumerate() {
            if e > 0 && !with_draft {
                continue;
            }
            let vocab = match v {
                _ if vocabs.len() == 1 || !with_draft => String::new(),
                0 => " / whole draft vocab".to_string(),
                v => format!(" / draft vocab {v}"),
            };
            for p in list(&a.policies) {
                let label = match a.synthetic_acceptance {
                    Some(r) => format!("{}{vocab} / synthetic acceptance {r}", d.name()),
                    None => format!("{}{vocab} / {p}", d.name()),
                };
                // Each fixed k, then adaptive k up to the largest.
                let k_max = *ks.iter().max().unwrap_or(&8);
                let runs = ks.iter().map(|&k| (k, false));
                for (k, adaptive) in runs.chain(a.adaptive.then_some((k_max, true))) {
                    let name = if adaptive {
                        format!("{label} / adaptive k<={k}")
                    } else {
                        format!("{label} / k={k}")
                    };
                    configs.push((
                        name,
                        Speculation::Draft {
                            drafter: Some(d.clone()),
                            k: Some(k),
                        },
                        Some(p.clone()),
                        adaptive,
                        e,
                    ));
                }
            }
        }
    }
    let mut json = match &a.json {
        Some(p) => Some(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    // Round-robin repeats: each configuration's time is the median of its rounds, so a drift
    // in the machine's speed (seen on the lent GPU's host) lands on every row alike.
    let mut rows: Vec<Row> = Vec::new();
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..a.repeat {
        for (c, (name, speculation, policy, adaptive, e)) in configs.iter().enumerate() {
            let engine = &engines[*e];
            let mut row = Row {
                name: name.clone(),
                tokens: 0,
                seconds: 0.0,
                steps: 0,
                drafted: 0,
                accepted: 0,
            };
            let mut phases = SpecPhases::default();
            for prompt in &prompts {
                let mut g = engine
                    .start(GenerateRequest {
                        policy: policy.clone(),
                        adaptive: Some(*adaptive),
                        ..greedy(prompt, a.max_tokens, &eos, speculation.clone())
                    })
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                // The prefill is the same for every configuration: time the decode only.
                g.step()?;
                let t = Instant::now();
                while g.finished().is_none() {
                    g.step()?;
                }
                row.seconds += t.elapsed().as_secs_f64();
                let s = g.stats();
                row.tokens += s.tokens.saturating_sub(1);
                row.steps += s.steps;
                row.drafted += s.drafted;
                row.accepted += s.accepted;
                phases.add(&s.spec_phases);
            }
            eprintln!(
                "bench: {name} (round {}): {} tokens in {:.2}s ({} steps{})",
                round + 1,
                row.tokens,
                row.seconds,
                row.steps,
                if phases.steps > 0 {
                    format!(", {}", phases.per_step_ms())
                } else {
                    String::new()
                }
            );
            if let Some(f) = json.as_mut() {
                writeln!(
                    f,
                    "{}",
                    serde_json::json!({"config": name, "round": round + 1, "tokens": row.tokens,
                        "seconds": row.seconds, "steps": row.steps, "drafted": row.drafted,
                        "accepted": row.accepted})
                )?;
            }
            rounds[c].push(row.seconds);
            if round == 0 {
                rows.push(row);
            }
        }
    }
    // Each round's time against the autoregressive time of the same round: a drift between
    // rounds cancels out of these, where it stays in a ratio of medians.
    let paired: Vec<(f64, f64, f64)> = rounds
        .iter()
        .map(|times| paired_ratio(&rounds[0], times))
        .collect();
    let mut spread = Vec::with_capacity(rows.len());
    for (row, times) in rows.iter_mut().zip(&mut rounds) {
        times.sort_by(f64::total_cmp);
        row.seconds = times[times.len() / 2];
        let (lo, hi) = (times[0], times[times.len() - 1]);
        spread.push((
            row.tokens as f64 / hi.max(1e-9),
            row.tokens as f64 / lo.max(1e-9),
        ));
    }
    let base = rows[0].tokens as f64 / rows[0].seconds.max(1e-9);
    let ranged = a.repeat > 1;
    println!(
        "| configuration | tokens | tok/s{} | tokens/step | accepted/drafted | speed vs autoregressive{} |",
        if ranged { " (median; range)" } else { "" },
        if ranged {
            " (ratio of medians) | per round (median; range)"
        } else {
            ""
        }
    );
    println!(
        "| --- | --- | --- | --- | --- | --- |{}",
        if ranged { " --- |" } else { "" }
    );
    for ((r, (lo, hi)), (pm, plo, phi)) in rows.iter().zip(&spread).zip(&paired) {
        let tps = r.tokens as f64 / r.seconds.max(1e-9);
        let per_step = r.tokens as f64 / r.steps.max(1) as f64;
        let rate = if r.drafted > 0 {
            format!("{:.2}", r.accepted as f64 / r.drafted as f64)
        } else {
            "-".into()
        };
        let range = if ranged {
            format!("; {lo:.1}-{hi:.1}")
        } else {
            String::new()
        };
        let per_round = if ranged {
            format!(" {pm:.2}x; {plo:.2}-{phi:.2}x |")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {:.1}{range} | {:.2} | {} | {:.2}x |{per_round}",
            r.name,
            r.tokens,
            tps,
            per_step,
            rate,
            tps / base
        );
    }
    Ok(())
}

/// The speed ratios `base[r] / times[r]` of each round r: (median, lowest, highest).
fn paired_ratio(base: &[f64], times: &[f64]) -> (f64, f64, f64) {
    let mut r: Vec<f64> = base
        .iter()
        .zip(times)
        .map(|(b, t)| b / t.max(1e-9))
        .collect();
    if r.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    r.sort_by(f64::total_cmp);
    (r[r.len() / 2], r[0], r[r.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::{paired_ratio, replay_lookup};

    #[test]
    fn per_round_ratios_pair_each_round_with_its_own_baseline() {
        // The machine slows down in round 2 and the configuration hits a stall in round 3: its
        // own rounds say 1.25x, 1.25x and 0.6x (median 1.25x), where the ratio of the medians
        // (12 s against 16 s) would say 0.75x.
        let (base, times) = ([10.0, 20.0, 12.0], [8.0, 16.0, 20.0]);
        assert_eq!(paired_ratio(&base, &times), (1.25, 0.6, 1.25));
        assert!(paired_ratio(&[], &[]).0.is_nan());
    }
    use crate::draft::PromptLookup;

    #[test]
    fn lookup_replay_counts_rows_per_step() {
        let prompt = [7, 1, 2, 3, 4, 5, 6];
        let answer = [1, 2, 3, 4, 5, 6, 9];
        let fixed = |rule: &PromptLookup, answer: &[u32]| {
            replay_lookup(rule, &prompt, answer, |left, _| 4.min(left))
                .iter()
                .map(|&(d, _)| d + 1)
                .collect::<Vec<_>>()
        };
        // The prefill gives 1; "1" matches -> drafts 2 3 4 5 (all kept, 5 rows), then
        // "3 4 5 6" matches -> drafts 1 (rejected: the answer says 9, 2 rows).
        let rule = PromptLookup::with_min(1);
        assert_eq!(fixed(&rule, &answer), vec![5, 2]);
        // One token per matched token: "1" drafts only 2, then "1 2 3" drafts 4 5 6.
        let rule = PromptLookup {
            per_match: 1,
            ..PromptLookup::with_min(1)
        };
        assert_eq!(fixed(&rule, &answer), vec![2, 4]);
        // Nothing to replay past the first token.
        assert!(fixed(&rule, &answer[..1]).is_empty());
        // The default waits for two matching tokens: "6 1" is new, so a plain step (1 row);
        // then "1 2" drafts 3 4 5 6, all kept, and the target's 9 ends the answer.
        assert_eq!(fixed(&PromptLookup::default(), &answer), vec![1, 5]);
        // The k callback sees what is left and the last step's (drafted, accepted).
        let mut seen = Vec::new();
        let rule = PromptLookup::with_min(1);
        let rows = replay_lookup(&rule, &prompt, &answer, |left, last| {
            seen.push((left, last));
            4.min(left)
        });
        // (drafted, accepted): 2 3 4 5 kept, then the drafted 1 rejected.
        assert_eq!(rows, vec![(4, 4), (1, 0)]);
        assert_eq!(seen, vec![(6, None), (1, Some((4, 4)))]);
    }

    #[test]
    fn fits_a_line_through_costs() {
        let (a, b) = super::fit_line(&[(1.0, 90.0), (2.0, 110.0), (3.0, 130.0)]);
        assert!((a - 70.0).abs() < 1e-9 && (b - 20.0).abs() < 1e-9);
        assert_eq!(super::fit_line(&[(1.0, 5.0)]), (5.0, 0.0));
    }
}
