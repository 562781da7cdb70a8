//! The engine: the one place that joins drafters, the target, features and policies. A
//! [`Generation`] is one request; each [`Generation::step`] is one speculation step:
//!
//! 1. draft k tokens ([`crate::draft`]);
//! 2. verify them in one target forward and compute per-position features ([`crate::verify`]);
//! 3. ask the request's policy for a verdict ([`crate::decide`]; faults fall back to strict);
//! 4. commit: keep the accepted prefix, add the correction (or the bonus token when all k pass),
//!    and roll the target's KV cache back to what was kept (the drafter rolls its own back the
//!    next time it drafts).

pub mod adaptive;
pub mod prefix;
mod stats;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use crate::decide::{Correction, PolicyInstance, PolicyRegistry, Step, trace};
use crate::draft::{
    AutoDrafter, Draft, Drafter, DrafterSpec, ModelDrafter, Predicted, PromptLookup,
};
use crate::models::tokenizer::Tokenizer;
use crate::models::{Model, Rows, Session};
use crate::sample::{Adjust, Constraint, Penalizer, Penalties, Rng64, SamplingParams};
pub use crate::verify::token_logprobs;
use crate::verify::{self, DrawFrom, JudgeHead, JudgeScorer, StepDevice, Verification};
pub use adaptive::{AdaptiveK, VerifyFit};
pub use prefix::{PrefixCache, PrefixStats};
pub use stats::{PlainPhases, SpecPhases, SpecStats};

/// Largest speculation length a request may ask for.
pub const MAX_K: usize = 64;

/// Most alternatives a request may ask for per emitted token (OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Prompt positions per forward when a request scores its prompt.
const PROMPT_SCORE_ROWS: usize = 64;

/// How the engine is set up at start-up.
pub struct EngineConfig {
    pub target: Model,
    /// A separate draft model (same tokenizer as the target; checked here).
    pub draft: Option<Model>,
    pub registry: Arc<PolicyRegistry>,
    /// Policy used when a request names none.
    pub default_policy: String,
    /// Drafter used when a request does not say; `None` = autoregressive by default.
    pub default_drafter: Option<DrafterSpec>,
    /// k (the maximum k when adaptive).
    pub default_k: usize,
    /// Adapt k per request from its acceptance history.
    pub adaptive: bool,
    /// The target's judge head (checked against the target here), scored for policies that
    /// declare `needs-judge`.
    pub judge: Option<JudgeHead>,
    /// Benchmarks only (`verdict bench spec --synthetic-acceptance`): accept each drafted
    /// position with this probability instead of the policy's verdict (the policy still runs,
    /// so a step costs what it costs). For speed runs on random weights, where drafts never
    /// match; the output is not the target's. The server never sets it.
    pub synthetic_acceptance: Option<f64>,
}

/// A shareable handle on the loaded models and policies.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineConfig>,
    judge: Option<Arc<JudgeScorer>>,
    /// The step kernels when the target (and the draft model) run on a GPU.
    step_device: StepDevice,
    draft_device: StepDevice,
    /// The prompt cache ([`Engine::with_prompt_cache`]); `None`: every request prefills all.
    prefix: Option<Arc<PrefixCache>>,
}

/// What a request asks of the speculation machinery.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Speculation {
    /// The engine's defaults.
    #[default]
    Default,
    /// Plain autoregressive decoding.
    Off,
    /// Speculate with this drafter and k (each falls back to the default when `None`).
    Draft {
        drafter: Option<DrafterSpec>,
        k: Option<usize>,
    },
}

/// One generation request, already tokenized.
#[derive(Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Same seed + same request = same output (a seed also fixes k unless `adaptive` is set).
    /// `None` draws one.
    pub seed: Option<u64>,
    /// Tokens that end the generation (not emitted).
    pub stop_tokens: Vec<u32>,
    pub speculation: Speculation,
    /// `name` or `name@version`; `None` = the engine's default policy.
    pub policy: Option<String>,
    pub policy_params: Vec<(String, f64)>,
    /// Adapt k (`None` = the engine's default).
    pub adaptive: Option<bool>,
    /// Write each step's features (the policy's input) as JSON Lines.
    pub trace: Option<Box<dyn Write + Send>>,
    /// Record each emitted token's log-probability and this many most likely alternatives
    /// (0..=[`MAX_TOP_LOGPROBS`]); read them with [`Generation::take_logprobs`]. `None`: not
    /// recorded.
    pub logprobs: Option<usize>,
    /// Logit bias and repetition penalties (`Penalties::default()`: none).
    pub penalties: Penalties,
    /// Score the prompt too: each prompt token after the first gets its log-probability given
    /// the tokens before it, with this many alternatives ([`Generation::take_prompt_logprobs`]).
    /// Such a request reads its whole prompt (no prompt-cache hit), and may ask for
    /// `max_tokens` = 0 (score only). `None`: not scored.
    pub prompt_logprobs: Option<usize>,
    /// The output's grammar (structured outputs), compiled for the target's tokenizer with
    /// this request's stop tokens ([`crate::sample::Grammars::compile`]).
    pub grammar: Option<Constraint>,
    /// The prompt cache is shared only among requests with the same salt (see
    /// [`prefix`]); `None`: among those with none.
    pub cache_salt: Option<String>,
    /// OpenAI's predicted output: tokens the answer is expected to repeat, drafted from
    /// ([`crate::draft::Predicted`]) unless speculation is off.
    pub prediction: Option<Vec<u32>>,
}

