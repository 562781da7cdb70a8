//! Bad input everywhere: valid requests to every JSON route, mutated at random (a value
//! replaced by one of another type or an extreme one, a field dropped, an unknown field
//! added), must each get an answer naming what was wrong (or a success), never a 5xx, a
//! dropped connection or a panic, and the server must answer as before afterwards.

mod http_common;

use std::time::Duration;

use http_common::{Server, tiny_models_of};
use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// A valid request to each route, using most of its fields.
fn templates() -> Vec<(&'static str, Value)> {
    let chat_messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "user", "content": "More"}
    ]);
    vec![
        (
            "/v1/completions",
            json!({"prompt": ["Hello", "def f("], "max_tokens": 4, "temperature": 0.7,
                   "top_p": 0.9, "top_k": 5, "n": 2, "logprobs": 2, "echo": true,
                   "stop": ["\n"], "seed": 3, "logit_bias": {"5": -100},
                   "frequency_penalty": 0.5, "speculation": {"draft": "model", "k": 3},
                   "policy": "strict", "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": chat_messages, "max_tokens": 4, "temperature": 0,
                   "logprobs": true, "top_logprobs": 2, "stop": "x", "n": 1,
                   "response_format": {"type": "json_schema", "json_schema":
                       {"name": "o", "schema": {"type": "object",
                        "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
                   "guided_choice": null, "chat_template_kwargs": {"x": 1},
                   "cache_salt": "s", "priority": 0, "store": true,
                   "metadata": {"k": "v"},
                   "prediction": {"type": "content", "content": [{"type": "text", "text": "{}"}]}}),
        ),
        (
            "/v1/responses",
            json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                             {"type": "function_call", "call_id": "c", "name": "f",
                              "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c", "output": "1"}],
                   "instructions": "Be brief.", "max_output_tokens": 4,
                   "text": {"format": {"type": "text"}}, "store": true,
                   "include": ["message.output_text.logprobs"], "top_logprobs": 1,
                   "metadata": {"k": "v"}}),
        ),
        (
            "/v1/responses/input_tokens",
            json!({"input": "Hello", "instructions": "x"}),
        ),
        (
            "/v1/messages",
            json!({"model": "tiny-target", "max_tokens": 4, "system": "Be brief.",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "More"}],
                   "stop_sequences": ["x"], "temperature": 0.5, "top_k": 3,
                   "metadata": {"user_id": "u"}}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "tiny-target",
                   "messages": [{"role": "user", "content": "Hi"}], "system": "x"}),
        ),
        (
            "/v1/embeddings",
            json!({"input": ["Hello", "there"], "encoding_format": "float", "dimensions": 4}),
        ),
        (
            "/v1/rerank",
            json!({"query": "a", "documents": ["b", "c"], "top_n": 1}),
        ),
        ("/v1/score", json!({"text_1": "a", "text_2": ["b", "c"]})),
        (
            "/tokenize",
            json!({"prompt": "Hello", "add_special_tokens": true}),
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
        ),
        ("/detokenize", json!({"tokens": [1, 2, 3]})),
        (
            "/v1/conversations",
            json!({"items": [{"type": "message", "role": "user", "content": "Hi"}],
                   "metadata": {"k": "v"}}),
        ),
        (
            "/v1/batches",
            json!({"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"k": "v"}}),
        ),
        (
            "/v1/messages/batches",
            json!({"requests": [{"custom_id": "a", "params": {"model": "tiny-target",
                   "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}}]}),
        ),
        (
            "/invocations",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ),
    ]
}

/// Values of every JSON type, and extremes of each.
fn odd_value(rng: &mut ChaCha8Rng) -> Value {
    let long = "x".repeat(rng.random_range(0..5000));
    let deep = (0..200).fold(json!(1), |v, _| json!([v]));
    let choices = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1),
        json!(3.5),
        json!(-1e300),
        json!(1e300),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(""),
        json!(long),
        json!("\u{0}\u{fffd}<|im_start|>"),
        json!([]),
        json!([null]),
        json!({}),
        json!({"type": null}),
        json!([{"role": "user"}]),
        deep,
    ];
    choices.choose(rng).unwrap().clone()
}

/// Every place in `v`: the keys and indices from the top.
fn places(v: &Value, at: &mut Vec<Vec<Value>>, path: Vec<Value>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let mut p = path.clone();
                p.push(json!(k));
                at.push(p.clone());
                places(x, at, p);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let mut p = path.clone();
                p.push(json!(i));
                at.push(p.clone());
                places(x, at, p);
            }
        }
        _ => {}
    }
}

