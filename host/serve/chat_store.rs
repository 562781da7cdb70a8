//! OpenAI's stored chat completions: a chat request with `store: true` is kept with the
//! messages it was sent, and `/v1/chat/completions` lists them (by `model` and `metadata`),
//! `/v1/chat/completions/{id}` reads, updates (metadata) and deletes one, and
//! `/v1/chat/completions/{id}/messages` lists its messages.
//!
//! Kept in memory, bounded in number and bytes: the oldest go first. Engine-free: `http.rs`
//! runs the requests and hands their answers here.

use serde_json::{Map, Value, json};

use super::api::metadata;
use super::batch::{self, ListQuery};
use super::error::ApiError;
use super::kept::Kept;

/// Completions kept...
pub const CAPACITY: usize = 1024;

/// ...and at most this many bytes of them (as JSON) in all.
pub const BYTES: usize = 64 << 20;

fn missing(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no stored chat completion `{id}` (kept with `store: true`, in memory: the last {CAPACITY} up to {} MiB)",
        BYTES >> 20
    ))
}

struct Stored {
    completion: Value,
    messages: Vec<Value>,
}

pub struct Store(Kept<Stored>);

impl Default for Store {
    fn default() -> Store {
        Store(Kept::new(CAPACITY, BYTES))
    }
}

/// A list query: paging (`after`, `limit` 1-100, `order`, ascending by default as OpenAI's),
/// and for the completions list `model` and `metadata[KEY]=VALUE` filters.
#[derive(Debug, Default)]
pub struct Query {
    pub page: ListQuery,
    pub model: Option<String>,
    pub metadata: Vec<(String, String)>,
}

/// Parses a list route's query; `filters`: `model` and `metadata[...]` are taken too.
pub fn parse_query(
    query: Option<&str>,
    filters: bool,
    decode: impl Fn(&str) -> String,
) -> Result<Query, ApiError> {
    let (mut model, mut metadata) = (None, Vec::new());
    let rules = batch::ListRules {
        limit: 20,
        order: Some(true),
    };
    let page = batch::parse_list(
        query,
        rules,
        |k, v| {
            if !filters {
                return false;
            }
            if k == "model" {
                model = Some(v);
            } else if let Some(key) = k
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
            {
                metadata.push((key.to_string(), v));
            } else {
                return false;
            }
            true
        },
        decode,
    )?;
    Ok(Query {
        page,
        model,
        metadata,
    })
}

/// The request's messages as the store lists them: each with an `id`
/// (`{completion}-{index}`), a content of parts as its text with the parts beside it.
fn store_messages(id: &str, messages: &[Value]) -> Vec<Value> {
    (messages.iter().enumerate())
        .map(|(i, m)| {
            let mut m = m.clone();
            if let Some(o) = m.as_object_mut() {
                o.insert("id".into(), json!(format!("{id}-{i}")));
                let parts = match o.get("content") {
                    Some(Value::Array(parts)) => Some(parts.clone()),
                    _ => None,
                };
                if let Some(parts) = parts {
                    let text: String = (parts.iter())
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect();
                    o.insert("content".into(), json!(text));
                    o.insert("content_parts".into(), Value::Array(parts));
                } else {
                    o.insert("content_parts".into(), Value::Null);
                }
            }
            m
        })
        .collect()
}

impl Store {
    /// Keeps an answered request: `completion` (the object the client got; its `metadata`
    /// is set to the request's) and the `messages` it sent.
    pub fn insert(
        &mut self,
        mut completion: Value,
        messages: &[Value],
        meta: Option<Map<String, Value>>,
    ) {
        let Some(id) = completion["id"].as_str().map(str::to_string) else {
            return;
        };
        completion["metadata"] = Value::Object(meta.unwrap_or_default());
        let messages = store_messages(&id, messages);
        let bytes = completion.to_string().len()
            + messages.iter().map(|m| m.to_string().len()).sum::<usize>();
        let stored = Stored {
            completion,
            messages,
        };
        self.0.insert(id, stored, bytes);
    }

    /// `GET /v1/chat/completions`.
    pub fn list(&self, q: &Query) -> Result<Value, ApiError> {
        let items = (self.0.iter())
            .filter(|(_, s)| {
                q.model
                    .as_ref()
                    .is_none_or(|m| s.completion["model"].as_str() == Some(m))
                    && (q.metadata.iter())
                        .all(|(k, v)| s.completion["metadata"][k].as_str() == Some(v))
            })
            .map(|(id, s)| (id.clone(), s.completion.clone()))
            .collect();
        batch::page(items, &q.page)
    }

    pub fn get(&self, id: &str) -> Result<Value, ApiError> {
        (self.0.get(id))
            .map(|s| s.completion.clone())
            .ok_or_else(|| missing(id))
    }

