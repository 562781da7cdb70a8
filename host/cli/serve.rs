//! `verdict serve`: the OpenAI-compatible HTTP server (see host/serve).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::decide::{PolicyLimits, PolicyRegistry};
use crate::draft::DrafterSpec;
use crate::engine::{Engine, EngineConfig, MAX_K};
use crate::models::Model;
use crate::models::chat::ChatTemplate;
use crate::models::tokenizer::Tokenizer;
use crate::serve::{Module, ServeOptions, Served, Tokens};

/// `--draft-vocab`'s default: Qwen2.5-Coder-0.5B drafting for the 1.5B with its head cut to the
/// first 32k ids (plus each request's own) ran at 1.54x autoregressive against 1.34x whole
/// (adaptive k, HumanEval prompts, BENCHMARKS.md); a vocabulary of at most this many keeps it
/// whole.
pub const DEFAULT_DRAFT_VOCAB: usize = 32768;

/// Positions per prefill forward when requests batch (`--prefill-chunk`): BENCHMARKS.md,
/// session 19, measures what a long prompt costs the other streams and itself.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// The default pair, as `scripts/fetch-models default` leaves it in the model cache.
pub const DEFAULT_TARGET: &str = "qwen2.5-coder-1.5b.gguf";
pub const DEFAULT_DRAFT: &str = "qwen2.5-coder-0.5b.gguf";

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Judge head for policies that need judge logits: `auto` (the shipped head when it matches
    /// the target), `none`, or a head file (safetensors, from `verdict judge train`).
    #[arg(long, value_name = "auto|none|PATH", default_value = "auto")]
    pub judge_head: String,
    /// The target model (GGUF). Without it: the default pair (Qwen2.5-Coder-1.5B, drafted by
    /// -0.5B) from the model cache, fetched first if missing.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub lora: crate::cli::generate::LoraArgs,
    /// A LoRA adapter a request chooses by naming it in `model` (vLLM's `--lora-modules`):
    /// NAME=PATH, a GGUF adapter or a PEFT directory. Repeat for more; each is listed by
    /// /v1/models, shares the target's weights, and keeps a prompt cache of its own.
    #[arg(long = "lora-modules", value_name = "NAME=PATH", num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Let POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove LoRA modules
    /// while the server runs (vLLM's routes). They read adapter files from paths the server
    /// can reach: set --admin-token-file too unless every client is trusted.
    #[arg(long)]
    pub allow_lora_loading: bool,
    /// The default drafter: a draft model (GGUF path, same tokenizer), `prompt-lookup`,
    /// `self:N` (the target's first N layers), or `auto` / `auto:PATH` (per step, prompt lookup
    /// or the draft model, whichever is expected to be faster). Without it requests decode
    /// autoregressively unless they ask for speculation.
    #[arg(long)]
    pub draft: Option<String>,
    /// The draft model's lm_head, read for every drafted token, keeps only the first N token
    /// ids (BPE vocabularies put frequent tokens first) and the special tokens; each request
    /// adds back the ids its prompt and output hold. 0 keeps the whole vocabulary. Lossless
    /// with `strict` either way; measured in BENCHMARKS.md.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// What the KV caches (target and draft model, the prompt cache's too) store: f32; f16 or
    /// bf16, half the memory per position; q8_0, 8.5 bits per value (CPU).
    #[arg(long, value_name = "f32|f16|bf16|q8_0", default_value = "f32", value_parser = crate::models::KvDtype::parse)]
    pub kv_cache_dtype: crate::models::KvDtype,
    /// Hold at most N positions (prompt and output) per sequence, below the model's own
    /// context (vLLM's flag): longer requests get `context_length_exceeded`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: Option<u32>,
    /// Speculation length k; the maximum k unless --fixed-k (requests may override with
    /// speculation.k).
    #[arg(long, default_value_t = 16)]
    pub k: usize,
    /// Draft exactly k tokens every step instead of adapting k per request from its acceptance
    /// history (adaptive measured at least as fast: BENCHMARKS.md).
    #[arg(long)]
    pub fixed_k: bool,
    /// The policy of requests that name none.
    #[arg(long, default_value = "strict")]
    pub policy: String,
    /// Policy directory (registered components and manifest; shared with `verdict policy`).
    /// Uploads persist there. Without it uploads live in memory only.
    #[arg(long, env = "VERDICT_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on stdout as `listening on http://ADDR`, or `https://`).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Serve HTTPS with this PEM certificate chain (the server's own first; vLLM's flag).
    #[arg(long, requires = "ssl_keyfile", value_name = "PEM")]
    pub ssl_certfile: Option<PathBuf>,
    /// The PEM private key of --ssl-certfile's certificate.
    #[arg(long, requires = "ssl_certfile", value_name = "PEM")]
    pub ssl_keyfile: Option<PathBuf>,
    /// With --ssl-certfile: the PEM CA certificates client certificates are checked against
    /// (see --ssl-cert-reqs).
    #[arg(long, requires = "ssl_certfile", value_name = "PEM")]
    pub ssl_ca_certs: Option<PathBuf>,
    /// Client certificates (vLLM's flag, Python's `ssl.CERT_*` numbers): 0 not asked for, 1
    /// optional (checked against --ssl-ca-certs when given), 2 required (mutual TLS).
    #[arg(
        long,
        default_value = "0",
        requires = "ssl_ca_certs",
        value_name = "0|1|2"
    )]
    pub ssl_cert_reqs: crate::serve::tls::ClientCerts,
    /// Read the --ssl-* files again when they change (a renewed certificate; vLLM's flag): new
    /// connections use them, and files that do not load keep the ones in use.
    #[arg(long, requires = "ssl_certfile")]
    pub enable_ssl_refresh: bool,
    /// Sampling defaults for requests that leave them out, as a JSON object (vLLM's option):
    /// temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
    /// presence_penalty, max_new_tokens (or max_tokens). A request's own values win.
    #[arg(long, value_name = "JSON", value_parser = parse_generation_defaults)]
    pub override_generation_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Logprobs name every token `token_id:N` (vLLM's flag; a request's
    /// `return_tokens_as_token_ids` does it for itself).
    #[arg(long)]
    pub return_tokens_as_token_ids: bool,
    /// Every streamed completions and chat response ends with a usage chunk, as with
    /// `stream_options.include_usage` (vLLM's flag).
    #[arg(long)]
    pub enable_force_include_usage: bool,
    /// File holding the bearer token the policy admin routes (PUT, DELETE) require.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// The model id `/v1/models` lists and requests name in `model` (default: the target
    /// file's name without `.gguf`). More names after it (vLLM's form) are aliases requests may
    /// use too; responses name the first.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    pub served_model_name: Vec<String>,
    /// Chat replies of a reasoning model: its `<think>` block goes to `reasoning_content`,
    /// the rest to `content` (as vLLM's option of that name). `qwen3`: thinking only inside the
    /// tags; `deepseek_r1`: everything before `</think>` (its template opens the block);
    /// `gpt-oss`: harmony's `analysis` channel is the thinking, `final` the answer.
    #[arg(long, value_enum)]
    pub reasoning_parser: Option<crate::serve::reasoning::Parser>,
    /// A Jinja chat template file to use in place of the GGUF's `tokenizer.chat_template` (as
    /// vLLM's option of that name): a fixed or extended template, one that lists tools.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// How /v1/embeddings pools a text's final hidden states: mean, cls or last (default: as
    /// the GGUF's `pooling_type` says, else the last token's, as vLLM does for a decoder).
    #[arg(long, value_parser = parse_pooling)]
    pub pooling: Option<crate::models::embed::Pooling>,
    /// File of API keys, one per line: every route but /health, /ready, /metrics and /version then
    /// needs `Authorization: Bearer <key>` (the `openai` client's `api_key`) or `x-api-key:
    /// <key>` (the `anthropic` client's).
    #[arg(long, conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// One API key, as --api-key-file's. Prefer the environment variable or the file: a
    /// command line is visible to every user of the machine.
    #[arg(long, env = "VERDICT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait for a generation worker; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Generation worker threads (requests generating at once; vLLM's `--max-num-seqs`).
    #[arg(long, visible_alias = "max-num-seqs", default_value_t = 8)]
    pub workers: usize,
    /// The order waiting requests start in (vLLM's flag): `fcfs`, by arrival; `priority`, by
    /// each request's `priority` field (lower first), then arrival. No running request is
    /// preempted.
    #[arg(long, value_enum, default_value = "fcfs")]
    pub scheduling_policy: crate::serve::http::Scheduling,
    /// Web pages whose scripts may call the server from a browser (CORS), as origins
    /// (`https://app.example`) or `*` for any; comma-separated or repeated. None by default:
    /// a page the user visits cannot reach a local server unless listed here.
    #[arg(long, value_delimiter = ',', value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// No log line per request (vLLM's flag): by default each answered request logs its
    /// method, route, status and time, and each generation its tokens and speed, on stderr.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Where the models run: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", value_parser = crate::cli::generate::parse_device)]
    pub device: crate::cli::generate::DeviceArg,
    /// Split the target over N tensor-parallel ranks: threads on the CPU, or with a CUDA device
    /// N GPUs from that one on (NCCL). A sharded target does not batch across requests yet.
    #[arg(
        long,
        visible_alias = "tensor-parallel-size",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub shards: u32,
    /// Most requests whose forwards run as one batched forward (target and draft model each;
    /// outputs are the same as unbatched). 1 turns batching off.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Prefill prompts this many positions per forward (0: a whole prompt in one), so that the
    /// other requests' steps run between the pieces instead of waiting for a long prompt's
    /// whole prefill. Outputs do not change. Applies with batching on (--max-batch > 1).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Prompt cache size in positions (target and draft model together; 0 turns it off): a
    /// request that starts with an earlier request's tokens (a system prompt, the earlier turns
    /// of a chat) skips their prefill. Each position of the default pair costs ~56 KiB (target)
    /// or ~24 KiB (draft).
    #[arg(long, default_value_t = 16384)]
    pub prompt_cache: usize,
    /// Seconds SIGTERM waits for in-flight requests before exiting.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// Keep uploaded files and batches (OpenAI's Batch API) in this directory: a restart lists
    /// them again and goes on with the batches still running, skipping the lines already
    /// answered. Without it they live in memory.
    #[arg(long, env = "VERDICT_BATCH_DIR", value_name = "DIR")]
    pub batch_dir: Option<PathBuf>,
    /// Keep conversations (OpenAI's Conversations API) in this directory, one JSON file each,
    /// written before a change is answered: a restart finds them all. Without it they live in
    /// memory (the 1024 last used).
    #[arg(long, env = "VERDICT_CONVERSATION_DIR", value_name = "DIR")]
    pub conversation_dir: Option<PathBuf>,
    /// The largest batch input file `POST /v1/files` takes, in bytes (OpenAI's Batch API).
    #[arg(long, default_value_t = 100 << 20, value_name = "BYTES")]
    pub max_file_bytes: usize,
    /// Files (uploads and batch outputs) are kept in memory: uploads beyond this many bytes in
    /// all are refused until files are deleted.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    pub max_file_store_bytes: usize,
}