/// The target's log-probability of one emitted token, at temperature 1 (log-softmax of the
/// target's raw logits at that position, whatever the request's sampling transforms).
/// Speculative steps score a position from the verification forward, plain steps from a
/// one-token forward: the same values, bit for bit with quantized weights (candle scores each
/// row on its own); F32 weights go through a GEMM whose rounding depends on the row count
/// (differences around 1e-6).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f64,
    /// The most likely tokens at that position with their log-probabilities, most likely first
    /// (ties: lower id first, as the greedy argmax picks).
    pub top: Vec<(u32, f64)>,
    /// The token's place in that order (1: the most likely); prompt tokens only (an emitted
    /// token's would cost a pass over the row that no API returns).
    pub rank: Option<u32>,
}

/// A request the engine refuses, naming the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub param: Option<String>,
    pub message: String,
}

impl RequestError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        RequestError {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_tokens reached, or the context is full.
    Length,
    /// A stop token was produced.
    Stop,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Result<Engine> {
        if let Some(draft) = &cfg.draft {
            check_same_tokenizer(&cfg.target, draft)?;
        }
        if cfg.default_k == 0 || cfg.default_k > MAX_K {
            anyhow::bail!("k must be in 1..={MAX_K}, got {}", cfg.default_k);
        }
        if let Some(DrafterSpec::SelfDraft(n)) = cfg.default_drafter {
            check_self_layers(&cfg.target, n).map_err(|e| anyhow!(e.message))?;
        }
        if cfg.default_drafter == Some(DrafterSpec::Model) && cfg.draft.is_none() {
            anyhow::bail!("the default drafter is `model` but no draft model was loaded");
        }
        cfg.registry
            .resolve(&cfg.default_policy)
            .with_context(|| format!("default policy `{}`", cfg.default_policy))?;
        let judge = match &cfg.judge {
            Some(head) => {
                head.check_target(&cfg.target, "the judge head")?;
                Some(Arc::new(JudgeScorer::new(head, cfg.target.device())?))
            }
            None => None,
        };
        let step_device = StepDevice::for_device(cfg.target.device());
        let draft_device = match &cfg.draft {
            Some(d) if d.device().same_device(cfg.target.device()) => step_device.clone(),
            Some(d) => StepDevice::for_device(d.device()),
            None => StepDevice::default(),
        };
        Ok(Engine {
            inner: Arc::new(cfg),
            judge,
            step_device,
            draft_device,
            prefix: None,
        })
    }

    /// The same engine with a prompt cache of `positions` (target and draft model together; 0
    /// turns it off): requests that share a prefix with an earlier request's prompt and output
    /// skip its prefill ([`prefix`]). Outputs do not change.
    pub fn with_prompt_cache(mut self, positions: usize) -> Engine {
        self.prefix = (positions > 0).then(|| Arc::new(PrefixCache::new(positions)));
        self
    }

    /// The prompt cache's size now (`None` when off).
    pub fn prompt_cache_stats(&self) -> Option<PrefixStats> {
        self.prefix.as_ref().map(|p| p.stats())
    }

    pub fn target(&self) -> &Model {
        &self.inner.target
    }

    /// The same engine with every request's features and draws on the host, also on a GPU
    /// (what `VERDICT_STEP_KERNELS=0` does at start-up): for comparisons and tests.
    pub fn host_features(mut self) -> Engine {
        self.step_device = StepDevice::default();
        self.draft_device = StepDevice::default();
        self
    }

    /// Whether requests (with sampling the kernels support) get their features on the device.
    pub fn features_on_device(&self) -> bool {
        self.step_device.serves(&SamplingParams::greedy(), false)
    }

    pub fn draft(&self) -> Option<&Model> {
        self.inner.draft.as_ref()
    }

    pub fn registry(&self) -> &Arc<PolicyRegistry> {
        &self.inner.registry
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner
    }

    /// The target's context length (its declared one, or `Model::with_max_context`'s cap).
    pub fn max_context(&self) -> usize {
        self.inner.target.max_context()
    }

    /// The target's embeddings of `texts` (see `models::embed::embed_batch`): final hidden
    /// states pooled, at unit length; texts run together in batched forwards. `go_on` is asked
    /// between forwards with the texts done so far.
    pub fn embed(
        &self,
        texts: &[Vec<u32>],
        pooling: crate::models::embed::Pooling,
        go_on: impl FnMut(usize) -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        Ok(crate::models::embed::embed_batch(
            &self.inner.target,
            texts,
            pooling,
            crate::models::embed::BATCH_TOKENS,
            go_on,
        )?)
    }

