//! Request parsing for `/v1/completions` and `/v1/chat/completions`. The body is read as a JSON
//! value and checked field by field, so that each error names the field and what was wrong with
//! it (serde's derive reports the first error only, and in its own words). Engine-free (only
//! the drafter spelling is shared with the command line): the result is converted to an engine request in `generate.rs`.

use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::draft::DrafterSpec;
use crate::sample::{GrammarSpec, MAX_LOGIT_BIAS, MAX_PENALTY, Penalties};

/// Which endpoint a request came through; it decides the response shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// A completion prompt: text, or token ids (OpenAI accepts both).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls, each `function.arguments` as an object (OpenAI sends
    /// a JSON string; templates write it out as JSON).
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

/// What the request says about speculation.
#[derive(Clone, Debug, PartialEq)]
pub enum SpeculationChoice {
    /// The server's default drafter and k.
    Default,
    Off,
    Draft {
        draft: Option<DrafterSpec>,
        k: Option<usize>,
    },
}

/// The largest k a request may ask for.
pub const MAX_K: usize = 64;
/// At most this many stop strings. OpenAI allows 4; vLLM sets no limit, and evaluation
/// harnesses send more (a task's every end marker), so a bound only against abuse.
pub const MAX_STOP: usize = 64;
/// `n` (choices per request) goes up to this: each choice is a generation of its own.
pub const MAX_N: usize = 16;
/// A completions request's prompts times `n` go up to this (each a generation of its own).
pub const MAX_CHOICES: usize = 64;
/// `logprobs: N` on `/v1/completions` goes up to this: OpenAI's legacy limit is 5, vLLM's
/// default 20 (what evaluation harnesses may ask for), as on chat.
pub const MAX_COMPLETION_LOGPROBS: usize = MAX_TOP_LOGPROBS;
/// `top_logprobs` on `/v1/chat/completions` goes up to this (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = crate::engine::MAX_TOP_LOGPROBS;

#[derive(Clone, Debug, PartialEq)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    /// Completions only: the (first) prompt.
    pub prompt: Option<PromptInput>,
    /// Completions only: the prompts after the first (OpenAI's batched prompts), each answered
    /// with `n` choices of its own, in order.
    pub more_prompts: Vec<PromptInput>,
    /// Chat only.
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// vLLM's `min_p` (0 = off).
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub policy: Option<String>,
    pub policy_params: Vec<(String, f64)>,
    pub speculation: SpeculationChoice,
    /// Per-token logprobs with this many alternatives each (completions: `logprobs: N`; chat:
    /// `logprobs: true` with `top_logprobs: N`, N = 0 when absent). `None`: not asked for.
    pub logprobs: Option<usize>,
    /// `frequency_penalty`, `presence_penalty`, `logit_bias` and vLLM's `repetition_penalty`.
    pub penalties: Penalties,
    /// Choices to generate for the prompt (`n`, 1..=[`MAX_N`]).
    pub n: usize,
    /// Completions only (OpenAI's `best_of`, n..=[`MAX_N`]): generations per prompt, of which
    /// the `n` the target finds likeliest per token are returned. `None`: `n`.
    pub best_of: Option<usize>,
    /// Completions only: the text starts with the prompt, and logprobs (when asked) cover the
    /// prompt's tokens too.
    pub echo: bool,
    /// Completions only: text that follows the completion (fill-in-the-middle).
    pub suffix: Option<String>,
    /// End-of-generation tokens do not end the output (it runs to max_tokens or a stop string).
    pub ignore_eos: bool,
    /// Chat only: the functions the model may call (OpenAI's `tools`, validated), unless
    /// `tool_choice` is "none".
    pub tools: Option<Value>,
    /// Chat only (vLLM's `continue_final_message`): the last message is the assistant's, and
    /// the output continues its text instead of starting a new turn (a "prefill").
    pub continue_final: bool,
    /// vLLM's `add_generation_prompt` and `add_special_tokens`.
    pub framing: Framing,
    /// Chat only (vLLM's `chat_template_kwargs`): more variables for the chat template, such as
    /// Qwen3's `enable_thinking`.
    pub template_vars: Option<Map<String, Value>>,
    /// What the output must match, and the field that asked: `response_format` (a JSON object
    /// or schema), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
    /// (or the same under `structured_outputs`), or a `tool_choice` that requires a call (the output is then the call's JSON object).
    pub grammar: Option<(&'static str, GrammarSpec)>,
    /// vLLM's `stop_token_ids`: more tokens that end the output (also with `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `bad_words`: words the output must not hold (tokenized with the model's
    /// tokenizer into `penalties.bad_words`).
    pub bad_words: Vec<String>,
    /// vLLM's `include_stop_str_in_output`: the stop string that ended the output is part of
    /// its text.
    pub include_stop: bool,
    /// vLLM's `skip_special_tokens` (default true): special tokens are left out of the text.
    pub skip_special: bool,
    /// vLLM's `truncate_prompt_tokens`: keep only the prompt's last N tokens. `Some(None)`
    /// (-1): as many as leave room for `max_tokens` (16 when not given) in the context.
    pub truncate_prompt: Option<Option<usize>>,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name tokens as `token_id:N`.
    pub tokens_as_ids: bool,
    /// vLLM's `prompt_logprobs`: each prompt token's log-probability given those before it,
    /// its rank, and this many most likely alternatives (not streamed).
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `return_token_ids`: the response carries the prompt's and each output's token ids.
    pub return_token_ids: bool,
    /// vLLM's `cache_salt`: the prompt cache is shared only with requests of the same salt.
    pub cache_salt: Option<String>,
    /// OpenAI's `store` (chat): the answer is kept for `/v1/chat/completions` to list.
    pub store: bool,
    /// OpenAI's `metadata`: kept with a stored answer.
    pub metadata: Option<Map<String, Value>>,
    /// OpenAI's `prediction` (predicted outputs): text the answer is expected to repeat, a
    /// draft to speculate from.
    pub prediction: Option<String>,
    /// vLLM's `stream_options.continuous_usage_stats`: every streamed chunk carries usage.
    pub continuous_usage: bool,
    /// vLLM's `priority`: with the server's `priority` scheduling, a waiting request of a
    /// lower value starts first.
    pub priority: i64,
    /// vLLM's `request_id`: names the response (`chatcmpl-ID`; a request's `X-Request-Id`
    /// header first).
    pub request_id: Option<String>,
}

impl ParsedRequest {
    /// Generations per prompt: `best_of` when set, else `n`.
    pub fn candidates(&self) -> usize {
        self.best_of.unwrap_or(self.n)
    }
}

/// `--override-generation-config` (vLLM's option): the sampling settings a server applies to
/// requests that leave them out, by the names it takes and the request field each sets
/// (`max_new_tokens` is Hugging Face's generation-config name for `max_tokens`).
const GENERATION_DEFAULTS: &[(&str, &str)] = &[
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("repetition_penalty", "repetition_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("max_new_tokens", "max_tokens"),
    ("max_tokens", "max_tokens"),
];

/// Reads `--override-generation-config`'s JSON object into request fields, each value checked
/// as a request's would be. An error names the key.
pub fn generation_defaults(json: &str) -> Result<Map<String, Value>, String> {
    let given: Map<String, Value> = serde_json::from_str(json)
        .map_err(|e| format!("not a JSON object ({e}), e.g. '{{\"temperature\": 0.7}}'"))?;
    let mut fields = Map::new();
    for (k, v) in given {
        let Some(&(_, field)) = GENERATION_DEFAULTS.iter().find(|(name, _)| *name == k) else {
            let names: Vec<&str> = GENERATION_DEFAULTS.iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown key {k:?}; it takes {}", names.join(", ")));
        };
        if v.is_null() {
            return Err(format!("{k}: null (leave the key out)"));
        }
        let mut probe = Map::new();
        probe.insert("prompt".into(), Value::from("x"));
        probe.insert(field.into(), v.clone());
        parse_object(Endpoint::Completions, &probe).map_err(|e| format!("{k}: {}", e.message))?;
        fields.insert(field.into(), v);
    }
    Ok(fields)
}

/// Sets the server's default sampling fields (`generation_defaults`) a request left out (or
/// sent as null). Not `max_tokens`: a default one is capped to the room the prompt leaves
/// ([`default_max_tokens`]), where a request's own is refused when it does not fit.
pub fn with_defaults(obj: &mut Map<String, Value>, defaults: &Map<String, Value>) {
    for (k, v) in defaults.iter().filter(|(k, _)| *k != "max_tokens") {
        if obj.get(k).is_none_or(Value::is_null) {
            obj.insert(k.clone(), v.clone());
        }
    }
}

/// The default `max_tokens` of `generation_defaults` (`max_new_tokens`), if it sets one.
pub fn default_max_tokens(defaults: &Map<String, Value>) -> Option<usize> {
    defaults
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
}

/// Parses a request body. Malformed JSON, wrong types, unknown fields and out-of-range values
/// are 400s naming the field.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, ApiError> {
    parse_object(endpoint, &json_object(body)?)
}