    /// `POST /v1/chat/completions/{id}` (`{"metadata"}`): the metadata replaced.
    pub fn update(&mut self, id: &str, body: &Map<String, Value>) -> Result<Value, ApiError> {
        if let Some(k) = body.keys().find(|k| *k != "metadata") {
            return Err(ApiError::invalid(
                k,
                format!("unknown field `{k}` (only metadata can be updated)"),
            )
            .with_code("unknown_parameter"));
        }
        let m = body
            .get("metadata")
            .ok_or_else(|| ApiError::invalid("metadata", "`metadata` is required"))?;
        let m = metadata(m)?.unwrap_or_default();
        let s = self.0.get_mut(id).ok_or_else(|| missing(id))?;
        s.completion["metadata"] = Value::Object(m);
        Ok(s.completion.clone())
    }

    pub fn delete(&mut self, id: &str) -> Result<Value, ApiError> {
        self.0.remove(id).ok_or_else(|| missing(id))?;
        Ok(json!({"id": id, "object": "chat.completion.deleted", "deleted": true}))
    }

    /// `GET /v1/chat/completions/{id}/messages`.
    pub fn messages(&self, id: &str, q: &Query) -> Result<Value, ApiError> {
        let s = self.0.get(id).ok_or_else(|| missing(id))?;
        let items = (s.messages.iter())
            .map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m.clone()))
            .collect();
        batch::page(items, &q.page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        parse_query(Some(s), true, |x| x.to_string()).unwrap()
    }

    fn completion(id: &str, model: &str) -> Value {
        json!({"id": id, "object": "chat.completion", "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]})
    }

    fn meta(v: Value) -> Option<Map<String, Value>> {
        v.as_object().cloned()
    }

    #[test]
    fn stored_completions_are_listed_filtered_and_paged() {
        let mut s = Store::default();
        let msgs = [
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}),
        ];
        s.insert(completion("c1", "m"), &msgs, meta(json!({"team": "a"})));
        s.insert(completion("c2", "lora"), &msgs, None);
        s.insert(completion("c3", "m"), &msgs, meta(json!({"team": "b"})));
        let ids = |v: Value| -> Vec<String> {
            (v["data"].as_array().unwrap().iter())
                .map(|c| c["id"].as_str().unwrap().to_string())
                .collect()
        };
        // Oldest first by default (as OpenAI lists them); filters by model and metadata.
        assert_eq!(ids(s.list(&q("")).unwrap()), ["c1", "c2", "c3"]);
        assert_eq!(ids(s.list(&q("order=desc&limit=1")).unwrap()), ["c3"]);
        assert_eq!(ids(s.list(&q("after=c1")).unwrap()), ["c2", "c3"]);
        assert_eq!(ids(s.list(&q("model=m")).unwrap()), ["c1", "c3"]);
        assert_eq!(ids(s.list(&q("metadata[team]=b")).unwrap()), ["c3"]);
        assert_eq!(s.get("c2").unwrap()["metadata"], json!({}));
        // Messages: ids, and parts as text with the parts beside.
        let m = s.messages("c1", &q("")).unwrap();
        assert_eq!(m["data"][0]["id"], "c1-0");
        assert_eq!(m["data"][0]["content_parts"], Value::Null);
        assert_eq!(m["data"][1]["content"], "Hello");
        assert_eq!(m["data"][1]["content_parts"][1]["text"], "lo");
        assert_eq!(m["first_id"], "c1-0");
        // Metadata replaced; deleted.
        let body = json!({"metadata": {"team": "c"}});
        let u = s.update("c1", body.as_object().unwrap()).unwrap();
        assert_eq!(u["metadata"], json!({"team": "c"}));
        assert_eq!(
            s.delete("c1").unwrap(),
            json!({"id": "c1", "object": "chat.completion.deleted", "deleted": true})
        );
        assert_eq!(s.get("c1").unwrap_err().status, 404);
        assert_eq!(s.delete("c1").unwrap_err().status, 404);
        // Bad uses, named.
        let bad = json!({"metadata": {"k": 1}});
        assert_eq!(
            s.update("c2", bad.as_object().unwrap())
                .unwrap_err()
                .param
                .as_deref(),
            Some("metadata.k")
        );
        let bad = json!({"model": "x"});
        assert_eq!(
            s.update("c2", bad.as_object().unwrap())
                .unwrap_err()
                .param
                .as_deref(),
            Some("model")
        );
        for bad in ["order=up", "limit=0", "colour=red"] {
            assert!(
                parse_query(Some(bad), true, |x| x.to_string()).is_err(),
                "{bad}"
            );
        }
        // Messages take no filters.
        assert!(parse_query(Some("model=m"), false, |x| x.to_string()).is_err());
    }

    #[test]
    fn the_store_keeps_the_latest() {
        let mut s = Store::default();
        for i in 0..CAPACITY + 3 {
            s.insert(completion(&format!("c{i}"), "m"), &[], None);
        }
        assert!(s.get("c2").is_err() && s.get("c3").is_ok());
        let big = "x".repeat(BYTES / 3);
        for i in 0..4 {
            s.insert(completion(&format!("b{i}"), &big), &[], None);
        }
        assert!(s.get("b0").is_err() && s.get("b3").is_ok());
        assert!(s.0.bytes() <= BYTES);
    }
}