    /// Validates a request and sets up its state. Errors name the request field.
    pub fn start(&self, req: GenerateRequest) -> Result<Generation, RequestError> {
        let cfg = &*self.inner;
        let ctx = cfg.target.max_context();
        if req.prompt.is_empty() {
            return Err(RequestError::new("prompt", "the prompt is empty"));
        }
        if req.prompt.len() >= ctx {
            return Err(RequestError::new(
                "prompt",
                format!(
                    "the prompt has {} tokens but the model's context holds {ctx} (prompt + at least one generated token)",
                    req.prompt.len()
                ),
            ));
        }
        let vocab = cfg.target.config().vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RequestError::new(
                "prompt",
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        if req.max_tokens == 0 && req.prompt_logprobs.is_none() {
            return Err(RequestError::new(
                "max_tokens",
                "max_tokens must be at least 1 (0 only when scoring the prompt)",
            ));
        }
        if let Some(n) = req.prompt_logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(RequestError::new(
                "logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per prompt token, got {n}"),
            ));
        }
        req.sampling
            .validate()
            .map_err(|m| RequestError::new(sampling_field(&m), m))?;
        req.penalties
            .validate(vocab)
            .map_err(|(field, m)| RequestError::new(field, m))?;
        if req.penalties.min_tokens > req.max_tokens {
            return Err(RequestError::new(
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed max_tokens ({})",
                    req.penalties.min_tokens, req.max_tokens
                ),
            ));
        }
        if let Some(n) = req.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(RequestError::new(
                "logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {n}"),
            ));
        }

        let (drafter_spec, k) = match &req.speculation {
            Speculation::Off => (None, cfg.default_k),
            Speculation::Default => (cfg.default_drafter.clone(), cfg.default_k),
            Speculation::Draft { drafter, k } => (
                drafter
                    .clone()
                    .or_else(|| cfg.default_drafter.clone())
                    .or_else(|| cfg.draft.as_ref().map(|_| DrafterSpec::Model))
                    .or(Some(DrafterSpec::PromptLookup(None))),
                k.unwrap_or(cfg.default_k),
            ),
        };
        if k == 0 || k > MAX_K {
            return Err(RequestError::new(
                "speculation.k",
                format!("k must be in 1..={MAX_K}, got {k}"),
            ));
        }
        // Adaptive k follows measured timings, and k decides which positions are drafted and
        // which sampled by the target: a seeded request keeps a fixed k so that it reproduces.
        let adaptive = req.adaptive.unwrap_or(cfg.adaptive && req.seed.is_none());
        let mut drafter: Option<Box<dyn Drafter>> = match drafter_spec {
            None => None,
            Some(DrafterSpec::Auto) => {
                // Prompt lookup first: it is free whenever it has a proposal.
                let mut candidates: Vec<Box<dyn Drafter>> = vec![Box::new(PromptLookup::default())];
                if let Some(draft) = &cfg.draft {
                    candidates.push(Box::new(
                        ModelDrafter::new("model", draft.session())
                            .on_device(&self.draft_device)
                            .cacheable(),
                    ));
                }
                Some(Box::new(AutoDrafter::new(candidates, k, adaptive)))
            }
            Some(DrafterSpec::PromptLookup(min)) => Some(Box::new(
                min.map_or_else(PromptLookup::default, PromptLookup::with_min),
            )),
            Some(DrafterSpec::Model) => {
                let draft = cfg.draft.as_ref().ok_or_else(|| {
                    RequestError::new(
                        "speculation.draft",
                        "no draft model is loaded (start with --draft PATH, or use prompt-lookup or self:N)",
                    )
                })?;
                Some(Box::new(
                    ModelDrafter::new("model", draft.session())
                        .on_device(&self.draft_device)
                        .cacheable(),
                ))
            }
            Some(DrafterSpec::SelfDraft(n)) => {
                check_self_layers(&cfg.target, n)?;
                let session = cfg
                    .target
                    .session_layers(n)
                    .map_err(|e| RequestError::new("speculation.draft", e.to_string()))?;
                Some(Box::new(
                    ModelDrafter::new(format!("self:{n}"), session).on_device(&self.step_device),
                ))
            }
        };

        // A prediction drafts where the output follows it, the request's drafter elsewhere.
        let predicted = req.prediction.filter(|p| !p.is_empty());
        let predicted = predicted.filter(|_| !matches!(req.speculation, Speculation::Off));
        let has_prediction = predicted.is_some();
        if let Some(p) = predicted {
            drafter = Some(Box::new(Predicted::new(p, req.prompt.len(), drafter)));
        }

        // The policy is resolved when speculating, and also when a request names one with
        // parameters but no speculation, so that a typo is not silently ignored.
        let policy_name = req.policy.as_deref().unwrap_or(&cfg.default_policy);
        let wants_policy =
            drafter.is_some() || (req.policy.is_some() && !req.policy_params.is_empty());
        let (policy, params, top_k, judge) = if wants_policy {
            let handle = cfg
                .registry
                .resolve(policy_name)
                .map_err(|e| RequestError::new("policy", format!("{e:#}")))?;
            let mut overrides = req.policy_params.clone();
            // The head's calibrated threshold is the default of a judge policy's `threshold`.
            if let Some(j) = &self.judge
                && handle.info().needs_judge
                && handle.info().params.iter().any(|p| p.name == "threshold")
                && !overrides.iter().any(|(n, _)| n == "threshold")
            {
                overrides.push(("threshold".into(), j.threshold as f64));
            }
            let params = handle
                .resolve_params(&overrides)
                .map_err(|e| RequestError::new("policy_params", format!("{e:#}")))?;
            let top_k = handle.info().top_k_to_send();
            let judge = handle
                .info()
                .needs_judge
                .then(|| self.judge.clone())
                .flatten();
            (
                drafter.is_some().then(|| handle.instance()),
                params,
                top_k,
                judge,
            )
        } else {
            (None, Vec::new(), 1, None)
        };

        // The target's session, and the draft model's, from the longest cached prefix (none
        // when every prompt position is to be scored).
        let (target, cached) = if req.prompt_logprobs.is_some() {
            (cfg.target.session(), 0)
        } else {
            self.resume(&req.prompt, req.cache_salt.as_deref(), &mut drafter)
        };
        let seed = req.seed.unwrap_or_else(rand::random);
        let adjust = Adjust::new(
            Penalizer::new(req.penalties, &req.prompt, &req.stop_tokens),
            req.grammar,
        );
        let mut stats = SpecStats {
            prediction: has_prediction,
            ..SpecStats::default()
        };
        if let Some(d) = &drafter {
            stats.drafter = Some(d.name());
            stats.policy = policy.as_ref().map(|p| {
                let i = p.info();
                format!("{}@{}", i.name, i.version)
            });
        }
        Ok(Generation {
            target,
            prefix: self.prefix.clone(),
            cache_salt: req.cache_salt,
            cached,
            prefilled: false,
            poisoned: false,
            drafter,
            policy,
            judge,
            // One step buffer per request: each speculation step refills its positions.
            step: Step::new(
                top_k.min(vocab),
                req.sampling.temperature,
                vocab as u32,
                params,
            ),
            k_max: k,
            adaptive: adaptive.then(|| AdaptiveK::new(k)),
            sampling: req.sampling,
            rng: Rng64::new(seed),
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            max_tokens: req.max_tokens,
            stop: req.stop_tokens,
            finished: None,
            stopped_by: None,
            stop_logprob: None,
            stats,
            trace: req.trace,
            last_policy_seconds: None,
            on_device: self
                .step_device
                .serves(
                    &req.sampling,
                    req.logprobs.is_some_and(|n| n > 0) || adjust.is_some(),
                )
                .then(|| self.step_device.clone()),
            adjust,
            logprobs_top: req.logprobs.map(|n| n.min(vocab)),
            logprobs: Vec::new(),
            prompt_logprobs_top: req.prompt_logprobs.map(|n| n.min(vocab)),
            prompt_logprobs: Vec::new(),
            synthetic: cfg
                .synthetic_acceptance
                .map(|r| (r, Rng64::new(seed ^ 0x5717))),
        })
    }

    /// The target session for `prompt` and how many of its tokens it already holds: the
    /// longest cached prefix when the prompt cache has one (the draft model resumes from the
    /// same entry), else an empty session. A cache that fails is a miss, never a failed request.
    fn resume(
        &self,
        prompt: &[u32],
        salt: Option<&str>,
        drafter: &mut Option<Box<dyn Drafter>>,
    ) -> (Session, usize) {
        let cfg = &*self.inner;
        let hit = match self.prefix.as_ref().map(|p| p.lookup(prompt, salt)) {
            Some(Ok(hit)) => hit,
            Some(Err(e)) => {
                tracing::warn!("prompt cache lookup failed, prefilling the whole prompt: {e:#}");
                None
            }
            None => None,
        };
        let Some(hit) = hit else {
            return (cfg.target.session(), 0);
        };
        let target = match cfg.target.adopt(hit.target) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("prompt cache: {e:#}; prefilling the whole prompt");
                return (cfg.target.session(), 0);
            }
        };
        if let (Some((session, tokens)), Some(d), Some(model)) =
            (hit.draft, drafter.as_mut(), cfg.draft.as_ref())
        {
            match model.adopt(session) {
                Ok(session) => d.resume(session, tokens),
                Err(e) => tracing::warn!("prompt cache, draft model: {e:#}"),
            }
        }
        (target, hit.len)
    }
}