/// [`parse`] of a body already read as a JSON object.
pub fn parse_object(
    endpoint: Endpoint,
    obj: &Map<String, Value>,
) -> Result<ParsedRequest, ApiError> {
    let mut r = ParsedRequest {
        endpoint,
        model: None,
        prompt: None,
        more_prompts: Vec::new(),
        messages: Vec::new(),
        max_tokens: None,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        seed: None,
        stop: Vec::new(),
        stream: false,
        include_usage: false,
        policy: None,
        policy_params: Vec::new(),
        speculation: SpeculationChoice::Default,
        logprobs: None,
        penalties: Penalties::default(),
        n: 1,
        best_of: None,
        echo: false,
        suffix: None,
        ignore_eos: false,
        tools: None,
        continue_final: false,
        framing: Framing::default(),
        template_vars: None,
        grammar: None,
        stop_token_ids: Vec::new(),
        bad_words: Vec::new(),
        include_stop: false,
        skip_special: true,
        truncate_prompt: None,
        tokens_as_ids: false,
        prompt_logprobs: None,
        return_token_ids: false,
        cache_salt: None,
        store: false,
        metadata: None,
        prediction: None,
        continuous_usage: false,
        priority: 0,
        request_id: None,
    };
    let chat = endpoint == Endpoint::Chat;
    // Chat's two logprobs fields are checked together after the loop.
    let mut chat_logprobs = false;
    let mut tools_off = false;
    let mut effort: Option<String> = None;
    // A tool_choice that forces a call: "required" (any tool) or the one named.
    let mut tool_forced: Option<Option<String>> = None;
    let mut grammars: Vec<(&'static str, GrammarSpec)> = Vec::new();
    let mut top_logprobs = None;
    for (key, v) in obj {
        let k = key.as_str();
        match k {
            "model" => r.model = opt(v, |v| string(k, v))?,
            "prompt" if !chat => {
                let mut all = prompts(v)?.into_iter();
                r.prompt = all.next();
                r.more_prompts = all.collect();
            }
            "messages" if chat => r.messages = messages(v)?,
            "continue_final_message" if chat => {
                r.continue_final = opt(v, |v| boolean(k, v))?.unwrap_or(false)
            }
            "add_generation_prompt" if chat => r.framing.read(k, v)?,
            "add_special_tokens" => r.framing.read(k, v)?,
            "chat_template_kwargs" if chat => r.template_vars = opt(v, |v| template_vars(k, v))?,
            "reasoning_effort" if chat => effort = opt(v, |v| reasoning_effort(k, v))?,
            "max_tokens" => {
                // 0 only with echo or prompt_logprobs (checked after the loop).
                if let Some(n) = opt(v, |v| int_range(k, v, 0, u32::MAX as i64))? {
                    r.max_tokens = Some(n as usize);
                }
            }
            "max_completion_tokens" if chat => {
                if let Some(n) = opt(v, |v| int_range(k, v, 1, u32::MAX as i64))? {
                    r.max_tokens = Some(n as usize);
                }
            }
            "temperature" => {
                if let Some(t) = opt(v, |v| num_range(k, v, 0.0, 2.0))? {
                    r.temperature = t as f32;
                }
            }
            "top_p" => {
                if let Some(p) = opt(v, |v| number(k, v))? {
                    if !(p > 0.0 && p <= 1.0) {
                        return Err(ApiError::invalid(
                            k,
                            format!("top_p must be in (0, 1], got {p}"),
                        ));
                    }
                    r.top_p = p as f32;
                }
            }
            "min_p" => {
                if let Some(x) = opt(v, |v| num_range(k, v, 0.0, 1.0))? {
                    r.min_p = x as f32;
                }
            }
            "top_k" => {
                if let Some(n) = opt(v, |v| int_range(k, v, 0, u32::MAX as i64))? {
                    r.top_k = n as usize;
                }
            }
            "seed" => r.seed = opt(v, |v| int_range(k, v, i64::MIN, i64::MAX))?.map(|s| s as u64),
            "stop" => r.stop = stop(v)?,
            "stream" => r.stream = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            "stream_options" => {
                if let Some(o) = opt(v, |v| object(k, v))? {
                    for (sk, sv) in o {
                        let name = format!("stream_options.{sk}");
                        match sk.as_str() {
                            "include_usage" => {
                                r.include_usage = opt(sv, |v| boolean(&name, v))?.unwrap_or(false)
                            }
                            // As in vLLM, it takes effect with include_usage (checked below).
                            "continuous_usage_stats" => {
                                r.continuous_usage =
                                    opt(sv, |v| boolean(&name, v))?.unwrap_or(false)
                            }
                            _ => return Err(unknown_field(&name)),
                        }
                    }
                }
            }
            "n" => {
                if let Some(n) = opt(v, |v| int_range(k, v, 1, MAX_N as i64))? {
                    r.n = n as usize;
                }
            }
            "best_of" if !chat => {
                r.best_of = opt(v, |v| int_range(k, v, 1, MAX_N as i64))?.map(|n| n as usize);
            }
            // Chat has no `best_of` (OpenAI's never had); 1 is what a client copying completions'
            // defaults sends.
            "best_of" => {
                if let Some(n) = opt(v, |v| int_range(k, v, i64::MIN, i64::MAX))?
                    && n != 1
                {
                    return Err(ApiError::invalid(
                        k,
                        format!("best_of must be 1 (use n for several choices), got {n}"),
                    ));
                }
            }
            "frequency_penalty" | "presence_penalty" => {
                let max = MAX_PENALTY as f64;
                if let Some(x) = opt(v, |v| num_range(k, v, -max, max))? {
                    match k {
                        "frequency_penalty" => r.penalties.frequency = x as f32,
                        _ => r.penalties.presence = x as f32,
                    }
                }
            }
            // vLLM's extension (and llama.cpp's `repeat_penalty`): 1 = off.
            "repetition_penalty" => {
                if let Some(x) = opt(v, |v| number(k, v))? {
                    if !(x > 0.0 && x.is_finite()) {
                        return Err(ApiError::invalid(
                            k,
                            format!("repetition_penalty must be > 0 (1 = off), got {x}"),
                        ));
                    }
                    r.penalties.repetition = x as f32;
                }
            }
            // vLLM's extensions: at least this many tokens before a stop token may end the
            // output; and EOS tokens that do not end it at all.
            "min_tokens" => {
                if let Some(n) = opt(v, |v| int_range(k, v, 0, u32::MAX as i64))? {
                    r.penalties.min_tokens = n as usize;
                }
            }
            "ignore_eos" => r.ignore_eos = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            // vLLM's sampling extensions (the token ids are checked against the vocabulary
            // once the model is known).
            "stop_token_ids" => {
                r.stop_token_ids = opt(v, |v| array(k, v))?
                    .map(|a| token_ids(k, a))
                    .transpose()?
                    .unwrap_or_default()
            }
            "allowed_token_ids" => {
                if let Some(a) = opt(v, |v| array(k, v))? {
                    if a.is_empty() {
                        return Err(ApiError::invalid(
                            k,
                            "allowed_token_ids must name at least one token",
                        ));
                    }
                    r.penalties.allowed = token_ids(k, a)?;
                }
            }
            "bad_words" => {
                if let Some(a) = opt(v, |v| array(k, v))? {
                    r.bad_words = a
                        .iter()
                        .enumerate()
                        .map(|(i, w)| string(&format!("{k}[{i}]"), w))
                        .collect::<Result<_, _>>()?;
                    if let Some(i) = r.bad_words.iter().position(|w| w.trim().is_empty()) {
                        return Err(ApiError::invalid(
                            format!("{k}[{i}]"),
                            "bad words must not be empty or only spaces",
                        ));
                    }
                }
            }
            "include_stop_str_in_output" => {
                r.include_stop = opt(v, |v| boolean(k, v))?.unwrap_or(false)
            }
            "skip_special_tokens" => r.skip_special = opt(v, |v| boolean(k, v))?.unwrap_or(true),
            "truncate_prompt_tokens" => {
                r.truncate_prompt = opt(v, |v| int_range(k, v, -1, u32::MAX as i64))?
                    .map(|n| match n {
                        -1 => Ok(None),
                        0 => Err(ApiError::invalid(
                            k,
                            "truncate_prompt_tokens must be at least 1 (or -1: what the context leaves beside max_tokens)",
                        )),
                        n => Ok(Some(n as usize)),
                    })
                    .transpose()?
            }
            "priority" => {
                r.priority = opt(v, |v| int_range(k, v, i32::MIN as i64, i32::MAX as i64))?
                    .unwrap_or(0)
            }
            "request_id" => {
                r.request_id = opt(v, |v| string(k, v))?;
                if r.request_id.as_ref().is_some_and(|id| id.is_empty()) {
                    return Err(ApiError::invalid(k, "request_id must not be empty"));
                }
            }
            "return_tokens_as_token_ids" => {
                r.tokens_as_ids = opt(v, |v| boolean(k, v))?.unwrap_or(false)
            }
            "prompt_logprobs" => {
                r.prompt_logprobs =
                    opt(v, |v| int_range(k, v, 0, MAX_TOP_LOGPROBS as i64))?.map(|n| n as usize);
            }
            "return_token_ids" => r.return_token_ids = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            "cache_salt" => {
                r.cache_salt = opt(v, |v| string(k, v))?;
                if r.cache_salt.as_deref() == Some("") {
                    return Err(ApiError::invalid(
                        k,
                        "cache_salt must be a non-empty string (a secret of at least 128 bits keeps other tenants from guessing prompts)",
                    ));
                }
            }
            "logit_bias" => {
                if let Some(o) = opt(v, |v| object(k, v))? {
                    r.penalties.logit_bias = logit_bias(o)?;
                }
            }
            "logprobs" if chat => chat_logprobs = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            "top_logprobs" if chat => {
                top_logprobs = opt(v, |v| int_range(k, v, 0, MAX_TOP_LOGPROBS as i64))?;
            }
            "logprobs" => {
                r.logprobs = opt(v, |v| int_range(k, v, 0, MAX_COMPLETION_LOGPROBS as i64))?
                    .map(|n| n as usize);
            }
            "echo" if !chat => r.echo = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            // Fill-in-the-middle: the completion goes between `prompt` and this.
            "suffix" if !chat => r.suffix = opt(v, |v| string(k, v))?,
            "tools" if chat => {
                if let Some(a) = opt(v, |v| array(k, v))?
                    && !a.is_empty()
                {
                    r.tools = Some(tools(a)?);
                }
            }
            "tool_choice" if chat => match v {
                Value::Null => {}
                Value::String(s) if s == "auto" => {}
                Value::String(s) if s == "none" => tools_off = true,
                Value::String(s) if s == "required" => tool_forced = Some(None),
                Value::Object(o) => tool_forced = Some(Some(named_tool(o)?)),
                _ => {
                    return Err(ApiError::invalid(
                        k,
                        "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ));
                }
            },
            "functions" => {
                if let Some(a) = opt(v, |v| array(k, v))?
                    && !a.is_empty()
                {
                    return Err(ApiError::invalid(
                        k,
                        "functions (deprecated) are not supported; send tools",
                    ));
                }
            }
            "response_format" => {
                if let Some(o) = opt(v, |v| object(k, v))?
                    && let Some(g) = response_format(o)?
                {
                    grammars.push(("response_format", g));
                }
            }
            // vLLM's guided decoding: its older fields, and `structured_outputs`.
            "guided_json" | "guided_regex" | "guided_choice" | "guided_grammar" => {
                if let Some((field, kind)) = GUIDED.iter().find(|(f, _)| *f == k)
                    && let Some(g) = guided(field, kind, v)?
                {
                    grammars.push((field, g));
                }
            }
            "structured_outputs" => {
                if let Some(o) = opt(v, |v| object(k, v))? {
                    grammars.extend(structured_outputs(o)?);
                }
            }
            "store" => r.store = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            "prediction" => r.prediction = opt(v, prediction)?,
            "metadata" => r.metadata = metadata(v)?,
            // Accepted and without effect here (OpenAI's routing, safety and style hints).
            "user"
            | "safety_identifier"
            | "prompt_cache_key"
            | "prompt_cache_retention"
            | "verbosity"
            | "service_tier"
            | "function_call"
            | "parallel_tool_calls" => {}
            "policy" => {
                if let Some(p) = opt(v, |v| string(k, v))? {
                    if p.trim().is_empty() {
                        return Err(ApiError::invalid(
                            k,
                            "policy must be a non-empty \"name\" or \"name@version\"",
                        ));
                    }
                    r.policy = Some(p);
                }
            }
            "policy_params" => {
                if let Some(o) = opt(v, |v| object(k, v))? {
                    for (pk, pv) in o {
                        let name = format!("policy_params.{pk}");
                        let x = number(&name, pv)?;
                        r.policy_params.push((pk.clone(), x));
                    }
                }
            }
            "speculation" => r.speculation = speculation(v)?,
            _ => return Err(unknown_field(k)),
        }
    }
    if tools_off {
        r.tools = None;
    }
    if let Some(name) = tool_forced {
        let tools = r.tools.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "tool_choice",
                "tool_choice requires a call, but the request offers no tools",
            )
        })?;
        grammars.push(("tool_choice", tool_call_grammar(tools, name.as_deref())?));
    }
    if grammars.len() > 1 {
        let names: Vec<&str> = grammars.iter().map(|(f, _)| *f).collect();
        return Err(ApiError::invalid(
            grammars[1].0,
            format!(
                "the output can follow one grammar, but {} each set one",
                names.join(" and ")
            ),
        ));
    }
    r.grammar = grammars.pop();
    if r.suffix.is_some() && r.echo {
        return Err(ApiError::invalid(
            "suffix",
            "suffix (fill-in-the-middle) cannot be combined with echo",
        ));
    }
    // The template's own kwargs win over the request's effort.
    if let Some(e) = effort {
        r.template_vars
            .get_or_insert_with(Map::new)
            .entry("reasoning_effort")
            .or_insert(Value::String(e));
    }
    r.continuous_usage &= r.include_usage;
    if let Some(b) = r.best_of {
        if b < r.n {
            return Err(ApiError::invalid(
                "best_of",
                format!("best_of ({b}) must be at least n ({})", r.n),
            ));
        }
        if r.stream && b > r.n {
            return Err(ApiError::invalid(
                "best_of",
                "best_of above n cannot be streamed (the best are known once all have finished)",
            ));
        }
    }
    let generations = (1 + r.more_prompts.len()) * r.candidates();
    if generations > MAX_CHOICES {
        let (field, per) = match r.best_of {
            Some(b) => ("best_of", format!("best_of = {b} generations")),
            None => ("n", format!("n = {} choices", r.n)),
        };
        return Err(ApiError::invalid(
            field,
            format!(
                "{} prompts with {per} each make {generations} generations; at most {MAX_CHOICES} per request",
                1 + r.more_prompts.len(),
            ),
        ));
    }
    if r.max_tokens == Some(0) && !r.echo && r.prompt_logprobs.is_none() {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1 (0 only with echo or prompt_logprobs, to score the prompt)",
        ));
    }
    // The prompt's scores come once, with the whole response (as in vLLM).
    if r.prompt_logprobs.is_some() && r.stream {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            "prompt_logprobs is not available with stream",
        ));
    }
    if chat {
        if top_logprobs.is_some() && !chat_logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            ));
        }
        r.logprobs = chat_logprobs.then(|| top_logprobs.unwrap_or(0) as usize);
        r.framing.check(r.continue_final)?;
        if r.continue_final && r.messages.last().is_some_and(|m| m.role != "assistant") {
            return Err(ApiError::invalid(
                "continue_final_message",
                "continue_final_message needs the last message to be the assistant's (the text to continue)",
            ));
        }
    }
    match endpoint {
        Endpoint::Completions if r.prompt.is_none() => {
            return Err(ApiError::invalid(
                "prompt",
                "missing required field `prompt`",
            ));
        }
        Endpoint::Chat if !obj.contains_key("messages") => {
            return Err(ApiError::invalid(
                "messages",
                "missing required field `messages`",
            ));
        }
        Endpoint::Chat if r.messages.is_empty() => {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        _ => {}
    }
    Ok(r)
}