fn model_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("VERDICT_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/verdict/models")
}

/// Runs `scripts/fetch-models default` from the checkout verdict was built in.
fn fetch_default_pair(cache: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-models");
    if !script.exists() {
        bail!(
            "the default models are not in {} and the fetch script {} is not there; run \
             scripts/fetch-models default from a verdict checkout, or pass --model PATH",
            cache.display(),
            script.display()
        );
    }
    eprintln!(
        "verdict: fetching the default model pair into {}",
        cache.display()
    );
    let status = std::process::Command::new(&script)
        .arg("default")
        .env("VERDICT_MODELS", cache)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("{} default failed ({status})", script.display());
    }
    Ok(())
}

/// `(target, draft)` paths and the default drafter.
fn resolve_models(args: &ServeArgs) -> Result<(PathBuf, Option<PathBuf>, Option<DrafterSpec>)> {
    let (target, implied_draft) = match &args.model {
        Some(m) => (m.clone(), None),
        None => {
            let cache = model_cache();
            let (t, d) = (cache.join(DEFAULT_TARGET), cache.join(DEFAULT_DRAFT));
            // No --draft, or --draft auto: the default pair's draft model.
            let wants_draft = matches!(args.draft.as_deref(), None | Some("auto"));
            if !t.exists() || (wants_draft && !d.exists()) {
                fetch_default_pair(&cache)?;
            }
            (t, wants_draft.then_some(d))
        }
    };
    if !target.is_file() {
        bail!("--model {}: no such file", target.display());
    }
    match args.draft.as_deref() {
        None => match implied_draft {
            Some(d) => Ok((target, Some(d), Some(DrafterSpec::Model))),
            None => Ok((target, None, None)),
        },
        // Auto: prompt lookup or the draft model (the default pair's, or auto:PATH), per step.
        Some("auto") => Ok((target, implied_draft, Some(DrafterSpec::Auto))),
        Some(s) if s.starts_with("auto:") => {
            let p = PathBuf::from(&s["auto:".len()..]);
            if !p.is_file() {
                bail!("--draft {s}: {} is not a file", p.display());
            }
            Ok((target, Some(p), Some(DrafterSpec::Auto)))
        }
        Some(s) if s == "prompt-lookup" || s.starts_with("self:") => {
            let spec = DrafterSpec::parse(s).with_context(|| format!("--draft {s}"))?;
            Ok((target, None, Some(spec)))
        }
        Some(path) => {
            let p = PathBuf::from(path);
            if !p.is_file() {
                bail!("--draft {path}: not a file, and not `prompt-lookup` or `self:N`");
            }
            Ok((target, Some(p), Some(DrafterSpec::Model)))
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let (opts, registry, loader) = setup(args)?;
    crate::serve::run(opts, registry, loader)
}

/// The server's options, its policy registry and its model loader, from the flags (`verdict
/// serve` and `verdict run-batch` share them); files the flags name are read now, so that a
/// bad one fails before anything starts.
pub fn setup(args: ServeArgs) -> Result<(ServeOptions, Arc<PolicyRegistry>, crate::serve::Loader)> {
    if args.k == 0 || args.k > MAX_K {
        bail!("--k must be in 1..={MAX_K}, got {}", args.k);
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1 (1 turns batching off)");
    }
    let tokens = |f: &PathBuf, flag: &str| -> Result<Tokens> {
        let text = std::fs::read_to_string(f).with_context(|| format!("{flag} {}", f.display()))?;
        Tokens::from_lines(&text)
            .with_context(|| format!("{flag} {}: the file holds no token", f.display()))
    };
    let admin_token = match &args.admin_token_file {
        None => None,
        Some(f) => Some(tokens(f, "--admin-token-file")?),
    };
    let api_keys =
        match (&args.api_key_file, &args.api_key) {
            (Some(f), _) => Some(tokens(f, "--api-key-file")?),
            (None, Some(k)) => Some(Tokens::new(k).context(
                "--api-key (or VERDICT_API_KEY) is blank; unset it to serve without a key",
            )?),
            (None, None) => None,
        };
    let (target_path, draft_path, default_drafter) = resolve_models(&args)?;
    let registry = Arc::new(match &args.policy_dir {
        Some(dir) => PolicyRegistry::open(dir, PolicyLimits::default())
            .with_context(|| format!("--policy-dir {}", dir.display()))?,
        None => PolicyRegistry::in_memory(PolicyLimits::default())?,
    });
    for e in registry.load_errors() {
        eprintln!("verdict: warning: {e}");
    }
    for (i, n) in args.served_model_name.iter().enumerate() {
        if n.trim().is_empty() || n.chars().any(char::is_control) {
            bail!(
                "--served-model-name must be a non-blank name without control characters, got {n:?}"
            );
        }
        if args.served_model_name[..i].contains(n) {
            bail!("--served-model-name names {n:?} twice");
        }
    }
    let model_id = match args.served_model_name.first() {
        Some(n) => n.clone(),
        None => target_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let aliases = args
        .served_model_name
        .iter()
        .skip(1)
        .cloned()
        .collect::<Vec<_>>();
    let names: Vec<&str> = std::iter::once(model_id.as_str())
        .chain(aliases.iter().map(String::as_str))
        .collect();
    let modules = lora_modules(&args.lora_modules, &names)?;
    let tls = match (&args.ssl_certfile, &args.ssl_keyfile) {
        (Some(cert), Some(key)) => Some(crate::serve::tls::Tls::load(
            cert,
            key,
            args.ssl_ca_certs.as_deref(),
            args.ssl_cert_reqs,
        )?),
        _ => None,
    };
    let opts = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        tls,
        tls_refresh: args.enable_ssl_refresh,
        generation_defaults: args.override_generation_config.clone().unwrap_or_default(),
        tokens_as_ids: args.return_tokens_as_token_ids,
        force_include_usage: args.enable_force_include_usage,
        workers: args.workers,
        max_queue: args.max_queue,
        admin_token,
        api_keys,
        model_id,
        model_aliases: aliases,
        default_policy: args.policy.clone(),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        reasoning: args.reasoning_parser,
        pooling: args.pooling,
        allow_lora_loading: args.allow_lora_loading,
        scheduling: args.scheduling_policy,
        allowed_origins: args.allowed_origins.clone(),
        batch_dir: args.batch_dir.clone(),
        conversation_dir: args.conversation_dir.clone(),
        max_file_bytes: args.max_file_bytes,
        file_store_bytes: args.max_file_store_bytes,
        lora_modules: modules
            .iter()
            .map(|(n, a)| (n.clone(), a.path().to_path_buf()))
            .collect(),
        ..ServeOptions::new("")
    };
    let reg = registry.clone();
    let (k, adaptive, policy) = (args.k, !args.fixed_k, args.policy.clone());
    // Read now: a missing or bad adapter stops the server before it starts.
    let lora = args.lora.clone();
    let adapters = lora.load()?;
    let head_choice = lora.judge_head(&args.judge_head, &adapters);
    // A module's target is adapted: no shipped head for it (a head file named still applies).
    let module_head = crate::verify::HeadChoice::parse(&args.judge_head).adapted();
    let max_batch = args.max_batch;
    let prefill_chunk = args.prefill_chunk;
    let prompt_cache = args.prompt_cache;
    let draft_vocab = args.draft_vocab;
    let kv_dtype = args.kv_cache_dtype;
    let max_model_len = args.max_model_len;
    let shards = args.shards as usize;
    let device = args.device.open()?;
    // Read now, so that a missing file fails before the server starts (it compiles with the
    // model's tokenizer, in the loader).
    let template = match &args.chat_template {
        Some(p) => Some((
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the chat template {}", p.display()))?,
            p.clone(),
        )),
        None => None,
    };
    let loader = Box::new(move || -> Result<Served> {
        let base = Model::load_gguf(&target_path, &device)
            .with_context(|| format!("loading the target {}", target_path.display()))?
            .with_kv_cache_dtype(kv_dtype)?;
        let base = match max_model_len {
            Some(n) => base
                .with_max_context(n as usize)
                .context("--max-model-len")?,
            None => base,
        };
        let target = lora.apply(base.clone(), &adapters)?;
        let content = target
            .gguf_metadata()
            .with_context(|| format!("{}: no GGUF metadata (tokenizer)", target_path.display()))?;
        let tokenizer = Tokenizer::from_gguf(content)
            .with_context(|| format!("the tokenizer of {}", target_path.display()))?;
        let draft = match &draft_path {
            Some(p) => Some(crate::cli::generate::load_draft(
                p,
                &device,
                draft_vocab,
                &tokenizer.special_ids(),
                kv_dtype,
            )?),
            None => None,
        };
        let chat = match &template {
            Some((source, path)) => ChatTemplate::for_tokenizer(source, &tokenizer)
                .with_context(|| format!("the chat template {}", path.display()))?,
            None => ChatTemplate::from_gguf(content, &tokenizer)
                .with_context(|| format!("the chat template of {}", target_path.display()))?,
        };
        let judge = head_choice.load(&target)?;
        let target = crate::cli::generate::shard_target(target, shards, &device)?;
        // Concurrent requests share forwards; a lone request runs exactly as unbatched.
        let target = target
            .with_batching(max_batch)?
            .with_prefill_chunk(prefill_chunk);
        let draft = draft
            .map(|d| {
                Ok::<_, anyhow::Error>(
                    d.with_batching(max_batch)?
                        .with_prefill_chunk(prefill_chunk),
                )
            })
            .transpose()?;
        for (m, what) in [(Some(&target), "target"), (draft.as_ref(), "draft")] {
            if let Some(m) = m {
                m.warm_up()
                    .with_context(|| format!("warming up the {what} model"))?;
                tracing::info!(
                    "{what}: KV cache of {}, {:.1} KiB per position",
                    m.kv_cache_dtype(),
                    m.kv_bytes_per_position() as f64 / 1024.0
                );
            }
        }
        let engine_of = {
            let draft = draft.clone();
            let reg = reg.clone();
            let default_drafter = default_drafter.clone();
            move |target: Model, judge| -> Result<Engine> {
                Ok(Engine::new(EngineConfig {
                    target,
                    draft: draft.clone(),
                    registry: reg.clone(),
                    default_policy: policy.clone(),
                    default_drafter: default_drafter.clone(),
                    default_k: k,
                    adaptive,
                    synthetic_acceptance: None,
                    judge,
                })?
                .with_prompt_cache(prompt_cache))
            }
        };
        let engine = engine_of(target, judge)?;
        // A module: the base with the --lora adapters and its own, batched apart (its forwards
        // differ), the same draft (whose batcher every engine shares).
        let adapt = move |adapter: &crate::models::LoraAdapter| -> Result<Engine> {
            let mut all = adapters.clone();
            all.push(adapter.clone());
            let t = base.with_lora(&all)?;
            let judge = module_head.load(&t)?;
            let t = crate::cli::generate::shard_target(t, shards, &device)?
                .with_batching(max_batch)?
                .with_prefill_chunk(prefill_chunk);
            engine_of(t, judge)
        };
        let mut loaded = Vec::with_capacity(modules.len());
        for (name, adapter) in &modules {
            let engine = adapt(adapter)
                .with_context(|| format!("--lora-modules {name}={}", adapter.path().display()))?;
            loaded.push(Module {
                name: name.clone(),
                root: adapter.path().to_path_buf(),
                engine,
            });
        }
        Ok(Served {
            engine,
            modules: std::sync::RwLock::new(loaded),
            adapt: Some(Box::new(adapt)),
            tokenizer: Arc::new(tokenizer),
            chat: Arc::new(chat),
        })
    });
    Ok((opts, registry, loader))
}

/// `--lora-modules NAME=PATH ...`: each adapter read now (a bad one stops the server before it
/// starts), names distinct and apart from the served model's.
fn lora_modules(
    specs: &[String],
    model_names: &[&str],
) -> Result<Vec<(String, crate::models::LoraAdapter)>> {
    let mut out: Vec<(String, crate::models::LoraAdapter)> = Vec::new();
    for spec in specs {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--lora-modules {spec:?}: expected NAME=PATH");
        };
        let name = name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bail!("--lora-modules {spec:?}: the name must be non-blank, without spaces");
        }
        if model_names.contains(&name) || out.iter().any(|(n, _)| n == name) {
            bail!("--lora-modules {spec:?}: the name {name:?} is already served");
        }
        let adapter = crate::models::LoraAdapter::load(std::path::Path::new(path), 1.0)
            .with_context(|| format!("--lora-modules {name}={path}"))?;
        out.push((name.to_string(), adapter));
    }
    Ok(out)
}

fn parse_pooling(s: &str) -> Result<crate::models::embed::Pooling, String> {
    crate::models::embed::Pooling::parse(s)
        .ok_or_else(|| format!("{s:?} is not a pooling (mean, cls or last)"))
}

fn parse_generation_defaults(
    json: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    crate::serve::api::generation_defaults(json)
}