fn sampling_field(message: &str) -> &'static str {
    ["temperature", "top_p", "top_k", "min_p"]
        .into_iter()
        .find(|f| message.starts_with(f))
        .unwrap_or("sampling")
}

fn check_self_layers(target: &Model, n: usize) -> Result<(), RequestError> {
    let layers = target.config().n_layers;
    if n == 0 || n >= layers {
        return Err(RequestError::new(
            "speculation.draft",
            format!(
                "self:{n}: the self-draft must use 1..{layers} of the target's {layers} layers"
            ),
        ));
    }
    Ok(())
}

/// A draft model must speak the target's tokenizer: same vocabulary size and the same tokens.
pub fn check_same_tokenizer(target: &Model, draft: &Model) -> Result<()> {
    let (tv, dv) = (target.config().vocab_size, draft.config().vocab_size);
    let names = || {
        format!(
            "draft {} vs target {}",
            draft.source().display(),
            target.source().display()
        )
    };
    if tv != dv {
        anyhow::bail!(
            "the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}): {}",
            names()
        );
    }
    // Same size, so compare the tokenizers themselves (tokens, merges, specials, pre-tokenizer).
    if let (Some(t), Some(d)) = (target.gguf_metadata(), draft.gguf_metadata()) {
        let (t, d) = (Tokenizer::from_gguf(t)?, Tokenizer::from_gguf(d)?);
        t.ensure_same(&d).with_context(|| {
            format!(
                "the draft model's tokenizer differs from the target's: {}",
                names()
            )
        })?;
    }
    Ok(())
}