/// OpenAI's `response_format`: `{"type": "text"}` (no grammar), `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`.
fn response_format(o: &Map<String, Value>) -> Result<Option<GrammarSpec>, ApiError> {
    const K: &str = "response_format";
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::json_object())),
        Some("json_schema") => {
            let js = object(
                "response_format.json_schema",
                o.get("json_schema").unwrap_or(&Value::Null),
            )?;
            for (k, v) in js {
                let name = format!("response_format.json_schema.{k}");
                match k.as_str() {
                    "name" | "description" => {
                        string(&name, v)?;
                    }
                    "strict" => {
                        opt(v, |v| boolean(&name, v))?;
                    }
                    "schema" => {}
                    _ => return Err(unknown_field(&name)),
                }
            }
            Ok(Some(match js.get("schema") {
                Some(v) => GrammarSpec::JsonSchema(json_schema_value(
                    "response_format.json_schema.schema",
                    v,
                )?),
                None => GrammarSpec::json_object(),
            }))
        }
        _ => Err(ApiError::invalid(
            format!("{K}.type"),
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// vLLM's guided-decoding fields: the older top-level ones and `structured_outputs`' keys,
/// each with the kind of grammar it gives.
const GUIDED: &[(&str, &str)] = &[
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
    ("structured_outputs.json", "json"),
    ("structured_outputs.regex", "regex"),
    ("structured_outputs.choice", "choice"),
    ("structured_outputs.grammar", "grammar"),
    ("structured_outputs.json_object", "json_object"),
];

/// A guided-decoding field's grammar (`kind` as [`GUIDED`] names it); `None` when null.
fn guided(field: &str, kind: &str, v: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    Ok(match kind {
        "json" => opt(v, |v| json_schema_value(field, v))?.map(GrammarSpec::JsonSchema),
        "regex" => opt(v, |v| string(field, v))?.map(GrammarSpec::Regex),
        "grammar" => opt(v, |v| string(field, v))?.map(GrammarSpec::Lark),
        "json_object" => {
            (opt(v, |v| boolean(field, v))? == Some(true)).then(GrammarSpec::json_object)
        }
        _ => match opt(v, |v| array(field, v))? {
            None => None,
            Some(a) => {
                let choices = (a.iter().enumerate())
                    .map(|(i, c)| string(&format!("{field}[{i}]"), c))
                    .collect::<Result<Vec<_>, _>>()?;
                if choices.is_empty() {
                    return Err(ApiError::invalid(
                        field,
                        format!("{field} must not be empty"),
                    ));
                }
                Some(GrammarSpec::Choice(choices))
            }
        },
    })
}

/// vLLM's `structured_outputs` (its newer name for guided decoding): `json`, `regex`,
/// `choice`, `grammar` or `json_object`; `disable_fallback` means nothing here (one backend).
fn structured_outputs(
    o: &Map<String, Value>,
) -> Result<Vec<(&'static str, GrammarSpec)>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in o {
        let name = format!("structured_outputs.{k}");
        match GUIDED.iter().find(|(f, _)| *f == name) {
            Some((field, kind)) => {
                if let Some(g) = guided(field, kind, v)? {
                    out.push((*field, g));
                }
            }
            None if k == "disable_fallback" || k.starts_with("_backend") => {}
            None => {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "structured_outputs.{k} is not supported (json, regex, choice, grammar or json_object)"
                    ),
                )
                .with_code("unknown_parameter"));
            }
        }
    }
    Ok(out)
}

/// A JSON Schema: an object (or `true`), or (vLLM's `guided_json`) a string holding one.
fn json_schema_value(name: &str, v: &Value) -> Result<Value, ApiError> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::invalid(name, format!("{name} is a string but not JSON: {e}"))
        })?,
        v => v.clone(),
    };
    match schema {
        Value::Object(_) | Value::Bool(true) => Ok(schema),
        _ => Err(ApiError::invalid(
            name,
            format!("{name} must be a JSON Schema (an object)"),
        )),
    }
}

/// `tool_choice: {"type": "function", "function": {"name": ...}}`: the name.
fn named_tool(o: &Map<String, Value>) -> Result<String, ApiError> {
    if o.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(
            "tool_choice.type",
            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
        ));
    }
    o.get("function")
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::invalid(
                "tool_choice.function.name",
                "a named tool_choice needs a non-empty string `function.name`",
            )
        })
}

/// The grammar of a forced call: the bare `{"name": ..., "arguments": {...}}` object (the form
/// [`super::tools::parse`] reads), its name one of the tools (`name`: that one) and its arguments
/// matching that tool's `parameters` schema.
fn tool_call_grammar(tools: &Value, name: Option<&str>) -> Result<GrammarSpec, ApiError> {
    let call = |f: &Value| {
        let params = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => json!({"type": "object"}),
        };
        json!({
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let functions: Vec<&Value> = tools
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["function"])
        .filter(|f| name.is_none_or(|n| f["name"] == n))
        .collect();
    let schema = match functions.as_slice() {
        [] => {
            return Err(ApiError::invalid(
                "tool_choice.function.name",
                format!(
                    "tool_choice names {:?}, which is not among the tools",
                    name.unwrap_or_default()
                ),
            ));
        }
        [f] => call(f),
        many => json!({"anyOf": many.iter().map(|f| call(f)).collect::<Vec<_>>()}),
    };
    Ok(GrammarSpec::JsonSchema(schema))
}

/// A forced call (the JSON schema of `tool_call_grammar`) as gpt-oss writes one, a harmony
/// message to the function: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`
/// and the arguments' JSON (the reply ends with `<|call|>`, an end token). `special(marker)`
/// says whether the vocabulary holds the marker as a special token (then the grammar asks for
/// that token, as the model writes it); else the marker is text.
pub fn harmony_call_grammar(
    call: &GrammarSpec,
    special: impl Fn(&str) -> bool,
) -> Result<GrammarSpec, String> {
    let GrammarSpec::JsonSchema(schema) = call else {
        return Err("a forced call's grammar is a JSON schema".into());
    };
    let calls: Vec<&Value> = match schema.get("anyOf").and_then(Value::as_array) {
        Some(many) => many.iter().collect(),
        None => vec![schema],
    };
    let marker = |m: &str| match special(m) {
        true => m.to_string(),
        false => format!("{m:?}"),
    };
    let mut rules = Vec::with_capacity(calls.len());
    let mut lark = String::new();
    for (i, c) in calls.iter().enumerate() {
        let props = &c["properties"];
        let name = props["name"]["const"]
            .as_str()
            .ok_or("a forced call without a function name")?;
        let header = serde_json::to_string(&format!("commentary to=functions.{name} "))
            .map_err(|e| e.to_string())?;
        lark.push_str(&format!(
            "call_{i}: {} {header} {} \"json\" {} %json {}\n",
            marker("<|channel|>"),
            marker("<|constrain|>"),
            marker("<|message|>"),
            crate::sample::bounded_json(&props["arguments"])
        ));
        rules.push(format!("call_{i}"));
    }
    Ok(GrammarSpec::Lark(format!(
        "start: {}\n{lark}",
        rules.join(" | ")
    )))
}

/// `{"token id": bias, ...}`: ids as decimal strings (JSON keys), biases in [-100, 100]. Whether
/// an id is in the vocabulary is the engine's check.
fn logit_bias(o: &Map<String, Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let max = MAX_LOGIT_BIAS as f64;
    o.iter()
        .map(|(key, v)| {
            let name = format!("logit_bias.{key}");
            let id = key.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    &name,
                    format!("logit_bias keys are token ids (non-negative integers), got {key:?}"),
                )
            })?;
            Ok((id, num_range(&name, v, -max, max)? as f32))
        })
        .collect()
}

