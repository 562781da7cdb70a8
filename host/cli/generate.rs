//! `verdict generate`: one prompt in, generated text out: autoregressive, or speculative with
//! `--draft` and `--policy`.
//!
//! stdout carries only the generated text, streamed and flushed token by token; everything else
//! (`--stats`, errors) goes to stderr, so `verdict generate ... > out.txt` captures just the text.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::models::chat::{ChatTemplate, Message};
use crate::models::tokenizer::Tokenizer;
use std::sync::Arc;

use crate::decide::{PolicyLimits, PolicyRegistry};
use crate::draft::DrafterSpec;
use crate::engine::{Engine, EngineConfig, FinishReason, GenerateRequest, Speculation};
use crate::models::{KvDtype, Model};
use crate::sample::{GrammarSpec, Grammars, Penalties, SamplingParams};
use crate::verify::HeadChoice;

/// Arguments of `verdict generate`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Judge head for policies that need judge logits: `auto` (the shipped head when it matches
    /// the target), `none`, or a head file (safetensors, from `verdict judge train`).
    #[arg(long, value_name = "auto|none|PATH", default_value = "auto")]
    pub judge_head: String,
    /// GGUF model file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,

    #[command(flatten)]
    pub lora: LoraArgs,

    /// The prompt: a user message, wrapped in the model's chat template (see --raw).
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub prompt: String,

    /// Feed the prompt verbatim, recognising special tokens such as <|im_start|> in it.
    #[arg(long)]
    pub raw: bool,

    /// Most tokens to generate (at least 1).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), allow_hyphen_values = true)]
    pub max_tokens: u32,

    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature, allow_hyphen_values = true)]
    pub temperature: f32,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (0 < P <= 1).
    #[arg(long, default_value_t = 1.0, value_parser = parse_top_p, allow_hyphen_values = true)]
    pub top_p: f32,

    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub top_k: u32,

    /// Keep only tokens at least P times as likely as the most likely one (0 = all, <= 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_finite, allow_hyphen_values = true)]
    pub min_p: f32,

    /// Lowers each token's logit by F times the number of times it was generated so far
    /// (OpenAI's frequency_penalty, -2..=2).
    #[arg(long, default_value_t = 0.0, value_parser = parse_finite, allow_hyphen_values = true)]
    pub frequency_penalty: f32,

    /// Lowers the logit of every token generated so far by F (OpenAI's presence_penalty, -2..=2).
    #[arg(long, default_value_t = 0.0, value_parser = parse_finite, allow_hyphen_values = true)]
    pub presence_penalty: f32,

    /// Divides positive logits (multiplies negative ones) of tokens in the prompt or the output
    /// by R (vLLM's repetition_penalty; 1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = parse_finite, allow_hyphen_values = true)]
    pub repetition_penalty: f32,

    /// Adds BIAS (-100..=100) to token ID's logit, as ID=BIAS; repeat for more tokens.
    #[arg(long = "logit-bias", value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,

    /// A word the output must not hold (vLLM's bad_words: its tokens at the start of a text
    /// and after a space); repeat for more.
    #[arg(long = "bad-word", value_name = "WORD", allow_hyphen_values = true)]
    pub bad_words: Vec<String>,

    /// A token that ends the output besides the model's end-of-turn tokens (also with
    /// --ignore-eos; vLLM's stop_token_ids); repeat for more.
    #[arg(long = "stop-token-id", value_name = "ID")]
    pub stop_token_ids: Vec<u32>,

    /// Constrain the output to JSON matching this JSON Schema file (`{"type": "object"}`: any
    /// object).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema: Option<PathBuf>,

    /// Constrain the output to text matching this regex, whole.
    #[arg(
        long,
        value_name = "REGEX",
        group = "constraint",
        allow_hyphen_values = true
    )]
    pub regex: Option<String>,

    /// Constrain the output to this Lark grammar file (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar: Option<PathBuf>,

    /// Text the output is expected to repeat (OpenAI's predicted outputs), read from FILE: it
    /// drafts where the output follows it, the --draft drafter elsewhere. The output is the same
    /// as without it under `strict`.
    #[arg(long, value_name = "FILE")]
    pub prediction: Option<PathBuf>,

    /// Seed of the sampling RNG (the same seed gives the same text).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub seed: u64,

    /// Keep generating after an end-of-turn token (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,

    /// CPU threads for the matrix kernels (default: one per physical core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024), allow_hyphen_values = true)]
    pub threads: Option<u32>,

    /// Split the target over N tensor-parallel ranks: threads on the CPU, or with a CUDA device
    /// N GPUs from that one on (one thread each, summed through NCCL).
    #[arg(
        long,
        visible_alias = "tensor-parallel-size",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub shards: u32,

    /// Print one JSON line of timings and counts on stderr at the end.
    #[arg(long)]
    pub stats: bool,

    /// Speculate: a draft GGUF sharing the model's tokenizer, `prompt-lookup` (`prompt-lookup:N`:
    /// draft only after a match of at least N tokens), `self:N` (the model's own first N
    /// layers), or `auto:PATH` (per step, prompt lookup or the draft model at PATH, whichever is
    /// expected to be faster).
    #[arg(long, value_name = "PATH|prompt-lookup[:N]|self:N|auto:PATH")]
    pub draft: Option<String>,

    /// The draft model's lm_head keeps only the first N token ids (BPE vocabularies put
    /// frequent tokens first) and the special tokens; the ids the prompt and output hold are
    /// added back. 0 keeps the whole vocabulary. Lossless with `strict` either way.
    #[arg(long, value_name = "N", default_value_t = crate::cli::serve::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,

    /// What the KV caches (target and draft model) store: f32; f16 or bf16, half the memory
    /// per position; q8_0, 8.5 bits per value (CPU).
    #[arg(long, value_name = "f32|f16|bf16|q8_0", default_value = "f32", value_parser = KvDtype::parse)]
    pub kv_cache_dtype: KvDtype,

    /// Hold at most N positions (prompt and output) per sequence, below the model's own context
    /// (vLLM's --max-model-len).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: Option<u32>,

    /// Acceptance policy (`name` or `name@version`): a built-in (strict, judge, threshold) or
    /// one registered in --policy-dir.
    #[arg(long, default_value = "strict")]
    pub policy: String,

    /// A policy parameter override, `key=value` (repeatable).
    #[arg(long = "policy-param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub policy_params: Vec<(String, f64)>,

    /// Tokens drafted per step: the maximum, adapted per step from the acceptance history,
    /// unless --fixed-k.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=crate::engine::MAX_K as i64))]
    pub k: u32,

    /// Draft exactly k tokens every step (adaptive k measured at least as fast: BENCHMARKS.md).
    #[arg(long)]
    pub fixed_k: bool,

    /// Directory of registered policies (see `verdict policy add`).
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,

    /// Write each speculation step's features as JSON Lines (input of `verdict policy replay`).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