/// One running request.
pub struct Generation {
    target: Session,
    /// Where the sequences go when the request ends (the engine's prompt cache).
    prefix: Option<Arc<PrefixCache>>,
    /// The request's `cache_salt`: its sequences are kept under it.
    cache_salt: Option<String>,
    /// Prompt tokens the target's cache held from the prompt cache at the start.
    cached: usize,
    /// Whether the prompt has been read (the first step).
    prefilled: bool,
    /// A step failed part-way: the caches may not match `tokens`, so they are not kept.
    poisoned: bool,
    drafter: Option<Box<dyn Drafter>>,
    policy: Option<PolicyInstance>,
    judge: Option<Arc<JudgeScorer>>,
    /// The policy's step, reused: parameters, top-K, temperature and vocabulary size are set
    /// once per request, the positions refilled by every speculation step.
    step: Step,
    k_max: usize,
    adaptive: Option<AdaptiveK>,
    sampling: SamplingParams,
    /// The request's penalties (with the counts they read) and grammar; `None` when it has
    /// neither.
    adjust: Option<Adjust>,
    rng: Rng64,
    /// Prompt followed by every emitted token. All but the last are in the target's cache.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    stop: Vec<u32>,
    finished: Option<FinishReason>,
    /// The token that ended the output (a stop token, or one the grammar ends on), and the
    /// target's log-probability of it there.
    stopped_by: Option<u32>,
    stop_logprob: Option<f64>,
    stats: SpecStats,
    trace: Option<Box<dyn Write + Send>>,
    last_policy_seconds: Option<f64>,
    /// Where the features are computed: on the target's GPU, or (`None`) on the host.
    on_device: Option<StepDevice>,
    /// Alternatives to record per emitted token; `None` records no logprobs.
    logprobs_top: Option<usize>,
    /// Logprobs of the tokens emitted since the last `take_logprobs`.
    logprobs: Vec<TokenLogprob>,
    /// Alternatives per scored prompt token; `None`: the prompt is not scored.
    prompt_logprobs_top: Option<usize>,
    /// The prompt's tokens 1.. scored by the prefill, until `take_prompt_logprobs`.
    prompt_logprobs: Vec<TokenLogprob>,
    /// [`EngineConfig::synthetic_acceptance`] and its own draws (the request's stay untouched).
    synthetic: Option<(f64, Rng64)>,
}

impl Generation {
    /// How long the last step's policy call took (once per call; `None` after reading it or
    /// when the step called no policy). Feeds the policy latency histogram.
    pub fn take_policy_latency(&mut self) -> Option<f64> {
        self.last_policy_seconds.take()
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The token that ended the output with [`FinishReason::Stop`] (not emitted).
    pub fn stopped_by(&self) -> Option<u32> {
        self.stopped_by
    }

    pub fn stats(&self) -> &SpecStats {
        &self.stats
    }

    /// The target's mean log-probability (T = 1) per token of the output, the token that ended
    /// it included (OpenAI's `best_of` ranks by it: an output that ends where the target would
    /// not have ended it pays for that). `None`: nothing generated and nothing ended it.
    pub fn mean_logprob(&self) -> Option<f64> {
        let stop = self.stop_logprob.into_iter();
        let n = self.stats.tokens + stop.len() as u64;
        let sum = self.stats.target_logprob + stop.sum::<f64>();
        (n > 0).then(|| sum / n as f64)
    }

    /// The emitted tokens so far (stop tokens excluded).
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Prompt tokens read from the prompt cache instead of prefilled.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.cached
    }

    /// The logprobs of the tokens emitted since the last call, one per token in order (what
    /// the `step` calls since then returned, concatenated). Empty unless the request set
    /// `logprobs`.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }

    /// Runs one step and returns the tokens it emitted (empty once finished).
    pub fn step(&mut self) -> Result<Vec<u32>> {
        let r = self.step_inner();
        self.poisoned |= r.is_err();
        r
    }

