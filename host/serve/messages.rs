//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), on top of
//! the chat path, as [`super::responses`] does for OpenAI's Responses API. A request becomes a
//! chat request:
//! - `system` becomes a system message before the conversation;
//! - content blocks become chat messages: `text` blocks the message's text, an assistant's
//!   `tool_use` blocks its `tool_calls`, a user's `tool_result` blocks `tool` messages (before
//!   the user's text, in their order);
//! - a conversation that ends with an assistant message is continued from its text (the API's
//!   "prefill"): the chat request's `continue_final_message`;
//! - `tools` (`name`, `input_schema`) become function tools, `tool_choice` auto / any / tool /
//!   none becomes "auto" / "required" / a named function / "none";
//! - `stop_sequences` become `stop`, `output_config.format` (a JSON schema) `response_format`.
//!
//! The reply comes back as content blocks (`text`, then `tool_use`) with a `stop_reason`, or
//! streamed as the API's events (`message_start` ... `message_stop`). Errors are in the API's
//! shape (`{"type": "error", "error": {"type", "message"}}`). Engine-free: `http.rs` runs the
//! generation.

use serde_json::{Map, Value, json};

use super::api::{array, object, str_of as string, type_name};
use super::error::ApiError;
use super::generate::Outcome;
use super::reasoning;
use super::tools;

/// What a request asked, ready to run as chat.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The chat request body.
    pub chat: Map<String, Value>,
    pub stream: bool,
}

/// Fields of an OpenAI request that this API spells otherwise: a client mixing the two is told
/// which to use rather than having the field ignored.
const OPENAI_ONLY: &[(&str, &str)] = &[
    ("stop", "stop_sequences"),
    ("max_completion_tokens", "max_tokens"),
    ("response_format", "output_config.format"),
    ("n", ""),
    ("logprobs", ""),
    ("top_logprobs", ""),
    ("stream_options", ""),
    ("functions", "tools"),
    ("function_call", "tool_choice"),
    ("prompt", "messages"),
    ("input", "messages"),
    ("instructions", "system"),
    ("max_output_tokens", "max_tokens"),
    ("continue_final_message", ""),
    ("prompt_logprobs", ""),
    ("return_token_ids", ""),
];

/// Anthropic's own features that a local model has no part for.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "mcp_servers",
        "MCP servers are not supported: run the tools in the client",
    ),
    ("container", "containers (code execution) are not supported"),
    (
        "context_management",
        "context management is not supported: the conversation is sent whole",
    ),
];

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn field<'a>(
    o: &'a Map<String, Value>,
    at: &str,
    k: &str,
    what: &str,
) -> Result<&'a Value, ApiError> {
    o.get(k)
        .ok_or_else(|| invalid(format!("{at}.{k}"), format!("{what} needs `{k}`")))
}

/// `POST /v1/messages` needs `max_tokens`, as Anthropic's API does (`count_tokens` has none).
pub fn require_max_tokens(body: &Map<String, Value>) -> Result<(), ApiError> {
    match body.get("max_tokens") {
        None | Some(Value::Null) => Err(invalid(
            "max_tokens",
            "max_tokens is required (the most tokens the reply may have)",
        )),
        Some(_) => Ok(()),
    }
}