fn parse_param(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    let v: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{k}: expected a number, got {v:?}"))?;
    if !v.is_finite() {
        return Err(format!("{k}: expected a finite number, got {v}"));
    }
    Ok((k.trim().to_string(), v))
}

/// A device as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Opens the device; a CUDA device in a build without CUDA is an error that says so.
    pub fn open(self) -> Result<candle_core::Device> {
        match self {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device cuda:{n}: this verdict was built without CUDA support \
                         (rebuild with scripts/build-cuda)"
                    );
                }
                // cudarc loads the driver on first use and panics when it is missing.
                #[cfg(feature = "cuda")]
                // SAFETY: only tries to dlopen the driver library by its usual names.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    bail!(
                        "--device cuda:{n}: no CUDA driver library (libcuda.so.1) found; \
                         is LD_LIBRARY_PATH pointing at the driver's folder?"
                    );
                }
                crate::models::choose_cuda_kernels();
                candle_core::Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}"))
            }
        }
    }
}

/// LoRA adapters on the model (the target), as llama.cpp's `--lora` / `--lora-scaled`.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct LoraArgs {
    /// A LoRA adapter to apply to the model: llama.cpp's GGUF adapter
    /// (convert_lora_to_gguf.py) or a PEFT directory (adapter_config.json +
    /// adapter_model.safetensors). Repeat to stack adapters.
    #[arg(long = "lora", value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// A LoRA adapter applied at a scale of its own (1 as trained, 0 off).
    #[arg(long = "lora-scaled", value_names = ["PATH", "SCALE"], num_args = 2, allow_hyphen_values = true)]
    pub scaled: Vec<String>,
}