    fn step_inner(&mut self) -> Result<Vec<u32>> {
        if self.finished.is_some() {
            return Ok(Vec::new());
        }
        if !self.prefilled {
            // Prefill: the prompt (what the prompt cache did not hold) in one forward, then the
            // first token.
            let prompt = self.tokens.clone();
            let logits = match self.prompt_logprobs_top {
                Some(top) => self.score_prompt(&prompt, top)?,
                None => {
                    self.target
                        .forward(&prompt[self.cached..], Rows::Last)?
                        .logits
                }
            };
            self.prefilled = true;
            if self.max_tokens == 0 {
                self.finished = Some(FinishReason::Length);
                return Ok(Vec::new());
            }
            if let Some(d) = self.drafter.as_mut() {
                d.prefill(&prompt)?;
            }
            let v = verify::score_row(
                &logits,
                &self.sampling,
                self.adjust.as_mut(),
                self.on_device.as_ref(),
            )?;
            let t = v.draw(0, DrawFrom::P, &mut self.rng)?;
            return self.emit(&[t], &v);
        }
        let emitted = self.tokens.len() - self.prompt_len;
        let remaining = self.max_tokens - emitted;
        // After feeding the last token, this many positions are left in the context.
        let room = self.target.max_len().saturating_sub(self.target.len() + 1);
        if room == 0 {
            self.finished = Some(FinishReason::Length);
            return Ok(Vec::new());
        }
        let chooses_k = self.drafter.as_ref().is_some_and(|d| d.chooses_k());
        // Drafting past max_tokens is wasted; the bonus/correction token needs no slot.
        let limit = remaining.saturating_sub(1).min(room - 1);
        let k = match &self.adaptive {
            Some(a) if !chooses_k => a.next_k(),
            _ => self.k_max,
        }
        .min(limit);
        if self.drafter.is_none() || k == 0 {
            return self.plain_step();
        }
        self.speculative_step(k, limit)
    }

    /// The prefill of a request that scores its prompt: the prompt in chunks of
    /// [`PROMPT_SCORE_ROWS`] with logits for every row (rows are independent, so chunks change
    /// no result; the whole prompt's rows at once would hold prompt x vocabulary floats), each
    /// row scoring the next prompt token. Returns the last row's logits (`[1, V]`): the first
    /// generated token's distribution.
    fn score_prompt(&mut self, prompt: &[u32], top: usize) -> Result<candle_core::Tensor> {
        let mut last = None;
        for (c, chunk) in prompt.chunks(PROMPT_SCORE_ROWS).enumerate() {
            let logits = self.target.forward(chunk, Rows::All)?.logits;
            let rows = logits.to_vec2::<f32>()?;
            for (j, row) in rows.iter().enumerate() {
                if let Some(&next) = prompt.get(c * PROMPT_SCORE_ROWS + j + 1) {
                    let (logprob, top) = verify::token_logprobs(row, next, top);
                    self.prompt_logprobs.push(TokenLogprob {
                        token: next,
                        logprob,
                        top,
                        rank: Some(verify::token_rank(row, next)),
                    });
                }
            }
            last = Some(logits.narrow(0, chunk.len() - 1, 1)?);
        }
        last.context("the prompt is empty")
    }

    /// The prompt's logprobs (for tokens 1.., the first has no context to be scored in) once
    /// the prefill has run, when the request asked ([`GenerateRequest::prompt_logprobs`]).
    pub fn take_prompt_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    /// One autoregressive token.
    fn plain_step(&mut self) -> Result<Vec<u32>> {
        let last = *self.tokens.last().context("no tokens")?;
        let t0 = Instant::now();
        let out = self.target.forward(&[last], Rows::Last)?;
        let t1 = Instant::now();
        let v = verify::score_row(
            &out.logits,
            &self.sampling,
            self.adjust.as_mut(),
            self.on_device.as_ref(),
        )?;
        let t2 = Instant::now();
        let t = v.draw(0, DrawFrom::P, &mut self.rng)?;
        let t3 = Instant::now();
        self.stats.steps += 1;
        // A plain step is the one-position point of the verify cost that adaptive k fits.
        let plain_s = (t3 - t0).as_secs_f64();
        if let Some(d) = self.drafter.as_mut() {
            d.observe(0, 0, 0.0, plain_s);
            if let Some(a) = self.adaptive.as_mut().filter(|_| !d.chooses_k()) {
                a.observe(0, 0, 0.0, plain_s);
            }
        }
        let out = self.emit(&[t], &v)?;
        let p = &mut self.stats.plain_phases;
        p.steps += 1;
        p.forward_s += (t1 - t0).as_secs_f64();
        p.logits_s += (t2 - t1).as_secs_f64();
        p.sample_s += (t3 - t2).as_secs_f64();
        p.emit_s += t3.elapsed().as_secs_f64();
        Ok(out)
    }