/// Reads a Messages request (or a `count_tokens` one, which has no `max_tokens`).
pub fn translate(body: &Map<String, Value>) -> Result<Translated, ApiError> {
    let mut chat = Map::new();
    let mut system = None;
    let mut messages = None;
    let mut stream = false;
    for (k, v) in body {
        match k.as_str() {
            "messages" => messages = Some(v),
            "system" => {
                if !v.is_null() {
                    system = Some(text_of("system", v)?);
                }
            }
            "stop_sequences" => {
                chat.insert("stop".into(), v.clone());
            }
            "tools" => {
                chat.insert(k.clone(), tools_of(v)?);
            }
            "tool_choice" => {
                if !v.is_null() {
                    let (choice, parallel) = tool_choice(v)?;
                    chat.insert(k.clone(), choice);
                    if let Some(p) = parallel {
                        chat.insert("parallel_tool_calls".into(), Value::Bool(p));
                    }
                }
            }
            // `output_config.format` (what the `anthropic` package's `parse` sends), or the
            // earlier beta's `output_format`.
            "output_config" => {
                if !v.is_null() {
                    let o = object(k, v)?;
                    for (ck, cv) in o {
                        match ck.as_str() {
                            "format" => {
                                if let Some(f) = output_format("output_config.format", cv)? {
                                    chat.insert("response_format".into(), f);
                                }
                            }
                            // As chat's `reasoning_effort` (gpt-oss's template reads it).
                            "effort" => {
                                if !cv.is_null() {
                                    let e =
                                        super::api::reasoning_effort("output_config.effort", cv)?;
                                    chat.insert("reasoning_effort".into(), e.into());
                                }
                            }
                            _ => {
                                return Err(invalid(
                                    format!("output_config.{ck}"),
                                    format!("unknown field `output_config.{ck}`"),
                                ));
                            }
                        }
                    }
                }
            }
            "output_format" => {
                if let Some(f) = output_format(k, v)? {
                    chat.insert("response_format".into(), f);
                }
            }
            "stream" => {
                stream = v.as_bool().unwrap_or(false);
                chat.insert(k.clone(), v.clone());
            }
            "metadata" => {
                if !v.is_null() {
                    object(k, v)?;
                }
            }
            // Thinking on or off: the template's `enable_thinking` (Qwen3's switch); templates
            // without one ignore it, and "auto" leaves the model's default.
            "thinking" => {
                if !v.is_null() {
                    let o = object(k, v)?;
                    let on = match o.get("type").and_then(Value::as_str) {
                        Some("enabled") => Some(true),
                        Some("disabled") => Some(false),
                        Some("auto") => None,
                        _ => {
                            return Err(invalid(
                                "thinking.type",
                                "thinking.type must be \"enabled\" or \"disabled\"",
                            ));
                        }
                    };
                    if let Some(on) = on {
                        chat.insert(
                            "chat_template_kwargs".into(),
                            json!({"enable_thinking": on}),
                        );
                    }
                }
            }
            // Settings of Anthropic's service with no counterpart here (the prompt cache is
            // automatic: `cache_control` marks nothing it would not keep anyway).
            "service_tier" | "cache_control" | "inference_geo" | "speed" => {}
            k if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| *f == k) => {
                return Err(invalid(k, *why));
            }
            k if let Some((_, use_)) = OPENAI_ONLY.iter().find(|(f, _)| *f == k) => {
                let hint = if use_.is_empty() {
                    "an OpenAI field this API has not".to_string()
                } else {
                    format!("an OpenAI field; this API's is `{use_}`")
                };
                return Err(invalid(k, format!("unknown field `{k}` ({hint})"))
                    .with_code("unknown_parameter"));
            }
            // `model`, `max_tokens`, `temperature`, `top_p`, `top_k` are the chat route's too;
            // so are sampling extensions (`seed`, `min_p`...) and verdict's `policy` and
            // `speculation`, which it checks.
            _ => {
                chat.insert(k.clone(), v.clone());
            }
        }
    }
    let messages = messages.ok_or_else(|| invalid("messages", "a message needs `messages`"))?;
    let mut out = Vec::new();
    if let Some(s) = system {
        out.push(json!({"role": "system", "content": s}));
    }
    let conversation = conversation(messages)?;
    // A final assistant turn is the start of the reply (the API's prefill), unless it is blank
    // or holds tool calls (whose results are still to come).
    if let Some(last) = conversation.last()
        && last["role"] == "assistant"
    {
        let text = last["content"].as_str().unwrap_or("");
        if last.get("tool_calls").is_some() {
            return Err(invalid(
                format!("messages[{}]", messages.as_array().map_or(0, Vec::len) - 1),
                "the conversation ends with the assistant's tool_use: send their tool_result in a user message",
            ));
        }
        if text.trim_end() != text {
            return Err(invalid(
                format!("messages[{}]", messages.as_array().map_or(0, Vec::len) - 1),
                "a final assistant message (the start of the reply) cannot end with whitespace",
            ));
        }
        if !text.is_empty() {
            chat.insert("continue_final_message".into(), Value::Bool(true));
        }
    }
    out.extend(conversation.into_iter().filter(|m| {
        !(m["role"] == "assistant" && m["content"] == "" && m.get("tool_calls").is_none())
    }));
    chat.insert("messages".into(), Value::Array(out));
    Ok(Translated { chat, stream })
}

/// The chat route names fields its own way; an error it finds is renamed to the field this
/// request used.
pub fn rename_param(mut e: ApiError) -> ApiError {
    let Some(p) = e.param.clone() else {
        return e;
    };
    let renamed = if p == "stop" || p.starts_with("stop[") {
        Some(p.replacen("stop", "stop_sequences", 1))
    } else if let Some(rest) = p.strip_prefix("response_format") {
        Some(format!(
            "output_config.format{}",
            rest.replace(".json_schema.schema", ".schema")
                .replace(".json_schema", "")
        ))
    } else if p.starts_with("tools[") {
        Some(
            p.replace(".function.parameters", ".input_schema")
                .replace(".function.", "."),
        )
    } else if p.starts_with("tool_choice") {
        Some(
            p.replace(".function.name", ".name")
                .replace(".function", ""),
        )
    } else if p == "messages" || p.starts_with("messages[") {
        // Message indices moved (the system message, tool results split out): name the list.
        Some("messages".to_string())
    } else {
        None
    };
    if let Some(r) = renamed {
        let old = p.split(['[', '.']).next().unwrap_or(&p).to_string();
        let new = r.split(['[', '.']).next().unwrap_or(&r).to_string();
        if old != new {
            e.message = e.message.replace(&old, &new);
        }
        e.param = Some(r);
    }
    e
}