/// What `POST /tokenize` tokenizes.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizeInput {
    Prompt(String),
    Messages {
        messages: Vec<ChatMessage>,
        /// Whether the last (assistant) message is continued.
        continue_final: bool,
        template_vars: Option<Map<String, Value>>,
    },
}

/// How a prompt becomes tokens: vLLM's `add_generation_prompt` (a chat template ends with the
/// assistant's turn opened; default true) and `add_special_tokens` (the model's BOS is added,
/// as the GGUF asks; default true; false: only what the text or template writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub generation_prompt: bool,
    pub special_tokens: bool,
    /// `add_generation_prompt` was sent true (not the default).
    asked_generation_prompt: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            generation_prompt: true,
            special_tokens: true,
            asked_generation_prompt: false,
        }
    }
}

impl Framing {
    fn read(&mut self, k: &str, v: &Value) -> Result<(), ApiError> {
        let Some(b) = opt(v, |v| boolean(k, v))? else {
            return Ok(());
        };
        if k == "add_generation_prompt" {
            self.generation_prompt = b;
            self.asked_generation_prompt = b;
        } else {
            self.special_tokens = b;
        }
        Ok(())
    }

    /// A continued final message has no generation prompt: asking for one too is a contradiction.
    fn check(&self, continue_final: bool) -> Result<(), ApiError> {
        if continue_final && self.asked_generation_prompt {
            return Err(ApiError::invalid(
                "add_generation_prompt",
                "add_generation_prompt and continue_final_message cannot both be true (a continued message opens no new turn)",
            ));
        }
        Ok(())
    }

    /// Whether the chat template opens the assistant's turn.
    pub fn opens_turn(&self, continue_final: bool) -> bool {
        self.generation_prompt && !continue_final
    }
}

/// `POST /tokenize`'s body: `prompt` (a string) or `messages` (a chat), and optionally `model`;
/// also whether vLLM's `return_token_strs` asks for each token's text.
pub fn parse_tokenize(body: &[u8]) -> Result<(TokenizeInput, bool, Framing), ApiError> {
    let obj = json_object(body)?;
    let mut strs = false;
    let mut framing = Framing::default();
    let input = tokenize_input(&obj, &mut strs, &mut framing)?;
    Ok((input, strs, framing))
}

fn tokenize_input(
    obj: &Map<String, Value>,
    strs: &mut bool,
    framing: &mut Framing,
) -> Result<TokenizeInput, ApiError> {
    let mut input = None;
    let mut continue_final = false;
    let mut vars = None;
    for (k, v) in obj {
        match k.as_str() {
            "model" => {
                opt(v, |v| string(k, v))?;
            }
            "return_token_strs" => *strs = opt(v, |v| boolean(k, v))?.unwrap_or(false),
            "prompt" => input = Some(TokenizeInput::Prompt(string(k, v)?)),
            "messages" => {
                input = Some(TokenizeInput::Messages {
                    messages: messages(v)?,
                    continue_final: false,
                    template_vars: None,
                })
            }
            "continue_final_message" => {
                continue_final = opt(v, |v| boolean(k, v))?.unwrap_or(false)
            }
            "chat_template_kwargs" => vars = opt(v, |v| template_vars(k, v))?,
            "add_generation_prompt" | "add_special_tokens" => framing.read(k, v)?,
            _ => return Err(unknown_field(k)),
        }
    }
    framing.check(continue_final)?;
    if obj.contains_key("prompt") && obj.contains_key("messages") {
        return Err(ApiError::invalid(
            "prompt",
            "send either `prompt` or `messages`, not both",
        ));
    }
    match input {
        Some(TokenizeInput::Messages { messages, .. }) => Ok(TokenizeInput::Messages {
            messages,
            continue_final,
            template_vars: vars,
        }),
        Some(_) if continue_final => Err(ApiError::invalid(
            "continue_final_message",
            "continue_final_message applies to `messages`",
        )),
        Some(_) if vars.is_some() => Err(ApiError::invalid(
            "chat_template_kwargs",
            "chat_template_kwargs applies to `messages`",
        )),
        Some(_) if obj.contains_key("add_generation_prompt") => Err(ApiError::invalid(
            "add_generation_prompt",
            "add_generation_prompt applies to `messages`",
        )),
        Some(p) => Ok(p),
        None => Err(ApiError::invalid(
            "prompt",
            "missing field `prompt` (text) or `messages` (a chat)",
        )),
    }
}

/// `POST /detokenize`'s body: `tokens` (ids), and optionally `model`.
pub fn parse_detokenize(body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let obj = json_object(body)?;
    let mut tokens = None;
    for (k, v) in &obj {
        match k.as_str() {
            "model" => {
                opt(v, |v| string(k, v))?;
            }
            "tokens" => {
                let ids = array(k, v)?
                    .iter()
                    .enumerate()
                    .map(|(i, t)| int_range(&format!("tokens[{i}]"), t, 0, u32::MAX as i64))
                    .map(|r| r.map(|t| t as u32))
                    .collect::<Result<Vec<u32>, ApiError>>()?;
                tokens = Some(ids);
            }
            _ => return Err(unknown_field(k)),
        }
    }
    tokens.ok_or_else(|| ApiError::invalid("tokens", "missing field `tokens` (token ids)"))
}

/// One text of an embeddings request: a string, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// `POST /v1/embeddings`'s body, as OpenAI's API defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: Option<String>,
    pub inputs: Vec<EmbedInput>,
    /// `encoding_format: "base64"`: each vector as the base64 of its little-endian f32 bytes.
    pub base64: bool,
    /// Keep the leading `dimensions` values (then scale to unit length again).
    pub dimensions: Option<usize>,
    /// What errors call each input (`/v1/rerank`'s `query`, `documents[i]`...); empty:
    /// `input` / `input[i]`.
    pub names: Vec<String>,
}

/// The most texts one embeddings request may hold (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// `input` is a string, an array of strings, an array of token ids, or an array of arrays of
/// token ids; `encoding_format` is `float` or `base64`; `user` is accepted and ignored.
pub fn parse_embeddings(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
    let obj = json_object(body)?;
    let mut req = EmbeddingsRequest {
        model: None,
        inputs: Vec::new(),
        base64: false,
        dimensions: None,
        names: Vec::new(),
    };
    for (k, v) in &obj {
        match k.as_str() {
            "model" => req.model = opt(v, |v| string(k, v))?,
            "input" => req.inputs = embed_inputs(v)?,
            "encoding_format" => {
                req.base64 = match opt(v, |v| str_of(k, v))? {
                    None | Some("float") => false,
                    Some("base64") => true,
                    Some(other) => {
                        return Err(ApiError::invalid(
                            k,
                            format!(
                                "encoding_format must be \"float\" or \"base64\", got {other:?}"
                            ),
                        ));
                    }
                }
            }
            "dimensions" => {
                req.dimensions =
                    opt(v, |v| int_range(k, v, 1, u32::MAX as i64))?.map(|d| d as usize)
            }
            "user" => {
                opt(v, |v| string(k, v))?;
            }
            _ => return Err(unknown_field(k)),
        }
    }
    if !obj.contains_key("input") {
        return Err(ApiError::invalid(
            "input",
            "missing field `input` (a string, an array of strings, or token ids)",
        ));
    }
    Ok(req)
}

/// `POST /v1/rerank` (Jina's and Cohere's shape, as vLLM serves it): documents ranked by how
/// close each is to the query.
#[derive(Clone, Debug, PartialEq)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<String>,
    /// Only the best `top_n` come back (all when absent).
    pub top_n: Option<usize>,
    /// Each result carries its document's text (default true).
    pub return_documents: bool,
}

pub fn parse_rerank(body: &[u8]) -> Result<RerankRequest, ApiError> {
    let obj = json_object(body)?;
    let mut r = RerankRequest {
        model: None,
        query: String::new(),
        documents: Vec::new(),
        top_n: None,
        return_documents: true,
    };
    let (mut query, mut documents) = (None, None);
    for (k, v) in &obj {
        match k.as_str() {
            "model" => r.model = opt(v, |v| string(k, v))?,
            "query" => query = Some(non_empty(k, str_of(k, v)?)?),
            "documents" => documents = Some(texts(k, v, true)?),
            // vLLM's default, 0, means all.
            "top_n" => {
                r.top_n = opt(v, |v| int_range(k, v, 0, MAX_EMBED_INPUTS as i64))?
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
            }
            "return_documents" => r.return_documents = opt(v, |v| boolean(k, v))?.unwrap_or(true),
            "user" => {
                opt(v, |v| string(k, v))?;
            }
            _ => return Err(unknown_field(k)),
        }
    }
    r.query = query.ok_or_else(|| {
        ApiError::invalid(
            "query",
            "missing field `query` (the text to rank documents by)",
        )
    })?;
    r.documents = documents.ok_or_else(|| {
        ApiError::invalid("documents", "missing field `documents` (an array of texts)")
    })?;
    Ok(r)
}

/// `POST /v1/score` (vLLM's): how close each `text_2` is to its `text_1` (one `text_1` for all,
/// or one per `text_2`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreRequest {
    pub model: Option<String>,
    pub text_1: Vec<String>,
    pub text_2: Vec<String>,
}

pub fn parse_score(body: &[u8]) -> Result<ScoreRequest, ApiError> {
    let obj = json_object(body)?;
    let mut r = ScoreRequest {
        model: None,
        text_1: Vec::new(),
        text_2: Vec::new(),
    };
    for (k, v) in &obj {
        match k.as_str() {
            "model" => r.model = opt(v, |v| string(k, v))?,
            "text_1" => r.text_1 = texts(k, v, false)?,
            "text_2" => r.text_2 = texts(k, v, false)?,
            "user" => {
                opt(v, |v| string(k, v))?;
            }
            _ => return Err(unknown_field(k)),
        }
    }
    for (name, t) in [("text_1", &r.text_1), ("text_2", &r.text_2)] {
        if t.is_empty() {
            return Err(ApiError::invalid(
                name,
                format!("missing field `{name}` (a text or an array of texts)"),
            ));
        }
    }
    if r.text_1.len() != 1 && r.text_1.len() != r.text_2.len() {
        return Err(ApiError::invalid(
            "text_2",
            format!(
                "text_1 has {} texts and text_2 {}: give one text_1 for all, or one per text_2",
                r.text_1.len(),
                r.text_2.len()
            ),
        ));
    }
    if r.text_1.len() + r.text_2.len() > MAX_EMBED_INPUTS {
        return Err(ApiError::invalid(
            "text_2",
            format!("at most {MAX_EMBED_INPUTS} texts per request"),
        ));
    }
    Ok(r)
}

