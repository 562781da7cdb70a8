//! Anthropic's Message Batches API (`/v1/messages/batches`): a list of Messages API requests,
//! each `{"custom_id", "params"}`, run in the background like an OpenAI batch (the same runner,
//! store and `--batch-dir`, [`super::batch`]); its results are one JSONL file of
//! `{"custom_id", "result"}` lines, `result` one of `succeeded` (the message), `errored` (the
//! error the route gave), `canceled` or `expired`, read from the batch's `results_url` once
//! processing has ended.
//!
//! The requests are checked whole when the batch is created (its shape, `custom_id`s, no
//! streaming): a bad one refuses the batch, naming it (`requests[3].custom_id`). Their `params`
//! are checked when they run, as Anthropic does: a bad one is an `errored` result.

use std::collections::HashSet;

use bytes::Bytes;
use serde_json::{Value, json};

use super::batch::{self, Answer, Batch, Line, Outcome, Status, Stop};
use super::error::ApiError;

/// Requests per batch (Anthropic's limit).
pub const MAX_REQUESTS: usize = 100_000;

/// The purpose of a batch's results file: kept with the files (`--max-file-store-bytes`,
/// `--batch-dir`) but never listed or served by the Files API.
pub const RESULTS_PURPOSE: &str = "message_batch_results";

/// The id of a batch's results file (named after it: finalizing again after a restart replaces
/// it, and forgetting the batch finds it).
pub fn results_id(batch: &str) -> String {
    format!("file-{batch}-results")
}

/// Reads `POST /v1/messages/batches`' body (`{"requests": [...]}`) into batch lines, as a
/// batch file of them (kept by `--batch-dir` to go on after a restart) and its parsed lines.
pub fn parse_create(body: &[u8]) -> Result<(Bytes, Vec<Line>), ApiError> {
    let o = super::api::json_object(body)?;
    if let Some(k) = o.keys().find(|k| *k != "requests") {
        return Err(ApiError::invalid(
            k.as_str(),
            format!("unknown parameter {k:?} (a message batch holds requests)"),
        )
        .with_code("unknown_parameter"));
    }
    let requests = match o.get("requests") {
        Some(Value::Array(r)) => r,
        Some(_) => return Err(ApiError::invalid("requests", "requests must be an array")),
        None => return Err(ApiError::invalid("requests", "requests is required")),
    };
    if requests.is_empty() || requests.len() > MAX_REQUESTS {
        return Err(ApiError::invalid(
            "requests",
            format!(
                "requests holds {} requests; a batch holds 1 to {MAX_REQUESTS}",
                requests.len()
            ),
        ));
    }
    let mut ids = HashSet::new();
    let mut data = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let at = |k: &str| format!("requests[{i}].{k}");
        let Value::Object(r) = r else {
            return Err(ApiError::invalid(
                format!("requests[{i}]"),
                "a request must be an object of custom_id and params",
            ));
        };
        if let Some(k) = r
            .keys()
            .find(|k| !["custom_id", "params"].contains(&k.as_str()))
        {
            return Err(ApiError::invalid(
                at(k),
                format!("unknown field {k:?} (a request holds custom_id and params)"),
            ));
        }
        let id = match r.get("custom_id") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(ApiError::invalid(
                    at("custom_id"),
                    "custom_id must be a string",
                ));
            }
            None => return Err(ApiError::invalid(at("custom_id"), "custom_id is required")),
        };
        let well_formed = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !well_formed {
            return Err(ApiError::invalid(
                at("custom_id"),
                format!("custom_id {id:?} must be 1 to 64 letters, digits, '_' or '-'"),
            ));
        }
        if !ids.insert(id.as_str()) {
            return Err(ApiError::invalid(
                at("custom_id"),
                format!("custom_id {id:?} is used by an earlier request"),
            ));
        }
        let params = match r.get("params") {
            Some(Value::Object(p)) => p,
            Some(_) => {
                return Err(ApiError::invalid(
                    at("params"),
                    "params must be an object (a Messages API request)",
                ));
            }
            None => return Err(ApiError::invalid(at("params"), "params is required")),
        };
        if params.get("stream") == Some(&Value::Bool(true)) {
            return Err(ApiError::invalid(
                at("params.stream"),
                "params.stream must be false: a batch answers each request whole",
            ));
        }
        let line =
            json!({"custom_id": id, "method": "POST", "url": batch::MESSAGES, "body": params});
        serde_json::to_writer(&mut data, &line)
            .map_err(|e| ApiError::internal(format!("cannot write the batch's lines: {e}")))?;
        data.push(b'\n');
    }
    let data = Bytes::from(data);
    // The lines were checked above; this only cuts them (a refusal here names its request).
    let lines = batch::parse_at_most(&data, Some(batch::MESSAGES), MAX_REQUESTS).map_err(|e| {
        let first = e.first();
        let at = (first.and_then(|e| e.line)).map(|n| format!("requests[{}]", n.saturating_sub(1)));
        let message =
            first.map_or_else(|| "the requests do not read".into(), |e| e.message.clone());
        ApiError::invalid(at.unwrap_or_else(|| "requests".into()), message)
    })?;
    Ok((data, lines))
}