impl LoraArgs {
    /// The adapters, read (each file checked now, before any model loads).
    pub fn load(&self) -> Result<Vec<crate::models::LoraAdapter>> {
        let mut out = Vec::new();
        let mut all: Vec<(PathBuf, f32)> = self.paths.iter().map(|p| (p.clone(), 1.0)).collect();
        for pair in self.scaled.chunks(2) {
            let [path, scale] = pair else {
                bail!("--lora-scaled takes a PATH and a SCALE");
            };
            let s: f32 = scale
                .parse()
                .ok()
                .filter(|s: &f32| s.is_finite())
                .with_context(|| {
                    format!("--lora-scaled {path} {scale}: the scale is not a number")
                })?;
            all.push((PathBuf::from(path), s));
        }
        for (path, scale) in all {
            out.push(
                crate::models::LoraAdapter::load(&path, scale)
                    .with_context(|| format!("--lora {}", path.display()))?,
            );
        }
        Ok(out)
    }

    /// The judge head to load: `auto` picks no shipped head for an adapted model (the heads
    /// were trained on the base's hidden states); a head file named is the user's choice.
    pub fn judge_head(&self, choice: &str, adapters: &[crate::models::LoraAdapter]) -> HeadChoice {
        match HeadChoice::parse(choice) {
            HeadChoice::Auto if !adapters.is_empty() => {
                tracing::info!("LoRA: no shipped judge head (trained on the base model's states)");
                HeadChoice::Auto.adapted()
            }
            c => c,
        }
    }

    /// `model` with the adapters, or `model` itself when there are none.
    pub fn apply(&self, model: Model, adapters: &[crate::models::LoraAdapter]) -> Result<Model> {
        if adapters.is_empty() {
            return Ok(model);
        }
        let names: Vec<String> = adapters
            .iter()
            .map(|a| a.path().display().to_string())
            .collect();
        let m = model
            .with_lora(adapters)
            .with_context(|| format!("applying the LoRA adapter(s) {}", names.join(", ")))?;
        tracing::info!(
            "LoRA: {} adapter(s), {} projection update(s): {}",
            adapters.len(),
            adapters.iter().map(|a| a.len()).sum::<usize>(),
            names.join(", ")
        );
        Ok(m)
    }
}

/// `--draft-vocab N`: loads a draft model with its lm_head cut to the first `vocab` ids and
/// `specials` (0: whole), its KV caches of element type `kv`, as `serve`, `generate` and `bench
/// spec` load it.
pub(crate) fn load_draft(
    path: &std::path::Path,
    device: &candle_core::Device,
    vocab: usize,
    specials: &[u32],
    kv: KvDtype,
) -> Result<Model> {
    let m = Model::load_gguf(path, device)
        .with_context(|| format!("loading the draft {}", path.display()))?;
    // The cut first: it needs the only handle on the weights.
    let m = m.with_draft_vocab(vocab, specials)?;
    m.with_kv_cache_dtype(kv)
        .with_context(|| format!("the draft {}", path.display()))
}

/// `--shards N`: the target split over N tensor-parallel ranks: CPU threads, or N GPUs from
/// `device`'s ordinal on.
pub(crate) fn shard_target(model: Model, n: usize, device: &candle_core::Device) -> Result<Model> {
    if n > 1 && device.is_cuda() {
        #[cfg(feature = "cuda")]
        {
            let devices = crate::models::nccl::rank_devices(device, n)
                .map_err(|e| anyhow::anyhow!("--shards {n}: {e}"))?;
            return model
                .shard_across(&devices)
                .with_context(|| format!("--shards {n} over GPUs"));
        }
    }
    model.shard(n).with_context(|| format!("--shards {n}"))
}