/// A non-empty string or a non-empty array of them (with `objects`, also Cohere's
/// `{"text": ...}`); an empty text is refused, as `/v1/embeddings` refuses it.
fn texts(name: &str, v: &Value, objects: bool) -> Result<Vec<String>, ApiError> {
    let a = match v {
        Value::String(s) if !objects => return Ok(vec![non_empty(name, s)?]),
        _ => array(name, v)?,
    };
    if a.is_empty() {
        return Err(ApiError::invalid(name, format!("{name} must not be empty")));
    }
    if a.len() >= MAX_EMBED_INPUTS {
        return Err(ApiError::invalid(
            name,
            format!("at most {} texts per request", MAX_EMBED_INPUTS - 1),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, d)| {
            let at = format!("{name}[{i}]");
            match d {
                Value::String(s) => non_empty(&at, s),
                Value::Object(o) if objects => match o.get("text") {
                    Some(Value::String(s)) => non_empty(&format!("{at}.text"), s),
                    _ => Err(ApiError::invalid(
                        format!("{at}.text"),
                        "a document object needs a `text` string",
                    )),
                },
                other => Err(wrong_type(&at, "a string", other)),
            }
        })
        .collect()
}

fn non_empty(name: &str, s: &str) -> Result<String, ApiError> {
    match s.is_empty() {
        true => Err(ApiError::invalid(name, format!("{name} is empty"))),
        false => Ok(s.to_string()),
    }
}

fn embed_inputs(v: &Value) -> Result<Vec<EmbedInput>, ApiError> {
    const I: &str = "input";
    let empty = |name: &str| ApiError::invalid(name, format!("{name} must not be empty"));
    let inputs = match v {
        Value::String(s) => vec![EmbedInput::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(empty(I)),
        Value::Array(a) => match &a[0] {
            Value::Number(_) => vec![EmbedInput::Tokens(token_ids(I, a)?)],
            Value::String(_) => a
                .iter()
                .enumerate()
                .map(|(i, s)| string(&format!("input[{i}]"), s).map(EmbedInput::Text))
                .collect::<Result<_, _>>()?,
            Value::Array(_) => a
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let name = format!("input[{i}]");
                    token_ids(&name, array(&name, t)?).map(EmbedInput::Tokens)
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(ApiError::invalid(
                    I,
                    format!(
                        "input must be a string, an array of strings, token ids or arrays of token ids, got an array of {}",
                        type_name(other)
                    ),
                ));
            }
        },
        _ => return Err(wrong_type(I, "a string or an array", v)),
    };
    if inputs.len() > MAX_EMBED_INPUTS {
        return Err(ApiError::invalid(
            I,
            format!(
                "input holds {} texts; at most {MAX_EMBED_INPUTS} per request",
                inputs.len()
            ),
        ));
    }
    for (i, x) in inputs.iter().enumerate() {
        let blank = match x {
            EmbedInput::Text(s) => s.is_empty(),
            EmbedInput::Tokens(t) => t.is_empty(),
        };
        if blank {
            return Err(empty(&match v {
                Value::String(_) => I.to_string(),
                _ => format!("input[{i}]"),
            }));
        }
    }
    Ok(inputs)
}

/// `metadata` as OpenAI's objects take it: at most 16 pairs, keys of at most 64 characters,
/// values strings of at most 512 (`None` for null).
pub fn metadata(v: &Value) -> Result<Option<Map<String, Value>>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Object(m) => {
            if m.len() > 16 {
                return Err(ApiError::invalid(
                    "metadata",
                    format!("metadata holds {} keys; at most 16", m.len()),
                ));
            }
            for (k, v) in m {
                let ok =
                    k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512);
                if !ok {
                    return Err(ApiError::invalid(
                        format!("metadata.{k}"),
                        "metadata keys are at most 64 characters and values strings of at most 512",
                    ));
                }
            }
            Ok(Some(m.clone()))
        }
        _ => Err(ApiError::invalid(
            "metadata",
            "metadata must be an object of strings",
        )),
    }
}

pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON: {e} (send a JSON object with Content-Type: application/json)"
        ))
    })?;
    match value {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

/// OpenAI's `reasoning_effort`, which reaches the chat template as the variable of that name
/// (gpt-oss's template writes it into the system message as `Reasoning: low`).
pub(crate) fn reasoning_effort(k: &str, v: &Value) -> Result<String, ApiError> {
    const LEVELS: [&str; 5] = ["none", "minimal", "low", "medium", "high"];
    match v.as_str() {
        Some(e) if LEVELS.contains(&e) => Ok(e.to_string()),
        _ => Err(ApiError::invalid(
            k,
            format!("{k} must be one of {LEVELS:?}, got {v}"),
        )),
    }
}

/// `chat_template_kwargs`: an object of template variables. The ones the server sets itself
/// (the conversation, the tools, the special tokens) cannot be replaced this way.
fn template_vars(k: &str, v: &Value) -> Result<Map<String, Value>, ApiError> {
    let vars = object(k, v)?;
    for name in vars.keys() {
        if crate::models::chat::SERVER_VARS.contains(&name.as_str()) {
            return Err(ApiError::invalid(
                format!("{k}.{name}"),
                format!(
                    "`{name}` is set by the server from the request; it cannot be a template variable"
                ),
            ));
        }
    }
    Ok(vars.clone())
}

/// OpenAI's `prediction`: `{"type": "content", "content": TEXT or [text parts]}`.
fn prediction(v: &Value) -> Result<String, ApiError> {
    let o = object("prediction", v)?;
    for (k, x) in o {
        match k.as_str() {
            "type" => {
                if str_of("prediction.type", x)? != "content" {
                    return Err(ApiError::invalid(
                        "prediction.type",
                        "prediction.type must be \"content\"",
                    ));
                }
            }
            "content" => {}
            _ => return Err(unknown_field(&format!("prediction.{k}"))),
        }
    }
    match o.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (i, p) in parts.iter().enumerate() {
                let at = format!("prediction.content[{i}]");
                let p = object(&at, p)?;
                if p.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(ApiError::invalid(
                        format!("{at}.type"),
                        "a predicted content part must be {\"type\": \"text\", \"text\": ...}",
                    ));
                }
                s.push_str(str_of(
                    &format!("{at}.text"),
                    p.get("text").unwrap_or(&Value::Null),
                )?);
            }
            Ok(s)
        }
        Some(other) => Err(ApiError::invalid(
            "prediction.content",
            format!(
                "prediction.content must be a string or an array of text parts, got {}",
                type_name(other)
            ),
        )),
        None => Err(ApiError::invalid(
            "prediction.content",
            "a prediction needs `content`",
        )),
    }
}

fn unknown_field(name: &str) -> ApiError {
    ApiError::invalid(name, format!("unknown field `{name}`")).with_code("unknown_parameter")
}

/// How an error names a JSON value's type ("a string", "an array"...).
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(name: &str, want: &str, v: &Value) -> ApiError {
    ApiError::invalid(name, format!("{name} must be {want}, got {}", type_name(v)))
}

/// `null` counts as absent.
fn opt<'a, T>(
    v: &'a Value,
    f: impl FnOnce(&'a Value) -> Result<T, ApiError>,
) -> Result<Option<T>, ApiError> {
    if v.is_null() {
        Ok(None)
    } else {
        f(v).map(Some)
    }
}

fn string(name: &str, v: &Value) -> Result<String, ApiError> {
    str_of(name, v).map(str::to_string)
}

/// `v` as a string; the error names the field and what it got.
pub(crate) fn str_of<'a>(name: &str, v: &'a Value) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| wrong_type(name, "a string", v))
}

fn boolean(name: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| wrong_type(name, "a boolean", v))
}

pub(crate) fn object<'a>(name: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| wrong_type(name, "an object", v))
}

pub(crate) fn array<'a>(name: &str, v: &'a Value) -> Result<&'a Vec<Value>, ApiError> {
    v.as_array().ok_or_else(|| wrong_type(name, "an array", v))
}

fn number(name: &str, v: &Value) -> Result<f64, ApiError> {
    let x = v.as_f64().ok_or_else(|| wrong_type(name, "a number", v))?;
    if !x.is_finite() {
        return Err(ApiError::invalid(name, format!("{name} must be finite")));
    }
    Ok(x)
}

fn num_range(name: &str, v: &Value, lo: f64, hi: f64) -> Result<f64, ApiError> {
    let x = number(name, v)?;
    if x < lo || x > hi {
        return Err(ApiError::invalid(
            name,
            format!("{name} must be in [{lo}, {hi}], got {x}"),
        ));
    }
    Ok(x)
}

/// An integer (a float with no fraction, like 16.0, is accepted as OpenAI does).
fn int_range(name: &str, v: &Value, lo: i64, hi: i64) -> Result<i64, ApiError> {
    let n = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        _ => None,
    };
    let Some(n) = n else {
        return Err(match v {
            Value::Number(n) => {
                ApiError::invalid(name, format!("{name} must be an integer, got {n}"))
            }
            _ => wrong_type(name, "an integer", v),
        });
    };
    if n < lo || n > hi {
        return Err(ApiError::invalid(
            name,
            format!("{name} must be in [{lo}, {hi}], got {n}"),
        ));
    }
    Ok(n)
}

fn token_ids(name: &str, a: &[Value]) -> Result<Vec<u32>, ApiError> {
    a.iter()
        .enumerate()
        .map(|(i, t)| int_range(&format!("{name}[{i}]"), t, 0, u32::MAX as i64).map(|t| t as u32))
        .collect()
}