fn parent<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(k) => &mut v[k.as_str()],
        _ => &mut v[k.as_u64().unwrap() as usize],
    })
}

/// One random change to `v`.
fn mutate(v: &mut Value, rng: &mut ChaCha8Rng) {
    let mut at = Vec::new();
    places(v, &mut at, Vec::new());
    let Some(path) = at.choose(rng).cloned() else {
        return;
    };
    let (last, up) = path.split_last().unwrap();
    let holder = parent(v, up);
    match rng.random_range(0..10) {
        // Dropped.
        0 | 1 => match (holder, last) {
            (Value::Object(o), Value::String(k)) => {
                o.remove(k);
            }
            (Value::Array(a), i) => {
                a.remove(i.as_u64().unwrap() as usize);
            }
            _ => {}
        },
        // A field no route knows.
        2 => {
            if let Value::Object(o) = holder {
                o.insert("no_such_field".into(), odd_value(rng));
            }
        }
        // Repeated.
        3 => {
            if let (Value::Array(a), Some(i)) = (holder, last.as_u64()) {
                let x = a[i as usize].clone();
                a.extend(std::iter::repeat_n(x, rng.random_range(1..300)));
            }
        }
        _ => *parent(holder, std::slice::from_ref(last)) = odd_value(rng),
    }
}