/// The result of a request its route answered: the message, or the error in Anthropic's shape.
pub fn answered(custom_id: &str, a: Answer) -> Outcome {
    let ok = (200..300).contains(&a.status);
    let result = if ok {
        json!({"type": "succeeded", "message": a.body})
    } else {
        // The Messages route's errors have Anthropic's shape already; anything else is put in it.
        let error = if a.body["type"] == "error" {
            a.body
        } else {
            let message = a.body["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| a.body.to_string());
            json!({"type": "error", "error": {"type": "api_error", "message": message}})
        };
        json!({"type": "errored", "error": error})
    };
    line(custom_id, result, ok, None)
}

/// The result of a request that got no answer.
pub fn stopped(custom_id: &str, why: Stop) -> Outcome {
    let result = match why {
        Stop::Cancelled => json!({"type": "canceled"}),
        Stop::Expired => json!({"type": "expired"}),
        // (Never a result: a batch stopped by a shutdown does not end.)
        Stop::ShuttingDown => json!({"type": "errored", "error": {"type": "error", "error": {
            "type": "overloaded_error", "message": "the server stopped before this request ran"}}}),
    };
    line(custom_id, result, false, Some(why))
}

fn line(custom_id: &str, result: Value, ok: bool, stopped: Option<Stop>) -> Outcome {
    let v = json!({"custom_id": custom_id, "result": result});
    Outcome {
        ok,
        stopped,
        json: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    }
}

/// Unix seconds as an RFC 3339 time (Anthropic's times), UTC.
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A batch as Anthropic's `message_batch` object; `origin` (`http://host:port`, as the client
/// reached the server) makes `results_url` absolute, as Anthropic's is.
pub fn json(b: &Batch, origin: Option<&str>) -> Value {
    let s = b.state();
    let (status, ended_at) = match s.status {
        Status::InProgress | Status::Finalizing => ("in_progress", None),
        Status::Cancelling => ("canceling", None),
        Status::Completed => ("ended", s.completed_at),
        Status::Cancelled => ("ended", s.cancelled_at),
        Status::Expired => ("ended", s.expired_at),
        Status::Failed => ("ended", s.failed_at),
    };
    let ended = status == "ended";
    let done = s.completed + s.failed + s.cancelled + s.expired;
    let rest = s.total.saturating_sub(done);
    // An ended batch processes nothing: lines it lost (a `--batch-dir` that lost their copy)
    // are errored.
    let (processing, errored) = if ended {
        (0, s.failed + rest)
    } else {
        (rest, s.failed)
    };
    let results_url = (ended && s.output_file_id.is_some()).then(|| {
        format!(
            "{}/v1/messages/batches/{}/results",
            origin.unwrap_or(""),
            b.id
        )
    });
    json!({
        "id": b.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": processing,
            "succeeded": s.completed,
            "errored": errored,
            "canceled": s.cancelled,
            "expired": s.expired,
        },
        "ended_at": ended_at.map(rfc3339),
        "created_at": rfc3339(b.created_at),
        "expires_at": rfc3339(b.expires_at()),
        "archived_at": null,
        "cancel_initiated_at": s.cancelling_at.map(rfc3339),
        "results_url": results_url,
    })
}

/// How `GET /v1/messages/batches` pages: newest first, `limit` of them after `after_id` or
/// before `before_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    pub after: Option<String>,
    pub before: Option<String>,
}

/// Parses the list's query; errors name the parameter. (`beta`, which Anthropic's clients add
/// on their beta routes, is read and ignored.)
pub fn parse_query(
    query: Option<&str>,
    decode: impl Fn(&str) -> String,
) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: 20,
        after: None,
        before: None,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(&v.replace('+', " "));
        match k {
            "limit" => {
                q.limit = (v.parse().ok())
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("limit must be in 1..=1000, got {v:?}"))
                    })?
            }
            "after_id" => q.after = Some(v),
            "before_id" => q.before = Some(v),
            "beta" => {}
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?} (limit, after_id, before_id)"),
                ));
            }
        }
    }
    if q.after.is_some() && q.before.is_some() {
        return Err(ApiError::invalid(
            "before_id",
            "give after_id or before_id, not both",
        ));
    }
    Ok(q)
}