/// A completions `prompt`: a string, token ids, or an array of either (several prompts).
fn prompts(v: &Value) -> Result<Vec<PromptInput>, ApiError> {
    const P: &str = "prompt";
    match v {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid(P, "prompt must not be empty")),
        Value::Array(a) if a[0].is_number() => Ok(vec![PromptInput::Tokens(token_ids(P, a)?)]),
        Value::Array(a) => {
            if a.len() > MAX_CHOICES {
                return Err(ApiError::invalid(
                    P,
                    format!("at most {MAX_CHOICES} prompts per request, got {}", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, p)| {
                    let at = format!("{P}[{i}]");
                    match p {
                        Value::String(s) => Ok(PromptInput::Text(s.clone())),
                        Value::Array(ids) if ids.is_empty() => {
                            Err(ApiError::invalid(at, "a prompt must not be empty"))
                        }
                        Value::Array(ids) => Ok(PromptInput::Tokens(token_ids(&at, ids)?)),
                        other => Err(wrong_type(&at, "a string or an array of token ids", other)),
                    }
                })
                .collect()
        }
        _ => Err(wrong_type(P, "a string or an array of token ids", v)),
    }
}

fn messages(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let a = array("messages", v)?;
    let mut out = Vec::with_capacity(a.len());
    for (i, m) in a.iter().enumerate() {
        let at = format!("messages[{i}]");
        let o = object(&at, m)?;
        let mut role = None;
        let mut content = None;
        let (mut calls, mut call_id) = (None, None);
        for (k, mv) in o {
            let name = format!("{at}.{k}");
            match k.as_str() {
                "role" => {
                    let r = string(&name, mv)?;
                    if r.is_empty() {
                        return Err(ApiError::invalid(name, "role must not be empty"));
                    }
                    // OpenAI's newer name for the system role; chat templates know only
                    // "system" (Qwen's drops a message with a role it does not know).
                    role = Some(if r == "developer" { "system".into() } else { r });
                }
                "content" => content = Some(message_content(&name, mv)?),
                "tool_calls" => calls = opt(mv, |v| tool_calls(&name, v))?,
                "tool_call_id" => call_id = opt(mv, |v| string(&name, v))?,
                // Accepted and not used by chat templates we render.
                "name" | "function_call" | "refusal" => {}
                _ => return Err(unknown_field(&name)),
            }
        }
        let role = role.ok_or_else(|| {
            ApiError::invalid(format!("{at}.role"), format!("{at} has no `role`"))
        })?;
        out.push(ChatMessage {
            role,
            content: content.unwrap_or_default(),
            tool_calls: calls,
            tool_call_id: call_id,
        });
    }
    Ok(out)
}

/// OpenAI's `tools`: `{"type": "function", "function": {"name": ..., "description"?: ...,
/// "parameters"?: {...}}}` each, passed on to the chat template as they are.
fn tools(a: &[Value]) -> Result<Value, ApiError> {
    for (i, t) in a.iter().enumerate() {
        let at = format!("tools[{i}]");
        let o = object(&at, t)?;
        if o.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                format!("{at}.type"),
                "tools may only be {\"type\": \"function\", \"function\": {...}}",
            ));
        }
        let f = object(
            &format!("{at}.function"),
            o.get("function").unwrap_or(&Value::Null),
        )?;
        match f.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => {
                return Err(ApiError::invalid(
                    format!("{at}.function.name"),
                    "a function needs a non-empty string `name`",
                ));
            }
        }
    }
    Ok(Value::Array(a.to_vec()))
}

/// An assistant message's `tool_calls`, with each call's `function.arguments` (a JSON string
/// in OpenAI's API) parsed into the object templates expect.
fn tool_calls(name: &str, v: &Value) -> Result<Value, ApiError> {
    let mut calls = Vec::new();
    for (i, c) in array(name, v)?.iter().enumerate() {
        let at = format!("{name}[{i}]");
        let mut c = object(&at, c)?.clone();
        let f = c
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("{at}.function"),
                    "a tool call needs a `function` object",
                )
            })?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(
                format!("{at}.function.name"),
                "a tool call needs a string `name`",
            ));
        }
        if let Some(Value::String(s)) = f.get("arguments")
            && let Ok(parsed) = serde_json::from_str::<Value>(s)
        {
            f.insert("arguments".into(), parsed);
        }
        calls.push(Value::Object(c));
    }
    Ok(Value::Array(calls))
}

/// A string, null, or an array of `{"type": "text", "text": ...}` parts (joined).
fn message_content(name: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for (i, p) in parts.iter().enumerate() {
                let pn = format!("{name}[{i}]");
                let o = object(&pn, p)?;
                match o.get("type").and_then(Value::as_str) {
                    Some("text") => {}
                    Some(t) => {
                        return Err(ApiError::invalid(
                            format!("{pn}.type"),
                            format!("content part type `{t}` is not supported (only \"text\")"),
                        ));
                    }
                    None => {
                        return Err(ApiError::invalid(
                            format!("{pn}.type"),
                            "content part has no string `type`",
                        ));
                    }
                }
                let t = o.get("text").ok_or_else(|| {
                    ApiError::invalid(format!("{pn}.text"), "text part has no `text`")
                })?;
                s.push_str(&string(&format!("{pn}.text"), t)?);
            }
            Ok(s)
        }
        _ => Err(wrong_type(name, "a string or an array of text parts", v)),
    }
}

fn stop(v: &Value) -> Result<Vec<String>, ApiError> {
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => {
            if a.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!("at most {MAX_STOP} stop strings, got {}", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, s)| string(&format!("stop[{i}]"), s))
                .collect::<Result<_, _>>()?
        }
        _ => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if let Some(i) = list.iter().position(String::is_empty) {
        return Err(ApiError::invalid(
            format!("stop[{i}]"),
            "stop strings must not be empty",
        ));
    }
    Ok(list)
}