/// `system`, or a `tool_result`'s `content`: a string, or text blocks.
fn text_of(name: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let at = format!("{name}[{j}]");
                let o = object(&at, b)?;
                match o.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(block_text(o, &at)?),
                    Some(t) => return Err(unsupported_block(&at, t)),
                    None => {
                        return Err(invalid(
                            format!("{at}.type"),
                            "a content block needs a string `type`",
                        ));
                    }
                }
            }
            // Blocks are paragraphs of one text, as Anthropic's API reads a list of them.
            Ok(parts.join("\n\n"))
        }
        _ => Err(invalid(
            name,
            format!(
                "{name} must be a string or an array of text blocks, got {}",
                type_name(v)
            ),
        )),
    }
}

fn unsupported_block(at: &str, t: &str) -> ApiError {
    let why = match t {
        "image" | "document" | "search_result" => {
            format!("content block type \"{t}\" is not supported: the model reads text only")
        }
        _ => format!("content block type \"{t}\" is not supported here"),
    };
    invalid(format!("{at}.type"), why)
}

/// `messages` as chat messages.
fn conversation(v: &Value) -> Result<Vec<Value>, ApiError> {
    let list = array("messages", v)?;
    if list.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let o = object(&at, m)?;
        let role = string(&format!("{at}.role"), field(o, &at, "role", "a message")?)?;
        let content = field(o, &at, "content", "a message")?;
        let at = format!("{at}.content");
        match role {
            "user" => user_turn(&at, content, &mut out)?,
            "assistant" => out.push(assistant_turn(&at, content)?),
            r => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "role must be \"user\" or \"assistant\", got \"{r}\" (the system prompt goes in `system`)"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A user turn: its `tool_result` blocks as `tool` messages, its text as a user message.
fn user_turn(at: &str, content: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => return Err(content_type(at, content)),
    };
    let mut text: Vec<&str> = Vec::new();
    let flush = |text: &mut Vec<&str>, out: &mut Vec<Value>| {
        if !text.is_empty() {
            out.push(json!({"role": "user", "content": text.join("\n\n")}));
            text.clear();
        }
    };
    let mut results = 0;
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}[{j}]");
        let o = object(&bat, b)?;
        match block_type(o, &bat)? {
            "text" => text.push(block_text(o, &bat)?),
            "tool_result" => {
                flush(&mut text, out);
                let id = string(
                    &format!("{bat}.tool_use_id"),
                    field(o, &bat, "tool_use_id", "a tool_result block")?,
                )?;
                let mut result = match o.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => text_of(&format!("{bat}.content"), c)?,
                };
                if o.get("is_error").and_then(Value::as_bool) == Some(true) {
                    result = format!("Error: {result}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
                results += 1;
            }
            t => return Err(unsupported_block(&bat, t)),
        }
    }
    if !text.is_empty() || results == 0 {
        out.push(json!({"role": "user", "content": text.join("\n\n")}));
    }
    Ok(())
}

/// An assistant turn: its text, and its `tool_use` blocks as `tool_calls`.
fn assistant_turn(at: &str, content: &Value) -> Result<Value, ApiError> {
    let blocks = match content {
        Value::String(s) => return Ok(json!({"role": "assistant", "content": s})),
        Value::Array(b) => b,
        _ => return Err(content_type(at, content)),
    };
    let mut text: Vec<&str> = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}[{j}]");
        let o = object(&bat, b)?;
        match block_type(o, &bat)? {
            "text" => text.push(block_text(o, &bat)?),
            "tool_use" => {
                let id = string(
                    &format!("{bat}.id"),
                    field(o, &bat, "id", "a tool_use block")?,
                )?;
                let name = string(
                    &format!("{bat}.name"),
                    field(o, &bat, "name", "a tool_use block")?,
                )?;
                let input = field(o, &bat, "input", "a tool_use block")?;
                object(&format!("{bat}.input"), input)?;
                calls.push(json!({
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            // Past thinking passed back: templates leave it out of the prompt (Qwen3's does).
            "thinking" | "redacted_thinking" => {}
            t => return Err(unsupported_block(&bat, t)),
        }
    }
    let mut m = json!({"role": "assistant", "content": text.join("\n\n")});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

/// A text block's `text`.
fn block_text<'a>(o: &'a Map<String, Value>, at: &str) -> Result<&'a str, ApiError> {
    string(&format!("{at}.text"), field(o, at, "text", "a text block")?)
}

fn block_type<'a>(o: &'a Map<String, Value>, at: &str) -> Result<&'a str, ApiError> {
    o.get("type").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            format!("{at}.type"),
            "a content block needs a string `type`",
        )
    })
}

fn content_type(at: &str, v: &Value) -> ApiError {
    invalid(
        at,
        format!(
            "content must be a string or an array of content blocks, got {}",
            type_name(v)
        ),
    )
}