    /// One speculation step of up to `k` drafts (`limit` for the text a grammar forces).
    fn speculative_step(&mut self, k: usize, limit: usize) -> Result<Vec<u32>> {
        let t0 = Instant::now();
        // Text the request's grammar forces (a JSON key and its quotes) drafts itself, at no
        // drafter cost, when it is two tokens or more, or where the drafter has nothing. It is
        // verified like any draft, so strict stays lossless (the target may split that text
        // into other tokens).
        let mut forced = self.adjust.as_mut().map(Adjust::forced).unwrap_or_default();
        forced.truncate(limit);
        let mut cut = false;
        let proposed = if forced.len() >= 2 {
            None
        } else {
            let drafter = self.drafter.as_mut().context("no drafter")?;
            if let Some(g) = self.adjust.as_ref().and_then(|a| a.grammar.as_ref()) {
                drafter.constrain(g);
            }
            let mut draft = drafter.propose(&self.tokens, k, &self.sampling, &mut self.rng)?;
            draft.truncate(k);
            // A copied draft (prompt lookup) is cut where the grammar refuses it; model
            // drafters drafted under the grammar and lose nothing here.
            if let Some(g) = self.adjust.as_mut().and_then(|a| a.grammar.as_mut()) {
                let fit = g.fitting(&draft.tokens)?;
                if fit < draft.tokens.len() {
                    draft.truncate(fit);
                    cut = true;
                }
            }
            let name = drafter.last_choice().unwrap_or_else(|| drafter.name());
            Some((draft, name)).filter(|(d, _)| !d.tokens.is_empty() || forced.is_empty())
        };
        let by_grammar = proposed.is_none();
        let (draft, used) =
            proposed.unwrap_or_else(|| (Draft::certain(forced), "grammar".to_string()));
        self.stats.grammar_cuts += u64::from(cut);
        if draft.tokens.is_empty() {
            // Nothing to verify (e.g. prompt lookup found no match): a plain step.
            return self.plain_step();
        }
        let t_draft = t0.elapsed().as_secs_f64();
        let predicted = used == crate::draft::prediction::NAME;
        *self.stats.drafter_steps.entry(used).or_default() += 1;
        let kd = draft.tokens.len();
        let base = self.target.len();
        let last = *self.tokens.last().context("no tokens")?;

        let t1 = Instant::now();
        let v = verify::verify(
            &mut self.target,
            last,
            &draft,
            &self.sampling,
            self.adjust.as_mut(),
            &mut self.step,
            self.judge.as_deref(),
            &mut self.rng,
            self.on_device.as_ref(),
        )?;
        let step = &self.step;
        let policy = self.policy.as_mut().context("no policy")?;
        let t_policy = Instant::now();
        let decision = policy.verify(step);
        let policy_s = t_policy.elapsed().as_secs_f64();
        let t_commit = Instant::now();
        self.stats.policy_seconds += policy_s;
        self.last_policy_seconds = Some(policy_s);
        if let Some(w) = self.trace.as_mut() {
            trace::write_step(w, step).context("cannot write the step trace")?;
        }
        let mut n = (decision.verdict.accepted as usize).min(kd);
        let mut correction = decision.verdict.correction;
        if let Some((rate, rng)) = self.synthetic.as_mut() {
            n = 0;
            while n < kd && f64::from(rng.uniform()) < *rate {
                n += 1;
            }
            correction = Correction::Sample;
        }
        // Nothing past the first draft the grammar or a mask refuses (a lossy policy may accept
        // it). The grammar's cut above leaves none such, save an end token that something else
        // bars (min_tokens); this cap stands whatever the drafts.
        let grammar = self.adjust.as_ref().is_some_and(|a| a.grammar.is_some());
        self.stats.grammar_cuts += u64::from(v.allowed < kd && !cut && grammar);
        if n > v.allowed {
            n = v.allowed;
            correction = Correction::Sample;
        }
        // A policy's own correction token must fit the grammar too.
        if let Correction::Token(t) = correction
            && n < kd
            && !v.allows(n, t)?
        {
            correction = Correction::Sample;
        }
        let next = if n == kd {
            // Everything accepted: the bonus token from the target's next distribution.
            v.draw(kd, DrawFrom::P, &mut self.rng)?
        } else {
            match correction {
                Correction::Argmax => v.argmax(n)?,
                Correction::Token(t) => t,
                Correction::Sample => v.draw(n, DrawFrom::P, &mut self.rng)?,
                Correction::Residual => v.draw(
                    n,
                    DrawFrom::Residual {
                        q: draft.q_rows.get(n).map(Vec::as_slice),
                        token: draft.tokens[n],
                    },
                    &mut self.rng,
                )?,
            }
        };
        // Keep the last committed token and the accepted drafts in the cache; the new token is
        // fed at the next step.
        self.target.truncate(base + 1 + n)?;
        let t_verify = t1.elapsed().as_secs_f64();
        let commit_s = t_commit.elapsed().as_secs_f64();
        let t_emit = Instant::now();

        let mut off_argmax = 0;
        for i in 0..n {
            off_argmax += usize::from(draft.tokens[i] != v.argmax(i)?);
        }
        self.stats
            .record_step(kd, n, off_argmax, decision.fault.is_some());
        if predicted {
            self.stats.prediction_accepted += n as u64;
            self.stats.prediction_rejected += (kd - n) as u64;
        }
        // The drafter and adaptive k learn from their own proposals only.
        if let Some(d) = self.drafter.as_mut().filter(|_| !by_grammar) {
            d.observe(kd, n, t_draft, t_verify);
            if let Some(a) = self.adaptive.as_mut().filter(|_| !d.chooses_k()) {
                a.observe(kd, n, t_draft, t_verify);
            }
        }
        let mut out: Vec<u32> = draft.tokens[..n].to_vec();
        out.push(next);
        // Position i of the verification scores out[i]: the accepted drafts and the correction
        // or bonus token after them.
        let out = self.emit(&out, &v)?;
        let p = &mut self.stats.spec_phases;
        p.steps += 1;
        p.draft_s += t_draft;
        p.forward_s += v.forward_s;
        p.logits_s += v.logits_s;
        p.features_s += v.features_s;
        p.policy_s += policy_s;
        p.commit_s += commit_s;
        p.emit_s += t_emit.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Puts a copy of the prompt's sequences (target and draft model, after the prefill) into
    /// the prompt cache while this request goes on, so that requests with the same prompt
    /// (the other choices of an `n` > 1 request) skip its prefill. Returns whether it did
    /// (no cache, or no prefill yet: nothing to share).
    pub fn share_prompt(&self) -> Result<bool> {
        let Some(prefix) = self.prefix.as_ref() else {
            return Ok(false);
        };
        if !self.prefilled
            || self.poisoned
            || self.target.len() < self.prompt_len
            || !self.target.can_resume_at(self.prompt_len)
        {
            return Ok(false);
        }
        let target = self.target.copy_prefix(self.prompt_len)?;
        let draft = match self.drafter.as_ref().and_then(|d| d.copy_sequence()) {
            Some(copy) => {
                let (session, mut tokens) = copy?;
                // The draft may hold more than the prompt (its first proposal); keep the prompt.
                let n = prefix::common_prefix(&tokens, &self.tokens[..self.prompt_len]);
                tokens.truncate(n);
                Some((session, tokens))
            }
            None => None,
        };
        prefix.store(
            (target, self.tokens[..self.prompt_len].to_vec()),
            draft,
            self.cache_salt.as_deref(),
        )?;
        Ok(true)
    }

    /// Ends the request: its sequences go to the prompt cache (moved, not copied: what the
    /// target's cache holds of `tokens`, and the draft model's). Dropping a generation does
    /// the same; calling this first makes sure a follow-up request finds them.
    pub fn close(mut self) {
        self.keep_sequences();
    }

    fn keep_sequences(&mut self) {
        let Some(prefix) = self.prefix.take() else {
            return;
        };
        if self.poisoned || !self.prefilled {
            return;
        }
        // Positions past `tokens` (drafts after a stop token) are not part of the sequence.
        let n = self.target.len().min(self.tokens.len());
        let target = (self.target.take(), self.tokens[..n].to_vec());
        let draft = self.drafter.as_mut().and_then(|d| d.take_sequence());
        if let Err(e) = prefix.store(target, draft, self.cache_salt.as_deref()) {
            tracing::warn!("prompt cache: cannot keep the request's sequences: {e:#}");
        }
    }

    /// Appends tokens up to a stop token or max_tokens; returns what was appended.
    /// Row i of `v` scored `tokens[i]` (for the statistics and the request's logprobs).
    fn emit(&mut self, tokens: &[u32], v: &Verification) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            if self.stop.contains(&t) || self.adjust.as_ref().is_some_and(|a| a.ends(t)) {
                self.finished = Some(FinishReason::Stop);
                self.stopped_by = Some(t);
                self.stop_logprob = Some(v.logprob(i, t, 0)?.0);
                break;
            }
            self.tokens.push(t);
            out.push(t);
            if let Some(a) = self.adjust.as_mut() {
                a.push(t)?;
            }
            let (lp, top) = v.logprob(i, t, self.logprobs_top.unwrap_or(0))?;
            self.stats.target_logprob += lp;
            if self.logprobs_top.is_some() {
                self.logprobs.push(TokenLogprob {
                    token: t,
                    logprob: lp,
                    top,
                    rank: None,
                });
            }
            if self.tokens.len() - self.prompt_len >= self.max_tokens {
                self.finished = Some(FinishReason::Length);
                break;
            }
        }
        self.stats.tokens += out.len() as u64;
        Ok(out)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.keep_sequences();
    }
}