fn speculation(v: &Value) -> Result<SpeculationChoice, ApiError> {
    const S: &str = "speculation";
    match v {
        Value::Null => Ok(SpeculationChoice::Default),
        Value::String(s) if s == "off" => Ok(SpeculationChoice::Off),
        Value::String(s) if s == "default" => Ok(SpeculationChoice::Default),
        Value::Bool(false) => Ok(SpeculationChoice::Off),
        Value::String(s) => Err(ApiError::invalid(
            S,
            format!(
                "speculation must be \"off\" or an object {{\"draft\": ..., \"k\": N}}, got \"{s}\""
            ),
        )),
        Value::Object(o) => {
            let mut draft = None;
            let mut k = None;
            for (key, kv) in o {
                let name = format!("{S}.{key}");
                match key.as_str() {
                    "draft" => {
                        if let Some(d) = opt(kv, |v| string(&name, v))? {
                            draft = Some(
                                DrafterSpec::parse(&d)
                                    .map_err(|e| ApiError::invalid(&name, e.to_string()))?,
                            );
                        }
                    }
                    "k" => {
                        if let Some(n) = opt(kv, |v| int_range(&name, v, 1, MAX_K as i64))? {
                            k = Some(n as usize);
                        }
                    }
                    _ => return Err(unknown_field(&name)),
                }
            }
            Ok(SpeculationChoice::Draft { draft, k })
        }
        _ => Err(wrong_type(
            S,
            "\"off\" or an object {\"draft\": ..., \"k\": N}",
            v,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forced call under the gpt-oss parser is a harmony message to each allowed function:
    /// the markers as special tokens where the vocabulary has them, else as text; the
    /// arguments' schema embedded with JSON's whitespace bounded.
    #[test]
    fn forced_calls_become_harmony_messages() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time"}},
        ]);
        let both = tool_call_grammar(&tools, None).unwrap();
        let GrammarSpec::Lark(g) = harmony_call_grammar(&both, |_| true).unwrap() else {
            panic!("a Lark grammar");
        };
        assert!(g.starts_with("start: call_0 | call_1\n"), "{g}");
        assert!(
            g.contains(r#"call_0: <|channel|> "commentary to=functions.get_weather " <|constrain|> "json" <|message|> %json {"#),
            "{g}"
        );
        assert!(g.contains("to=functions.get_time "), "{g}");
        assert!(g.contains("whitespace_pattern"), "{g}");
        let one = tool_call_grammar(&tools, Some("get_time")).unwrap();
        let GrammarSpec::Lark(g) = harmony_call_grammar(&one, |_| false).unwrap() else {
            panic!("a Lark grammar");
        };
        assert!(g.starts_with("start: call_0\n"), "{g}");
        assert!(
            g.contains(
                r#"call_0: "<|channel|>" "commentary to=functions.get_time " "<|constrain|>""#
            ),
            "{g}"
        );
        assert!(!g.contains("get_weather"), "{g}");
    }

    fn err(endpoint: Endpoint, body: &str) -> ApiError {
        match parse(endpoint, body.as_bytes()) {
            Ok(r) => panic!("{body} parsed: {r:?}"),
            Err(e) => e,
        }
    }

    /// OpenAI's `reasoning_effort` reaches the chat template as a variable (the request's own
    /// `chat_template_kwargs` win); a level OpenAI does not have is refused by name.
    #[test]
    fn reasoning_effort_is_a_template_variable() {
        let vars = |body: &str| {
            parse(Endpoint::Chat, body.as_bytes())
                .unwrap()
                .template_vars
        };
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        assert_eq!(
            vars(&format!(r#"{{{m},"reasoning_effort":"low"}}"#)),
            Some(Map::from_iter([("reasoning_effort".into(), json!("low"))]))
        );
        assert_eq!(
            vars(&format!(
                r#"{{{m},"reasoning_effort":"low","chat_template_kwargs":{{"reasoning_effort":"high","x":1}}}}"#
            )),
            Some(Map::from_iter([
                ("reasoning_effort".into(), json!("high")),
                ("x".into(), json!(1))
            ]))
        );
        assert_eq!(vars(&format!(r#"{{{m},"reasoning_effort":null}}"#)), None);
        let e = err(
            Endpoint::Chat,
            &format!(r#"{{{m},"reasoning_effort":"extreme"}}"#),
        );
        assert!(
            e.message.contains("reasoning_effort") && e.message.contains("\"high\""),
            "{e:?}"
        );
        let e = err(
            Endpoint::Completions,
            r#"{"prompt":"x","reasoning_effort":"low"}"#,
        );
        assert!(e.message.contains("reasoning_effort"), "{e:?}");
    }

    #[test]
    fn full_completion_request() {
        let r = parse(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"hi","max_tokens":8,"temperature":0,"top_p":0.9,"seed":-1,
                "stop":["\n"],"stream":true,"stream_options":{"include_usage":true},"n":1,
                "policy":"judge@0.1.0","policy_params":{"threshold":0.7},
                "speculation":{"draft":"self:4","k":6}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Some(PromptInput::Text("hi".into())));
        assert_eq!(r.n, 1);
        assert_eq!(r.max_tokens, Some(8));
        assert_eq!(r.temperature, 0.0);
        assert_eq!(r.seed, Some(u64::MAX));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.policy.as_deref(), Some("judge@0.1.0"));
        assert_eq!(r.policy_params, vec![("threshold".to_string(), 0.7)]);
        assert_eq!(
            r.speculation,
            SpeculationChoice::Draft {
                draft: Some(DrafterSpec::SelfDraft(4)),
                k: Some(6)
            }
        );
    }

    #[test]
    fn prompt_forms() {
        let p = |b: &str| {
            parse(Endpoint::Completions, b.as_bytes())
                .unwrap()
                .prompt
                .unwrap()
        };
        assert_eq!(p(r#"{"prompt":["x"]}"#), PromptInput::Text("x".into()));
        assert_eq!(p(r#"{"prompt":[1,2]}"#), PromptInput::Tokens(vec![1, 2]));
        assert_eq!(p(r#"{"prompt":[[3]]}"#), PromptInput::Tokens(vec![3]));
        // Several prompts: the first, then the others in order.
        let r = parse(
            Endpoint::Completions,
            br#"{"prompt":["a",[4,5],"c"],"n":2}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Some(PromptInput::Text("a".into())));
        assert_eq!(
            r.more_prompts,
            [
                PromptInput::Tokens(vec![4, 5]),
                PromptInput::Text("c".into())
            ]
        );
        let single = parse(Endpoint::Completions, br#"{"prompt":["a"]}"#).unwrap();
        assert!(single.more_prompts.is_empty());
        let many = format!(r#"{{"prompt":{}}}"#, json!(vec!["x"; MAX_CHOICES + 1]));
        let times_n = format!(
            r#"{{"prompt":{},"n":2}}"#,
            json!(vec!["x"; MAX_CHOICES / 2 + 1])
        );
        for (body, field) in [
            (r#"{"prompt":[1,-2]}"#, "prompt[1]"),
            (r#"{"prompt":["a",[1,-2]]}"#, "prompt[1][1]"),
            (r#"{"prompt":["a",[]]}"#, "prompt[1]"),
            (r#"{"prompt":["a",7]}"#, "prompt[1]"),
            (r#"{"prompt":[["a"]]}"#, "prompt[0][0]"),
            (many.as_str(), "prompt"),
            (times_n.as_str(), "n"),
        ] {
            let e = err(Endpoint::Completions, body);
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e}");
        }
    }

    #[test]
    fn chat_messages_with_parts() {
        let r = parse(
            Endpoint::Chat,
            br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1].content, "ab");
        assert_eq!(
            err(
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#
            )
            .param
            .as_deref(),
            Some("messages[0].content[0].type")
        );
        assert_eq!(
            err(Endpoint::Chat, r#"{"messages":[{"content":"x"}]}"#)
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(Endpoint::Chat, r#"{"messages":[]}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(
                Endpoint::Chat,
                r#"{"prompt":"x","messages":[{"role":"user","content":"x"}]}"#
            )
            .param
            .as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn generation_defaults_fill_only_what_is_absent() {
        let d = generation_defaults(r#"{"temperature":0.5,"max_new_tokens":7}"#).unwrap();
        assert_eq!(default_max_tokens(&d), Some(7));
        let mut o: Map<String, Value> =
            serde_json::from_str(r#"{"prompt":"x","temperature":null}"#).unwrap();
        with_defaults(&mut o, &d);
        assert_eq!(o["temperature"], 0.5);
        // max_tokens is capped where the prompt is known, not set here.
        assert!(!o.contains_key("max_tokens"));
        let mut o: Map<String, Value> = serde_json::from_str(r#"{"temperature":1}"#).unwrap();
        with_defaults(&mut o, &d);
        assert_eq!(o["temperature"], 1);
        for bad in [
            r#"{"top_p":0}"#,
            r#"{"seed":1}"#,
            r#"{"top_k":null}"#,
            "[1]",
        ] {
            assert!(generation_defaults(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn best_of_sets_the_generations_per_prompt() {
        let r = parse(
            Endpoint::Completions,
            br#"{"prompt":"x","n":2,"best_of":5}"#,
        )
        .unwrap();
        assert_eq!((r.n, r.best_of, r.candidates()), (2, Some(5), 5));
        let r = parse(Endpoint::Completions, br#"{"prompt":"x","n":3}"#).unwrap();
        assert_eq!((r.best_of, r.candidates()), (None, 3));
        // As many as n may stream (each is a choice).
        let r = parse(
            Endpoint::Completions,
            br#"{"prompt":"x","best_of":1,"stream":true}"#,
        );
        assert!(r.is_ok());
        let chat = r#"{"messages":[{"role":"user","content":"x"}],"best_of":2}"#;
        let e = parse(Endpoint::Chat, chat.as_bytes()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("best_of"));
        let one = chat.replace("2}", "1}");
        assert!(parse(Endpoint::Chat, one.as_bytes()).is_ok());
    }

    #[test]
    fn each_error_names_its_field() {
        let too_many_stops = format!(
            r#"{{"prompt":"x","stop":{}}}"#,
            json!(vec!["a"; MAX_STOP + 1])
        );
        let cases: &[(&str, &str)] = &[
            (r#"{"prompt":"x","max_tokens":"8"}"#, "max_tokens"),
            (r#"{"prompt":"x","max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":"x","max_tokens":1.5}"#, "max_tokens"),
            (r#"{"prompt":"x","temperature":3}"#, "temperature"),
            (r#"{"prompt":"x","top_p":0}"#, "top_p"),
            (r#"{"prompt":"x","n":0}"#, "n"),
            (r#"{"prompt":"x","n":17}"#, "n"),
            (r#"{"prompt":"x","n":3,"best_of":2}"#, "best_of"),
            (r#"{"prompt":"x","best_of":2,"stream":true}"#, "best_of"),
            (r#"{"prompt":"x","stop":[""]}"#, "stop[0]"),
            (too_many_stops.as_str(), "stop"),
            (r#"{"prompt":"x","stop":5}"#, "stop"),
            (r#"{"prompt":"x","stream":"yes"}"#, "stream"),
            (r#"{"prompt":"x","policy":7}"#, "policy"),
            (
                r#"{"prompt":"x","policy_params":{"t":"high"}}"#,
                "policy_params.t",
            ),
            (r#"{"prompt":"x","policy_params":[1]}"#, "policy_params"),
            (r#"{"prompt":"x","speculation":"fast"}"#, "speculation"),
            (
                r#"{"prompt":"x","speculation":{"draft":"bogus"}}"#,
                "speculation.draft",
            ),
            (r#"{"prompt":"x","speculation":{"k":0}}"#, "speculation.k"),
            (r#"{"prompt":"x","speculation":{"kk":1}}"#, "speculation.kk"),
            (r#"{"prompt":"x","polcy":"strict"}"#, "polcy"),
            (r#"{"prompt":"x","logprobs":21}"#, "logprobs"),
            (r#"{"prompt":"x","logprobs":-1}"#, "logprobs"),
            (r#"{"prompt":"x","logprobs":true}"#, "logprobs"),
            (r#"{"prompt":"x","top_logprobs":2}"#, "top_logprobs"),
            (r#"{"prompt":7}"#, "prompt"),
            (r#"{"max_tokens":3}"#, "prompt"),
            (r#"{"prompt":"x","model":1}"#, "model"),
        ];
        for (body, field) in cases {
            let e = err(Endpoint::Completions, body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(*field), "{body}: {e}");
        }
        // More than OpenAI's 4 stop strings, as harnesses send.
        let five = parse(
            Endpoint::Completions,
            br#"{"prompt":"x","stop":["a","b","c","d","e"]}"#,
        );
        assert_eq!(five.unwrap().stop.len(), 5);
    }

    #[test]
    fn vllm_sampling_extensions() {
        let chat = |extra: &str| {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            parse(Endpoint::Chat, body.as_bytes())
        };
        let r = chat("").unwrap();
        assert!(r.stop_token_ids.is_empty() && r.bad_words.is_empty());
        assert!(r.skip_special && !r.include_stop && !r.tokens_as_ids && !r.continuous_usage);
        assert_eq!(r.truncate_prompt, None);
        assert_eq!((r.prompt_logprobs, r.return_token_ids), (None, false));
        let r = chat(
            r#","stop_token_ids":[7,9],"allowed_token_ids":[1,2],"bad_words":["foo"," bar baz"],
               "include_stop_str_in_output":true,"skip_special_tokens":false,
               "truncate_prompt_tokens":12,"return_tokens_as_token_ids":true,
               "stream_options":{"include_usage":true,"continuous_usage_stats":true},
               "prompt_logprobs":4,"return_token_ids":true"#,
        )
        .unwrap();
        assert_eq!((r.prompt_logprobs, r.return_token_ids), (Some(4), true));
        assert_eq!(r.stop_token_ids, [7, 9]);
        assert_eq!(r.penalties.allowed, [1, 2]);
        assert_eq!(r.bad_words, ["foo", " bar baz"]);
        assert!(r.include_stop && !r.skip_special && r.tokens_as_ids && r.continuous_usage);
        assert_eq!(r.truncate_prompt, Some(Some(12)));
        assert_eq!(
            chat(r#","truncate_prompt_tokens":-1"#)
                .unwrap()
                .truncate_prompt,
            Some(None)
        );
        // null is absent.
        let r = chat(r#","stop_token_ids":null,"bad_words":null,"skip_special_tokens":null"#);
        assert!(r.unwrap().skip_special);
        for (extra, field) in [
            (r#","stop_token_ids":[-1]"#, "stop_token_ids[0]"),
            (r#","stop_token_ids":7"#, "stop_token_ids"),
            (r#","allowed_token_ids":[]"#, "allowed_token_ids"),
            (r#","allowed_token_ids":[1,"a"]"#, "allowed_token_ids[1]"),
            (r#","bad_words":"foo""#, "bad_words"),
            (r#","bad_words":["a","  "]"#, "bad_words[1]"),
            (r#","bad_words":[3]"#, "bad_words[0]"),
            (
                r#","include_stop_str_in_output":1"#,
                "include_stop_str_in_output",
            ),
            (r#","skip_special_tokens":"no""#, "skip_special_tokens"),
            (r#","truncate_prompt_tokens":0"#, "truncate_prompt_tokens"),
            (r#","truncate_prompt_tokens":-2"#, "truncate_prompt_tokens"),
            (
                r#","return_tokens_as_token_ids":"y""#,
                "return_tokens_as_token_ids",
            ),
            (
                r#","stream_options":{"continuous_usage_stats":2}"#,
                "stream_options.continuous_usage_stats",
            ),
            (r#","prompt_logprobs":21"#, "prompt_logprobs"),
            (r#","prompt_logprobs":2,"stream":true"#, "prompt_logprobs"),
            (r#","return_token_ids":"y""#, "return_token_ids"),
        ] {
            let e = chat(extra).unwrap_err();
            assert_eq!(e.status, 400, "{extra}: {e}");
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {e}");
        }
    }

    #[test]
    fn penalties_and_logit_bias() {
        let pen = |b: &str| {
            parse(Endpoint::Completions, b.as_bytes())
                .unwrap()
                .penalties
        };
        assert_eq!(pen(r#"{"prompt":"x"}"#), Penalties::default());
        assert_eq!(
            pen(r#"{"prompt":"x","frequency_penalty":null,"logit_bias":null}"#),
            Penalties::default()
        );
        let p = pen(
            r#"{"prompt":"x","frequency_penalty":0.5,"presence_penalty":-1,
                "repetition_penalty":1.1,"logit_bias":{"50256":-100," 7":2.5}}"#,
        );
        assert_eq!((p.frequency, p.presence, p.repetition), (0.5, -1.0, 1.1));
        let mut bias = p.logit_bias;
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, 2.5), (50256, -100.0)]);
        for (extra, field) in [
            (r#""frequency_penalty":2.5"#, "frequency_penalty"),
            (r#""presence_penalty":"high""#, "presence_penalty"),
            (r#""repetition_penalty":0"#, "repetition_penalty"),
            (r#""repetition_penalty":-1.2"#, "repetition_penalty"),
            (r#""logit_bias":[1]"#, "logit_bias"),
            (r#""logit_bias":{"the":5}"#, "logit_bias.the"),
            (r#""logit_bias":{"-3":5}"#, "logit_bias.-3"),
            (r#""logit_bias":{"12":101}"#, "logit_bias.12"),
            (r#""logit_bias":{"12":"5"}"#, "logit_bias.12"),
        ] {
            let body = format!(r#"{{"prompt":"x",{extra}}}"#);
            let e = err(Endpoint::Completions, &body);
            assert_eq!(e.status, 400, "{body}: {e}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e}");
        }
    }

    #[test]
    fn tools_and_tool_messages() {
        let body = br#"{"messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
              "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"21 C"}],
            "tools":[{"type":"function","function":{"name":"get_weather"}}],"tool_choice":"auto"}"#;
        let r = parse(Endpoint::Chat, body).unwrap();
        assert_eq!(
            r.tools.as_ref().map(|t| t[0]["function"]["name"].clone()),
            Some("get_weather".into())
        );
        // The call's arguments string became the object templates write out.
        let calls = r.messages[1].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"]["city"], "Paris");
        assert_eq!(r.messages[2].tool_call_id.as_deref(), Some("call_1"));
        // tool_choice "none": no tools offered.
        let none = br#"{"messages":[{"role":"user","content":"x"}],
            "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none"}"#;
        assert!(parse(Endpoint::Chat, none).unwrap().tools.is_none());
        let chat =
            |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        for (extra, field) in [
            (r#""tools":[{"type":"retrieval"}]"#, "tools[0].type"),
            (r#""tools":[{"type":"function"}]"#, "tools[0].function"),
            (
                r#""tools":[{"type":"function","function":{"name":""}}]"#,
                "tools[0].function.name",
            ),
            // A forced call needs tools to call.
            (r#""tool_choice":"required""#, "tool_choice"),
            (
                r#""tool_choice":{"type":"function","function":{"name":"f"}}"#,
                "tool_choice",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],
                   "tool_choice":{"type":"function","function":{"name":"g"}}"#,
                "tool_choice.function.name",
            ),
            (
                r#""tool_choice":{"type":"function"}"#,
                "tool_choice.function.name",
            ),
            (r#""tool_choice":"sometimes""#, "tool_choice"),
            (r#""functions":[{"name":"f"}]"#, "functions"),
        ] {
            let e = err(Endpoint::Chat, &chat(extra));
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {e}");
        }
        // "required": the bare call object of one of the tools; a named choice: that tool's,
        // its arguments the tool's parameters (any object when it declares none).
        let tools = r#""tools":[{"type":"function","function":{"name":"f",
            "parameters":{"type":"object","properties":{"a":{"type":"integer"}}}}},
            {"type":"function","function":{"name":"g"}}]"#;
        let forced = |choice: &str| {
            let r = parse(
                Endpoint::Chat,
                chat(&format!("{tools},\"tool_choice\":{choice}")).as_bytes(),
            )
            .unwrap();
            let (field, spec) = r.grammar.unwrap();
            assert_eq!(field, "tool_choice");
            match spec {
                GrammarSpec::JsonSchema(s) => s,
                other => panic!("{other:?}"),
            }
        };
        let any = forced(r#""required""#);
        let calls = any["anyOf"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["properties"]["name"]["const"], "f");
        assert_eq!(
            calls[0]["properties"]["arguments"]["properties"]["a"]["type"],
            "integer"
        );
        assert_eq!(
            calls[1]["properties"]["arguments"],
            json!({"type": "object"})
        );
        let g = forced(r#"{"type":"function","function":{"name":"g"}}"#);
        assert_eq!(g["properties"]["name"]["const"], "g");
        assert_eq!(g["required"], json!(["name", "arguments"]));
        let bad_call = r#"{"messages":[{"role":"assistant","tool_calls":[{"type":"function"}]}]}"#;
        assert_eq!(
            err(Endpoint::Chat, bad_call).param.as_deref(),
            Some("messages[0].tool_calls[0].function")
        );
    }

    #[test]
    fn logprobs_fields() {
        let lp = |e, b: &str| parse(e, b.as_bytes()).unwrap().logprobs;
        let chat =
            |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        assert_eq!(lp(Endpoint::Completions, r#"{"prompt":"x"}"#), None);
        assert_eq!(
            lp(Endpoint::Completions, r#"{"prompt":"x","logprobs":null}"#),
            None
        );
        assert_eq!(
            lp(Endpoint::Completions, r#"{"prompt":"x","logprobs":0}"#),
            Some(0)
        );
        assert_eq!(
            lp(Endpoint::Completions, r#"{"prompt":"x","logprobs":5}"#),
            Some(5)
        );
        assert_eq!(lp(Endpoint::Chat, &chat("")), None);
        assert_eq!(lp(Endpoint::Chat, &chat(r#","logprobs":false"#)), None);
        assert_eq!(lp(Endpoint::Chat, &chat(r#","logprobs":true"#)), Some(0));
        assert_eq!(
            lp(
                Endpoint::Chat,
                &chat(r#","top_logprobs":20,"logprobs":true"#)
            ),
            Some(20)
        );
        for (extra, field) in [
            (r#","top_logprobs":21,"logprobs":true"#, "top_logprobs"),
            (r#","top_logprobs":2"#, "top_logprobs"),
            (r#","top_logprobs":0,"logprobs":false"#, "top_logprobs"),
            (r#","logprobs":3"#, "logprobs"),
        ] {
            let e = err(Endpoint::Chat, &chat(extra));
            assert_eq!(e.status, 400, "{extra}: {e}");
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {e}");
        }
    }

    #[test]
    fn malformed_bodies() {
        for body in ["", "{", "[1]", "null", "\"x\"", "{\"prompt\": \"x\",}"] {
            let e = err(Endpoint::Completions, body);
            assert_eq!(e.status, 400);
            assert!(e.param.is_none());
        }
    }

    #[test]
    fn drafter_spellings() {
        let draft = |d: &str| {
            let body = format!(r#"{{"prompt":"x","speculation":{{"draft":"{d}"}}}}"#);
            parse(Endpoint::Completions, body.as_bytes()).map(|p| p.speculation)
        };
        for (d, spec) in [
            ("model", DrafterSpec::Model),
            ("auto", DrafterSpec::Auto),
            ("prompt-lookup", DrafterSpec::PromptLookup(None)),
            ("prompt-lookup:3", DrafterSpec::PromptLookup(Some(3))),
            ("self:12", DrafterSpec::SelfDraft(12)),
        ] {
            assert_eq!(
                draft(d).unwrap(),
                SpeculationChoice::Draft {
                    draft: Some(spec),
                    k: None
                },
                "{d}"
            );
        }
        for (bad, says) in [
            ("self:0", "N >= 1"),
            ("self:", "N >= 1"),
            ("prompt-lookup:0", "match length N"),
            ("ngram", "unknown drafter `ngram`"),
        ] {
            let e = draft(bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert_eq!(e.param.as_deref(), Some("speculation.draft"), "{bad}");
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn min_p_is_read_and_checked() {
        let r = parse(Endpoint::Completions, br#"{"prompt":"x","min_p":0.05}"#).unwrap();
        assert_eq!(r.min_p, 0.05);
        for bad in [
            r#"{"prompt":"x","min_p":1.5}"#,
            r#"{"prompt":"x","min_p":"a"}"#,
        ] {
            assert_eq!(
                err(Endpoint::Completions, bad).param.as_deref(),
                Some("min_p")
            );
        }
    }

    #[test]
    fn response_format_and_guided_fields_give_the_grammar() {
        let chat =
            |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        let grammar = |extra: &str| {
            parse(Endpoint::Chat, chat(extra).as_bytes())
                .unwrap()
                .grammar
        };
        assert_eq!(grammar(r#""response_format":{"type":"text"}"#), None);
        assert_eq!(
            grammar(r#""response_format":{"type":"json_object"}"#),
            Some(("response_format", GrammarSpec::json_object()))
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert_eq!(
            grammar(&format!(
                r#""response_format":{{"type":"json_schema","json_schema":{{"name":"r","strict":true,"schema":{schema}}}}}"#
            )),
            Some(("response_format", GrammarSpec::JsonSchema(schema.clone())))
        );
        // vLLM's guided_json takes the schema as an object or as a string.
        for v in [
            schema.to_string(),
            serde_json::to_string(&schema.to_string()).unwrap(),
        ] {
            assert_eq!(
                grammar(&format!(r#""guided_json":{v}"#)),
                Some(("guided_json", GrammarSpec::JsonSchema(schema.clone())))
            );
        }
        assert_eq!(
            grammar(r#""guided_regex":"[0-9]+""#),
            Some(("guided_regex", GrammarSpec::Regex("[0-9]+".into())))
        );
        assert_eq!(
            grammar(r#""guided_choice":["a","b"]"#),
            Some((
                "guided_choice",
                GrammarSpec::Choice(vec!["a".into(), "b".into()])
            ))
        );
        // vLLM's newer name for them: `structured_outputs`.
        assert_eq!(
            grammar(r#""structured_outputs":{"choice":["a"],"disable_fallback":true}"#),
            Some((
                "structured_outputs.choice",
                GrammarSpec::Choice(vec!["a".into()])
            ))
        );
        assert_eq!(
            grammar(&format!(r#""structured_outputs":{{"json":{schema}}}"#)),
            Some((
                "structured_outputs.json",
                GrammarSpec::JsonSchema(schema.clone())
            ))
        );
        assert_eq!(
            grammar(r#""structured_outputs":{"json_object":true}"#),
            Some(("structured_outputs.json_object", GrammarSpec::json_object()))
        );
        assert_eq!(
            grammar(r#""structured_outputs":{"json_object":false}"#),
            None
        );
        assert_eq!(
            grammar(r#""guided_grammar":"start: \"x\"""#),
            Some(("guided_grammar", GrammarSpec::Lark("start: \"x\"".into())))
        );
        for (extra, field) in [
            (
                r#""response_format":{"type":"yaml"}"#,
                "response_format.type",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"schema":[1]}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"schema":{},"extra":1}}"#,
                "response_format.json_schema.extra",
            ),
            (r#""guided_json":"{not json""#, "guided_json"),
            (r#""guided_choice":[1]"#, "guided_choice[0]"),
            (r#""guided_choice":[]"#, "guided_choice"),
            (
                r#""guided_regex":"a","guided_choice":["a"]"#,
                "guided_choice",
            ),
            (
                r#""structured_outputs":{"choice":[2]}"#,
                "structured_outputs.choice[0]",
            ),
            (
                r#""structured_outputs":{"json_object":"yes"}"#,
                "structured_outputs.json_object",
            ),
            (
                r#""structured_outputs":{"structural_tag":"x"}"#,
                "structured_outputs.structural_tag",
            ),
            (r#""structured_outputs":[]"#, "structured_outputs"),
            (
                r#""structured_outputs":{"regex":"a","choice":["a"]}"#,
                "structured_outputs.choice",
            ),
        ] {
            let e = err(Endpoint::Chat, &chat(extra));
            assert_eq!(e.param.as_deref(), Some(field), "{extra}: {e}");
        }
    }
}