/// Anthropic tools (`name`, `description`, `input_schema`) as chat function tools.
fn tools_of(v: &Value) -> Result<Value, ApiError> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let mut out = Vec::new();
    for (i, t) in array("tools", v)?.iter().enumerate() {
        let at = format!("tools[{i}]");
        let o = object(&at, t)?;
        if let Some(kind) = o.get("type")
            && !kind.is_null()
        {
            let kind = string(&format!("{at}.type"), kind)?;
            if kind != "custom" {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "tool type \"{kind}\" is not supported: Anthropic's server and versioned tools run on Anthropic's side; describe it as a custom tool with an input_schema"
                    ),
                ));
            }
        }
        let name = field(o, &at, "name", "a tool")?;
        let schema = field(o, &at, "input_schema", "a tool")?;
        let mut f = json!({"name": name, "parameters": schema});
        if let Some(d) = o.get("description") {
            f["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as the chat one, and `parallel_tool_calls` when it says.
fn tool_choice(v: &Value) -> Result<(Value, Option<bool>), ApiError> {
    let o = object("tool_choice", v)?;
    let parallel = o
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let kind = o
        .get("type")
        .ok_or_else(|| invalid("tool_choice.type", "tool_choice needs `type`"))?;
    let choice = match string("tool_choice.type", kind)? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = field(o, "tool_choice", "name", "tool_choice of type \"tool\"")?;
            string("tool_choice.name", name)?;
            json!({"type": "function", "function": {"name": name}})
        }
        t => {
            return Err(invalid(
                "tool_choice.type",
                format!(
                    "tool_choice.type must be \"auto\", \"any\", \"tool\" or \"none\", got \"{t}\""
                ),
            ));
        }
    };
    Ok((choice, parallel))
}

/// A JSON-schema output format (`{"type": "json_schema", "schema": {...}}`) as a chat
/// `response_format`.
fn output_format(name: &str, v: &Value) -> Result<Option<Value>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let o = object(name, v)?;
    match o.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let schema = field(o, name, "schema", "a json_schema format")?;
            Ok(Some(json!({
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            })))
        }
        _ => Err(invalid(
            format!("{name}.type"),
            format!("{name}.type must be \"json_schema\""),
        )),
    }
}

/// An error in the API's shape. Its `type` follows the status, as Anthropic's clients map them
/// to exceptions; the field at fault leads the message, as this API has no `param`.
pub fn error_body(e: &ApiError) -> Value {
    let kind = match e.status.as_u16() {
        400 | 405 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    let message = match &e.param {
        Some(p) if !e.message.starts_with(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// One reply's identity, shared by its whole and streamed forms.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub model: String,
    /// The reply is read for tool calls (tools offered, `tool_choice` not "none").
    pub tools: bool,
    /// A reasoning model's `<think>` block becomes a `thinking` content block.
    pub reasoning: Option<reasoning::Reading>,
}

/// Why the reply ended, in this API's words, and the stop sequence that ended it.
fn stop_reason(outcome: &Outcome, calls: bool) -> (&'static str, Value) {
    if calls {
        return ("tool_use", Value::Null);
    }
    match (&outcome.stop_sequence, outcome.finish_reason) {
        (Some(s), _) => ("stop_sequence", json!(s)),
        (None, "length") => ("max_tokens", Value::Null),
        (None, _) => ("end_turn", Value::Null),
    }
}

/// Prompt tokens read from the prompt cache count apart, as Anthropic's cache reads do.
fn usage(o: &Outcome) -> Value {
    json!({
        "input_tokens": o.prompt_tokens.saturating_sub(o.cached_tokens),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": o.cached_tokens,
        "output_tokens": o.completion_tokens,
    })
}

/// A chat tool call as a `tool_use` block (its arguments as the `input` object).
fn tool_use(call: &Value) -> Value {
    let input = call["function"]["arguments"]
        .as_str()
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": input,
    })
}

/// A reply's text and calls (when it makes any).
fn split(meta: &Meta, text: &str) -> (String, Vec<Value>) {
    match meta.tools.then(|| tools::parse(text)).flatten() {
        Some((content, calls)) => (content.unwrap_or_default(), calls),
        None => (text.to_string(), Vec::new()),
    }
}

impl Meta {
    fn message(&self, content: Vec<Value>, stop: (&str, Value), usage: Value) -> Value {
        let mut m = json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": null,
            "stop_sequence": stop.1,
            "usage": usage,
        });
        if !stop.0.is_empty() {
            m["stop_reason"] = json!(stop.0);
        }
        m
    }

    /// The whole reply to a request that was not streamed.
    pub fn full(&self, text: &str, outcome: &Outcome) -> Value {
        let mut content = Vec::new();
        let answer;
        let text = match self.reasoning {
            Some(p) => {
                let (thought, a) = reasoning::split(p, text);
                if let Some(t) = thought {
                    // verdict signs nothing: clients pass the block back, the template drops it.
                    content.push(json!({"type": "thinking", "thinking": t, "signature": ""}));
                }
                answer = a;
                &answer
            }
            None => text,
        };
        let (text, calls) = split(self, text);
        if !text.is_empty() || calls.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        content.extend(calls.iter().map(tool_use));
        let mut m = self.message(
            content,
            stop_reason(outcome, !calls.is_empty()),
            usage(outcome),
        );
        m["speculation"] = serde_json::to_value(&outcome.speculation).unwrap_or(Value::Null);
        m
    }
}