#[cfg(test)]
mod tests {
    use super::token_logprobs;
    use crate::verify::token_rank;

    #[test]
    fn logprobs_and_sorted_alternatives() {
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let (lp, top) = token_logprobs(&row, 4, 3);
        // The exponentials are f32 (see sample::log_sum_exp).
        assert!((lp - (0.5 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|&(i, _)| i).collect();
        // The tie at 3.0 keeps the lower id first, as argmax does.
        assert_eq!(ids, [1, 3, 0]);
        assert!((top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(top[0].1, top[1].1);
        let total: f64 = row
            .iter()
            .enumerate()
            .map(|(i, _)| token_logprobs(&row, i as u32, 0).0.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprobs(&row, 2, 0).1.is_empty());
        assert_eq!(token_logprobs(&row, 9, 0).0, f64::NEG_INFINITY);
        // More alternatives than tokens: all of them, sorted.
        let (_, all) = token_logprobs(&row, 0, 20);
        assert_eq!(
            all.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
            [1, 3, 0, 4, 2]
        );
        // Ranks follow that order, ties included; a token past the row comes last.
        let ranks: Vec<u32> = (0..5).map(|t| token_rank(&row, t)).collect();
        assert_eq!(ranks, [3, 1, 5, 2, 4]);
        assert_eq!(token_rank(&row, 9), 6);
    }
}
