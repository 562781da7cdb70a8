//! OpenAI's Responses API (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`), on
//! top of the chat path. A request becomes a chat request:
//! - input items become messages (`developer` as `system`, function calls as an assistant's
//!   `tool_calls`, their outputs as `tool` messages);
//! - `instructions` become a system message before them;
//! - `text.format` becomes `response_format`, and `max_output_tokens` becomes `max_tokens`;
//! - flat function tools become chat tools.
//!
//! The request then runs as a chat request. Its reply is rendered as output items (a message,
//! then function calls), or streamed as the API's typed events. Replies are kept in a bounded
//! in-memory [`Store`] with the items they were generated from (`input_items`), so that
//! `previous_response_id` continues a conversation; `conversation` reads a conversation's items
//! instead ([`super::conversations`]). Engine-free: `http.rs` runs the generation.

use serde_json::{Map, Value, json};

use super::api::{object, str_of as string, type_name};
use super::error::ApiError;
use super::generate::Outcome;
use super::kept::Kept;
use super::logprobs::{self, TokenEntry};
use super::reasoning::{self, Part, Splitter};
use super::tools;

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`; the oldest goes
/// first. Each holds its conversation's text, at most the model's context in tokens.
pub const STORE_CAPACITY: usize = 256;

/// ...and at most this many bytes of them (as JSON) in all, so that long conversations cannot
/// hold the server's memory: the oldest go first.
pub const STORE_BYTES: usize = 64 << 20;

/// What a request asked, ready to run as chat and to be echoed in the response object.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The chat request body.
    pub chat: Map<String, Value>,
    /// The items before this input (a previous response's input items and output, or a
    /// conversation's), without `instructions`.
    pub context: Vec<Value>,
    /// This request's input as items, each with an `id`.
    pub input: Vec<Value>,
    /// The conversation the response belongs to: its input and output join it when it ends.
    pub conversation: Option<String>,
    pub store: bool,
    pub stream: bool,
    /// Run on after the request returns ([`super::background`]).
    pub background: bool,
    /// The request's settings as the response object repeats them.
    echo: Map<String, Value>,
}

/// `include` values about output this server never makes (images, tool-call results, encrypted
/// reasoning): asking for them adds nothing, as for OpenAI's models that make none.
const INCLUDE_NOTHING: &[&str] = &[
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
];

/// Fields of a chat request that the Responses API spells otherwise or has not.
const CHAT_ONLY: &[&str] = &[
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "response_format",
    "logprobs",
    "functions",
    "function_call",
    "prompt",
    "echo",
    "suffix",
    "best_of",
    "prompt_logprobs",
    "return_token_ids",
];

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Where a response's context comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context<'a> {
    /// `previous_response_id`: that response's input items and output.
    Response(&'a str),
    /// `conversation`: its items.
    Conversation(&'a str),
}

impl Translated {
    /// The items the response is generated from, oldest first (`GET .../input_items`).
    pub fn input_items(&self) -> Vec<Value> {
        self.context.iter().chain(&self.input).cloned().collect()
    }
}

/// Reads a Responses request for response `id` (its input items' ids are made from it).
/// `lookup` reads the context a request names (`None`: there is no such response or
/// conversation); it is called once the rest of the request has been read.
pub fn translate(
    body: &Map<String, Value>,
    id: &str,
    lookup: impl FnOnce(Context<'_>) -> Result<Option<Vec<Value>>, ApiError>,
) -> Result<Translated, ApiError> {
    let mut chat = Map::new();
    let mut echo = Map::new();
    let mut input = None;
    let mut instructions = None;
    let mut previous_id = None;
    let mut conversation = None;
    let mut store = true;
    let mut stream = false;
    let mut background = false;
    let mut logprobs = false;
    for (k, v) in body {
        match k.as_str() {
            "input" => input = Some(v),
            "instructions" => {
                if !v.is_null() {
                    instructions = Some(string(k, v)?.to_string());
                }
                echo.insert(k.clone(), v.clone());
            }
            "previous_response_id" => {
                if !v.is_null() {
                    previous_id = Some(string(k, v)?.to_string());
                }
            }
            // A conversation's id, or `{"id": ...}`.
            "conversation" => match v {
                Value::Null => {}
                Value::String(s) => conversation = Some(s.clone()),
                Value::Object(o) => match o.get("id") {
                    Some(Value::String(s)) => conversation = Some(s.clone()),
                    _ => {
                        return Err(invalid(
                            "conversation.id",
                            "conversation must be an id or an object with a string `id`",
                        ));
                    }
                },
                _ => {
                    return Err(invalid(
                        k,
                        format!(
                            "conversation must be an id or an object with a string `id`, got {}",
                            type_name(v)
                        ),
                    ));
                }
            },
            "metadata" => {
                super::api::metadata(v)?;
                chat.insert(k.clone(), v.clone());
                echo.insert(k.clone(), v.clone());
            }
            "store" => match v {
                Value::Null => {}
                Value::Bool(b) => store = *b,
                _ => {
                    return Err(invalid(
                        k,
                        format!("store must be a boolean, got {}", type_name(v)),
                    ));
                }
            },
            "max_output_tokens" => {
                chat.insert("max_tokens".into(), v.clone());
                echo.insert(k.clone(), v.clone());
            }
            "text" => {
                if let Some(f) = text_format(v)? {
                    chat.insert("response_format".into(), f);
                }
                echo.insert(k.clone(), v.clone());
            }
            "tools" => {
                chat.insert(k.clone(), tools_of(v)?);
                echo.insert(k.clone(), v.clone());
            }
            "tool_choice" => {
                chat.insert(k.clone(), tool_choice(v)?);
                echo.insert(k.clone(), v.clone());
            }
            "stream" => {
                stream = v.as_bool().unwrap_or(false);
                chat.insert(k.clone(), v.clone());
            }
            "truncation" => match v {
                Value::Null => {}
                Value::String(s) if s == "disabled" => {}
                Value::String(s) if s == "auto" => {
                    return Err(invalid(
                        k,
                        "truncation \"auto\" is not supported: an input longer than the context is an error",
                    ));
                }
                _ => return Err(invalid(k, "truncation must be \"disabled\"")),
            },
            // Its one setting, obfuscation padding on streamed deltas, is not made here.
            "stream_options" => {
                if let Some(o) = (!v.is_null()).then(|| object(k, v)).transpose()?
                    && let Some(bad) = o.keys().find(|x| *x != "include_obfuscation")
                {
                    return Err(invalid(
                        format!("stream_options.{bad}"),
                        format!(
                            "unknown field `stream_options.{bad}` (the Responses API has include_obfuscation)"
                        ),
                    ));
                }
            }
            "background" => match v {
                Value::Null => {}
                Value::Bool(b) => background = *b,
                _ => {
                    return Err(invalid(
                        k,
                        format!("background must be a boolean, got {}", type_name(v)),
                    ));
                }
            },
            "include" => {
                let items = match v {
                    Value::Null => &Vec::new(),
                    Value::Array(a) => a,
                    _ => {
                        return Err(invalid(
                            k,
                            format!("include must be an array of strings, got {}", type_name(v)),
                        ));
                    }
                };
                for (i, x) in items.iter().enumerate() {
                    match string(&format!("include[{i}]"), x)? {
                        "message.output_text.logprobs" => logprobs = true,
                        x if INCLUDE_NOTHING.contains(&x) => {}
                        x => {
                            return Err(invalid(
                                format!("include[{i}]"),
                                format!("unknown include value \"{x}\""),
                            ));
                        }
                    }
                }
            }
            // The alternatives per token of the output's logprobs (which it implies).
            "top_logprobs" => {
                logprobs |= !v.is_null();
                chat.insert(k.clone(), v.clone());
                echo.insert(k.clone(), v.clone());
            }
            // The effort reaches the template as chat's `reasoning_effort` does (gpt-oss's
            // `Reasoning: low`); a summary is not made.
            "reasoning" => {
                if !v.is_null()
                    && let Some(e) = object(k, v)?.get("effort").filter(|e| !e.is_null())
                {
                    let e = super::api::reasoning_effort("reasoning.effort", e)?;
                    chat.insert("reasoning_effort".into(), e.into());
                }
            }
            "temperature" | "top_p" | "parallel_tool_calls" => {
                chat.insert(k.clone(), v.clone());
                echo.insert(k.clone(), v.clone());
            }
            k if CHAT_ONLY.contains(&k) => {
                return Err(invalid(
                    k,
                    format!("unknown field `{k}` (a chat completions field; see the Responses API's own)"),
                )
                .with_code("unknown_parameter"));
            }
            // Everything else (sampling extensions, verdict's policy and speculation, `model`,
            // `user`...) means what it means on the chat route, which checks it.
            _ => {
                chat.insert(k.clone(), v.clone());
            }
        }
    }
    if logprobs {
        chat.insert("logprobs".into(), Value::Bool(true));
    }
    if background && !store {
        return Err(invalid(
            "background",
            "a background response is read back from the store: it needs `store` (true)",
        ));
    }
    let input = input.ok_or_else(|| invalid("input", "a response needs `input`"))?;
    let input = items(
        "input",
        input,
        &format!("{}_in", id.trim_start_matches("resp_")),
    )?;
    let context = match (&previous_id, &conversation) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "conversation",
                "previous_response_id and conversation cannot be used together: a response continues one or the other",
            ));
        }
        (None, None) => Vec::new(),
        (Some(p), None) => lookup(Context::Response(p))?.ok_or_else(|| {
            ApiError::not_found(format!(
                "previous_response_id: no stored response `{p}` (responses are kept in memory, the last {STORE_CAPACITY} up to {} MiB, and only with `store`)",
                STORE_BYTES >> 20
            ))
            .with_param("previous_response_id")
        })?,
        (None, Some(c)) => lookup(Context::Conversation(c))?.ok_or_else(|| {
            super::conversations::missing(c).with_param("conversation")
        })?,
    };
    distinct_ids("input", &context, &input)?;
    let mut messages = Vec::with_capacity(context.len() + input.len() + 1);
    if let Some(i) = &instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    // Together, so that calls on both sides of the seam are one assistant turn.
    let all: Vec<Value> = context.iter().chain(&input).cloned().collect();
    messages.extend(input_messages("input", &Value::Array(all))?);
    chat.insert("messages".into(), Value::Array(messages));
    echo.insert(
        "previous_response_id".into(),
        previous_id.map_or(Value::Null, Value::String),
    );
    echo.insert(
        "conversation".into(),
        conversation
            .as_ref()
            .map_or(Value::Null, |c| json!({"id": c})),
    );
    echo.insert("store".into(), Value::Bool(store));
    echo.insert("background".into(), Value::Bool(background));
    Ok(Translated {
        chat,
        context,
        input,
        conversation,
        store,
        stream,
        background,
        echo,
    })
}

/// Items (`input`, or a conversation's `items`), read as [`translate`] reads them, each given
/// an `id` if it has none (`{prefix}_{tag}{index}`) and a `status`; a string is one user
/// message. Errors name the field as `{name}[i]...`.
pub fn items(name: &str, v: &Value, tag: &str) -> Result<Vec<Value>, ApiError> {
    input_messages(name, v)?;
    // (What input_messages took: a string or an array of objects.)
    let list = match v {
        Value::String(s) => vec![json!({"type": "message", "role": "user", "content": s})],
        Value::Array(a) => a.clone(),
        _ => {
            return Err(invalid(
                name,
                format!("{name} must be a string or an array"),
            ));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        let Value::Object(mut o) = item else {
            return Err(invalid(format!("{name}[{i}]"), "an item must be an object"));
        };
        let kind = o
            .entry("type")
            .or_insert_with(|| json!("message"))
            .as_str()
            .unwrap_or_default()
            .to_string();
        let prefix = match kind.as_str() {
            "message" => "msg",
            "function_call" => "fc",
            "function_call_output" => "fco",
            _ => "rs",
        };
        match o.get("id") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => {
                o.insert("id".into(), json!(format!("{prefix}_{tag}{i}")));
            }
            Some(other) => {
                return Err(invalid(
                    format!("{name}[{i}].id"),
                    format!("an item's id must be a string, got {}", type_name(other)),
                ));
            }
        }
        if kind == "message" {
            let assistant = o.get("role").and_then(Value::as_str) == Some("assistant");
            let part = if assistant {
                "output_text"
            } else {
                "input_text"
            };
            match o.get_mut("content") {
                Some(Value::String(text)) => {
                    let text = std::mem::take(text);
                    let mut p = json!({"type": part, "text": text});
                    if assistant {
                        p["annotations"] = json!([]);
                    }
                    o.insert("content".into(), json!([p]));
                }
                Some(Value::Array(parts)) if assistant => {
                    for p in parts {
                        if p.get("annotations").is_none() {
                            p["annotations"] = json!([]);
                        }
                    }
                }
                _ => {}
            }
        }
        if kind != "reasoning" && o.get("status").is_none_or(Value::is_null) {
            o.insert("status".into(), json!("completed"));
        }
        out.push(Value::Object(o));
    }
    Ok(out)
}

/// Items' ids are distinct, and none is already among `context`'s.
pub fn distinct_ids(name: &str, context: &[Value], new: &[Value]) -> Result<(), ApiError> {
    let mut seen: std::collections::HashSet<&str> =
        context.iter().filter_map(|i| i["id"].as_str()).collect();
    for (i, item) in new.iter().enumerate() {
        let id = item["id"].as_str().unwrap_or_default();
        if !seen.insert(id) {
            return Err(invalid(
                format!("{name}[{i}].id"),
                format!(
                    "duplicate item id `{id}`: an item with that id is already in the conversation"
                ),
            ));
        }
    }
    Ok(())
}

/// The chat route names fields its own way; an error it finds is renamed to the field the
/// Responses request used.
pub fn rename_param(mut e: ApiError) -> ApiError {
    if let Some(p) = &e.param {
        let renamed = if p == "max_tokens" {
            Some("max_output_tokens".to_string())
        } else if let Some(rest) = p.strip_prefix("response_format") {
            Some(format!("text.format{}", rest.replace(".json_schema", "")))
        } else if p.starts_with("messages") {
            Some("input".to_string())
        } else if p.starts_with("tools[") || p.starts_with("tool_choice") {
            Some(p.replace(".function.", "."))
        } else {
            None
        };
        if let Some(r) = renamed {
            // The message names the field as the chat route knew it.
            let old = p.split(['[', '.']).next().unwrap_or(p).to_string();
            let new = match old.as_str() {
                "response_format" => "text.format".to_string(),
                _ => r.split(['[', '.']).next().unwrap_or(&r).to_string(),
            };
            if old != "messages" && old != new {
                e.message = e.message.replace(&old, &new);
            }
            e.param = Some(r);
        }
    }
    e
}

/// `text.format` as a chat `response_format` (`None` for plain text).
fn text_format(v: &Value) -> Result<Option<Value>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let mut format = None;
    for (k, fv) in object("text", v)? {
        match k.as_str() {
            "format" => format = Some(fv),
            // How long an answer a model writes; these models take no such setting.
            "verbosity" => {}
            _ => {
                return Err(invalid(
                    format!("text.{k}"),
                    format!("unknown field `text.{k}`"),
                ));
            }
        }
    }
    let Some(f) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let o = object("text.format", f)?;
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for (k, fv) in o {
                match k.as_str() {
                    "type" => {}
                    "name" | "schema" | "strict" | "description" => {
                        schema.insert(k.clone(), fv.clone());
                    }
                    _ => {
                        return Err(invalid(
                            format!("text.format.{k}"),
                            format!("unknown field `text.format.{k}`"),
                        ));
                    }
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(t) => Err(invalid(
            "text.format.type",
            format!(
                "text.format.type must be \"text\", \"json_object\" or \"json_schema\", got \"{t}\""
            ),
        )),
        None => Err(invalid(
            "text.format.type",
            "text.format needs a string `type`",
        )),
    }
}

/// Responses tools (`{"type": "function", "name", "description", "parameters", "strict"}`) as
/// chat tools.
fn tools_of(v: &Value) -> Result<Value, ApiError> {
    let Some(a) = v.as_array() else {
        return Err(invalid(
            "tools",
            format!("tools must be an array, got {}", type_name(v)),
        ));
    };
    let mut out = Vec::with_capacity(a.len());
    for (i, t) in a.iter().enumerate() {
        let at = format!("tools[{i}]");
        let o = object(&at, t)?;
        match o.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(t) => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "tool type \"{t}\" is not supported: only \"function\" tools, which the caller runs"
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    format!("{at}.type"),
                    "a tool needs a string `type`",
                ));
            }
        }
        let mut f = Map::new();
        for (k, fv) in o {
            match k.as_str() {
                "type" => {}
                "name" | "description" | "parameters" | "strict" => {
                    f.insert(k.clone(), fv.clone());
                }
                _ => {
                    return Err(invalid(
                        format!("{at}.{k}"),
                        format!("unknown field `{at}.{k}`"),
                    ));
                }
            }
        }
        if f.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(invalid(
                format!("{at}.name"),
                "a function tool needs a non-empty string `name`",
            ));
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

fn tool_choice(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::String(_) | Value::Null => Ok(v.clone()),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = o.get("name").ok_or_else(|| {
                    invalid("tool_choice.name", "a function tool_choice needs `name`")
                })?;
                Ok(json!({"type": "function", "function": {"name": name}}))
            }
            _ => Err(invalid(
                "tool_choice.type",
                "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}",
            )),
        },
        _ => Err(invalid(
            "tool_choice",
            format!(
                "tool_choice must be a string or an object, got {}",
                type_name(v)
            ),
        )),
    }
}

/// Items (a string, or a list of them) as chat messages; errors name `{name}[i]...`.
fn input_messages(name: &str, v: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match v {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(a) => a,
        _ => {
            return Err(invalid(
                name,
                format!(
                    "{name} must be a string or an array of items, got {}",
                    type_name(v)
                ),
            ));
        }
    };
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{name}[{i}]");
        let o = object(&at, item)?;
        let kind = match o.get("type") {
            None => "message",
            Some(t) => string(&format!("{at}.type"), t)?,
        };
        match kind {
            "message" => {
                let role = o
                    .get("role")
                    .ok_or_else(|| invalid(format!("{at}.role"), format!("{at} has no `role`")))
                    .and_then(|r| string(&format!("{at}.role"), r))?;
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(invalid(
                        format!("{at}.role"),
                        format!(
                            "role must be \"user\", \"assistant\", \"system\" or \"developer\", got \"{role}\""
                        ),
                    ));
                }
                let content = content_text(&format!("{at}.content"), o.get("content"))?;
                out.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let field = |k: &str| -> Result<&str, ApiError> {
                    let name = format!("{at}.{k}");
                    let v = o.get(k).ok_or_else(|| {
                        invalid(&name, format!("a function_call item needs `{k}`"))
                    })?;
                    string(&name, v)
                };
                let call = json!({
                    "id": field("call_id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?},
                });
                // Calls made together are one assistant turn, as chat templates expect.
                match out.last_mut() {
                    Some(m)
                        if m["role"] == "assistant"
                            && m.get("tool_calls").is_some_and(Value::is_array) =>
                    {
                        m["tool_calls"].as_array_mut().expect("checked").push(call);
                    }
                    Some(m) if m["role"] == "assistant" => {
                        m["tool_calls"] = json!([call]);
                    }
                    _ => {
                        out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}))
                    }
                }
            }
            "function_call_output" => {
                let id = o
                    .get("call_id")
                    .ok_or_else(|| {
                        invalid(
                            format!("{at}.call_id"),
                            "a function_call_output item needs `call_id`",
                        )
                    })
                    .and_then(|v| string(&format!("{at}.call_id"), v))?;
                let output = content_text(&format!("{at}.output"), o.get("output"))?;
                out.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
            }
            // Past thinking passed back: templates leave it out of the prompt (Qwen3's does).
            "reasoning" => {}
            t => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "input item type \"{t}\" is not supported (only message, function_call, function_call_output)"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A message's content: a string, or text parts (`input_text`, `output_text`, `text`).
fn content_text(name: &str, v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None => Err(invalid(name, format!("{name} is missing"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                let pn = format!("{name}[{j}]");
                let o = object(&pn, p)?;
                match o.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        let t = o.get("text").ok_or_else(|| {
                            invalid(format!("{pn}.text"), "a text part needs `text`")
                        })?;
                        s.push_str(string(&format!("{pn}.text"), t)?);
                    }
                    Some(t) => {
                        return Err(invalid(
                            format!("{pn}.type"),
                            format!(
                                "content part type \"{t}\" is not supported (text models read input_text only)"
                            ),
                        ));
                    }
                    None => {
                        return Err(invalid(
                            format!("{pn}.type"),
                            "a content part needs a string `type`",
                        ));
                    }
                }
            }
            Ok(s)
        }
        Some(other) => Err(invalid(
            name,
            format!(
                "{name} must be a string or an array of parts, got {}",
                type_name(other)
            ),
        )),
    }
}

/// One response's identity and settings, shared by its whole and streamed forms.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub echo: Map<String, Value>,
    pub tools: bool,
    /// A reasoning model's `<think>` block becomes a reasoning item before the message.
    pub reasoning: Option<reasoning::Reading>,
}

impl Meta {
    /// `tools`: the reply is read for function calls (tools offered, `tool_choice` not
    /// "none").
    pub fn new(id: String, created_at: u64, model: String, t: &Translated, tools: bool) -> Meta {
        Meta {
            id,
            created_at,
            model,
            echo: t.echo.clone(),
            tools,
            reasoning: None,
        }
    }

    /// The response object with `status`, `output` and (when finished) `usage`.
    fn object(&self, status: &str, output: Vec<Value>, outcome: Option<&Outcome>) -> Value {
        let get = |k: &str, default: Value| self.echo.get(k).cloned().unwrap_or(default);
        let incomplete = outcome
            .filter(|o| o.finish_reason == "length")
            .map(|_| json!({"reason": "max_output_tokens"}));
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": get("background", json!(false)),
            "conversation": get("conversation", Value::Null),
            "error": null,
            "incomplete_details": incomplete,
            "instructions": get("instructions", Value::Null),
            "max_output_tokens": get("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
            "previous_response_id": get("previous_response_id", Value::Null),
            "store": get("store", json!(true)),
            "temperature": get("temperature", json!(1.0)),
            "top_p": get("top_p", json!(1.0)),
            "text": get("text", json!({"format": {"type": "text"}})),
            "tool_choice": get("tool_choice", json!("auto")),
            "tools": get("tools", json!([])),
            "truncation": "disabled",
            "metadata": get("metadata", json!({})),
            "usage": outcome.map_or(Value::Null, usage),
        });
        if let Some(o) = outcome {
            r["speculation"] = serde_json::to_value(&o.speculation).unwrap_or(Value::Null);
        }
        r
    }

    /// The response object before it has output (a background response's `queued`,
    /// `cancelled`).
    pub fn pending(&self, status: &str) -> Value {
        self.object(status, Vec::new(), None)
    }

    /// The reply's output items: its text as a message (left out when the reply is only calls),
    /// then its function calls. The message carries the tokens' logprobs when it is the whole
    /// reply (not the text before calls).
    fn items(&self, text: &str, entries: &[TokenEntry]) -> Vec<Value> {
        let mut items = Vec::new();
        let (text, entries) = match self.reasoning {
            Some(p) => {
                let (thought, answer) = reasoning::split(p, text);
                if let Some(t) = thought {
                    items.push(reasoning_item(&self.reasoning_id(), &t, "completed"));
                }
                // The answer is the text's tail: its tokens are those from where it starts.
                let start = text.chars().count() - answer.chars().count();
                let at = entries.partition_point(|e| e.offset < start);
                (answer, &entries[at..])
            }
            None => (text.to_string(), entries),
        };
        let (content, calls, lp) = match self.tools.then(|| tools::parse(&text)).flatten() {
            Some((content, calls)) => (content, calls, json!([])),
            None => (Some(text), Vec::new(), logprob_list(entries)),
        };
        if let Some(c) = content.filter(|c| !c.is_empty() || calls.is_empty()) {
            items.push(message_item(&self.message_id(), &c, "completed", &lp));
        }
        for (j, c) in calls.iter().enumerate() {
            items.push(call_item(&self.call_item_id(j), c, "completed"));
        }
        items
    }

    fn reasoning_id(&self) -> String {
        format!("rs_{}", self.id.trim_start_matches("resp_"))
    }

    fn message_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    fn call_item_id(&self, j: usize) -> String {
        format!("fc_{}_{j}", self.id.trim_start_matches("resp_"))
    }

    /// The whole response to a request that was not streamed.
    pub fn full(&self, text: &str, entries: &[TokenEntry], outcome: &Outcome) -> Value {
        let items = self.items(text, entries);
        let status = if outcome.finish_reason == "length" {
            "incomplete"
        } else {
            "completed"
        };
        self.object(status, items, Some(outcome))
    }
}

fn usage(o: &Outcome) -> Value {
    json!({
        "input_tokens": o.prompt_tokens,
        "input_tokens_details": {"cached_tokens": o.cached_tokens},
        "output_tokens": o.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": o.prompt_tokens + o.completion_tokens,
    })
}

fn message_item(id: &str, text: &str, status: &str, logprobs: &Value) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": if status == "completed" { json!([text_part(text, logprobs)]) } else { json!([]) },
    })
}

/// The thinking as a reasoning item (its text as `reasoning_text` content, no summary).
fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "reasoning",
        "id": id,
        "status": status,
        "summary": [],
        "content": if status == "completed" { json!([reasoning_part(text)]) } else { json!([]) },
    })
}

fn reasoning_part(text: &str) -> Value {
    json!({"type": "reasoning_text", "text": text})
}

fn text_part(text: &str, logprobs: &Value) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// Tokens' logprobs in the API's shape (the chat shape's `content` list).
fn logprob_list(entries: &[TokenEntry]) -> Value {
    if entries.is_empty() {
        return json!([]);
    }
    logprobs::chat_json(entries)["content"].take()
}

/// A chat tool call (`{"id", "function": {"name", "arguments"}}`) as a function-call item.
fn call_item(id: &str, call: &Value, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": id,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": if status == "completed" { call["function"]["arguments"].clone() } else { json!("") },
        "status": status,
    })
}

/// A streamed response's events. Each is an object with its `type` and `sequence_number`; the
/// server sends it as `event: <type>` and `data: <object>`.
pub struct Stream {
    meta: Meta,
    seq: u64,
    /// The message item is open (its text streams).
    open: bool,
    text: String,
    /// The message's tokens' logprobs so far (when asked for).
    logprobs: Vec<Value>,
    held: tools::Holder<TokenEntry>,
    split: Option<Splitter<TokenEntry>>,
    /// The reasoning item's text so far; `None`: no thinking yet.
    thought: Option<String>,
    /// Finished items that come before the message (the reasoning item).
    before: Vec<Value>,
}

impl Stream {
    pub fn new(meta: Meta) -> Stream {
        Stream {
            split: meta.reasoning.map(Splitter::new),
            meta,
            seq: 0,
            open: false,
            text: String::new(),
            logprobs: Vec::new(),
            held: tools::Holder::default(),
            thought: None,
            before: Vec::new(),
        }
    }

    /// The message's output index: after the reasoning item, when there is one.
    fn message_index(&self) -> usize {
        usize::from(self.thought.is_some())
    }

    /// Thinking for the reasoning item, opening it first.
    fn reasoning_delta(&mut self, out: &mut Vec<Value>, delta: &str) {
        if delta.is_empty() || !self.before.is_empty() {
            return;
        }
        let id = self.meta.reasoning_id();
        if self.thought.is_none() {
            self.thought = Some(String::new());
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": reasoning_item(&id, "", "in_progress")}),
            ));
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": 0, "content_index": 0,
                       "part": reasoning_part("")}),
            ));
        }
        if let Some(t) = &mut self.thought {
            t.push_str(delta);
        }
        out.push(self.event(
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": delta}),
        ));
    }

    /// Closes the reasoning item, when one is open (the answer follows it).
    fn end_reasoning(&mut self, out: &mut Vec<Value>) {
        let Some(text) = self.thought.clone().filter(|_| self.before.is_empty()) else {
            return;
        };
        let id = self.meta.reasoning_id();
        out.push(self.event(
            "response.reasoning_text.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text}),
        ));
        out.push(self.event(
            "response.content_part.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0,
                   "part": reasoning_part(&text)}),
        ));
        let item = reasoning_item(&id, &text, "completed");
        out.push(self.event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        ));
        self.before.push(item);
    }

    /// Labelled pieces of the reply: thinking to the reasoning item, the answer (held back
    /// while it may be a function call) to the message.
    fn pieces(&mut self, out: &mut Vec<Value>, pieces: Vec<(Part, String, Vec<TokenEntry>)>) {
        for (part, t, entries) in pieces {
            match part {
                Part::Reasoning => self.reasoning_delta(out, &t),
                Part::Content => {
                    let send = if self.meta.tools {
                        self.held.push(&t, entries)
                    } else {
                        Some((t, entries))
                    };
                    if let Some((t, e)) = send {
                        self.text_delta(out, &t, &e);
                    }
                }
            }
        }
    }

    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        fields
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<Value> {
        let r = self.meta.object("in_progress", Vec::new(), None);
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// Text for the message item, opening it first.
    fn text_delta(&mut self, out: &mut Vec<Value>, delta: &str, entries: &[TokenEntry]) {
        let lp = logprob_list(entries);
        if let Some(a) = lp.as_array() {
            self.logprobs.extend(a.iter().cloned());
        }
        if delta.is_empty() {
            return;
        }
        let item_id = self.meta.message_id();
        if !self.open {
            self.open = true;
            self.open_message(out);
        }
        self.text.push_str(delta);
        let index = self.message_index();
        out.push(self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                   "delta": delta, "logprobs": lp}),
        ));
    }

    /// `response.output_item.added` and `response.content_part.added` of the message.
    fn open_message(&mut self, out: &mut Vec<Value>) {
        self.end_reasoning(out);
        let item_id = self.meta.message_id();
        let index = self.message_index();
        self.open = true;
        let item = message_item(&item_id, "", "in_progress", &json!([]));
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        out.push(self.event(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                   "part": text_part("", &json!([]))}),
        ));
    }

    /// New text of the reply (held back while it may be a function call).
    pub fn delta(&mut self, d: &str, entries: Vec<TokenEntry>) -> Vec<Value> {
        let mut out = Vec::new();
        let pieces = match &mut self.split {
            Some(s) => s.push(d, entries),
            None => vec![(Part::Content, d.to_string(), entries)],
        };
        self.pieces(&mut out, pieces);
        out
    }

    /// The end of the reply: the held text (as text or calls), each item's `done` events, and
    /// `response.completed` (or `response.incomplete` at `max_output_tokens`). Returns the
    /// events and the whole response.
    pub fn done(&mut self, outcome: &Outcome) -> (Vec<Value>, Value) {
        let mut out = Vec::new();
        if let Some(rest) = self.split.as_mut().map(|s| s.finish()) {
            self.pieces(&mut out, rest);
        }
        let (held, entries) = self.held.finish();
        let calls = match self.meta.tools.then(|| tools::parse(&held)).flatten() {
            // The held tokens were the calls: their logprobs go with no text.
            Some((content, calls)) => {
                self.text_delta(&mut out, content.as_deref().unwrap_or(""), &[]);
                calls
            }
            None => {
                self.text_delta(&mut out, &held, &entries);
                Vec::new()
            }
        };
        self.end_reasoning(&mut out);
        // A reply with neither text nor calls is one empty message, as when not streamed.
        if !self.open && calls.is_empty() {
            self.open_message(&mut out);
        }
        let mut items = std::mem::take(&mut self.before);
        if self.open {
            let item_id = self.meta.message_id();
            let index = self.message_index();
            let text = self.text.clone();
            let lp = Value::Array(std::mem::take(&mut self.logprobs));
            out.push(self.event(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                       "text": text, "logprobs": lp}),
            ));
            out.push(self.event(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                       "part": text_part(&text, &lp)}),
            ));
            let item = message_item(&item_id, &text, "completed", &lp);
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
            items.push(item);
        }
        for (j, c) in calls.iter().enumerate() {
            let index = items.len();
            let item_id = self.meta.call_item_id(j);
            let args = c["function"]["arguments"].clone();
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": call_item(&item_id, c, "in_progress")}),
            ));
            out.push(self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": args}),
            ));
            out.push(self.event(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "arguments": args}),
            ));
            let item = call_item(&item_id, c, "completed");
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
            items.push(item);
        }
        let (status, kind) = if outcome.finish_reason == "length" {
            ("incomplete", "response.incomplete")
        } else {
            ("completed", "response.completed")
        };
        let response = self.meta.object(status, items, Some(outcome));
        out.push(self.event(kind, json!({"response": response})));
        (out, response)
    }

    /// The generation failed after the response started: an `error` event, then
    /// `response.failed`.
    pub fn failed(&mut self, e: &ApiError) -> Vec<Value> {
        let error = json!({"code": e.code.unwrap_or(e.kind), "message": e.message});
        let mut r = self.meta.object("failed", Vec::new(), None);
        r["error"] = error.clone();
        vec![
            self.event(
                "error",
                json!({"code": error["code"], "message": e.message, "param": e.param}),
            ),
            self.event("response.failed", json!({"response": r})),
        ]
    }
}

/// Stored responses: each one's object (for `GET`) and the items it was generated from (for
/// `input_items`, and with its output for `previous_response_id`).
pub struct Store(Kept<Stored>);

impl Default for Store {
    fn default() -> Store {
        Store(Kept::new(STORE_CAPACITY, STORE_BYTES))
    }
}

struct Stored {
    response: Value,
    input_items: Vec<Value>,
}

impl Store {
    pub fn insert(&mut self, id: String, response: Value, input_items: Vec<Value>) {
        let bytes = response.to_string().len()
            + input_items
                .iter()
                .map(|m| m.to_string().len())
                .sum::<usize>();
        let stored = Stored {
            response,
            input_items,
        };
        self.0.insert(id, stored, bytes);
    }

    pub fn response(&self, id: &str) -> Option<&Value> {
        self.0.get(id).map(|s| &s.response)
    }

    /// What a response continuing this one reads: its input items, then its output.
    pub fn context(&self, id: &str) -> Option<Vec<Value>> {
        let s = self.0.get(id)?;
        let output = s.response["output"].as_array().into_iter().flatten();
        Some(s.input_items.iter().chain(output).cloned().collect())
    }

    pub fn input_items(&self, id: &str) -> Option<&[Value]> {
        self.0.get(id).map(|s| &s.input_items[..])
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.0.remove(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::{self, Endpoint};
    use crate::serve::generate::SpeculationReport;

    fn t(body: Value) -> Result<Translated, ApiError> {
        translate(body.as_object().unwrap(), "resp_t", |_| Ok(None))
    }

    fn outcome(finish: &'static str) -> Outcome {
        Outcome {
            finish_reason: finish,
            stop_sequence: None,
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
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 20,
            "temperature": 0, "policy": "strict",
            "input": [
                {"role": "developer", "content": "Use Python."},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "now", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "reasoning", "summary": []},
            ],
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
        }))
        .unwrap();
        let c = &r.chat;
        assert_eq!(c["max_tokens"], 20);
        assert_eq!(c["policy"], "strict");
        // `reasoning.effort` becomes chat's `reasoning_effort`; a level there is not is
        // refused by name.
        let ask = |effort: Value| {
            t(json!({"input": "x", "reasoning": {"effort": effort, "summary": "auto"}}))
        };
        assert_eq!(ask(json!("low")).unwrap().chat["reasoning_effort"], "low");
        assert!(
            ask(json!(null))
                .unwrap()
                .chat
                .get("reasoning_effort")
                .is_none()
        );
        let e = ask(json!(3)).unwrap_err();
        assert!(e.message.contains("reasoning.effort"), "{e:?}");
        assert_eq!(
            c["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(
            c["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            c["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1], json!({"role": "developer", "content": "Use Python."}));
        assert_eq!(
            m[2],
            json!({"role": "user", "content": "Weather in Paris?"})
        );
        assert_eq!(m[3]["role"], "assistant");
        assert_eq!(m[3]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(m[3]["tool_calls"][1]["function"]["name"], "now");
        assert_eq!(
            m[4],
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        );
        assert_eq!(m.len(), 5);
        // The items leave the instructions out, and have ids and statuses.
        assert_eq!(r.input.len(), 6);
        assert!(r.context.is_empty());
        assert_eq!(r.input[0]["id"], "msg_t_in0");
        assert_eq!(r.input[0]["status"], "completed");
        assert_eq!(
            r.input[0]["content"],
            json!([{"type": "input_text", "text": "Use Python."}])
        );
        assert_eq!(r.input[2]["id"], "fc_t_in2");
        assert_eq!(r.input[4]["id"], "fco_t_in4");
        assert_eq!(r.input[5]["id"], "rs_t_in5");
        assert_eq!(r.input_items(), r.input);
        assert!(r.store && !r.stream);
        // ...and the chat route reads it, developer as system (one grammar at a time: the
        // named tool's).
        let e = api::parse_object(Endpoint::Chat, c).unwrap_err();
        assert_eq!(rename_param(e).param.as_deref(), Some("tool_choice"));
        let mut c = c.clone();
        c.remove("response_format");
        let p = api::parse_object(Endpoint::Chat, &c).unwrap();
        assert_eq!(p.messages[1].role, "system");
        assert_eq!(p.max_tokens, Some(20));
        assert!(p.grammar.is_some());
    }

    #[test]
    fn previous_response_continues_its_conversation() {
        // A stored response's context: its input items, then its output (a message and a call).
        let mut store = Store::default();
        let first = t(json!({"input": "Hi"})).unwrap();
        let reply = json!({"output": [
            message_item("msg_t", "Hello", "completed", &json!([])),
            call_item("fc_t_0", &json!({"id": "call_1", "function": {"name": "f", "arguments": "{}"}}), "completed"),
        ]});
        store.insert("resp_1".into(), reply, first.input_items());
        assert_eq!(store.input_items("resp_1").unwrap().len(), 1);
        let prev = store.context("resp_1").unwrap();
        assert_eq!(prev.len(), 3);
        let body = json!({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "2"}],
                          "previous_response_id": "resp_1", "store": false});
        let r = translate(body.as_object().unwrap(), "resp_2", |c| {
            Ok((c == Context::Response("resp_1")).then(|| prev.clone()))
        })
        .unwrap();
        assert_eq!(r.context.len(), 3);
        assert_eq!(r.input.len(), 1);
        let m = r.chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0], json!({"role": "user", "content": "Hi"}));
        assert_eq!(m[1]["content"], "Hello");
        assert_eq!(m[1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(m[2]["role"], "tool");
        assert!(!r.store);
        assert_eq!(r.input_items().len(), 4);
        // An item passed again with an id the context has is refused, by name.
        let again = json!({"input": [prev[1].clone()], "previous_response_id": "resp_1"});
        let e = translate(again.as_object().unwrap(), "resp_3", |_| {
            Ok(Some(prev.clone()))
        })
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].id"), "{e:?}");
        let e = translate(
            json!({"input": "x", "previous_response_id": "resp_2"})
                .as_object()
                .unwrap(),
            "resp_4",
            |_| Ok(None),
        )
        .unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.param.as_deref(), Some("previous_response_id"));
    }

    #[test]
    fn hints_without_effect_are_taken() {
        let r = t(
            json!({"input": "x", "stream_options": {"include_obfuscation": false},
                         "prompt_cache_key": "k", "safety_identifier": "u1"}),
        )
        .unwrap();
        let p = api::parse_object(Endpoint::Chat, &r.chat).unwrap();
        assert_eq!(p.messages.len(), 1);
    }

    #[test]
    fn a_conversation_is_the_context() {
        let items = vec![json!({"id": "msg_a", "type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": "Hi"}]})];
        let body = json!({"input": "Again", "conversation": {"id": "conv_1"}});
        let mut asked = None;
        let r = translate(body.as_object().unwrap(), "resp_9", |c| {
            asked = Some(format!("{c:?}"));
            Ok(Some(items.clone()))
        })
        .unwrap();
        assert_eq!(asked.as_deref(), Some("Conversation(\"conv_1\")"));
        assert_eq!(r.conversation.as_deref(), Some("conv_1"));
        assert_eq!(r.echo["conversation"], json!({"id": "conv_1"}));
        assert_eq!(r.chat["messages"].as_array().unwrap().len(), 2);
        assert_eq!(r.input[0]["id"], "msg_9_in0");
        // By id alone too; a missing one is a 404 naming the field.
        let e = translate(
            json!({"input": "x", "conversation": "conv_2"})
                .as_object()
                .unwrap(),
            "resp_9",
            |_| Ok(None),
        )
        .unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (404, Some("conversation"))
        );
        // Not with previous_response_id; a bad input is refused before the lookup (which takes
        // the conversation).
        for body in [
            json!({"input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"}),
            json!({"input": [{"role": "robot", "content": "x"}], "conversation": "conv_1"}),
            json!({"input": "x", "conversation": 3}),
        ] {
            let e = translate(body.as_object().unwrap(), "resp_9", |_| {
                panic!("looked up for {body}")
            })
            .unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body}");
        }
    }

    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (json!({}), "input"),
            (json!({"input": 3}), "input"),
            (json!({"input": [{"role": "user"}]}), "input[0].content"),
            (
                json!({"input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": [{"type": "web_search_call"}]}),
                "input[0].type",
            ),
            (json!({"input": "x", "messages": []}), "messages"),
            (json!({"input": "x", "max_tokens": 3}), "max_tokens"),
            (
                json!({"input": "x", "stream_options": {"include_usage": true}}),
                "stream_options.include_usage",
            ),
            (json!({"input": "x", "stream_options": 3}), "stream_options"),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"input": "x", "tools": [{"type": "function"}]}),
                "tools[0].name",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "file_search"}}),
                "tool_choice.type",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format.type",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "scheme": {}}}}),
                "text.format.scheme",
            ),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "background": true, "store": false}),
                "background",
            ),
            (json!({"input": "x", "background": 1}), "background"),
            (
                json!({"input": "x", "include": ["message.output_text.probs"]}),
                "include[0]",
            ),
            (json!({"input": "x", "include": "all"}), "include"),
        ];
        for (body, param) in cases {
            let e = t(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
            assert_eq!(e.status.as_u16(), 400, "{body}");
        }
        // What the chat route finds is renamed to the Responses field.
        for (body, param) in [
            (
                json!({"input": "x", "max_output_tokens": -1}),
                "max_output_tokens",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": 3}}}),
                "text.format.schema",
            ),
            (json!({"input": "x", "temperature": "hot"}), "temperature"),
        ] {
            let r = t(body.clone()).unwrap();
            let e = rename_param(api::parse_object(Endpoint::Chat, &r.chat).unwrap_err());
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
            assert!(
                !e.message.contains("max_tokens") && !e.message.contains("response_format"),
                "{e}"
            );
        }
    }

    fn meta(tools: bool) -> Meta {
        let r = t(json!({"input": "x", "max_output_tokens": 3, "temperature": 0})).unwrap();
        Meta::new("resp_abc".into(), 7, "m".into(), &r, tools)
    }

    #[test]
    fn the_whole_response() {
        let r = meta(false).full("Hi there", &[], &outcome("stop"));
        assert_eq!(r["object"], "response");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["incomplete_details"], Value::Null);
        assert_eq!(r["output"][0]["content"][0]["text"], "Hi there");
        assert_eq!(r["output"][0]["id"], "msg_abc");
        assert_eq!(r["max_output_tokens"], 3);
        assert_eq!(r["temperature"], 0);
        assert_eq!(r["usage"]["input_tokens"], 10);
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 4);
        assert_eq!(r["usage"]["total_tokens"], 13);
        assert_eq!(r["conversation"], Value::Null);
        let r = meta(false).full("Hi", &[], &outcome("length"));
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        // With tools, a call is a function_call item and no empty message goes before it.
        let r = meta(true).full(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>",
            &[],
            &outcome("stop"),
        );
        let out = r["output"].as_array().unwrap();
        assert_eq!(out.len(), 1, "{r}");
        assert_eq!(out[0]["type"], "function_call");
        assert_eq!(out[0]["name"], "f");
        assert_eq!(out[0]["arguments"], "{\"x\":1}");
        assert!(out[0]["call_id"].as_str().unwrap().starts_with("call_"));
    }

    /// The streamed events, folded the way a client does, give the same output as the whole
    /// response.
    #[test]
    fn streamed_events_add_up_to_the_response() {
        for (tools, pieces) in [
            (false, vec!["Hel", "lo", " world"]),
            (
                true,
                vec![
                    "Sure. ",
                    "<tool_call>\n{\"name\": ",
                    "\"f\", \"arguments\": {}}\n</tool_call>",
                ],
            ),
            (
                true,
                vec!["{\"name\": \"f\", ", "\"arguments\": {\"a\": [1]}}"],
            ),
            (false, vec![]),
        ] {
            let mut s = Stream::new(meta(tools));
            let mut events = s.start();
            for p in &pieces {
                events.extend(s.delta(p, Vec::new()));
            }
            let (end, response) = s.done(&outcome("stop"));
            events.extend(end);
            let whole = meta(tools).full(&pieces.concat(), &[], &outcome("stop"));
            assert_eq!(
                response["output"].as_array().map(Vec::len),
                whole["output"].as_array().map(Vec::len)
            );
            for (a, b) in response["output"]
                .as_array()
                .unwrap()
                .iter()
                .zip(whole["output"].as_array().unwrap())
            {
                assert_eq!(a["type"], b["type"]);
                // Text streamed before a call keeps its spaces; the whole reply trims them.
                let text = |v: &Value| {
                    v["content"][0]["text"]
                        .as_str()
                        .map(|t| t.trim().to_string())
                };
                assert_eq!(text(a), text(b));
                assert_eq!(a["arguments"], b["arguments"]);
            }
            let seq: Vec<u64> = events
                .iter()
                .map(|e| e["sequence_number"].as_u64().unwrap())
                .collect();
            assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
            assert_eq!(events[0]["type"], "response.created");
            assert_eq!(events.last().unwrap()["type"], "response.completed");
            // Fold: items added, text deltas, then each item's done form.
            let mut items: Vec<Value> = Vec::new();
            for e in &events {
                match e["type"].as_str().unwrap() {
                    "response.output_item.added" => {
                        assert_eq!(e["output_index"], items.len());
                        items.push(e["item"].clone());
                    }
                    "response.output_text.delta" => {
                        let i = e["output_index"].as_u64().unwrap() as usize;
                        assert_eq!(items[i]["type"], "message");
                    }
                    "response.output_item.done" => {
                        let i = e["output_index"].as_u64().unwrap() as usize;
                        assert_eq!(items[i]["id"], e["item"]["id"]);
                        items[i] = e["item"].clone();
                    }
                    _ => {}
                }
            }
            assert_eq!(Value::Array(items), response["output"], "{pieces:?}");
        }
        let mut s = Stream::new(meta(false));
        s.start();
        s.delta("a", Vec::new());
        let (end, r) = s.done(&outcome("length"));
        assert_eq!(end.last().unwrap()["type"], "response.incomplete");
        assert_eq!(r["status"], "incomplete");
    }

    /// With a reasoning parser, a `<think>` block is a reasoning item before the message, whole
    /// or streamed (the same items, the message's logprobs only the answer's tokens).
    #[test]
    fn thinking_is_a_reasoning_item() {
        let meta = Meta {
            reasoning: Some(reasoning::Parser::Qwen3.reading(false)),
            ..meta(false)
        };
        let tokens = ["<think>", "plan", " it", "</think>", "\n\n", "Hel", "lo"];
        let mut offset = 0;
        let entries: Vec<TokenEntry> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let e = TokenEntry {
                    bytes: t.as_bytes().to_vec(),
                    logprob: Some(-0.1 * i as f64),
                    top: Vec::new(),
                    offset,
                };
                offset += t.chars().count();
                e
            })
            .collect();
        let o = outcome("stop");
        let whole = meta.full(&tokens.concat(), &entries, &o);
        let out = whole["output"].as_array().unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["content"][0]["text"], "plan it");
        assert_eq!(out[1]["content"][0]["text"], "Hello");
        let lp: Vec<&str> = out[1]["content"][0]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(lp, ["Hel", "lo"]);
        // Read back as context, the thinking is left out.
        assert_eq!(
            input_messages("input", &whole["output"]).unwrap(),
            [json!({"role": "assistant", "content": "Hello"})]
        );

        let mut s = Stream::new(meta.clone());
        let mut events = s.start();
        for (t, e) in tokens.iter().zip(entries) {
            events.extend(s.delta(t, vec![e]));
        }
        let (end, response) = s.done(&o);
        events.extend(end);
        assert_eq!(response["output"], whole["output"]);
        // Fold the events as a client does: items by output index, text by delta.
        let mut items: Vec<Value> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for e in &events {
            let i = e["output_index"].as_u64().unwrap_or(0) as usize;
            match e["type"].as_str().unwrap() {
                "response.output_item.added" => {
                    assert_eq!(i, items.len());
                    items.push(e["item"].clone());
                    texts.push(String::new());
                }
                "response.reasoning_text.delta" | "response.output_text.delta" => {
                    texts[i].push_str(e["delta"].as_str().unwrap())
                }
                "response.output_item.done" => items[i] = e["item"].clone(),
                _ => {}
            }
        }
        assert_eq!(Value::Array(items), whole["output"]);
        assert_eq!(texts, ["plan it", "Hello"]);
        // Without thinking, the message is the only item, as before.
        let plain = meta.full("Hello", &[], &o);
        assert_eq!(plain["output"].as_array().unwrap().len(), 1);
        assert_eq!(plain["output"][0]["type"], "message");
    }

    #[test]
    fn the_store_keeps_the_latest() {
        let mut s = Store::default();
        for i in 0..STORE_CAPACITY + 5 {
            s.insert(format!("r{i}"), json!({"output": [i]}), vec![json!(i)]);
        }
        assert!(s.response("r4").is_none());
        assert_eq!(s.response("r5"), Some(&json!({"output": [5]})));
        assert_eq!(s.context("r200"), Some(vec![json!(200), json!(200)]));
        assert_eq!(s.input_items("r200"), Some(&[json!(200)][..]));
        assert!(s.remove("r200"));
        assert!(!s.remove("r200"));
        assert!(s.context("r200").is_none());
        // Big conversations: the byte budget evicts the oldest first.
        let big = "x".repeat(STORE_BYTES / 4);
        for i in 0..5 {
            s.insert(format!("b{i}"), json!(i), vec![json!(big)]);
        }
        assert!(s.response("b0").is_none() && s.response("b1").is_none());
        assert!(s.response("b4").is_some() && s.response("b2").is_some());
        assert!(s.0.bytes() <= STORE_BYTES);
        assert!(s.remove("b4"));
        assert!(s.0.bytes() < 3 * STORE_BYTES / 4);
    }
}