/// A streamed reply's events, each an object with its `type` (sent as `event: <type>`).
pub struct Stream {
    meta: Meta,
    /// Content blocks started so far; the text or thinking block, when open, is the last.
    blocks: usize,
    text_open: bool,
    thinking_open: bool,
    held: tools::Holder<()>,
    split: Option<reasoning::Splitter<()>>,
}

impl Stream {
    pub fn new(meta: Meta) -> Stream {
        Stream {
            split: meta.reasoning.map(reasoning::Splitter::new),
            meta,
            blocks: 0,
            text_open: false,
            thinking_open: false,
            held: tools::Holder::default(),
        }
    }

    /// `message_start` (the prompt's length as its input tokens; the final count, with cache
    /// reads apart, comes with `message_delta`) and a `ping`.
    pub fn start(&mut self, prompt_tokens: usize) -> Vec<Value> {
        let usage = json!({"input_tokens": prompt_tokens, "output_tokens": 0});
        let m = self.meta.message(Vec::new(), ("", Value::Null), usage);
        vec![
            json!({"type": "message_start", "message": m}),
            json!({"type": "ping"}),
        ]
    }

    /// Closes the thinking block, when one is open (the answer follows it).
    fn end_thinking(&mut self, out: &mut Vec<Value>) {
        if self.thinking_open {
            self.thinking_open = false;
            out.push(
                json!({"type": "content_block_delta", "index": self.blocks - 1,
                            "delta": {"type": "signature_delta", "signature": ""}}),
            );
            out.push(json!({"type": "content_block_stop", "index": self.blocks - 1}));
        }
    }

    fn thinking(&mut self, out: &mut Vec<Value>, t: &str) {
        if t.is_empty() {
            return;
        }
        if !self.thinking_open {
            self.thinking_open = true;
            out.push(json!({"type": "content_block_start", "index": self.blocks,
                            "content_block": {"type": "thinking", "thinking": "", "signature": ""}}));
            self.blocks += 1;
        }
        out.push(
            json!({"type": "content_block_delta", "index": self.blocks - 1,
                        "delta": {"type": "thinking_delta", "thinking": t}}),
        );
    }

    fn text(&mut self, out: &mut Vec<Value>, t: &str) {
        if t.is_empty() {
            return;
        }
        self.end_thinking(out);
        if !self.text_open {
            self.text_open = true;
            out.push(json!({"type": "content_block_start", "index": self.blocks,
                            "content_block": {"type": "text", "text": ""}}));
            self.blocks += 1;
        }
        out.push(
            json!({"type": "content_block_delta", "index": self.blocks - 1,
                        "delta": {"type": "text_delta", "text": t}}),
        );
    }

    /// New text of the reply: thinking as it comes, the answer held back while it may be a
    /// tool call.
    pub fn delta(&mut self, d: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let pieces = match &mut self.split {
            Some(s) => s.push(d, Vec::new()),
            None => vec![(reasoning::Part::Content, d.to_string(), Vec::new())],
        };
        self.pieces(&mut out, pieces);
        out
    }

    fn pieces(&mut self, out: &mut Vec<Value>, pieces: Vec<(reasoning::Part, String, Vec<()>)>) {
        for (part, t, _) in pieces {
            match part {
                reasoning::Part::Reasoning => self.thinking(out, &t),
                reasoning::Part::Content if self.meta.tools => {
                    if let Some((t, _)) = self.held.push(&t, Vec::new()) {
                        self.text(out, &t);
                    }
                }
                reasoning::Part::Content => self.text(out, &t),
            }
        }
    }