/// A page of `items` (id and object, oldest first) as Anthropic lists them.
pub fn page(items: Vec<(String, Value)>, q: &ListQuery) -> Result<Value, ApiError> {
    let mut items = items;
    items.reverse();
    let find = |id: &str, param: &str| {
        (items.iter().position(|(x, _)| x == id)).ok_or_else(|| {
            ApiError::invalid(param, format!("{param} names {id:?}, which is not listed"))
        })
    };
    let (range, has_more) = match (&q.after, &q.before) {
        (_, Some(b)) => {
            let end = find(b, "before_id")?;
            let start = end.saturating_sub(q.limit);
            (start..end, start > 0)
        }
        (Some(a), None) => {
            let start = find(a, "after_id")? + 1;
            let end = (start + q.limit).min(items.len());
            (start..end, end < items.len())
        }
        (None, None) => {
            let end = q.limit.min(items.len());
            (0..end, end < items.len())
        }
    };
    let data = &items[range];
    Ok(json!({
        "data": data.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": data.first().map(|(id, _)| id),
        "last_id": data.last().map(|(id, _)| id),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: Value) -> (String, String) {
        let e = parse_create(&serde_json::to_vec(&body).unwrap()).unwrap_err();
        (e.param.unwrap_or_default(), e.message)
    }

    fn request(id: &str) -> Value {
        json!({"custom_id": id, "params": {"model": "m", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}})
    }

    #[test]
    fn requests_become_lines_of_the_messages_route() {
        let body = json!({"requests": [request("a"), request("b-2_X")]});
        let (data, lines) = parse_create(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[1].custom_id.as_str(), lines[1].url.as_str()),
            ("b-2_X", "/v1/messages")
        );
        let body: Value = serde_json::from_slice(&lines[0].body()).unwrap();
        assert_eq!(body["max_tokens"], 4);
        // The file a restart reads them from again.
        let again = batch::parse_at_most(&data, Some(batch::MESSAGES), MAX_REQUESTS).unwrap();
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn a_bad_request_refuses_the_batch_naming_it() {
        let cases = [
            (json!({"requests": []}), "requests", "1 to"),
            (json!({"requests": {}}), "requests", "array"),
            (json!({}), "requests", "required"),
            (json!({"requests": [request("a")], "x": 1}), "x", "unknown"),
            (
                json!({"requests": [request("a"), 3]}),
                "requests[1]",
                "object",
            ),
            (
                json!({"requests": [request("a"), request("a")]}),
                "requests[1].custom_id",
                "earlier",
            ),
            (
                json!({"requests": [request("a b")]}),
                "requests[0].custom_id",
                "letters",
            ),
            (
                json!({"requests": [request(&"x".repeat(65))]}),
                "requests[0].custom_id",
                "1 to 64",
            ),
            (
                json!({"requests": [{"custom_id": 3, "params": {}}]}),
                "requests[0].custom_id",
                "string",
            ),
            (
                json!({"requests": [{"custom_id": "a"}]}),
                "requests[0].params",
                "required",
            ),
            (
                json!({"requests": [{"custom_id": "a", "params": []}]}),
                "requests[0].params",
                "object",
            ),
            (
                json!({"requests": [{"custom_id": "a", "params": {}, "url": "/"}]}),
                "requests[0].url",
                "unknown",
            ),
            (
                json!({"requests": [{"custom_id": "a", "params": {"stream": true}}]}),
                "requests[0].params.stream",
                "whole",
            ),
        ];
        for (body, param, words) in cases {
            let (p, m) = refusal(body.clone());
            assert_eq!(p, param, "{body}: {m}");
            assert!(m.contains(words), "{body}: {m}");
        }
        let e = parse_create(b"[1]").unwrap_err();
        assert!(e.message.contains("object"), "{}", e.message);
    }

    #[test]
    fn results_read_as_anthropic_writes_them() {
        let ok = answered(
            "a",
            Answer {
                status: 200,
                body: json!({"type": "message"}),
            },
        );
        let v: Value = serde_json::from_slice(&ok.json).unwrap();
        assert_eq!(
            v,
            json!({"custom_id": "a", "result": {"type": "succeeded", "message": {"type": "message"}}})
        );
        assert!(ok.ok && ok.stopped.is_none());
        let error =
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "no"}});
        let bad = answered(
            "b",
            Answer {
                status: 400,
                body: error.clone(),
            },
        );
        let v: Value = serde_json::from_slice(&bad.json).unwrap();
        assert_eq!(v["result"], json!({"type": "errored", "error": error}));
        assert!(!bad.ok && bad.stopped.is_none());
        // An error in OpenAI's shape is put in Anthropic's.
        let other = answered(
            "c",
            Answer {
                status: 500,
                body: json!({"error": {"message": "boom"}}),
            },
        );
        let v: Value = serde_json::from_slice(&other.json).unwrap();
        assert_eq!(
            v["result"]["error"]["error"],
            json!({"type": "api_error", "message": "boom"})
        );
        for (why, kind) in [(Stop::Cancelled, "canceled"), (Stop::Expired, "expired")] {
            let o = stopped("d", why);
            let v: Value = serde_json::from_slice(&o.json).unwrap();
            assert_eq!(v, json!({"custom_id": "d", "result": {"type": kind}}));
            assert_eq!(o.stopped, Some(why));
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_680_595), "2026-12-07T21:56:35Z");
        assert_eq!(rfc3339(u64::MAX), "");
    }

    #[test]
    fn a_batch_object_follows_its_lines() {
        let b = Batch::messages(4, 100);
        assert!(b.id.starts_with("msgbatch_"));
        let v = json(&b, Some("http://h:1"));
        assert_eq!(v["processing_status"], "in_progress");
        assert_eq!(v["request_counts"]["processing"], 4);
        assert_eq!(v["created_at"], "1970-01-01T00:01:40Z");
        assert_eq!(v["expires_at"], rfc3339(100 + 24 * 3600));
        assert_eq!(v["results_url"], Value::Null);
        b.count(&answered(
            "a",
            Answer {
                status: 200,
                body: json!({}),
            },
        ));
        b.count(&answered(
            "b",
            Answer {
                status: 400,
                body: json!({}),
            },
        ));
        b.cancel(150).unwrap();
        let v = json(&b, None);
        assert_eq!(v["processing_status"], "canceling");
        assert_eq!(v["cancel_initiated_at"], rfc3339(150));
        b.count(&stopped("c", Stop::Cancelled));
        b.count(&stopped("d", Stop::Cancelled));
        b.finish(Some(Stop::Cancelled), Some(results_id(&b.id)), None, 160);
        let v = json(&b, Some("http://h:1"));
        assert_eq!(v["processing_status"], "ended");
        assert_eq!(v["ended_at"], rfc3339(160));
        assert_eq!(
            v["request_counts"],
            json!({"processing": 0, "succeeded": 1, "errored": 1, "canceled": 2, "expired": 0})
        );
        assert_eq!(
            v["results_url"],
            format!("http://h:1/v1/messages/batches/{}/results", b.id)
        );
        // Its record reads back as the same batch.
        let again = Batch::from_json(&b.record(), &[]).unwrap();
        assert_eq!(json(&again, Some("http://h:1")), v);
        assert_eq!(again.api, batch::Api::Anthropic);
    }

    #[test]
    fn lists_page_newest_first_both_ways() {
        let items: Vec<(String, Value)> = (0..5).map(|i| (format!("b{i}"), json!(i))).collect();
        let q = |s: &str| parse_query(Some(s), |x| x.to_string()).unwrap();
        let p = page(items.clone(), &q("limit=2")).unwrap();
        assert_eq!(
            p,
            json!({"data": [4, 3], "has_more": true, "first_id": "b4", "last_id": "b3"})
        );
        let p = page(items.clone(), &q("limit=2&after_id=b3")).unwrap();
        assert_eq!(
            p,
            json!({"data": [2, 1], "has_more": true, "first_id": "b2", "last_id": "b1"})
        );
        let p = page(items.clone(), &q("limit=2&after_id=b1")).unwrap();
        assert_eq!(p["data"], json!([0]));
        assert_eq!(p["has_more"], false);
        let p = page(items.clone(), &q("limit=2&before_id=b1&beta=true")).unwrap();
        assert_eq!(
            p,
            json!({"data": [3, 2], "has_more": true, "first_id": "b3", "last_id": "b2"})
        );
        let p = page(items.clone(), &q("before_id=b3")).unwrap();
        assert_eq!(
            (p["data"].clone(), p["has_more"].clone()),
            (json!([4]), json!(false))
        );
        let p = page(Vec::new(), &q("")).unwrap();
        assert_eq!(
            p,
            json!({"data": [], "has_more": false, "first_id": null, "last_id": null})
        );
        let e = page(items, &q("after_id=zz")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("after_id"));
        for (bad, param) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("order=asc", "order"),
            ("after_id=a&before_id=b", "before_id"),
        ] {
            let e = parse_query(Some(bad), |x| x.to_string()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }
}