#[test]
fn mutated_requests_get_named_errors_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (target, draft) = tiny_models_of(dir.path(), 512, candle_core::quantized::GgmlDType::Q8_0);
    let (t, d) = (target.display().to_string(), draft.display().to_string());
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let mut templates: Vec<(String, Value)> = (templates().into_iter())
        .map(|(p, b)| (p.to_string(), b))
        .collect();
    // Routes under a conversation and a stored completion (made here).
    let conv = s.post_json("/v1/conversations", &json!({})).json()["id"].clone();
    let conv = conv.as_str().unwrap();
    let stored = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "store": true}),
    );
    let stored = stored.json()["id"].as_str().unwrap().to_string();
    templates.extend([
        (
            format!("/v1/conversations/{conv}/items"),
            json!({"items": [{"type": "message", "role": "user", "content": "Hi"},
                             {"type": "function_call_output", "call_id": "c", "output": "1"}]}),
        ),
        (
            format!("/v1/conversations/{conv}"),
            json!({"metadata": {"k": "v"}}),
        ),
        (
            "/v1/responses".to_string(),
            json!({"input": [{"role": "user", "content": "Hi"}], "conversation": {"id": conv},
                   "max_output_tokens": 2}),
        ),
        (
            format!("/v1/chat/completions/{stored}"),
            json!({"metadata": {"k": "v"}}),
        ),
    ]);
    // Each template is valid as it stands.
    for (path, body) in &templates {
        let r = s.post_json(path, body);
        assert!(
            r.status == 200 || (*path == "/v1/batches" && r.status == 404),
            "{path} {body}: {} {}",
            r.status,
            r.text()
        );
    }
    // VERDICT_FUZZ=SEED:N runs N requests from another seed (a longer hunt than the suite's).
    let (seed, n) = match std::env::var("VERDICT_FUZZ") {
        Ok(v) => {
            let (a, b) = v.split_once(':').expect("VERDICT_FUZZ=SEED:N");
            (a.parse().unwrap(), b.parse().unwrap())
        }
        Err(_) => (20261208, 1500),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..n {
        let (path, body) = templates.choose(&mut rng).unwrap();
        let mut body = body.clone();
        for _ in 0..rng.random_range(1..=3) {
            mutate(&mut body, &mut rng);
        }
        // A generation streamed or not, whatever a mutation made of `stream`.
        let r = s
            .try_request(
                "POST",
                path,
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            )
            .unwrap_or_else(|e| panic!("#{i} {path} {body}: no answer ({e})\n{}", s.log_text()));
        *statuses.entry(r.status).or_insert(0) += 1;
        let what = || format!("#{i} {path} {body}: {} {}", r.status, r.text());
        assert!(r.status < 500, "{}", what());
        if r.status >= 400 {
            let v: Value = serde_json::from_str(&r.text()).unwrap_or_else(|_| panic!("{}", what()));
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{}", what());
        } else if r.header("content-type") == Some("application/json") {
            serde_json::from_str::<Value>(&r.text()).unwrap_or_else(|_| panic!("{}", what()));
        }
    }
    // Paths and query strings: list routes' paging, ids with odd characters.
    let conv = s.post_json("/v1/conversations", &json!({})).json()["id"].clone();
    let conv = conv.as_str().unwrap();
    let resp = s.post_json(
        "/v1/responses",
        &json!({"input": "Hi", "max_output_tokens": 2}),
    );
    let resp = resp.json()["id"].as_str().unwrap().to_string();
    let bases = [
        "/v1/files".to_string(),
        "/v1/batches".to_string(),
        "/v1/messages/batches".to_string(),
        "/v1/models".to_string(),
        "/v1/chat/completions".to_string(),
        "/v1/chat/completions/chatcmpl-x/messages".to_string(),
        format!("/v1/conversations/{conv}/items"),
        format!("/v1/responses/{resp}/input_items"),
        format!("/v1/responses/{resp}"),
        "/v1/files/%zz".to_string(),
        "/v1/conversations/%FF%FE/items/%00".to_string(),
        format!("/v1/responses/{}", "r".repeat(5000)),
        "/v1/models/%E2%9C%93".to_string(),
        "/metrics".to_string(),
    ];
    let keys = [
        "limit",
        "after",
        "before",
        "order",
        "purpose",
        "stream",
        "starting_after",
        "include",
        "include[]",
        "beta",
        "",
        "%zz",
    ];
    let values = [
        "",
        "0",
        "-1",
        "1",
        "100",
        "101",
        "99999999999999999999",
        "asc",
        "desc",
        "true",
        "x%zz",
        "%00",
        "msg_x",
        "a+b",
        "&",
        "=",
    ];
    for i in 0..n / 3 {
        let mut path = bases.choose(&mut rng).unwrap().clone();
        for j in 0..rng.random_range(0..4) {
            let sep = if j == 0 { '?' } else { '&' };
            path.push(sep);
            path.push_str(keys.choose(&mut rng).unwrap());
            if rng.random_bool(0.8) {
                path.push('=');
                path.push_str(values.choose(&mut rng).unwrap());
            }
        }
        let method = ["GET", "GET", "DELETE", "POST"].choose(&mut rng).unwrap();
        let r = s
            .try_request(method, &path, &[], b"")
            .unwrap_or_else(|e| panic!("#{i} {method} {path}: no answer ({e})"));
        *statuses.entry(r.status).or_insert(0) += 1;
        assert!(
            r.status < 500,
            "#{i} {method} {path}: {} {}",
            r.status,
            r.text()
        );
        if r.status >= 400 {
            let v: Value = serde_json::from_str(&r.text())
                .unwrap_or_else(|_| panic!("#{i} {method} {path}: {}", r.text()));
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }
    eprintln!("statuses: {statuses:?}");
    assert!(
        statuses.get(&400).is_some_and(|n| *n > 300)
            && statuses.get(&200).is_some_and(|n| *n > 100),
        "{statuses:?}"
    );
    // The server is as it was.
    for (path, body) in &templates[..3] {
        assert_eq!(s.post_json(path, body).status, 200, "{path}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}