pub(crate) fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
            _ => Err(format!("expected cpu, cuda or cuda:N, got {s:?}")),
        },
    }
}

fn parse_finite(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .parse()
        .map_err(|_| format!("expected a number, got {s:?}"))?;
    if !v.is_finite() {
        return Err(format!("expected a finite number, got {s}"));
    }
    Ok(v)
}

/// The output's grammar from `--json-schema`, `--regex` or `--grammar`.
fn grammar_spec(args: &Args) -> Result<Option<GrammarSpec>> {
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("{flag}: cannot read {}", p.display()))
    };
    Ok(if let Some(p) = &args.json_schema {
        let text = read("--json-schema", p)?;
        Some(GrammarSpec::JsonSchema(
            serde_json::from_str(&text)
                .with_context(|| format!("--json-schema: {} is not JSON", p.display()))?,
        ))
    } else if let Some(r) = &args.regex {
        Some(GrammarSpec::Regex(r.clone()))
    } else if let Some(p) = &args.grammar {
        Some(GrammarSpec::Lark(read("--grammar", p)?))
    } else {
        None
    })
}

fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=BIAS, got {s:?}"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("expected a token id before '=', got {id:?}"))?;
    Ok((id, parse_finite(bias.trim())?))
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    let v = parse_finite(s)?;
    if v < 0.0 {
        return Err(format!("temperature must be >= 0, got {v}"));
    }
    Ok(v)
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    let v = parse_finite(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("top-p must be in (0, 1], got {v}"));
    }
    Ok(v)
}

/// Sets the CPU thread count for candle before any of its thread pools exists: rayon's global
/// pool and candle's own pools read `RAYON_NUM_THREADS`, its quantized kernels'
/// barrier pool `CANDLE_NUM_THREADS`, each once, when first used.
pub(crate) fn configure_threads(threads: u32) {
    // SAFETY: called by `run` before anything in this process starts a thread (`main` parses
    // the command line and calls `run` first), so no other thread can read the environment.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Eos,
    MaxTokens,
    Context,
    /// stdout was closed (e.g. piped into `head`).
    Closed,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::MaxTokens => "max_tokens",
            Stop::Context => "context",
            Stop::Closed => "stdout_closed",
        }
    }
}