    /// The end: the held text (as text or tool calls), each block's stop, `message_delta`
    /// (the stop reason and the usage) and `message_stop`.
    pub fn done(&mut self, outcome: &Outcome) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(rest) = self.split.as_mut().map(|s| s.finish()) {
            self.pieces(&mut out, rest);
        }
        let (held, _) = self.held.finish();
        let (text, calls) = split(&self.meta, &held);
        self.text(&mut out, &text);
        self.end_thinking(&mut out);
        // A reply with neither text nor calls has one empty text block, as when not streamed.
        if !self.text_open && calls.is_empty() {
            out.push(json!({"type": "content_block_start", "index": self.blocks,
                            "content_block": {"type": "text", "text": ""}}));
            self.text_open = true;
            self.blocks += 1;
        }
        if self.text_open {
            out.push(json!({"type": "content_block_stop", "index": self.blocks - 1}));
        }
        for c in &calls {
            let mut block = tool_use(c);
            let input = std::mem::replace(&mut block["input"], json!({}));
            let index = self.blocks;
            self.blocks += 1;
            out.push(
                json!({"type": "content_block_start", "index": index, "content_block": block}),
            );
            out.push(json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}));
            out.push(json!({"type": "content_block_stop", "index": index}));
        }
        let (reason, sequence) = stop_reason(outcome, !calls.is_empty());
        out.push(json!({
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage(outcome),
            "speculation": serde_json::to_value(&outcome.speculation).unwrap_or(Value::Null),
        }));
        out.push(json!({"type": "message_stop"}));
        out
    }

    /// The generation failed after the reply started: an `error` event.
    pub fn failed(&mut self, e: &ApiError) -> Vec<Value> {
        vec![error_body(e)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::{self, Endpoint};
    use crate::serve::generate::SpeculationReport;
    use hyper::StatusCode;

    fn t(body: Value) -> Result<Translated, ApiError> {
        translate(body.as_object().unwrap())
    }

    fn outcome(finish: &'static str, stop: Option<&str>) -> Outcome {
        Outcome {
            finish_reason: finish,
            stop_sequence: stop.map(str::to_string),
            stop_token: None,
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 3,
            token_ids: Vec::new(),
            mean_logprob: None,
            speculation: SpeculationReport::default(),
        }
    }

    #[test]
    fn a_request_becomes_a_chat_request() {
        let r = t(json!({
            "model": "m", "max_tokens": 20, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["\n\n"], "temperature": 0, "top_k": 5, "policy": "strict",
            "metadata": {"user_id": "u"}, "thinking": {"type": "disabled"},
            "messages": [
                {"role": "user", "content": "What time is it?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "...", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {"tz": "UTC"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "12:34"}]},
                    {"type": "text", "text": "Say it."}]},
            ],
            "tools": [{"name": "now", "description": "the time", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        }))
        .unwrap();
        assert!(!r.stream);
        let c = &r.chat;
        assert_eq!(c["stop"], json!(["\n\n"]));
        assert_eq!(c["tool_choice"], "auto");
        assert_eq!(c["parallel_tool_calls"], false);
        assert_eq!(
            c["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(c["tools"][0]["function"]["description"], "the time");
        assert!(c.get("metadata").is_none() && c.get("thinking").is_none());
        // Thinking switched off reaches the template as Qwen3's switch.
        assert_eq!(c["chat_template_kwargs"], json!({"enable_thinking": false}));
        // The effort, as chat's `reasoning_effort`; a level there is not is refused by name.
        let ask = |effort: Value| {
            t(
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                     "output_config": {"effort": effort}}),
            )
        };
        assert_eq!(ask(json!("high")).unwrap().chat["reasoning_effort"], "high");
        let e = ask(json!("max")).unwrap_err();
        assert!(e.message.contains("output_config.effort"), "{e:?}");
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[2]["content"], "Let me look.");
        assert_eq!(m[2]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"tz":"UTC"}"#
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "12:34"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "Say it."}));
        assert!(c.get("continue_final_message").is_none());
        // The chat route reads the result.
        let p = api::parse_object(Endpoint::Chat, c).unwrap();
        assert_eq!((p.max_tokens, p.top_k, p.stop.len()), (Some(20), 5, 1));
        assert_eq!(p.messages.len(), 5);
    }

    #[test]
    fn a_final_assistant_message_is_continued() {
        let r = t(json!({"messages": [
            {"role": "user", "content": "JSON please"},
            {"role": "assistant", "content": "{\"a\":"}]}))
        .unwrap();
        assert_eq!(r.chat["continue_final_message"], true);
        // A blank one is no prefill: the reply starts fresh.
        let r = t(json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}))
        .unwrap();
        assert!(r.chat.get("continue_final_message").is_none());
        assert_eq!(r.chat["messages"].as_array().unwrap().len(), 1);
        let e = t(json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure "}]}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1]"));
        assert!(e.message.contains("whitespace"), "{e}");
    }

    #[test]
    fn tool_choices_and_output_format() {
        let tc = |v: Value| {
            t(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": v}))
                .map(|r| r.chat["tool_choice"].clone())
        };
        assert_eq!(tc(json!({"type": "any"})).unwrap(), "required");
        assert_eq!(tc(json!({"type": "none"})).unwrap(), "none");
        assert_eq!(
            tc(json!({"type": "tool", "name": "f"})).unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(
            tc(json!({"type": "tool"})).unwrap_err().param.as_deref(),
            Some("tool_choice.name")
        );
        assert_eq!(
            tc(json!({"type": "some"})).unwrap_err().param.as_deref(),
            Some("tool_choice.type")
        );
        for format in [
            json!({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}, "effort": "low"}}),
            json!({"output_format": {"type": "json_schema", "schema": {"type": "object"}}}),
        ] {
            let mut body = format.as_object().unwrap().clone();
            body.insert("messages".into(), json!([{"role": "user", "content": "x"}]));
            let r = translate(&body).unwrap();
            assert_eq!(
                r.chat["response_format"]["json_schema"]["schema"],
                json!({"type": "object"})
            );
            api::parse_object(Endpoint::Chat, &r.chat).unwrap();
        }
    }

    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}),
                "messages[0].content[0].tool_use_id",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": 1}]}]}),
                "messages[0].content[0].input",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "system": 1}),
                "system",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}),
                "tools[0].input_schema",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}],
                       "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a"]}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "mcp_servers": []}),
                "mcp_servers",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "x"}}),
                "thinking.type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "output_format": {"type": "x"}}),
                "output_format.type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "output_config": {"format": {"type": "json_schema"}}}),
                "output_config.format.schema",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "output_config": {"fmt": 1}}),
                "output_config.fmt",
            ),
        ];
        for (body, param) in cases {
            let e = t(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        let e =
            t(json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a"]})).unwrap_err();
        assert!(e.message.contains("stop_sequences"), "{e}");
    }

    #[test]
    fn chat_errors_are_renamed() {
        let e = rename_param(ApiError::invalid("stop", "stop must be a string or a list"));
        assert_eq!(e.param.as_deref(), Some("stop_sequences"));
        assert!(e.message.starts_with("stop_sequences must"), "{e}");
        let e = rename_param(ApiError::invalid(
            "tools[1].function.parameters",
            "bad schema",
        ));
        assert_eq!(e.param.as_deref(), Some("tools[1].input_schema"));
        let e = rename_param(ApiError::invalid(
            "tool_choice.function.name",
            "no tool `g`",
        ));
        assert_eq!(e.param.as_deref(), Some("tool_choice.name"));
        let e = rename_param(ApiError::invalid(
            "response_format.json_schema.schema",
            "bad",
        ));
        assert_eq!(e.param.as_deref(), Some("output_config.format.schema"));
        let e = rename_param(ApiError::invalid("messages[3].content", "bad"));
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = rename_param(ApiError::invalid("temperature", "out of range"));
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn errors_take_the_apis_shape() {
        let b = error_body(&ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "max_tokens must be at least 1");
        let b = error_body(&ApiError::invalid("top_k", "out of range"));
        assert_eq!(b["error"]["message"], "top_k: out of range");
        assert_eq!(
            error_body(&ApiError::unauthorized("no key"))["error"]["type"],
            "authentication_error"
        );
        assert_eq!(
            error_body(&ApiError::not_found("x"))["error"]["type"],
            "not_found_error"
        );
        assert_eq!(
            error_body(&ApiError::overloaded(1, "busy"))["error"]["type"],
            "rate_limit_error"
        );
        assert_eq!(
            error_body(&ApiError::unavailable("loading"))["error"]["type"],
            "overloaded_error"
        );
        assert_eq!(
            error_body(&ApiError::internal("x"))["error"]["type"],
            "api_error"
        );
    }

    #[test]
    fn replies_and_their_stop_reasons() {
        let meta = Meta {
            id: "msg_1".into(),
            model: "m".into(),
            tools: true,
            reasoning: None,
        };
        let m = meta.full("Hello.", &outcome("stop", None));
        assert_eq!(m["content"], json!([{"type": "text", "text": "Hello."}]));
        assert_eq!(
            (m["stop_reason"].as_str(), &m["stop_sequence"]),
            (Some("end_turn"), &Value::Null)
        );
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 6, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 4, "output_tokens": 3})
        );
        let m = meta.full("Hello", &outcome("stop", Some("\n\n")));
        assert_eq!(
            (m["stop_reason"].as_str(), m["stop_sequence"].as_str()),
            (Some("stop_sequence"), Some("\n\n"))
        );
        assert_eq!(
            meta.full("Hel", &outcome("length", None))["stop_reason"],
            "max_tokens"
        );
        let call = "Sure.\n<tool_call>\n{\"name\": \"now\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>";
        let m = meta.full(call, &outcome("stop", None));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "Sure."}));
        assert_eq!(m["content"][1]["type"], "tool_use");
        assert_eq!(m["content"][1]["name"], "now");
        assert_eq!(m["content"][1]["input"], json!({"tz": "UTC"}));
        // Without tools offered, the same text is text.
        let plain = Meta {
            tools: false,
            ..meta.clone()
        };
        assert_eq!(
            plain.full(call, &outcome("stop", None))["content"][0]["text"],
            call
        );
    }

    /// With a reasoning parser, a `<think>` block is a `thinking` content block before the
    /// answer's blocks, whole or streamed (the same blocks either way).
    #[test]
    fn thinking_comes_as_its_own_block() {
        let meta = Meta {
            id: "msg_1".into(),
            model: "m".into(),
            tools: true,
            reasoning: Some(reasoning::Parser::Qwen3.reading(false)),
        };
        let reply = "<think>\nthe clock</think>\n\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let o = outcome("stop", None);
        let whole = meta.full(reply, &o);
        assert_eq!(
            whole["content"][0],
            json!({"type": "thinking", "thinking": "\nthe clock", "signature": ""})
        );
        assert_eq!(whole["content"][1]["type"], "tool_use");
        assert_eq!(whole["stop_reason"], "tool_use");
        let mut s = Stream::new(meta.clone());
        let mut events = Vec::new();
        let chars: Vec<char> = reply.chars().collect();
        for piece in chars.chunks(5) {
            events.extend(s.delta(&piece.iter().collect::<String>()));
        }
        events.extend(s.done(&o));
        let mut content: Vec<Value> = Vec::new();
        let mut json_parts = String::new();
        for e in &events {
            match e["type"].as_str().unwrap() {
                "content_block_start" => {
                    assert_eq!(e["index"], content.len());
                    content.push(e["content_block"].clone());
                }
                "content_block_delta" => {
                    let b = &mut content[e["index"].as_u64().unwrap() as usize];
                    let d = &e["delta"];
                    match d["type"].as_str().unwrap() {
                        "thinking_delta" => {
                            b["thinking"] = json!(
                                b["thinking"].as_str().unwrap().to_string()
                                    + d["thinking"].as_str().unwrap()
                            )
                        }
                        "signature_delta" => b["signature"] = d["signature"].clone(),
                        "input_json_delta" => {
                            json_parts.push_str(d["partial_json"].as_str().unwrap())
                        }
                        other => panic!("{other}"),
                    }
                }
                "content_block_stop" if content.last().unwrap()["type"] == "tool_use" => {
                    content.last_mut().unwrap()["input"] =
                        serde_json::from_str(&json_parts).unwrap();
                }
                _ => {}
            }
        }
        content[1]["id"] = whole["content"][1]["id"].clone();
        assert_eq!(Value::Array(content), whole["content"]);
        // Thinking alone: the thinking block, then an empty text block.
        let m = meta.full("<think>hm", &o);
        assert_eq!(m["content"][0]["thinking"], "hm");
        assert_eq!(m["content"][1], json!({"type": "text", "text": ""}));
        let mut s = Stream::new(meta);
        let mut events = s.delta("<think>hm");
        events.extend(s.done(&o));
        let starts: Vec<(&Value, &Value)> = events
            .iter()
            .filter(|e| e["type"] == "content_block_start")
            .map(|e| (&e["index"], &e["content_block"]["type"]))
            .collect();
        assert_eq!(
            starts,
            [(&json!(0), &json!("thinking")), (&json!(1), &json!("text"))]
        );
    }

    #[test]
    fn a_streamed_reply_is_the_whole_one_in_events() {
        let meta = Meta {
            id: "msg_1".into(),
            model: "m".into(),
            tools: true,
            reasoning: None,
        };
        let call = "Sure.\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let o = outcome("stop", None);
        let whole = meta.full(call, &o);
        let mut s = Stream::new(meta);
        let mut events = s.start(10);
        for piece in [
            "Su",
            "re.\n<tool",
            "_call>\n{\"name\": \"now\", ",
            "\"arguments\": {}}\n</tool_call>",
        ] {
            events.extend(s.delta(piece));
        }
        events.extend(s.done(&o));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        // Rebuild the message from the events, as a client does.
        let mut content: Vec<Value> = Vec::new();
        let mut json_parts = String::new();
        for e in &events {
            match e["type"].as_str().unwrap() {
                "content_block_start" => content.push(e["content_block"].clone()),
                "content_block_delta" => {
                    let i = e["index"].as_u64().unwrap() as usize;
                    assert_eq!(i, content.len() - 1);
                    match e["delta"]["type"].as_str().unwrap() {
                        "text_delta" => {
                            let t = content[i]["text"].as_str().unwrap().to_string();
                            content[i]["text"] = json!(t + e["delta"]["text"].as_str().unwrap());
                        }
                        _ => json_parts.push_str(e["delta"]["partial_json"].as_str().unwrap()),
                    }
                }
                "content_block_stop" if content.last().unwrap()["type"] == "tool_use" => {
                    content.last_mut().unwrap()["input"] =
                        serde_json::from_str(&json_parts).unwrap();
                }
                _ => {}
            }
        }
        content[1]["id"] = whole["content"][1]["id"].clone();
        // The text before a call streams as it comes, its line break included; the whole reply
        // trims it.
        assert_eq!(content[0]["text"], "Sure.\n");
        content[0]["text"] = json!("Sure.");
        assert_eq!(Value::Array(content), whole["content"]);
        assert_eq!(events[9]["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[9]["usage"], whole["usage"]);
        // A plain reply that says nothing is one empty text block.
        let mut s = Stream::new(Meta {
            id: "m".into(),
            model: "m".into(),
            tools: false,
            reasoning: None,
        });
        let kinds: Vec<String> = s
            .done(&o)
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "content_block_start",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
    }
}