/// Writes to stdout and flushes; `Ok(false)` when the reader has gone away.
fn emit(out: &mut impl Write, text: &str) -> Result<bool> {
    if text.is_empty() {
        return Ok(true);
    }
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Runs `verdict generate`. Must be called before any other thread starts (see --threads).
pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        configure_threads(n);
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k as usize,
        top_p: args.top_p,
        min_p: args.min_p,
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let device = args.device.open()?;
    let path = &args.model;

    let t_load = Instant::now();
    let adapters = args.lora.load()?;
    let model = Model::load_gguf(path, &device)
        .with_context(|| format!("loading the model {}", path.display()))?;
    let model = args.lora.apply(model, &adapters)?;
    let model = model.with_kv_cache_dtype(args.kv_cache_dtype)?;
    let model = match args.max_model_len {
        Some(n) => model
            .with_max_context(n as usize)
            .context("--max-model-len")?,
        None => model,
    };
    let model = shard_target(model, args.shards as usize, &device)?;
    // Lazy kernel set-up (candle packs Q4_K on first use, seconds for the 1.5B) belongs to the
    // load, as llama.cpp's repacking does, not to the first decode step it would otherwise slow.
    model.warm_up().context("warming up the model")?;
    let content = model
        .gguf_metadata()
        .with_context(|| format!("{}: no GGUF metadata", path.display()))?;
    let tok = Tokenizer::from_gguf(content)
        .with_context(|| format!("{}: reading the tokenizer", path.display()))?;
    let n_logits = model.config().vocab_size;
    if n_logits > tok.vocab_size() {
        bail!(
            "{}: the model has {n_logits} output logits but the tokenizer only {} tokens",
            path.display(),
            tok.vocab_size()
        );
    }
    let text = if args.raw {
        args.prompt.clone()
    } else {
        ChatTemplate::from_gguf(content, &tok)
            .with_context(|| format!("{}: chat template", path.display()))?
            .render(&[Message::user(args.prompt.as_str())], true)?
    };
    // Special tokens are parsed in the rendered template (that is how it marks turns) and in a
    // raw prompt (by request), as Hugging Face and llama.cpp do.
    let prompt = tok
        .encode_prompt(&text, true)
        .context("tokenizing the prompt")?;
    let load_s = t_load.elapsed().as_secs_f64();
    if prompt.is_empty() {
        bail!("the prompt is empty (0 tokens): give --prompt some text");
    }
    let ctx = model.max_context();
    if prompt.len() >= ctx {
        bail!(
            "the prompt is {} tokens but {} has a context of {ctx} tokens: nothing is left to \
             generate into",
            prompt.len(),
            path.display()
        );
    }

    let (draft_model, drafter) = match args.draft.as_deref() {
        None => (None, None),
        Some(d)
            if d == "prompt-lookup"
                || d.starts_with("prompt-lookup:")
                || d.starts_with("self:") =>
        {
            (None, Some(DrafterSpec::parse(d).context("--draft")?))
        }
        Some(d) => {
            let (p, spec) = match d.strip_prefix("auto:") {
                Some(p) => (p, DrafterSpec::Auto),
                None => (d, DrafterSpec::Model),
            };
            let m = load_draft(
                std::path::Path::new(p),
                &device,
                args.draft_vocab,
                &tok.special_ids(),
                args.kv_cache_dtype,
            )?;
            m.warm_up().context("warming up the draft model")?;
            (Some(m), Some(spec))
        }
    };
    let prediction = match &args.prediction {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--prediction: cannot read {}", p.display()))?;
            Some(
                tok.encode(&text, false)
                    .context("--prediction: tokenizing")?,
            )
        }
        None => None,
    };
    let speculating = drafter.is_some() || prediction.is_some();
    let registry = match &args.policy_dir {
        Some(dir) => PolicyRegistry::open(dir, PolicyLimits::default())?,
        None => PolicyRegistry::in_memory(PolicyLimits::default())?,
    };
    let judge = args
        .lora
        .judge_head(&args.judge_head, &adapters)
        .load(&model)?;
    let engine = Engine::new(EngineConfig {
        judge,
        target: model,
        draft: draft_model,
        registry: Arc::new(registry),
        default_policy: args.policy.clone(),
        default_drafter: drafter,
        default_k: args.k as usize,
        adaptive: !args.fixed_k,
        synthetic_acceptance: None,
    })?;
    let trace: Option<Box<dyn Write + Send>> = match &args.trace {
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("--trace: cannot create {}", p.display()))?,
        ))),
        None => None,
    };
    let mut stop_tokens = if args.ignore_eos {
        Vec::new()
    } else {
        tok.eos_ids().to_vec()
    };
    if let Some(&t) = args
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= tok.vocab_size())
    {
        anyhow::bail!(
            "--stop-token-id {t} is outside the vocabulary (size {})",
            tok.vocab_size()
        );
    }
    stop_tokens.extend(&args.stop_token_ids);
    let bad_words = crate::sample::bad_words_ids(&args.bad_words, |w| tok.encode(w, false))
        .map_err(|(_, e)| anyhow::anyhow!("--bad-word: {e}"))?;
    let grammar = match grammar_spec(&args)? {
        Some(spec) => Some(
            Grammars::new(&tok)?
                .compile(&spec, &stop_tokens)
                .map_err(|e| anyhow::anyhow!("the grammar: {e}"))?,
        ),
        None => None,
    };
    let mut generation = engine
        .start(GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: args.max_tokens as usize,
            sampling: params,
            seed: Some(args.seed),
            stop_tokens,
            speculation: Speculation::Default,
            policy: speculating.then(|| args.policy.clone()),
            policy_params: args.policy_params.clone(),
            adaptive: Some(!args.fixed_k),
            trace,
            logprobs: None,
            prompt_logprobs: None,
            penalties: Penalties {
                frequency: args.frequency_penalty,
                presence: args.presence_penalty,
                repetition: args.repetition_penalty,
                logit_bias: args.logit_bias.clone(),
                bad_words,
                ..Penalties::default()
            },
            grammar,
            cache_salt: None,
            prediction,
        })
        .map_err(|e| match &e.param {
            Some(p) => anyhow::anyhow!("{p}: {}", e.message),
            None => anyhow::anyhow!("{}", e.message),
        })?;

    let mut stdout = std::io::stdout().lock();
    let mut stream = tok.stream(true);
    let t_start = Instant::now();
    let first = generation.step().context("prompt forward")?;
    let prefill_s = t_start.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    let mut pending = first;
    let mut last_newline = false;
    let stop = 'outer: loop {
        for t in pending.drain(..) {
            let piece = stream.push(&tok, t)?;
            if !piece.is_empty() {
                last_newline = piece.ends_with('\n');
            }
            if !emit(&mut stdout, &piece)? {
                break 'outer Stop::Closed;
            }
        }
        match generation.finished() {
            Some(FinishReason::Stop) => break Stop::Eos,
            Some(FinishReason::Length) => {
                break if generation.output().len() >= args.max_tokens as usize {
                    Stop::MaxTokens
                } else {
                    Stop::Context
                };
            }
            None => {}
        }
        pending = generation.step().with_context(|| {
            format!(
                "step at position {}",
                prompt.len() + generation.output().len()
            )
        })?;
    };
    let generated = generation.output().len();
    let spec = generation.stats().clone();
    let steps = spec.steps as usize;
    let decode_s = t_decode.elapsed().as_secs_f64();
    let seconds = t_start.elapsed().as_secs_f64();
    let mut ends_in_newline = true;
    if stop != Stop::Closed {
        let rest = stream.finish();
        emit(&mut stdout, &rest)?;
        ends_in_newline = if rest.is_empty() {
            generated == 0 || last_newline
        } else {
            rest.ends_with('\n')
        };
    }
    drop(stdout);

    if args.stats {
        // On a terminal the stats line would otherwise continue the text's last line.
        if !ends_in_newline && std::io::stdout().is_terminal() {
            eprintln!();
        }
        let line = serde_json::json!({
            "tokens": generated,
            "prompt_tokens": prompt.len(),
            "seconds": seconds,
            // Decode rate: tokens after the first per second of decoding.
            "tokens_per_s": if decode_s > 0.0 { generated.saturating_sub(1) as f64 / decode_s } else { 0.0 },
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": prompt.len() as f64 / prefill_s.max(f64::MIN_POSITIVE),
            "decode_s": decode_s,
            "decode_steps": steps,
            "steps": spec.steps,
            "drafted": spec.drafted,
            "accepted": spec.accepted,
            "tokens_per_step": spec.tokens_per_step(),
            "accepted_per_position": spec.accepted_per_position,
            "policy_faults": spec.policy_faults,
            "policy": spec.policy,
            "drafter": spec.drafter,
            "drafter_steps": spec.drafter_steps,
            "accepted_prediction_tokens": spec.prediction.then_some(spec.prediction_accepted),
            "rejected_prediction_tokens": spec.prediction.then_some(spec.prediction_rejected),
            "grammar_cuts": spec.grammar_cuts,
            "plain_phases": spec.plain_phases,
            "spec_phases": spec.spec_phases,
            "load_s": load_s,
            "stop": stop.name(),
            "device": args.device.to_string(),
            "threads": candle_core::utils::get_num_threads(),
            "model": path.display().to_string(),
        });
        eprintln!("{line}");
    }
    Ok(())
}
