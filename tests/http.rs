//! End-to-end tests of `verdict serve`: the real binary on a free port, tiny random models
//! written by the test (and SmolLM2 for real text), driven with raw HTTP/1.1.

mod http_common;

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use http_common::{Server, hostile_guest, stream_text, tiny_models, tiny_models_of};
use serde_json::{Value, json};

fn tiny_server(context: usize, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, draft) = tiny_models(dir.path(), context);
    let mut args: Vec<String> = vec![
        "--model".into(),
        target.display().to_string(),
        "--draft".into(),
        draft.display().to_string(),
        "--policy-dir".into(),
        dir.path().join("policies").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log_dir = dir.path().to_path_buf();
    Server::start(&args, Some(dir), &log_dir)
}

/// `verdict serve --model MODEL EXTRA...` must stop before serving: its stderr.
fn serve_fails(model: &std::path::Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args([
            "serve",
            "--port",
            "0",
            "--model",
            &model.display().to_string(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {extra:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_for(what: &str, server: &Server, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}\nserver log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `base` with `extra`'s fields set over it.
fn merged(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().expect("extra fields: an object") {
        base[k] = v.clone();
    }
    base
}

/// POSTs `body`, which must be answered 200: the answer.
fn ok_json(s: &Server, path: &str, body: &Value) -> Value {
    let r = s.post_json(path, body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

/// Sends a completions request without reading the answer: the connection, to read or drop.
fn send_only(s: &Server, body: &Value) -> std::net::TcpStream {
    let mut c = s.connect();
    http_common::write_request(
        &mut c,
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    )
    .unwrap();
    c
}

/// The tokenizer of a GGUF model file.
fn tokenizer_of(model: &str) -> verdict::models::tokenizer::Tokenizer {
    let m =
        verdict::models::Model::load_gguf(std::path::Path::new(model), &candle_core::Device::Cpu)
            .unwrap();
    verdict::models::tokenizer::Tokenizer::from_gguf(m.gguf_metadata().unwrap()).unwrap()
}

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or_else(|| c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

#[test]
fn completions_chat_streaming_stop_and_stats() {
    let s = tiny_server(256, &[]);
    assert_eq!(s.get("/health").status, 200);
    let ready = s.get("/ready");
    assert_eq!(
        (ready.status, ready.json()["status"].as_str()),
        (200, Some("ready"))
    );
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny-target");
    assert_eq!(s.get("/v1/models/tiny-target").json(), models["data"][0]);
    // Anthropic's fields beside OpenAI's (its clients read the same route).
    let m = &models["data"][0];
    assert_eq!(
        (m["type"].as_str(), m["display_name"].as_str()),
        (Some("model"), Some("tiny-target"))
    );
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'), "{m}");
    assert_eq!(
        (models["has_more"].as_bool(), models["first_id"].as_str()),
        (Some(false), Some("tiny-target"))
    );
    let other = s.get("/v1/models/gpt-4");
    assert_eq!(other.status, 404);
    assert_eq!(other.json()["error"]["code"], "model_not_found");

    // Non-streamed completion with the draft model.
    let req = json!({"model": "tiny-target", "prompt": "the cat sat on", "max_tokens": 12,
                     "temperature": 0, "speculation": {"draft": "model", "k": 3}});
    let r = s.post_json("/v1/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = text_of(&v);
    let u = &v["usage"];
    let (pt, ct) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(pt > 0);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), pt + ct);
    match v["choices"][0]["finish_reason"].as_str() {
        Some("length") => assert_eq!(ct, 12),
        Some("stop") => assert!(ct <= 12),
        other => panic!("finish_reason {other:?}"),
    }
    let spec = &v["speculation"];
    assert_eq!(spec["drafter"], "model");
    assert_eq!(spec["policy"], "strict@0.1.0");
    assert!(spec["steps"].as_u64().unwrap() >= 1);
    let per_pos: u64 = spec["drafted_per_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(per_pos, spec["drafted"].as_u64().unwrap());
    let acc_pos: u64 = spec["accepted_per_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(acc_pos, spec["accepted"].as_u64().unwrap());
    assert!(spec["drafted_per_position"].as_array().unwrap().len() <= 3);
    // Strict at T = 0 keeps only the target's argmax; the output's likelihood is reported.
    assert_eq!(spec["accepted_off_argmax"], 0);
    let lp = spec["mean_target_logprob"].as_f64().unwrap();
    assert!(lp < 0.0 && lp.is_finite(), "{lp}");

    // Greedy is deterministic, and the stream carries exactly the same text.
    assert_eq!(text_of(&s.post_json("/v1/completions", &req).json()), text);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let st = s.open_stream("/v1/completions", &sreq);
    assert_eq!(st.status, 200);
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let events = st.collect();
    let (streamed, last, done) = stream_text(&events);
    assert!(done, "no [DONE]: {events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed, text);
    let last = last.expect("a final chunk");
    assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(ct));
    assert_eq!(last["speculation"]["drafter"], "model");
    // include_usage: a last chunk with no choices and the usage.
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["total_tokens"].as_u64(), Some(pt + ct));
    let ids: std::collections::HashSet<String> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one id per stream");

    // Chat, streamed and not, with the model's chat template.
    let chat = json!({"messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi there"}],
                      "max_tokens": 10, "temperature": 0, "speculation": "off"});
    let c = s.post_json("/v1/chat/completions", &chat);
    assert_eq!(c.status, 200, "{}", c.text());
    let cv = c.json();
    assert_eq!(cv["object"], "chat.completion");
    assert_eq!(cv["choices"][0]["message"]["role"], "assistant");
    assert!(
        cv["speculation"]["policy"].is_null(),
        "speculation off: no policy"
    );
    let mut cs = chat.clone();
    cs["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &cs).collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (ctext, clast, cdone) = stream_text(&events);
    assert!(cdone);
    assert_eq!(ctext, text_of(&cv));
    assert!(clast.is_some());

    // A seed makes sampling reproducible.
    let sampled = json!({"prompt": "a", "max_tokens": 16, "temperature": 1.0, "seed": 7});
    assert_eq!(
        text_of(&s.post_json("/v1/completions", &sampled).json()),
        text_of(&s.post_json("/v1/completions", &sampled).json())
    );

    // Stop strings: the output ends right before the first occurrence, finish_reason stop.
    let long =
        json!({"prompt": "once upon", "max_tokens": 40, "temperature": 0, "speculation": "off"});
    let full = text_of(&s.post_json("/v1/completions", &long).json());
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "need some text to cut: {full:?}");
    let stop: String = chars[8..10].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut r = long.clone();
        r["stop"] = json!([stop.clone(), "\u{1F600}never"]);
        r["stream"] = json!(stream);
        let (got, reason) = if stream {
            let (t, last, _) = stream_text(&s.open_stream("/v1/completions", &r).collect());
            (t, last.unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = s.post_json("/v1/completions", &r).json();
            (text_of(&v), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(
            got, expected,
            "stream={stream}, stop={stop:?}, full={full:?}"
        );
        assert_eq!(reason, "stop");
    }

    // Metrics saw all of it.
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "verdict_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "verdict_speculation_steps_total{policy=\"strict@0.1.0\"}",
        "verdict_drafted_tokens_total{policy=\"strict@0.1.0\"}",
        // (random tiny models: whether a draft is ever accepted is chance)
        "verdict_drafted_by_position_total{policy=\"strict@0.1.0\",position=\"0\"}",
        "verdict_accepted_tokens_total{policy=\"strict@0.1.0\"}",
        "verdict_time_to_first_token_seconds_count",
        "verdict_inter_token_seconds_count",
        "verdict_queue_seconds_count",
        "verdict_tokens_per_step_count",
        "verdict_queue_depth",
        "verdict_completion_tokens_total",
        "verdict_policy_call_seconds_count",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    assert!(
        s.metric("verdict_policy_call_seconds_count") >= 1.0,
        "speculative steps call the policy and time it:\n{text}"
    );
    // vLLM's names for the same metrics (what its dashboards and routers read), labelled with
    // the model's name: the same values. (Read once the last generation has finished its
    // bookkeeping, which may come just after its client's last byte.)
    wait_for("no generation running", &s, Duration::from_secs(10), || {
        s.metric("verdict_active_generations") == 0.0
    });
    let text = s.get("/metrics").text();
    let m = |name: &str| {
        let line = text
            .lines()
            .find(|l| l.rsplit_once(' ').is_some_and(|(k, _)| k == name));
        let value = line.and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok());
        value.unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let model = "model_name=\"tiny-target\"";
    let generated = m(&format!("vllm:generation_tokens_total{{{model}}}"));
    assert!(generated > 0.0);
    assert_eq!(generated, m("verdict_completion_tokens_total"));
    assert_eq!(
        m(&format!("vllm:prompt_tokens_total{{{model}}}")),
        m("verdict_prompt_tokens_total")
    );
    let policy = "policy=\"strict@0.1.0\"";
    assert_eq!(
        m(&format!(
            "vllm:spec_decode_num_draft_tokens_total{{{model},{policy}}}"
        )),
        m(&format!("verdict_drafted_tokens_total{{{policy}}}"))
    );
    assert_eq!(m(&format!("vllm:num_requests_running{{{model}}}")), 0.0);
    assert_eq!(m(&format!("vllm:num_requests_waiting{{{model}}}")), 0.0);
    assert_eq!(
        m(&format!(
            "vllm:time_to_first_token_seconds_count{{{model}}}"
        )),
        m("verdict_time_to_first_token_seconds_count")
    );
    assert_eq!(
        m(&format!(
            "vllm:request_success_total{{{model},finished_reason=\"length\"}}"
        )),
        m("verdict_generations_finished_total{reason=\"length\"}")
    );
    // Each generation waited for its worker once.
    let queued = m(&format!("vllm:request_queue_time_seconds_count{{{model}}}"));
    assert_eq!(queued, m("verdict_queue_seconds_count"));
    assert_eq!(
        queued,
        m("verdict_generations_finished_total{reason=\"stop\"}")
            + m("verdict_generations_finished_total{reason=\"length\"}")
    );
}

#[test]
fn bad_input_gets_a_4xx_naming_the_field_and_never_hurts_the_server() {
    let s = tiny_server(64, &[]);
    let long_prompt: Vec<u32> = (0..64).map(|i| 40 + i % 50).collect();
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        ("/v1/completions", "[1,2]".into(), 400, None),
        ("/v1/completions", "".into(), 400, None),
        (
            "/v1/completions",
            r#"{"prompt": 5}"#.into(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"max_tokens": 5}"#.into(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": "9"}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 100000}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": -1}"#.into(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "top_p": 1.5}"#.into(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 17}"#.into(),
            400,
            Some("n"),
        ),
        // The tiny model's template (ChatML) reads no tools.
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#.into(),
            400,
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}"#.into(),
            400,
            Some("tools[0].function.name"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#.into(),
            400,
            Some("tool_choice"),
        ),
        // The tiny vocabulary has no fill-in-the-middle tokens.
        (
            "/v1/completions",
            r#"{"prompt": "x", "suffix": "y"}"#.into(),
            400,
            Some("suffix"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "suffix": "y", "echo": true}"#.into(),
            400,
            Some("suffix"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "suffix": "y"}"#.into(),
            400,
            Some("suffix"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "stop": [1]}"#.into(),
            400,
            Some("stop[0]"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "model": "gpt-4"}"#.into(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "policy": "nosuch"}"#.into(),
            400,
            Some("policy"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "policy": "strict@9.9.9"}"#.into(),
            400,
            Some("policy"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "policy": "threshold", "policy_params": {"bogus": 1}}"#.into(),
            400,
            Some("policy_params.bogus"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "policy": "threshold", "policy_params": {"eps": 1e9}}"#.into(),
            400,
            Some("policy_params.eps"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "policy_params": {"eps": "big"}}"#.into(),
            400,
            Some("policy_params.eps"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "speculation": {"draft": "self:99"}}"#.into(),
            400,
            Some("speculation.draft"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "speculation": {"k": 1000}}"#.into(),
            400,
            Some("speculation.k"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "speculation": "fast"}"#.into(),
            400,
            Some("speculation"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "tempreature": 1}"#.into(),
            400,
            Some("tempreature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1, 99999]}"#.into(),
            400,
            Some("prompt[1]"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 21}"#.into(),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}"#.into(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#.into(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": "hi"}"#.into(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#.into(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": 3}]}"#.into(),
            400,
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"content": "x"}]}"#.into(),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            r#"{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}"#.into(),
            400,
            Some("prompt"),
        ),
    ];
    for (path, body, status, param) in &cases {
        let r = s.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, *status, "{path} {body}: {}", r.text());
        let e = r.json();
        let err = &e["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}: {e}"
        );
        assert!(err["type"].is_string(), "{e}");
        assert!(err.get("code").is_some(), "{e}");
        assert_eq!(err["param"].as_str(), *param, "{body}: {e}");
    }
    // A prompt that fills the context says how long it is, with OpenAI's code for it.
    let r = s.post_json("/v1/completions", &json!({"prompt": long_prompt}));
    let e = &r.json()["error"];
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    let m = e["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("the prompt is 64 tokens") && m.contains("holds 64"),
        "{m}"
    );
    // Routing and transport-level abuse.
    assert_eq!(s.get("/v1/nothing").status, 404);
    assert_eq!(s.get("/v1/completions").status, 405);
    let big = vec![b'x'; 9 << 20];
    assert_eq!(s.request("POST", "/v1/completions", &[], &big).status, 413);
    for garbage in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro",
    ] {
        let mut c = s.connect();
        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = c.write_all(garbage);
        let _ = c.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut c, &mut sink);
    }
    // Still alive and still generating.
    assert_eq!(s.get("/health").status, 200);
    let ok = s.post_json("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(s.metric("verdict_requests_total{route=\"/v1/completions\",status=\"400\"}") >= 20.0);
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let s = tiny_server(4096, &[]);
    let body = json!({"prompt": "go", "max_tokens": 4000, "temperature": 0, "speculation": "off", "stream": true});
    let mut st = s.open_stream("/v1/completions", &body);
    assert_eq!(st.status, 200);
    assert!(st.next_event().is_some());
    drop(st);
    let cancelled = "verdict_generations_finished_total{reason=\"cancelled\"}";
    wait_for(
        "the stream's cancellation",
        &s,
        Duration::from_secs(60),
        || s.metric(cancelled) >= 1.0,
    );
    // Non-streamed: the client sends and leaves.
    let c = send_only(
        &s,
        &json!({"prompt": "go", "max_tokens": 4000, "temperature": 0, "speculation": "off"}),
    );
    wait_for("the request to start", &s, Duration::from_secs(60), || {
        s.metric("verdict_active_generations") >= 1.0
    });
    drop(c);
    wait_for(
        "the request's cancellation",
        &s,
        Duration::from_secs(60),
        || s.metric(cancelled) >= 2.0,
    );
    let generated = s.metric("verdict_completion_tokens_total");
    assert!(
        generated < 8000.0,
        "cancelled generations ran on: {generated} tokens"
    );
    wait_for("idle workers", &s, Duration::from_secs(10), || {
        s.metric("verdict_active_generations") == 0.0
    });
}

/// `--scheduling-policy priority`: waiting requests start by their `priority` (lower first),
/// not by arrival. One worker; each queued request is a stream whose response starts only
/// when the worker takes it, and whose client leaving frees the worker for the next.
#[test]
fn waiting_requests_start_by_priority() {
    let s = tiny_server(4096, &["--workers", "1", "--scheduling-policy", "priority"]);
    let long = |priority: i64| {
        json!({"prompt": "go", "max_tokens": 4000, "temperature": 0, "speculation": "off",
               "stream": true, "ignore_eos": true, "priority": priority})
    };
    let mut running = s.open_stream("/v1/completions", &long(0));
    assert!(running.next_event().is_some());
    let mut waiting = Vec::new();
    for (name, priority) in [("low", 10), ("high", -5), ("mid", 0)] {
        let c = send_only(&s, &long(priority));
        let n = waiting.len() as f64 + 1.0;
        wait_for("the request to queue", &s, Duration::from_secs(30), || {
            s.metric("verdict_queue_depth") >= n
        });
        waiting.push((name, c));
    }
    let answered = |c: &std::net::TcpStream| {
        c.set_nonblocking(true).unwrap();
        let r = c.peek(&mut [0u8; 1]);
        c.set_nonblocking(false).unwrap();
        matches!(r, Ok(n) if n > 0)
    };
    drop(running);
    for want in ["high", "mid", "low"] {
        let at = waiting.iter().position(|(n, _)| *n == want).unwrap();
        wait_for(want, &s, Duration::from_secs(60), || {
            answered(&waiting[at].1)
        });
        for (name, c) in &waiting {
            if *name != want {
                assert!(!answered(c), "{name} started beside {want}");
            }
        }
        // Its client leaves: the worker takes the next.
        let (_, c) = waiting.remove(at);
        c.shutdown(Shutdown::Both).unwrap();
    }
    wait_for("idle workers", &s, Duration::from_secs(60), || {
        s.metric("verdict_active_generations") == 0.0
    });
    // A priority outside i32 is named.
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2, "priority": 1i64 << 40}),
    );
    assert_eq!(r.json()["error"]["param"], "priority", "{}", r.text());
}

/// `--allowed-origins`: a listed web page's scripts may call the server (CORS), the preflight
/// answered without credentials; another page's get no CORS headers (the browser blocks it);
/// a server without the option sends none.
#[test]
fn listed_web_origins_may_call_from_a_browser() {
    let s = tiny_server(
        256,
        &[
            "--allowed-origins",
            "https://app.example,https://b.example",
            "--api-key",
            "k1",
        ],
    );
    let preflight = |origin: &str| {
        s.request(
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ],
            b"",
        )
    };
    let ok = preflight("https://app.example");
    assert_eq!(ok.status, 204, "{}", ok.text());
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        ok.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    assert!(
        ok.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let other = preflight("https://evil.example");
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_ne!(other.status, 204);
    // The call itself: CORS headers for the listed page, the key still required.
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let call = |origin: &str, key: Option<&str>| {
        let bearer = key.map(|k| format!("Bearer {k}"));
        let mut h = vec![("Origin", origin), ("Content-Type", "application/json")];
        if let Some(b) = &bearer {
            h.push(("Authorization", b.as_str()));
        }
        s.request("POST", "/v1/completions", &h, body.as_bytes())
    };
    let r = call("https://b.example", Some("k1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://b.example")
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    let refused = call("https://b.example", None);
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("https://b.example"),
        "a page can read why it was refused"
    );
    assert_eq!(
        call("https://evil.example", Some("k1")).header("access-control-allow-origin"),
        None
    );
    // Without the option: no CORS at all.
    let plain = tiny_server(256, &[]);
    let r = plain.request(
        "OPTIONS",
        "/v1/completions",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.status, 405, "{}", r.text());
}

/// Each answered request logs a line (method, route, status, time, the client's request id),
/// and each generation its tokens; probes log none; `--disable-log-requests` turns both off.
#[test]
fn each_request_logs_a_line_unless_disabled() {
    let ask = |s: &Server| {
        let r = s.request(
            "POST",
            "/v1/completions",
            &[
                ("Content-Type", "application/json"),
                ("X-Request-Id", "r-7"),
            ],
            json!({"prompt": "hi", "max_tokens": 3, "ignore_eos": true})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(s.get("/health").status, 200);
    };
    let s = tiny_server(256, &[]);
    ask(&s);
    wait_for("the request's line", &s, Duration::from_secs(10), || {
        s.log_text().contains("POST /v1/completions 200 in")
    });
    let log = s.log_text();
    assert!(log.contains("(x-request-id r-7)"), "{log}");
    assert!(
        log.contains("generation ended (length): ") && log.contains(", 3 generated in"),
        "{log}"
    );
    assert!(!log.contains("/health"), "{log}");
    let quiet = tiny_server(256, &["--disable-log-requests"]);
    ask(&quiet);
    let log = quiet.log_text();
    assert!(log.contains("ready"), "{log}");
    assert!(!log.contains("verdict::requests"), "{log}");
}

/// `--served-model-name` with more names (vLLM's form): each is listed and may be named in
/// `model`; responses name the first; another name is a 404 listing them; a name twice or
/// a LoRA module under one of them stops the server.
#[test]
fn served_model_names_after_the_first_are_aliases() {
    // vLLM's names of two other options are accepted as well.
    let s = tiny_server(
        256,
        &[
            "--served-model-name",
            "team/one",
            "two",
            "--max-num-seqs",
            "3",
            "--tensor-parallel-size",
            "1",
        ],
    );
    let ids: Vec<Value> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("team/one"), json!("two")]);
    assert_eq!(s.get("/v1/models/two").json()["id"], "two");
    let v = ok_json(
        &s,
        "/v1/completions",
        &json!({"model": "two", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(v["model"], "team/one");
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "three", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(r.status, 404);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("`team/one`, `two`"), "{msg}");
    let dir = tempfile::tempdir().unwrap();
    let (t, _) = tiny_models(dir.path(), 256);
    let err = serve_fails(&t, &["--served-model-name", "a", "b", "a"]);
    assert!(err.contains("names \"a\" twice"), "{err}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = tiny_server(4096, &["--workers", "1", "--max-queue", "1"]);
    let long = json!({"prompt": "go", "max_tokens": 4000, "temperature": 0, "speculation": "off", "stream": true});
    let mut running = s.open_stream("/v1/completions", &long);
    assert!(running.next_event().is_some());
    // The second waits in the queue (its response only starts when a worker takes it).
    let queued = send_only(&s, &long);
    wait_for("the queued request", &s, Duration::from_secs(30), || {
        s.metric("verdict_queue_depth") >= 1.0
    });
    let r = s.post_json("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    drop(running);
    drop(queued);
    wait_for("both cancelled", &s, Duration::from_secs(60), || {
        s.metric("verdict_generations_finished_total{reason=\"cancelled\"}") >= 2.0
    });
    // Capacity is back.
    assert_eq!(
        s.post_json("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}))
            .status,
        200
    );
}

#[test]
fn admin_routes_need_the_token_and_policies_upload_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "let-me-in\n").unwrap();
    let tf = token_file.display().to_string();
    let s = tiny_server(256, &["--admin-token-file", &tf]);
    let wasm = verdict::decide::builtin_wasm("threshold").expect("built-in threshold compiled in");
    let put = |auth: Option<&str>, name: &str, body: &[u8]| {
        let h = auth.map(|a| format!("Bearer {a}"));
        let mut headers = vec![("Content-Type", "application/wasm")];
        if let Some(h) = &h {
            headers.push(("Authorization", h.as_str()));
        }
        s.request("PUT", &format!("/v1/policies/{name}"), &headers, body)
    };
    let r = put(None, "mine", wasm);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(put(Some("let-me-i"), "mine", wasm).status, 401);
    assert_eq!(put(Some("let-me-inn"), "mine", wasm).status, 401);
    let r = put(Some("let-me-in"), "mine", wasm);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], "0.1.0");
    // Listing is open.
    let list = s.get("/v1/policies").json();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"mine") && names.contains(&"strict"),
        "{names:?}"
    );
    // Requests can use it, with its parameters checked.
    let use_it = json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "policy": "mine",
                        "policy_params": {"eps": 0.2}, "speculation": {"draft": "model", "k": 2}});
    let r = s.post_json("/v1/completions", &use_it);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["speculation"]["policy"], "threshold@0.1.0");
    // A bad upload is refused and the old version keeps serving.
    let r = put(Some("let-me-in"), "mine", b"\0asm not really");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_policy");
    assert_eq!(s.post_json("/v1/completions", &use_it).status, 200);
    assert_eq!(put(Some("let-me-in"), "strict", wasm).status, 409);
    // Delete.
    let del = |auth: Option<&str>, name: &str| {
        let h = auth.map(|a| format!("Bearer {a}"));
        let headers: Vec<(&str, &str)> = h.iter().map(|h| ("Authorization", h.as_str())).collect();
        s.request("DELETE", &format!("/v1/policies/{name}"), &headers, b"")
    };
    assert_eq!(del(None, "mine").status, 401);
    assert_eq!(del(Some("let-me-in"), "mine").status, 200);
    let r = s.post_json("/v1/completions", &use_it);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "policy");
    assert_eq!(del(Some("let-me-in"), "mine").status, 404);
    assert_eq!(del(Some("let-me-in"), "strict").status, 409);
    assert!(
        s.metric("verdict_requests_total{route=\"/v1/policies/{name}\",status=\"401\"}") >= 4.0
    );
}

#[test]
fn hot_swap_while_16_streams_run() {
    let v1 = hostile_guest("");
    let v2 = hostile_guest("v2");
    let s = tiny_server(4096, &["--workers", "16", "--max-queue", "16"]);
    let put = |wasm: &[u8]| s.request("PUT", "/v1/policies/hs", &[], wasm);
    let r = put(&v1);
    assert_eq!(r.status, 201, "{}", r.text());
    let body = json!({"prompt": "the", "max_tokens": 300, "temperature": 0, "stream": true,
                      "policy": "hs", "speculation": {"draft": "model", "k": 4}});
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let swapped_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let tx = started_tx.clone();
                let s = &s;
                let body = &body;
                scope.spawn(move || {
                    let mut st = s.open_stream("/v1/completions", body);
                    assert_eq!(st.status, 200);
                    let first = st.next_event().expect("first event");
                    tx.send(()).unwrap();
                    let mut events = vec![first];
                    events.extend(st.collect());
                    (events, Instant::now())
                })
            })
            .collect();
        for _ in 0..16 {
            started_rx
                .recv_timeout(Duration::from_secs(120))
                .expect("all 16 streams start");
        }
        // Every stream is generating: swap in version 2.
        let r = put(&v2);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["previous"], "1.0.0");
        swapped_at.set(Instant::now()).unwrap();
        handles
            .into_iter()
            .map(|h| h.join().expect("stream thread"))
            .collect()
    });
    let swapped = *swapped_at.get().unwrap();
    let mut overlapped = 0;
    for (events, ended) in &results {
        let (_, last, done) = stream_text(events);
        assert!(done, "a stream did not complete: {events:?}");
        let last = last.expect("final chunk");
        assert!(!last["choices"][0]["finish_reason"].is_null(), "{last}");
        let spec = &last["speculation"];
        // Streams keep the version they started with.
        assert_eq!(spec["policy"], "hostile@1.0.0", "{spec}");
        // Version 1 accepts at most one draft per step.
        let acc = spec["accepted_per_position"].as_array().unwrap();
        assert!(acc.iter().skip(1).all(|x| x == 0), "{spec}");
        assert_eq!(spec["policy_faults"], 0);
        overlapped += (*ended > swapped) as usize;
    }
    assert!(
        overlapped > 0,
        "no stream was still running when the swap landed"
    );
    // Later requests get version 2.
    let r = s.post_json("/v1/completions", &json!({"prompt": "the", "max_tokens": 20, "temperature": 0,
                                                   "policy": "hs", "speculation": {"draft": "model", "k": 4}}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["speculation"]["policy"], "hostile@2.0.0");
}

/// A server on the Q8_0 tiny pair, with `extra` arguments.
fn q8_server(context: usize, extra: &[&str]) -> Server {
    let (dir, t, d) = q8_models(context);
    let log_dir = dir.path().to_path_buf();
    let mut args = vec!["--model", t.as_str(), "--draft", d.as_str()];
    args.extend(extra);
    Server::start(&args, Some(dir), &log_dir)
}

/// Tiny Q8_0 target and draft (every forward row-exact) in a new temporary directory, and their
/// paths.
fn q8_models(context: usize) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, draft) =
        tiny_models_of(dir.path(), context, candle_core::quantized::GgmlDType::Q8_0);
    let (t, d) = (target.display().to_string(), draft.display().to_string());
    (dir, t, d)
}

/// A chat's second turn reads the first from the prompt cache and answers as a server without
/// the cache does (Q8_0: prefilling in two pieces gives the same logits as one).
#[test]
fn a_chat_continued_reads_its_earlier_turns_from_the_prompt_cache() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let cached = Server::start(&["--model", &t, "--draft", &d], None, &log_dir);
    let plain = Server::start(
        &["--model", &t, "--draft", &d, "--prompt-cache", "0"],
        Some(dir),
        &log_dir,
    );
    let turn = |s: &Server, messages: &Value| -> Value {
        let body = json!({"messages": messages, "max_tokens": 24, "temperature": 0,
                          "speculation": {"draft": "model", "k": 3}});
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let cached_tokens = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let mut messages = json!([{"role": "system", "content": "you answer in rhymes"},
                              {"role": "user", "content": "the cat sat on"}]);
    let first = turn(&cached, &messages);
    assert_eq!(cached_tokens(&first), Some(0), "{first}");
    assert_eq!(text_of(&first), text_of(&turn(&plain, &messages)));
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": text_of(&first)}),
        json!({"role": "user", "content": "and then the dog"}),
    ]);
    let second = turn(&cached, &messages);
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let hit = cached_tokens(&second).unwrap();
    assert!(
        hit >= first_prompt && hit < second["usage"]["prompt_tokens"].as_u64().unwrap(),
        "the first turn's prompt ({first_prompt} tokens) comes from the cache: {second}"
    );
    let uncached = turn(&plain, &messages);
    assert_eq!(cached_tokens(&uncached), Some(0));
    assert_eq!(
        text_of(&second),
        text_of(&uncached),
        "the cache changes no output"
    );
    assert_eq!(
        cached.metric("verdict_cached_prompt_tokens_total"),
        hit as f64
    );
    assert!(cached.metric("verdict_prompt_cache_positions") > hit as f64);
    assert_eq!(plain.metric("verdict_prompt_cache_positions"), 0.0);
    // vLLM's `cache_salt`: a salted request does not read what unsalted ones left, nor another
    // salt's; its own salt does. The text is the same throughout.
    let salted = |salt: &str| -> Value {
        ok_json(
            &cached,
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 24, "temperature": 0,
                    "speculation": {"draft": "model", "k": 3}, "cache_salt": salt}),
        )
    };
    let a = salted("a-secret-of-some-length");
    assert_eq!(cached_tokens(&a), Some(0), "{a}");
    assert_eq!(cached_tokens(&salted("another-secret")), Some(0));
    let again = salted("a-secret-of-some-length");
    assert!(cached_tokens(&again).unwrap() > 0, "{again}");
    assert_eq!(text_of(&a), text_of(&second));
    assert_eq!(text_of(&again), text_of(&second));
    let r = cached.post_json(
        "/v1/chat/completions",
        &json!({"messages": messages, "cache_salt": ""}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "cache_salt");
}

/// `frequency_penalty`, `presence_penalty`, `repetition_penalty` and `logit_bias` change the
/// output, speculation keeps it exactly (Q8_0: verification rows equal single-token rows), and
/// logprobs stay the model's own.
#[test]
fn penalties_and_logit_bias_change_the_output_and_speculation_keeps_it() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let complete = |extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/completions",
            &merged(
                json!({"prompt": [40, 41, 42, 43, 40, 41], "max_tokens": 24,
                              "temperature": 0, "logprobs": 1}),
                &extra,
            ),
        )
    };
    let tokens = |v: &Value| v["choices"][0]["logprobs"]["tokens"].clone();
    let penalties = json!({"frequency_penalty": 1.5, "presence_penalty": 1.0,
                           "repetition_penalty": 1.2, "logit_bias": {"7": 3}});
    let mut off = penalties.clone();
    off["speculation"] = json!("off");
    let reference = complete(off);
    let unpenalized = complete(json!({"speculation": "off"}));
    assert_ne!(
        tokens(&reference),
        tokens(&unpenalized),
        "penalties change the output"
    );
    for spec in [
        json!({"draft": "model", "k": 3}),
        json!({"draft": "prompt-lookup", "k": 4}),
    ] {
        let mut body = penalties.clone();
        body["speculation"] = spec.clone();
        let v = complete(body);
        assert_eq!(
            v["choices"][0]["logprobs"], reference["choices"][0]["logprobs"],
            "speculation {spec}"
        );
        assert_eq!(text_of(&v), text_of(&reference));
    }
    // A +100 bias forces the token; its reported logprob is the model's own, not the biased
    // distribution's (which would be ~0).
    let forced = complete(json!({"logit_bias": {"42": 100}, "max_tokens": 6,
                                 "speculation": {"draft": "model", "k": 3}}));
    let lp = &forced["choices"][0]["logprobs"];
    let toks = lp["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 6, "{lp}");
    assert!(toks.iter().all(|t| *t == toks[0]), "{lp}");
    let raw: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(raw.iter().all(|&x| x < -0.1), "{raw:?}");
    // min_tokens holds back the end token even when a bias forces it; ignore_eos emits it.
    let tok = tokenizer_of(&t);
    let eos = tok.eos_ids()[0].to_string();
    let ends = |extra: Value| {
        let body = merged(
            json!({"logit_bias": {&eos: 100}, "max_tokens": 8,
                              "speculation": {"draft": "model", "k": 3}}),
            &extra,
        );
        let v = complete(body);
        (
            v["usage"]["completion_tokens"].as_u64().unwrap(),
            v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    assert_eq!(ends(json!({})), (0, "stop".into()));
    assert_eq!(ends(json!({"min_tokens": 5})), (5, "stop".into()));
    assert_eq!(ends(json!({"ignore_eos": true})), (8, "length".into()));
    // Out of range: the field is named.
    for (body, param) in [
        (json!({"min_tokens": 9, "max_tokens": 8}), "min_tokens"),
        (json!({"logit_bias": {"99999": 5}}), "logit_bias"),
        (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
        (json!({"logit_bias": {"x": 5}}), "logit_bias.x"),
    ] {
        let mut b = body.clone();
        b["prompt"] = json!("hi");
        let r = s.post_json("/v1/completions", &b);
        assert_eq!(r.status, 400, "{b}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{b}");
    }
}

/// vLLM's sampling extensions on both routes: `stop_token_ids` (the token id as
/// `stop_reason`), `allowed_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`,
/// `truncate_prompt_tokens`, `return_tokens_as_token_ids` and `stream_options.
/// continuous_usage_stats`; each keeps speculation's output equal to plain decoding's, and each
/// bad value is a 400 naming the field.
#[test]
fn vllm_sampling_extensions() {
    let (dir, t, d) = q8_models(256);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let prompt: Vec<u32> = (40..60).collect();
    let complete = |extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/completions",
            &merged(
                json!({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                              "logprobs": 0, "return_tokens_as_token_ids": true}),
                &extra,
            ),
        )
    };
    let ids = |v: &Value| -> Vec<u32> {
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let t = t.as_str().unwrap();
                t.strip_prefix("token_id:")
                    .unwrap_or_else(|| panic!("{t}"))
                    .parse()
                    .unwrap()
            })
            .collect()
    };
    let spec = [
        json!("off"),
        json!({"draft": "model", "k": 3}),
        json!({"draft": "prompt-lookup", "k": 4}),
    ];
    let free = complete(json!({"speculation": "off"}));
    let free_ids = ids(&free);
    assert_eq!(free_ids.len(), 24);
    // Up to 20 alternatives per token on completions too (vLLM's default bound); named by id,
    // every one is a key of its own.
    let wide = complete(json!({"logprobs": 20, "max_tokens": 2}));
    let top = &wide["choices"][0]["logprobs"]["top_logprobs"][0];
    assert_eq!(top.as_object().unwrap().len(), 20, "{top}");
    // return_tokens_as_token_ids names the very tokens of the text.
    let d = s.post_json("/detokenize", &json!({"tokens": free_ids}));
    assert_eq!(d.json()["prompt"], text_of(&free).as_str());

    // stop_token_ids: the first token new to the output ends it and is its stop_reason.
    let at = (2..24)
        .find(|&i| !free_ids[..i].contains(&free_ids[i]))
        .unwrap();
    let stop_id = free_ids[at];
    for sp in &spec {
        for extra in [json!({}), json!({"ignore_eos": true})] {
            let mut body = json!({"stop_token_ids": [stop_id], "speculation": sp});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let v = complete(body);
            assert_eq!(ids(&v), free_ids[..at], "{sp} {extra}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            assert_eq!(v["choices"][0]["stop_reason"], json!(stop_id));
        }
    }
    // ...streamed too (chat), where the last chunk names it.
    let chat = |extra: Value| {
        merged(
            json!({"messages": [{"role": "user", "content": "hi there"}],
                              "max_tokens": 20, "temperature": 0}),
            &extra,
        )
    };
    let plain_chat = s.post_json(
        "/v1/chat/completions",
        &chat(json!({"logprobs": true,
        "return_tokens_as_token_ids": true})),
    );
    let chat_ids: Vec<u32> = plain_chat.json()["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_str().unwrap()[9..].parse().unwrap())
        .collect();
    // The tiny model repeats one token here: min_tokens holds the stop token back that long.
    let first = chat_ids[0];
    let events = s
        .open_stream(
            "/v1/chat/completions",
            &chat(
                json!({"stream": true, "stop_token_ids": [first], "min_tokens": 5,
                          "speculation": {"draft": "model", "k": 3}}),
            ),
        )
        .collect();
    let (_, last, done) = stream_text(&events);
    let last = last.unwrap();
    assert!(done);
    assert_eq!(last["choices"][0]["stop_reason"], json!(first));
    let cut = chat_ids.iter().skip(5).position(|&t| t == first).unwrap() + 5;
    assert_eq!(last["usage"]["completion_tokens"], json!(cut));

    // allowed_token_ids: only those tokens, whatever drafts.
    let allowed: Vec<u32> = vec![free_ids[1], free_ids[at], 50, 51];
    let mut outs = Vec::new();
    for sp in &spec {
        let v = complete(json!({"allowed_token_ids": allowed, "speculation": sp}));
        let o = ids(&v);
        assert!(o.iter().all(|t| allowed.contains(t)), "{sp}: {o:?}");
        outs.push(o);
    }
    assert!(outs.iter().all(|o| o == &outs[0]), "{outs:?}");
    assert_ne!(outs[0], free_ids);

    // include_stop_str_in_output: the stop string ends the text.
    let text = text_of(&free);
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    for include in [false, true] {
        let v = complete(json!({"stop": [stop], "include_stop_str_in_output": include}));
        let want = if include {
            format!("{before}{stop}")
        } else {
            before.to_string()
        };
        assert_eq!(text_of(&v), want, "include {include}");
        assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
        let mut body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                              "stream": true, "stop": [stop],
                              "include_stop_str_in_output": include});
        body["speculation"] = json!({"draft": "model", "k": 3});
        let (streamed, _, _) = stream_text(&s.open_stream("/v1/completions", &body).collect());
        assert_eq!(streamed, want, "streamed, include {include}");
    }

    // skip_special_tokens: a special token forced into the output shows only when asked.
    let tok = tokenizer_of(&t);
    let im_start = tok.token_id("<|im_start|>").unwrap();
    let forced = json!({"logit_bias": {im_start.to_string(): 100}, "max_tokens": 3});
    assert_eq!(text_of(&complete(forced.clone())), "");
    let mut shown = forced;
    shown["skip_special_tokens"] = json!(false);
    assert_eq!(text_of(&complete(shown)), "<|im_start|>".repeat(3));

    // truncate_prompt_tokens: the prompt's last N tokens, as if sent alone.
    let v = complete(json!({"truncate_prompt_tokens": 8}));
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    let alone = complete(json!({"prompt": prompt[12..]}));
    assert_eq!(ids(&v), ids(&alone));
    // -1 keeps what the context (256) leaves beside max_tokens; without it the prompt is refused.
    let long: Vec<u32> = (0..300).map(|i| 40 + i % 50).collect();
    let v = complete(json!({"prompt": long, "max_tokens": 6, "truncate_prompt_tokens": -1}));
    assert_eq!(v["usage"]["prompt_tokens"], 250);
    let r = s.post_json("/v1/completions", &json!({"prompt": long, "max_tokens": 6}));
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // Without max_tokens, room for completions' default of 16; a max_tokens filling the
    // context leaves no room for any prompt.
    let v = complete(json!({"prompt": long, "max_tokens": null, "truncate_prompt_tokens": -1}));
    assert_eq!(v["usage"]["prompt_tokens"], 240);
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 256, "truncate_prompt_tokens": -1}),
    );
    assert_eq!(r.json()["error"]["param"], "max_tokens", "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");

    // continuous_usage_stats (with include_usage, as vLLM reads it): every chunk counts the
    // tokens so far, an echoed prompt's chunk too.
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true,
                      "stream_options": {"continuous_usage_stats": true, "include_usage": true},
                      "speculation": {"draft": "model", "k": 3}});
    let mut echoed = body.clone();
    echoed["echo"] = json!(true);
    let first: Value =
        serde_json::from_str(&s.open_stream("/v1/completions", &echoed).collect()[0]).unwrap();
    assert_eq!(first["usage"]["prompt_tokens"], 20, "{first}");
    assert_eq!(first["usage"]["completion_tokens"], 0, "{first}");
    let mut alone = body.clone();
    alone["stream_options"] = json!({"continuous_usage_stats": true});
    let first: Value =
        serde_json::from_str(&s.open_stream("/v1/completions", &alone).collect()[0]).unwrap();
    assert!(first["usage"].is_null(), "{first}");
    let events = s.open_stream("/v1/completions", &body).collect();
    let mut counts = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"], 20, "{e}");
        let c = u["completion_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("{e}"));
        assert_eq!(u["total_tokens"].as_u64(), Some(20 + c), "{e}");
        counts.push(c);
    }
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(counts.last(), Some(&12));
    assert!(counts[0] < 12, "{counts:?}");

    // Bad values name their field.
    for (body, param) in [
        (json!({"stop_token_ids": [99999]}), "stop_token_ids[0]"),
        (
            json!({"allowed_token_ids": [1, 99999]}),
            "allowed_token_ids[1]",
        ),
        (json!({"allowed_token_ids": []}), "allowed_token_ids"),
        (json!({"bad_words": [""]}), "bad_words[0]"),
        (
            json!({"truncate_prompt_tokens": 0}),
            "truncate_prompt_tokens",
        ),
        // This server schedules first come, first served.
        (json!({"priority": 1}), "priority"),
        // Only a stop token allowed, and min_tokens holds it back: nothing can come.
        (
            json!({"allowed_token_ids": [tok.eos_ids()[0]], "min_tokens": 2}),
            "allowed_token_ids",
        ),
    ] {
        let mut b = body.clone();
        b["prompt"] = json!("hi");
        let r = s.post_json("/v1/completions", &b);
        assert_eq!(r.status, 400, "{b}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{b}");
    }
    let ok = s.post_json("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(ok.status, 200, "the server still serves: {}", ok.text());
}

/// Several prompts in one completions request (OpenAI's batched prompts, what evaluation
/// harnesses send): choice k * n + j is the j-th answer to prompt k, the same as that prompt
/// sent alone, whole or streamed; usage counts every prompt once; a bad prompt is named by its
/// index.
#[test]
fn a_completions_request_answers_each_of_its_prompts() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let prompts = [
        json!([40, 41, 42, 43, 40, 41]),
        json!("the cat"),
        json!([7, 8, 9]),
    ];
    let ask = |prompt: Value, extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/completions",
            &merged(
                json!({"prompt": prompt, "max_tokens": 10, "temperature": 0,
                              "speculation": {"draft": "model", "k": 3}}),
                &extra,
            ),
        )
    };
    let alone: Vec<Value> = prompts.iter().map(|p| ask(p.clone(), json!({}))).collect();
    let all = Value::Array(prompts.to_vec());
    for extra in [json!({}), json!({"echo": true, "logprobs": 1})] {
        let alone: Vec<Value> = prompts
            .iter()
            .map(|p| ask(p.clone(), extra.clone()))
            .collect();
        let mut with_n = extra.clone();
        with_n["n"] = json!(2);
        let v = ask(all.clone(), with_n);
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 6, "{v}");
        for (i, c) in choices.iter().enumerate() {
            let one = &alone[i / 2]["choices"][0];
            assert_eq!(c["index"], i, "{v}");
            assert_eq!(c["text"], one["text"], "choice {i}");
            assert_eq!(c["logprobs"], one["logprobs"], "choice {i}");
        }
        let sum = |key: &str| -> u64 {
            alone
                .iter()
                .map(|a| a["usage"][key].as_u64().unwrap())
                .sum()
        };
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64(),
            Some(sum("prompt_tokens"))
        );
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64(),
            Some(2 * sum("completion_tokens"))
        );
    }
    // Streamed: each chunk names its choice, and each choice's text is its prompt's answer.
    let body = json!({"prompt": all, "max_tokens": 10, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let mut texts = vec![String::new(); 3];
    let mut done = false;
    for e in s.open_stream("/v1/completions", &body).collect() {
        if e == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap());
            // Each chunk's usage is its own prompt's.
            let want = alone[i]["usage"]["prompt_tokens"].as_u64().unwrap();
            if !c["text"].as_str().unwrap().is_empty() {
                assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(want), "{e}");
            }
        }
    }
    assert!(done);
    let want: Vec<String> = alone.iter().map(text_of).collect();
    assert_eq!(texts, want);
    // Each prompt's second choice starts once its first has read the prompt (the prompt
    // cache shares it), not once the first has ended: their chunks interleave, every prompt.
    let body = json!({"prompt": all, "n": 2, "max_tokens": 200, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let mut order = Vec::new();
    for e in s.open_stream("/v1/completions", &body).collect() {
        if let Ok(v) = serde_json::from_str::<Value>(&e) {
            for c in v["choices"].as_array().unwrap() {
                if !c["text"].as_str().unwrap().is_empty() {
                    order.push(c["index"].as_u64().unwrap() as usize);
                }
            }
        }
    }
    for k in 0..3 {
        let first_of_second = order.iter().position(|&i| i == 2 * k + 1).unwrap();
        let last_of_first = order.iter().rposition(|&i| i == 2 * k).unwrap();
        assert!(first_of_second < last_of_first, "prompt {k}: {order:?}");
    }
    // A bad prompt is named by its index; too many generations by n.
    for (body, param) in [
        (json!({"prompt": ["ok", [1, 99999]]}), "prompt[1][1]"),
        (json!({"prompt": ["ok", ""]}), "prompt[1]"),
        (
            json!({"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 2}),
            "n",
        ),
    ] {
        let r = s.post_json("/v1/completions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
}

/// `n` choices: each is a generation of its own (choice i seeded with seed + i), streamed
/// chunks carry their choice's index, and usage counts the prompt once.
#[test]
fn n_choices_are_separate_generations_of_one_request() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let complete = |extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/completions",
            &merged(
                json!({"prompt": [40, 41, 42, 43, 40, 41], "max_tokens": 10,
                              "speculation": {"draft": "model", "k": 3}}),
                &extra,
            ),
        )
    };
    let texts = |v: &Value| -> Vec<String> {
        let cs = v["choices"].as_array().unwrap();
        for (i, c) in cs.iter().enumerate() {
            assert_eq!(c["index"], i, "{v}");
            assert!(c["finish_reason"].is_string(), "{v}");
        }
        cs.iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    // Greedy: n equal choices, the statistics of n single requests.
    let one = complete(json!({"temperature": 0, "seed": 1}));
    let three = complete(json!({"temperature": 0, "seed": 1, "n": 3}));
    assert_eq!(texts(&three), vec![text_of(&one); 3]);
    for key in ["completion_tokens", "total_tokens"] {
        let (a, b) = (
            one["usage"][key].as_u64().unwrap(),
            three["usage"][key].as_u64().unwrap(),
        );
        let p = one["usage"]["prompt_tokens"].as_u64().unwrap();
        let want = if key == "total_tokens" {
            p + 3 * (a - p)
        } else {
            3 * a
        };
        assert_eq!(b, want, "{key}: {three}");
    }
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    for key in ["steps", "drafted", "accepted"] {
        assert_eq!(
            three["speculation"][key].as_u64().unwrap(),
            3 * one["speculation"][key].as_u64().unwrap(),
            "{key}"
        );
    }
    // A new prompt: choice 0 prefills it and shares it; the others read it from the prompt
    // cache (all but the last prompt token, which gives the first logits).
    let before = s.metric("verdict_cached_prompt_tokens_total");
    let fresh = complete(
        json!({"prompt": [50, 51, 52, 53, 54, 55, 56], "temperature": 0,
                                "seed": 1, "n": 3}),
    );
    assert_eq!(
        fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 6,
        "{fresh}"
    );
    assert_eq!(
        s.metric("verdict_cached_prompt_tokens_total") - before,
        12.0
    );
    let t = texts(&fresh);
    assert!(t.iter().all(|x| *x == t[0]), "{t:?}");
    // Sampled: choice i is what a single request seeded with 7 + i gives.
    let sampled = complete(json!({"temperature": 1, "seed": 7, "n": 3}));
    let got = texts(&sampled);
    for (i, text) in got.iter().enumerate() {
        let single = complete(json!({"temperature": 1, "seed": 7 + i}));
        assert_eq!(*text, text_of(&single), "choice {i}");
    }
    assert!(
        got[0] != got[1] || got[1] != got[2],
        "seeds 7, 8, 9 all gave {got:?}"
    );
    // Streamed: each index's deltas join into that choice's text; one finish chunk per choice,
    // the last with the usage.
    let body = json!({"prompt": [40, 41, 42, 43, 40, 41], "max_tokens": 10, "temperature": 1,
                      "seed": 7, "n": 3, "stream": true,
                      "speculation": {"draft": "model", "k": 3}});
    let events = s.open_stream("/v1/completions", &body).collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut joined = vec![String::new(); 3];
    let mut finished = Vec::new();
    let mut usage = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        joined[i].push_str(c["text"].as_str().unwrap());
        if c["finish_reason"].is_string() {
            finished.push(i);
        }
        if !v["usage"].is_null() {
            assert!(usage.is_none(), "one usage: {events:?}");
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(joined, got);
    finished.sort();
    assert_eq!(finished, vec![0, 1, 2]);
    assert_eq!(usage.as_ref(), Some(&sampled["usage"]));
    // Chat: n messages.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
                "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let cs = v["choices"].as_array().unwrap();
    assert_eq!(cs.len(), 2, "{v}");
    assert_eq!(cs[0]["message"], cs[1]["message"]);
    assert_eq!(cs[1]["index"], 1);
}

/// Requests that arrive together share target (and draft) forwards, and each still gets exactly
/// the output it gets alone: greedy and seeded sampling, speculative and plain. Q8_0 weights
/// make every forward row-exact whatever else is in the batch.
#[test]
fn concurrent_requests_share_forwards_and_get_their_own_outputs() {
    let (dir, t, d) = q8_models(4096);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(
        &[
            "--model",
            &t,
            "--draft",
            &d,
            "--workers",
            "6",
            "--max-batch",
            "6",
        ],
        Some(dir),
        &log_dir,
    );
    let bodies = [
        json!({"prompt": "the cat sat on", "max_tokens": 120, "temperature": 0,
               "speculation": {"draft": "model", "k": 3}}),
        json!({"prompt": "once upon a time", "max_tokens": 120, "temperature": 0,
               "speculation": "off"}),
        json!({"prompt": "a b a b a b a", "max_tokens": 120, "temperature": 0,
               "speculation": {"draft": "prompt-lookup", "k": 4}}),
        json!({"prompt": "hello", "max_tokens": 120, "temperature": 0.9, "seed": 7,
               "speculation": {"draft": "model", "k": 2}}),
        json!({"prompt": "zebra", "max_tokens": 120, "temperature": 0.7, "seed": 3,
               "speculation": "off"}),
        json!({"prompt": "the dog", "max_tokens": 120, "temperature": 0, "stream": true,
               "speculation": {"draft": "model", "k": 5}}),
    ];
    let run = |body: &Value| -> String {
        if body["stream"] == json!(true) {
            let st = s.open_stream("/v1/completions", body);
            assert_eq!(st.status, 200);
            let (text, _, done) = stream_text(&st.collect());
            assert!(done);
            text
        } else {
            let r = s.post_json("/v1/completions", body);
            assert_eq!(r.status, 200, "{}", r.text());
            text_of(&r.json())
        }
    };
    let alone: Vec<String> = bodies.iter().map(run).collect();
    let (f0, q0) = (
        s.metric("verdict_batched_forwards_total{model=\"target\"}"),
        s.metric("verdict_batched_sequences_total{model=\"target\"}"),
    );
    // Sequential requests never share a forward.
    assert!(f0 > 0.0 && f0 == q0, "forwards {f0}, sequences {q0}");
    for round in 0..2 {
        let together: Vec<String> = std::thread::scope(|scope| {
            let hs: Vec<_> = bodies.iter().map(|b| scope.spawn(|| run(b))).collect();
            hs.into_iter().map(|h| h.join().expect("client")).collect()
        });
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(
                a, b,
                "round {round}, request {i}: batched output differs from alone"
            );
        }
    }
    let (f1, q1) = (
        s.metric("verdict_batched_forwards_total{model=\"target\"}"),
        s.metric("verdict_batched_sequences_total{model=\"target\"}"),
    );
    assert!(
        q1 - q0 > f1 - f0,
        "no target forward was shared: {} forwards for {} sequences",
        f1 - f0,
        q1 - q0
    );
    assert!(s.metric("verdict_batched_sequences_total{model=\"draft\"}") > 0.0);
}

/// CPU seconds (user + system) the process has used, from /proc (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// An idle server sleeps. (Its accept loop once kept polling a closed channel after the models
/// loaded, burning a core that generation needed: single-stream decoding ran at a third of the
/// CLI's speed.)
#[test]
fn an_idle_server_uses_no_cpu() {
    let s = tiny_server(256, &[]);
    let pid = s.child.id();
    let Some(before) = cpu_seconds(pid) else {
        eprintln!("SKIPPED: no /proc/{pid}/stat on this system");
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid).unwrap() - before;
    assert!(
        used < 0.3,
        "idle for 2 s, the server used {used:.2} CPU seconds"
    );
    // And it still answers.
    assert_eq!(s.get("/ready").status, 200);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let mut s = tiny_server(4096, &[]);
    // Greedy on the tiny model: it never emits its stop token from this prompt.
    let body = json!({"prompt": "go", "max_tokens": 600, "temperature": 0, "speculation": "off", "stream": true});
    let mut st = s.open_stream("/v1/completions", &body);
    assert!(st.next_event().is_some());
    s.terminate();
    let (text, last, done) = stream_text(&st.collect());
    assert!(done, "the in-flight stream was cut: {text:?}");
    let last = last.expect("final chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 600);
    let status = s
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits after draining");
    assert!(status.success(), "exit status {status}\n{}", s.log_text());
    assert!(s.log_text().contains("draining"));
}

fn models_dir() -> std::path::PathBuf {
    std::env::var_os("VERDICT_MODELS")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/verdict/models")
        })
}

/// A server on one of the fetched real models, drafting by prompt lookup.
fn real_server(file: &str) -> Server {
    real_server_with(file, &[])
}

/// [`real_server`] with `extra` arguments.
fn real_server_with(file: &str, extra: &[&str]) -> Server {
    let model = models_dir().join(file);
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().to_path_buf();
    let m = model.display().to_string();
    let mut args = vec!["--model", m.as_str(), "--draft", "prompt-lookup"];
    args.extend(extra);
    Server::start(&args, Some(dir), &log_dir)
}

#[test]
fn smollm2_chat_real_text() {
    let s = real_server("SmolLM2-135M-Instruct.Q4_1.gguf");
    let req = json!({"model": "SmolLM2-135M-Instruct.Q4_1",
                     "messages": [{"role": "user", "content": "Say hello."}],
                     "max_tokens": 8, "temperature": 0});
    let r = s.post_json("/v1/chat/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let text = text_of(&v);
    assert!(
        text.chars().any(char::is_alphabetic),
        "no words in {text:?}"
    );
    assert!(!text.contains("<|im_"), "special tokens leaked: {text:?}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (streamed, _, done) = stream_text(&s.open_stream("/v1/chat/completions", &sreq).collect());
    assert!(done);
    assert_eq!(streamed, text);
}

/// `bad_words` keeps a word out of real text: SmolLM2 names Paris as France's capital, and
/// with "Paris" barred (at a text's start and after a space, as vLLM tokenizes it) it writes
/// something else, the same with prompt lookup drafting as without.
#[test]
fn bad_words_keep_a_word_out_of_real_text() {
    let s = real_server("SmolLM2-135M-Instruct.Q4_1.gguf");
    let ask = |extra: Value| {
        let req = json!({"messages": [{"role": "user",
                                       "content": "What is the capital of France? Answer in one sentence, then repeat the answer."}],
                         "max_tokens": 40, "temperature": 0});
        text_of(&ok_json(&s, "/v1/chat/completions", &merged(req, &extra)))
    };
    let free = ask(json!({}));
    assert!(free.contains("Paris"), "{free:?}");
    let barred = ask(json!({"bad_words": ["Paris"], "speculation": "off"}));
    assert!(!barred.contains("Paris"), "{barred:?}");
    assert!(barred.chars().any(char::is_alphabetic), "{barred:?}");
    for k in [2, 8] {
        let spec = ask(json!({"bad_words": ["Paris"],
                              "speculation": {"draft": "prompt-lookup", "k": k}}));
        assert_eq!(spec, barred, "prompt lookup, k = {k}");
    }
}

/// Fill-in-the-middle with Qwen2.5-Coder's FIM tokens: with a `suffix` the completion is the
/// code between the prompt and it, ending (at an FIM or end token) where the suffix takes over;
/// the same prompt without one runs on to max_tokens. The reference: the same model's greedy
/// completion of the FIM prompt written out with its special tokens, stopping at the FIM
/// stops. (Which code the 0.5B writes there is a near-tie that turns with the CPU's matmul
/// kernels: " a + b" with the AVX-512 ones, a new assert line with candle's.)
#[test]
fn qwen_fills_in_the_middle() {
    let s = real_server("qwen2.5-coder-0.5b.gguf");
    let req = json!({"prompt": "def calc(a, b):\n    return",
                     "suffix": "\n\nassert calc(2, 3) == 5\n",
                     "max_tokens": 16, "temperature": 0});
    let r = s.post_json("/v1/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let stops: Vec<u64> = [
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|fim_pad|>",
        "<|file_sep|>",
        "<|repo_name|>",
        "<|endoftext|>",
    ]
    .iter()
    .map(|t| {
        let ids = s.post_json("/tokenize", &json!({"prompt": t})).json()["tokens"].clone();
        assert_eq!(ids.as_array().unwrap().len(), 1, "{t}: {ids}");
        ids[0].as_u64().unwrap()
    })
    .collect();
    let written = json!({"prompt": "<|fim_prefix|>def calc(a, b):\n    return<|fim_suffix|>\n\nassert calc(2, 3) == 5\n<|fim_middle|>",
                         "max_tokens": 16, "temperature": 0, "stop_token_ids": stops});
    let w = ok_json(&s, "/v1/completions", &written);
    assert_eq!(
        w["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"],
        "{w}"
    );
    assert_eq!(text_of(&v), text_of(&w), "{v}\n{w}");
    assert_eq!(w["choices"][0]["finish_reason"], "stop", "{w}");
    let mut plain = req.clone();
    plain.as_object_mut().unwrap().remove("suffix");
    let p = s.post_json("/v1/completions", &plain).json();
    assert_eq!(p["choices"][0]["finish_reason"], "length", "{p}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > p["usage"]["prompt_tokens"].as_u64(),
        "the suffix and the FIM tokens are in the prompt: {v} vs {p}"
    );
}

/// Tools with Qwen2.5-Coder: the template lists the function, the model's `<tool_call>` block
/// comes back as `message.tool_calls` (arguments as a JSON string, finish reason
/// "tool_calls"), streamed or not; `tool_choice` "required" or named forces a call; and a
/// follow-up turn with the call and its result renders.
#[test]
fn qwen_calls_a_tool() {
    let s = real_server("qwen2.5-coder-0.5b.gguf");
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]);
    let messages = json!([{"role": "user", "content": "What is the weather in Paris right now?"}]);
    let req = json!({"messages": messages, "tools": tools, "max_tokens": 40, "temperature": 0});
    let r = s.post_json("/v1/chat/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather", "{v}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Paris", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    // The same without tools is plain text; with tool_choice "none" too.
    let mut none = req.clone();
    none["tool_choice"] = json!("none");
    let plain = s.post_json("/v1/chat/completions", &none).json();
    assert!(
        plain["choices"][0]["message"]["tool_calls"].is_null(),
        "{plain}"
    );
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
        "the tools are in the prompt"
    );
    // Streamed: one chunk carries the call (with its index), the finish reason says so.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &sreq).collect();
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(streamed.len(), 1, "{events:?}");
    assert_eq!(streamed[0]["index"], 0);
    assert_eq!(streamed[0]["function"], call["function"]);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    // A reply that is not a call streams as text, in pieces, though tools were offered.
    let prose = json!({"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                       "tools": tools, "max_tokens": 24, "temperature": 0});
    let whole = s.post_json("/v1/chat/completions", &prose).json();
    assert_eq!(whole["choices"][0]["finish_reason"], "length", "{whole}");
    let mut sprose = prose.clone();
    sprose["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &sprose).collect();
    let (streamed, _, done) = stream_text(&events);
    assert!(done);
    assert_eq!(streamed, text_of(&whole));
    let pieces = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert!(pieces > 2, "streamed in {pieces} pieces: {events:?}");
    // tool_choice "required" forces a call where the model would answer in prose; a named
    // tool_choice forces that tool, with arguments that fit its schema.
    let two = json!([tools[0], {"type": "function", "function": {
        "name": "get_time", "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"], "additionalProperties": false}}}]);
    for (choice, want) in [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            Some("get_time"),
        ),
    ] {
        let mut forced = prose.clone();
        forced["tools"] = two.clone();
        forced["tool_choice"] = choice.clone();
        forced["max_tokens"] = json!(60);
        let v = s.post_json("/v1/chat/completions", &forced).json();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{choice}: {v}");
        let call = &c["message"]["tool_calls"][0]["function"];
        let name = call["name"].as_str().unwrap_or_else(|| panic!("{v}"));
        let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        let key = match name {
            "get_weather" => "city",
            "get_time" => "zone",
            _ => panic!("not a tool: {v}"),
        };
        assert!(args[key].is_string(), "{v}");
        if let Some(w) = want {
            assert_eq!(name, w, "{v}");
            assert_eq!(args.as_object().unwrap().len(), 1, "{v}");
        }
    }
    // The next turn: the assistant's call and the tool's answer go back through the template.
    let follow = json!({"messages": [
        messages[0],
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"celsius\": 21}"}],
        "tools": tools, "max_tokens": 24, "temperature": 0});
    let r = s.post_json("/v1/chat/completions", &follow);
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert!(
        answer["usage"]["prompt_tokens"].as_u64() > v["usage"]["prompt_tokens"].as_u64(),
        "{answer}"
    );
}

/// ln softmax(row) in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-4
}

/// A chat response's (or chunk's) `logprobs.content` list.
fn chat_content(choice: &Value) -> Vec<Value> {
    choice["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.content in {choice}"))
        .clone()
}

/// Joins the completions-shaped logprobs of streamed chunks into one object.
fn join_completion_logprobs(events: &[String]) -> Value {
    let mut joined =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    let mut text_len = 0usize;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        text_len += c["text"].as_str().unwrap().chars().count();
        let lp = &c["logprobs"];
        if !c["finish_reason"].is_null() {
            assert!(lp.is_null(), "the final chunk carries no tokens: {v}");
            continue;
        }
        // Each chunk carries the tokens whose text it completes.
        for off in lp["text_offset"].as_array().unwrap() {
            assert!(off.as_u64().unwrap() as usize <= text_len, "{v}");
        }
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let items = lp[key].as_array().unwrap_or_else(|| panic!("{key} in {v}"));
            joined[key]
                .as_array_mut()
                .unwrap()
                .extend(items.iter().cloned());
        }
    }
    joined
}

#[test]
fn logprobs_match_a_fresh_target_forward_in_every_mode() {
    use candle_core::quantized::GgmlDType;
    use verdict::models::testing::{TinySpec, write_tiny_gguf};
    use verdict::models::tokenizer::Tokenizer;
    use verdict::models::{Model, Rows};

    // Quantized weights, as real models have: candle's quantized matmul scores each row on its
    // own, so a k-row verification forward gives the same logits as k single-token forwards,
    // bit for bit (F32 weights go through a GEMM whose rounding depends on the row count).
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    };
    let (target, draft) = (
        dir.path().join("q-target.gguf"),
        dir.path().join("q-draft.gguf"),
    );
    write_tiny_gguf(&target, &spec).unwrap();
    let dspec = TinySpec {
        seed: 1,
        layers: 1,
        ..spec
    };
    write_tiny_gguf(&draft, &dspec).unwrap();
    let model = Model::load_gguf(&target, &candle_core::Device::Cpu).unwrap();
    let (t, d) = (target.display().to_string(), draft.display().to_string());
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let tok = Tokenizer::from_gguf(model.gguf_metadata().unwrap()).unwrap();
    let piece = |id: u32| tok.piece(id, false).unwrap().to_vec();
    let by_bytes: std::collections::HashMap<Vec<u8>, u32> = (0..tok.vocab_size() as u32)
        .map(|id| (piece(id), id))
        .collect();
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // Completions, greedy, five alternatives.
    let prompt: Vec<u32> = vec![40, 41, 42, 43, 40, 41];
    let max_tokens = 12;
    let req = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                     "logprobs": 5, "speculation": "off"});
    let r = s.post_json("/v1/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let lp = v["choices"][0]["logprobs"].clone();
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n, "{lp}");
    assert!(n >= 1);

    // The output ids, decoded greedily on a session of our own.
    let mut session = model.session();
    let mut row = session.forward(&prompt, Rows::Last).unwrap().logits;
    let mut ids = Vec::new();
    while ids.len() < n {
        let r = row.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let id = verdict::sample::argmax(&r);
        assert!(!tok.is_eos(id), "the server emitted past EOS");
        ids.push(id);
        row = session.forward(&[id], Rows::Last).unwrap().logits;
    }
    // One fresh forward over prompt + output scores every output position.
    let mut all: Vec<u32> = prompt.clone();
    all.extend(&ids);
    let rows = model
        .session()
        .forward(&all[..all.len() - 1], Rows::All)
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap();
    // text_offset: where the decoded text stood when the token arrived (a character cut between
    // tokens appears with its last byte).
    let mut offset = 0;
    let mut stream = tok.stream(true);
    for (j, &id) in ids.iter().enumerate() {
        let want = log_softmax(&rows[prompt.len() - 1 + j]);
        assert_eq!(tokens[j].as_str().unwrap(), lossy(&piece(id)), "token {j}");
        let got = lp["token_logprobs"][j].as_f64().unwrap();
        assert!(
            close(got, want[id as usize]),
            "token {j}: {got} vs {}",
            want[id as usize]
        );
        // The five most likely, the chosen (argmax) one among them with its own value.
        let top = lp["top_logprobs"][j].as_object().unwrap();
        assert!((1..=5).contains(&top.len()), "{top:?}");
        assert_eq!(top[tokens[j].as_str().unwrap()].as_f64(), Some(got));
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        let mut seen = std::collections::HashSet::new();
        for &i in order.iter().take(5) {
            let key = lossy(&piece(i as u32));
            if seen.insert(key.clone()) {
                let g = top[&key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key:?} not in {top:?}"));
                assert!(close(g, want[i]), "{key:?}: {g} vs {}", want[i]);
            }
        }
        assert!(top.values().all(|x| x.as_f64().unwrap() <= got));
        assert_eq!(lp["text_offset"][j].as_u64(), Some(offset as u64));
        offset += stream.push(&tok, id).unwrap().chars().count();
    }

    // Speculation scores positions from the verification forward: the same values.
    for spec in [
        json!({"draft": "model", "k": 3}),
        json!({"draft": "prompt-lookup", "k": 4}),
    ] {
        let mut sreq = req.clone();
        sreq["speculation"] = spec.clone();
        let sv = s.post_json("/v1/completions", &sreq).json();
        assert!(sv["speculation"]["drafted"].as_u64().unwrap() > 0 || spec["draft"] != "model");
        assert_eq!(sv["choices"][0]["logprobs"], lp, "speculation {spec}");
    }
    // Streamed: the chunks' logprobs join into the same object.
    let mut st = req.clone();
    st["stream"] = json!(true);
    st["speculation"] = json!({"draft": "model", "k": 3});
    let events = s.open_stream("/v1/completions", &st).collect();
    assert_eq!(join_completion_logprobs(&events), lp);
    // logprobs: 0 gives the chosen tokens only; none asked: null.
    let mut zero = req.clone();
    zero["logprobs"] = json!(0);
    let z = s.post_json("/v1/completions", &zero).json();
    assert!(z["choices"][0]["logprobs"]["top_logprobs"].is_null());
    assert_eq!(
        z["choices"][0]["logprobs"]["token_logprobs"],
        lp["token_logprobs"]
    );
    let mut none = req.clone();
    none.as_object_mut().unwrap().remove("logprobs");
    assert!(s.post_json("/v1/completions", &none).json()["choices"][0]["logprobs"].is_null());

    // Chat, greedy, three alternatives: plain, speculative and streamed agree.
    // The first of a few conversations whose greedy reply varies enough to cut with a stop
    // string further down (a random model often repeats one token).
    let (chat, cv, text) = [
        "tell me a story",
        "hello",
        "abc def",
        "the cat sat on the mat",
        "why is the sky blue?",
        "write a haiku about rust",
        "1 2 3 4 5",
        "what time is it",
        "zyx wvu tsr",
        "Quick brown foxes jump",
        "numbers: 42, 7, 19",
        "say something random",
    ]
    .iter()
    .map(|m| {
        let chat = json!({"messages": [{"role": "user", "content": m}],
                              "max_tokens": 16, "temperature": 0, "logprobs": true,
                              "top_logprobs": 3, "speculation": "off"});
        let cv = s.post_json("/v1/chat/completions", &chat).json();
        let text = text_of(&cv);
        (chat, cv, text)
    })
    .find(|(_, _, text)| {
        let chars: Vec<char> = text.chars().collect();
        chars.len() >= 8 && chars[3..].iter().any(|c| *c != chars[0])
    })
    .expect("a varied reply");
    let content = chat_content(&cv["choices"][0]);
    assert_eq!(
        content.len() as u64,
        cv["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut bytes = Vec::new();
    for t in &content {
        let b: Vec<u8> = serde_json::from_value(t["bytes"].clone()).unwrap();
        assert_eq!(t["token"].as_str().unwrap(), lossy(&b));
        let id = by_bytes[&b];
        if !tok.token_kind(id).unwrap().is_special() {
            bytes.extend(&b);
        }
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        let vals: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "sorted: {vals:?}");
        // T = 0: the chosen token is the argmax, first among the alternatives.
        assert_eq!(top[0]["bytes"], t["bytes"]);
        assert_eq!(top[0]["logprob"], t["logprob"]);
    }
    assert_eq!(lossy(&bytes), text);
    let mut spec_chat = chat.clone();
    spec_chat["speculation"] = json!({"draft": "model", "k": 4});
    let sv = s.post_json("/v1/chat/completions", &spec_chat).json();
    assert_eq!(sv["choices"][0]["logprobs"], cv["choices"][0]["logprobs"]);
    spec_chat["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &spec_chat).collect();
    let mut streamed = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        if c["finish_reason"].is_null() {
            streamed.extend(chat_content(c));
        }
    }
    assert_eq!(streamed, content);

    // A stop string: the kept tokens are those that reached the text, streamed or not.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 10, "need text to cut: {text:?}");
    // Two characters that first occur a few characters in, so that some text is kept.
    let stop: String = (3..chars.len() - 1)
        .map(|i| chars[i..i + 2].iter().collect::<String>())
        .find(|st| text.find(st.as_str()).is_some_and(|at| at > 0))
        .unwrap_or_else(|| panic!("no stop string to cut {text:?} with"));
    let cut = &text[..text.find(&stop).unwrap()];
    let mut stopped = chat.clone();
    stopped["stop"] = json!([stop]);
    let sv = s.post_json("/v1/chat/completions", &stopped).json();
    assert_eq!(text_of(&sv), cut);
    let kept = chat_content(&sv["choices"][0]);
    assert_eq!(kept[..], content[..kept.len()]);
    let join = |ts: &[Value]| {
        let mut b = Vec::new();
        for t in ts {
            b.extend(serde_json::from_value::<Vec<u8>>(t["bytes"].clone()).unwrap());
        }
        lossy(&b)
    };
    assert!(join(&kept).starts_with(cut), "{:?} vs {cut:?}", join(&kept));
    assert!(
        !join(&kept[..kept.len() - 1]).starts_with(cut),
        "one token too many"
    );
    stopped["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &stopped).collect();
    let mut streamed = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"].get(0)
            && c["finish_reason"].is_null()
        {
            streamed.extend(chat_content(c));
        }
    }
    assert_eq!(streamed, kept);
}

/// A server on Q8_0 tiny models, the target's tokenizer, and the target's logits at every
/// position of `prompt` from one forward of its own (what the server's prompt scores must be).
fn q8_server_scoring(
    prompt: &[u32],
) -> (Server, verdict::models::tokenizer::Tokenizer, Vec<Vec<f32>>) {
    use verdict::models::{Model, Rows};
    let (dir, t, d) = q8_models(1024);
    let model = Model::load_gguf(std::path::Path::new(&t), &candle_core::Device::Cpu).unwrap();
    let tok =
        verdict::models::tokenizer::Tokenizer::from_gguf(model.gguf_metadata().unwrap()).unwrap();
    let forward = model.session().forward(prompt, Rows::All).unwrap();
    let rows = forward.logits.to_vec2::<f32>().unwrap();
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    (s, tok, rows)
}

/// `echo` on completions: the text starts with the prompt, and with logprobs every prompt
/// token after the first is scored as a fresh forward over the prompt scores it (the first has
/// nulls); `max_tokens: 0` scores the prompt only. The output part is what the request without
/// echo gets, its offsets after the prompt's text.
#[test]
fn echo_scores_the_prompt_and_prefixes_the_text() {
    // Longer than one scoring chunk (64 positions), so chunks are joined.
    let prompt: Vec<u32> = (0..150).map(|i| 30 + (i * 7) % 90).collect();
    let (s, tok, rows) = q8_server_scoring(&prompt);
    let prompt_text = tok.decode(&prompt, false).unwrap();
    let complete = |extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/completions",
            &merged(json!({"prompt": prompt, "temperature": 0}), &extra),
        )
    };

    // Score only.
    let scored = complete(json!({"echo": true, "max_tokens": 0, "logprobs": 2}));
    assert_eq!(text_of(&scored), prompt_text);
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    assert_eq!(scored["choices"][0]["finish_reason"], "length");
    let lp = &scored["choices"][0]["logprobs"];
    let lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    for j in 1..prompt.len() {
        let want = log_softmax(&rows[j - 1])[prompt[j] as usize];
        let got = lps[j].as_f64().unwrap();
        assert!(close(got, want), "prompt token {j}: {got} vs {want}");
        // Two alternatives whose bytes decode to the same text share a key.
        let top = lp["top_logprobs"][j].as_object().unwrap().len();
        assert!((1..=2).contains(&top), "{lp}");
    }

    // Echo with an output, speculative: the prompt's entries, then the plain request's.
    let plain = complete(json!({"max_tokens": 8, "logprobs": 1}));
    let echoed = complete(json!({"echo": true, "max_tokens": 8, "logprobs": 1,
                                 "speculation": {"draft": "model", "k": 3}}));
    // Scored prompts are read whole, whatever the prompt cache holds (`plain` left it there).
    assert_eq!(echoed["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        text_of(&echoed),
        format!("{prompt_text}{}", text_of(&plain))
    );
    let (e, p) = (
        &echoed["choices"][0]["logprobs"],
        &plain["choices"][0]["logprobs"],
    );
    let n = prompt.len();
    let chars = prompt_text.chars().count() as u64;
    let arr = |v: &Value, key: &str| v[key].as_array().unwrap().clone();
    assert_eq!(arr(e, "token_logprobs")[..n], arr(lp, "token_logprobs")[..]);
    for key in ["tokens", "token_logprobs", "top_logprobs"] {
        assert_eq!(
            e[key].as_array().unwrap()[n..],
            p[key].as_array().unwrap()[..],
            "{key}"
        );
    }
    let offsets: Vec<u64> = e["text_offset"].as_array().unwrap()[n..]
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let plain_offsets: Vec<u64> = p["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() + chars)
        .collect();
    assert_eq!(offsets, plain_offsets);
    // The prompt's own offsets count its characters.
    assert_eq!(e["text_offset"][0], 0);
    assert!(e["text_offset"][n - 1].as_u64().unwrap() < chars);

    // Streamed: the prompt comes first; without logprobs none are sent.
    let body = json!({"prompt": prompt, "temperature": 0, "echo": true, "max_tokens": 8,
                      "stream": true});
    let events = s.open_stream("/v1/completions", &body).collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], prompt_text);
    assert!(first["choices"][0]["logprobs"].is_null());
    let joined: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    assert_eq!(joined, text_of(&echoed));

    // max_tokens 0 needs echo; chat has no echo.
    let r = s.post_json("/v1/completions", &json!({"prompt": "x", "max_tokens": 0}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "echo": true}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "echo");
}

/// vLLM's `prompt_logprobs`: each prompt token's log-probability, rank and text, and its
/// most likely alternatives, as the target's own forward pass over the prompt gives them; on
/// completions per choice, on chat once; refused with a stream.
#[test]
fn prompt_logprobs_score_and_rank_each_prompt_token() {
    // Longer than one scoring chunk (64 positions).
    let prompt: Vec<u32> = (0..90).map(|i| 30 + (i * 11) % 97).collect();
    let (s, tok, rows) = q8_server_scoring(&prompt);
    // The reference: row j - 1 scores token j; ranks with ties to the lower id.
    let rank = |row: &[f32], t: usize| {
        1 + row
            .iter()
            .enumerate()
            .filter(|&(i, &x)| x > row[t] || (x == row[t] && i < t))
            .count()
    };
    let text =
        |id: usize| String::from_utf8_lossy(tok.piece(id as u32, false).unwrap()).into_owned();
    let check = |scores: &Value, top: usize| {
        let scores = scores.as_array().unwrap_or_else(|| panic!("{scores}"));
        assert_eq!(scores.len(), prompt.len());
        assert!(scores[0].is_null());
        for j in 1..prompt.len() {
            let row = &rows[j - 1];
            let lsm = log_softmax(row);
            let entries = scores[j].as_object().unwrap();
            let own = prompt[j] as usize;
            let e = &entries[&own.to_string()];
            assert!(close(e["logprob"].as_f64().unwrap(), lsm[own]), "{j}: {e}");
            assert_eq!(e["rank"], rank(row, own), "{j}: {e}");
            assert_eq!(e["decoded_token"], text(own));
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by_key(|&i| rank(row, i));
            for (r, &id) in order[..top].iter().enumerate() {
                let e = &entries[&id.to_string()];
                assert_eq!(e["rank"], r + 1, "{j}: {id}");
                assert!(close(e["logprob"].as_f64().unwrap(), lsm[id]));
            }
            let extra = usize::from(!order[..top].contains(&own));
            assert_eq!(entries.len(), top + extra, "{j}: {entries:?}");
        }
    };
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 4});
    let complete = |extra: Value| ok_json(&s, "/v1/completions", &merged(body.clone(), &extra));

    // Scored alone (max_tokens 0: score only), and with an output, speculative, n = 2.
    let v = complete(json!({"max_tokens": 0, "prompt_logprobs": 3}));
    assert_eq!(text_of(&v), "");
    check(&v["choices"][0]["prompt_logprobs"], 3);
    // Score only, n = 2: each choice scores it (neither generates to share from); and an echo
    // without logprobs.
    let v = complete(json!({"max_tokens": 0, "prompt_logprobs": 1, "n": 2}));
    check(&v["choices"][1]["prompt_logprobs"], 1);
    let v = complete(json!({"max_tokens": 0, "echo": true, "n": 2}));
    assert_eq!(v["choices"][1]["text"], tok.decode(&prompt, false).unwrap());
    let v =
        complete(json!({"prompt_logprobs": 0, "n": 2, "speculation": {"draft": "model", "k": 3}}));
    for c in v["choices"].as_array().unwrap() {
        check(&c["prompt_logprobs"], 0);
    }
    // Choice 0 scores the prompt; choice 1 reads it from the prompt cache.
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert!(cached.unwrap() > 0, "{}", v["usage"]);
    assert_eq!(text_of(&v), text_of(&ok_json(&s, "/v1/completions", &body)));
    // An echo's alternatives stay as many as `logprobs` asks, whatever prompt_logprobs scores.
    let v = complete(json!({"prompt_logprobs": 5, "echo": true, "logprobs": 1}));
    check(&v["choices"][0]["prompt_logprobs"], 5);
    let echo_top = &v["choices"][0]["logprobs"]["top_logprobs"];
    assert!(
        echo_top.as_array().unwrap()[1..]
            .iter()
            .all(|t| t.as_object().unwrap().len() == 1)
    );
    // Not asked for: absent.
    let plain = ok_json(&s, "/v1/completions", &body);
    assert!(plain["choices"][0].get("prompt_logprobs").is_none());

    // Chat: once, beside the choices, over the templated prompt.
    let chat = json!({"messages": [{"role": "user", "content": "the cat sat on the mat"}],
                      "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2});
    let v = ok_json(&s, "/v1/chat/completions", &chat);
    let ids = ok_json(&s, "/tokenize", &json!({"messages": chat["messages"]}))["tokens"].clone();
    let scores = v["prompt_logprobs"].as_array().unwrap();
    assert_eq!(scores.len(), ids.as_array().unwrap().len());
    assert!(
        scores[0].is_null()
            && scores[1..]
                .iter()
                .all(|e| e.as_object().is_some_and(|m| (2..=3).contains(&m.len())))
    );

    // Bad values and a stream are named.
    for (extra, param) in [
        (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt_logprobs": -1}), "prompt_logprobs"),
        (json!({"prompt_logprobs": "3"}), "prompt_logprobs"),
        (
            json!({"prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
        ),
        (json!({"max_tokens": 0}), "max_tokens"),
    ] {
        let r = s.post_json("/v1/completions", &merged(body.clone(), &extra));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{extra}");
    }
    let r = s.post_json(
        "/v1/messages",
        &json!({"model": "x", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Anthropic's error shape names no param: the message does.
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("prompt_logprobs"), "{message}");
}

/// OpenAI's `best_of`: each prompt's `best_of` generations (those of an `n = best_of` request,
/// seeds and all), of which the `n` with the highest mean token log-probability come back,
/// likeliest first; usage counts them all.
#[test]
fn best_of_returns_the_likeliest_generations() {
    let s = tiny_server(1024, &[]);
    let prompts = json!(["the cat sat on", "a dog ran to the"]);
    let base = json!({"prompt": prompts, "max_tokens": 10, "temperature": 1.0, "seed": 11,
                      "speculation": {"draft": "model", "k": 3}});
    // The candidates, each scored by the target reading it after its prompt: the mean
    // log-probability of its tokens, the stop token that ended it included.
    let all = ok_json(
        &s,
        "/v1/completions",
        &merged(base.clone(), &json!({"n": 4, "return_token_ids": true})),
    );
    let mean = |c: &Value| {
        let out = c["token_ids"].as_array().unwrap();
        let mut ids = c["prompt_token_ids"].as_array().unwrap().clone();
        ids.extend(out.iter().cloned());
        let scored = ok_json(
            &s,
            "/v1/completions",
            &json!({"prompt": ids, "max_tokens": 0, "prompt_logprobs": 0}),
        );
        let rows = scored["choices"][0]["prompt_logprobs"].as_array().unwrap();
        let tail = &rows[rows.len() - out.len()..];
        let lps = tail
            .iter()
            .zip(out)
            .map(|(row, t)| row[t.to_string()]["logprob"].as_f64().unwrap());
        lps.sum::<f64>() / out.len() as f64
    };
    let candidates: Vec<(String, f64)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["text"].as_str().unwrap().to_string(), mean(c)))
        .collect();
    let texts: std::collections::HashSet<&String> = candidates.iter().map(|(t, _)| t).collect();
    assert!(
        texts.len() > 4,
        "the candidates should differ: {candidates:?}"
    );
    let best = ok_json(
        &s,
        "/v1/completions",
        &merged(base.clone(), &json!({"n": 2, "best_of": 4})),
    );
    let choices = best["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (k, group) in candidates.chunks(4).enumerate() {
        let mut ranked = group.to_vec();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        for j in 0..2 {
            let c = &choices[k * 2 + j];
            assert_eq!(c["index"], k * 2 + j);
            assert_eq!(
                c["text"].as_str().unwrap(),
                ranked[j].0,
                "prompt {k} rank {j}: {ranked:?}"
            );
        }
    }
    assert_eq!(best["usage"], all["usage"]);
    // best_of = n returns every choice in order.
    let same = ok_json(
        &s,
        "/v1/completions",
        &merged(base.clone(), &json!({"n": 4, "best_of": 4})),
    );
    assert_eq!(same["choices"][1]["text"], all["choices"][1]["text"]);

    // Bad values are named.
    for (extra, param) in [
        (json!({"n": 3, "best_of": 2}), "best_of"),
        (json!({"best_of": 0}), "best_of"),
        (json!({"best_of": 17}), "best_of"),
        (json!({"best_of": 2, "stream": true}), "best_of"),
        (
            json!({"best_of": 16, "prompt": ["a", "b", "c", "d", "e"]}),
            "best_of",
        ),
    ] {
        let r = s.post_json("/v1/completions", &merged(base.clone(), &extra));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{extra}");
    }
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "best_of": 2}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "best_of");
}

/// vLLM's `--override-generation-config`: sampling defaults for requests that leave them out;
/// a request's own values win; a bad config stops the server, naming the key.
#[test]
fn generation_defaults_fill_what_requests_leave_out() {
    let s = tiny_server(
        1024,
        &[
            "--override-generation-config",
            r#"{"temperature": 0, "max_new_tokens": 3}"#,
            "--return-tokens-as-token-ids",
            "--enable-force-include-usage",
        ],
    );
    let tokens = |v: &Value| v["usage"]["completion_tokens"].as_u64().unwrap();
    let bare = json!({"prompt": "the cat sat on", "ignore_eos": true});
    let a = ok_json(&s, "/v1/completions", &bare);
    assert_eq!(tokens(&a), 3);
    // Greedy, as asked for explicitly.
    let explicit = merged(bare.clone(), &json!({"temperature": 0, "max_tokens": 3}));
    assert_eq!(
        text_of(&a),
        text_of(&ok_json(&s, "/v1/completions", &explicit))
    );
    let five = ok_json(
        &s,
        "/v1/completions",
        &merged(bare.clone(), &json!({"max_tokens": 5})),
    );
    assert_eq!(tokens(&five), 5);
    assert!(text_of(&five).starts_with(&text_of(&a)));
    // Chat: the default too, and `max_completion_tokens` is the request's own max_tokens.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": true});
    assert_eq!(tokens(&ok_json(&s, "/v1/chat/completions", &chat)), 3);
    let four = merged(chat, &json!({"max_completion_tokens": 4}));
    assert_eq!(tokens(&ok_json(&s, "/v1/chat/completions", &four)), 4);

    // vLLM's server-wide switches: tokens by id in logprobs, a usage chunk on every stream.
    let lp = ok_json(
        &s,
        "/v1/completions",
        &merged(bare.clone(), &json!({"logprobs": 0})),
    );
    let names = lp["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        names
            .iter()
            .all(|t| t.as_str().unwrap().starts_with("token_id:")),
        "{names:?}"
    );
    let stream = merged(bare.clone(), &json!({"stream": true}));
    let events = s.open_stream("/v1/completions", &stream).collect();
    // The usage-only chunk (no choices) that `include_usage` asks for.
    let usage_only = events.iter().filter(|e| *e != "[DONE]").any(|e| {
        let v: Value = serde_json::from_str(e).unwrap();
        v["choices"] == json!([]) && v["usage"]["completion_tokens"] == 3
    });
    assert!(usage_only, "{events:?}");
    // Forced usage still lets a request ask for it on every chunk.
    let each = merged(
        stream,
        &json!({"stream_options": {"continuous_usage_stats": true}}),
    );
    let events = s.open_stream("/v1/completions", &each).collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert!(first["usage"]["completion_tokens"].is_u64(), "{events:?}");

    // A default beyond the room the prompt leaves is capped to it (a request's own is refused).
    let long = tiny_server(
        64,
        &["--override-generation-config", r#"{"max_new_tokens": 500}"#],
    );
    let v = ok_json(
        &long,
        "/v1/completions",
        &json!({"prompt": "the cat", "ignore_eos": true}),
    );
    let room = 64 - v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(tokens(&v), room);
    let r = long.post_json(
        "/v1/completions",
        &json!({"prompt": "the cat", "max_tokens": 500}),
    );
    assert_eq!(r.status, 400);

    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    for (config, want) in [
        (r#"{"temp": 1}"#, "unknown key \"temp\""),
        (r#"{"temperature": 5}"#, "temperature"),
        (r#"{"max_new_tokens": 0}"#, "max_new_tokens"),
        ("nope", "not a JSON object"),
    ] {
        let err = serve_fails(&target, &["--override-generation-config", config]);
        assert!(err.contains(want), "{config}: {err}");
        assert!(
            err.contains("--override-generation-config"),
            "{config}: {err}"
        );
    }
}

/// vLLM's `return_token_ids`: the prompt's token ids (what `/tokenize` gives) and each
/// choice's generated ids, whole or streamed a chunk at a time.
#[test]
fn return_token_ids_gives_the_prompt_and_output_tokens() {
    let s = tiny_server(1024, &[]);
    let detok = |ids: &Value| -> String {
        ok_json(&s, "/detokenize", &json!({"tokens": ids}))["prompt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let prompts = json!(["the cat sat on", "a dog ran to the"]);
    let body = json!({"prompt": prompts, "n": 2, "max_tokens": 12, "temperature": 0.8,
                      "seed": 7, "return_token_ids": true,
                      "speculation": {"draft": "model", "k": 3}});
    let v = ok_json(&s, "/v1/completions", &body);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let mut generated = 0;
    for (i, c) in choices.iter().enumerate() {
        let want = ok_json(&s, "/tokenize", &json!({"prompt": prompts[i / 2]}))["tokens"].clone();
        assert_eq!(c["prompt_token_ids"], want, "choice {i}");
        let ids = c["token_ids"].as_array().unwrap();
        // The stop token that ended a choice is its last id (not a completion token).
        generated += ids.len() - usize::from(c["finish_reason"] == "stop");
        // Without a stop string, the text is the ids' (an ending EOS decodes to nothing).
        assert_eq!(
            detok(&c["token_ids"]),
            c["text"].as_str().unwrap(),
            "choice {i}"
        );
    }
    assert_eq!(v["usage"]["completion_tokens"], generated);
    // A stop token of the request's ends the ids, as vLLM's do.
    let plain = json!({"prompt": "the cat sat on", "max_tokens": 8, "temperature": 0,
                       "return_token_ids": true});
    let full = ok_json(&s, "/v1/completions", &plain)["choices"][0]["token_ids"].clone();
    let ids = full.as_array().unwrap();
    let cut = (1..ids.len())
        .find(|&i| !ids[..i].contains(&ids[i]))
        .unwrap();
    let stopped = ok_json(
        &s,
        "/v1/completions",
        &merged(plain, &json!({"stop_token_ids": [ids[cut]]})),
    );
    let c = &stopped["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["token_ids"], json!(ids[..=cut]));
    assert_eq!(stopped["usage"]["completion_tokens"], cut);

    // Streamed: each chunk the tokens since the last, the prompt's with a choice's first.
    let mut streamed = vec![Vec::new(); 4];
    let mut firsts = vec![0; 4];
    for e in s
        .open_stream(
            "/v1/completions",
            &merged(body.clone(), &json!({"stream": true})),
        )
        .collect()
    {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let i = c["index"].as_u64().unwrap() as usize;
        streamed[i].extend(c["token_ids"].as_array().unwrap().iter().cloned());
        if let Some(p) = c.get("prompt_token_ids") {
            assert_eq!(p, &choices[i]["prompt_token_ids"]);
            assert!(streamed[i].len() <= choices[i]["token_ids"].as_array().unwrap().len());
            firsts[i] += 1;
        }
    }
    assert_eq!(firsts, [1; 4]);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(
            &Value::Array(streamed[i].clone()),
            &c["token_ids"],
            "choice {i}"
        );
    }

    // Chat: the templated prompt's ids beside the choices, also on the first chunk.
    let messages = json!([{"role": "user", "content": "hello there"}]);
    let chat = json!({"messages": messages, "max_tokens": 6, "temperature": 0,
                      "return_token_ids": true});
    let want = ok_json(&s, "/tokenize", &json!({"messages": messages}))["tokens"].clone();
    let v = ok_json(&s, "/v1/chat/completions", &chat);
    assert_eq!(v["prompt_token_ids"], want);
    assert_eq!(detok(&v["choices"][0]["token_ids"]), text_of(&v));
    let events = s
        .open_stream(
            "/v1/chat/completions",
            &merged(chat, &json!({"stream": true})),
        )
        .collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["prompt_token_ids"], want);
    let ids: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .flat_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["token_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(Value::Array(ids), v["choices"][0]["token_ids"]);

    // Not asked for: absent; a bad value is named.
    let plain = ok_json(
        &s,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert!(plain["choices"][0].get("token_ids").is_none());
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "x", "return_token_ids": 1}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "return_token_ids");
}

/// `/v1/rerank` and `/v1/score` (vLLM's, Jina's and Cohere's shapes): the cosine similarity of
/// the texts' embeddings, the same as computed from `/v1/embeddings`' vectors; ranked, cut to
/// `top_n`, paired one-to-many or one-to-one; bad input named.
#[test]
fn rerank_and_score_rank_by_embedding_similarity() {
    let s = tiny_server(1024, &[]);
    let query = "the cat sat on the mat";
    let docs = [
        "a dog ran",
        "the cat sat",
        "mat",
        "an old tree by the river",
    ];
    let mut all = vec![query];
    all.extend(docs);
    let e = ok_json(&s, "/v1/embeddings", &json!({"input": all}));
    let vecs: Vec<Vec<f64>> = e["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let cos = |a: &[f64], b: &[f64]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let mut want: Vec<(usize, f64)> = (0..docs.len())
        .map(|i| (i, cos(&vecs[0], &vecs[i + 1])))
        .collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));

    for path in ["/v1/rerank", "/rerank", "/v2/rerank"] {
        let docs_json: Vec<Value> = docs.iter().map(|d| json!({"text": d})).collect();
        let v = ok_json(
            &s,
            path,
            &json!({"query": query, "documents": docs_json, "top_n": 3}),
        );
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 3, "{v}");
        for (r, (i, score)) in results.iter().zip(&want) {
            assert_eq!(r["index"], *i, "{v}");
            assert!(
                (r["relevance_score"].as_f64().unwrap() - score).abs() < 1e-5,
                "{v}"
            );
            assert_eq!(r["document"]["text"], docs[*i]);
        }
        assert_eq!(v["usage"]["total_tokens"], e["usage"]["total_tokens"]);
    }
    // vLLM's default top_n, 0, is all of them.
    let all_docs =
        json!({"query": query, "documents": docs, "top_n": 0, "return_documents": false});
    let v = ok_json(&s, "/v1/rerank", &all_docs);
    assert_eq!(v["results"].as_array().unwrap().len(), docs.len());
    assert!(v["results"][0].get("document").is_none());

    // Score: one text_1 against each text_2, then pairs.
    let v = ok_json(&s, "/v1/score", &json!({"text_1": query, "text_2": docs}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), docs.len());
    for (j, d) in data.iter().enumerate() {
        assert_eq!(
            (d["index"].clone(), d["object"].clone()),
            (json!(j), json!("score"))
        );
        assert!((d["score"].as_f64().unwrap() - cos(&vecs[0], &vecs[j + 1])).abs() < 1e-5);
    }
    let v = ok_json(
        &s,
        "/score",
        &json!({"text_1": [docs[0], docs[1]], "text_2": [docs[2], docs[3]]}),
    );
    let pair = v["data"][1]["score"].as_f64().unwrap();
    assert!((pair - cos(&vecs[2], &vecs[4])).abs() < 1e-5, "{v}");

    for (path, body, param) in [
        ("/v1/rerank", json!({"documents": ["a"]}), "query"),
        ("/v1/rerank", json!({"query": "q"}), "documents"),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": []}),
            "documents",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": [{"txt": "a"}]}),
            "documents[0].text",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a", 5]}),
            "documents[1]",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "top_n": -1}),
            "top_n",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a", ""]}),
            "documents[1]",
        ),
        (
            "/v1/score",
            json!({"text_1": "", "text_2": ["a"]}),
            "text_1",
        ),
        (
            "/v1/rerank",
            json!({"query": "", "documents": ["a"]}),
            "query",
        ),
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a"], "topn": 1}),
            "topn",
        ),
        (
            "/v1/score",
            json!({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
            "text_2",
        ),
        ("/v1/score", json!({"text_2": ["c"]}), "text_1"),
    ] {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    // A document too long for the context is named by its place.
    let long = "word ".repeat(2000);
    let r = s.post_json(
        "/v1/rerank",
        &json!({"query": "q", "documents": ["a", long]}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "documents[1]");
    assert_eq!(s.get("/v1/rerank").status, 405);
}

/// `/tokenize` gives the ids a request's prompt or chat becomes (its count is the request's
/// `prompt_tokens`), `/detokenize` turns ids back into text; bad input names the field.
#[test]
fn tokenize_and_detokenize() {
    let s = tiny_server(1024, &[]);
    let r = s.post_json("/tokenize", &json!({"prompt": "hello there"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let ids: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(v["count"], ids.len());
    assert_eq!(v["max_model_len"], 1024);
    let c = s.post_json(
        "/v1/completions",
        &json!({"prompt": "hello there", "max_tokens": 1}),
    );
    assert_eq!(c.json()["usage"]["prompt_tokens"], ids.len());
    let d = s.post_json("/detokenize", &json!({"tokens": ids}));
    assert_eq!(d.status, 200, "{}", d.text());
    assert_eq!(d.json()["prompt"], "hello there");
    // vLLM's return_token_strs: each token's text.
    let v = ok_json(
        &s,
        "/tokenize",
        &json!({"prompt": "hello there", "return_token_strs": true}),
    );
    let strs: Vec<String> = v["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(strs.len(), ids.len());
    // As the vocabulary writes them: byte-level `Ġ` for a space.
    assert!(
        strs.concat().replace('Ġ', " ").ends_with("hello there"),
        "{strs:?}"
    );
    let r = s.post_json("/tokenize", &json!({"prompt": "x", "return_token_strs": 1}));
    assert_eq!(r.json()["error"]["param"], "return_token_strs");
    // vLLM's add_special_tokens: false leaves the model's BOS out (the SentencePiece tiny
    // vocabulary adds one), in /tokenize and in the completion alike.
    let dir = tempfile::tempdir().unwrap();
    let spm = dir.path().join("spm.gguf");
    let spec = verdict::models::testing::peer_spec("llama-spm").unwrap();
    verdict::models::testing::write_tiny_gguf(&spm, &spec).unwrap();
    let log_dir = dir.path().to_path_buf();
    let bos = Server::start(&["--model", spm.to_str().unwrap()], Some(dir), &log_dir);
    let with = ok_json(&bos, "/tokenize", &json!({"prompt": "the end"}))["tokens"].clone();
    assert_eq!(with[0], 1, "{with}");
    let bare = json!({"prompt": "the end", "add_special_tokens": false});
    let without = ok_json(&bos, "/tokenize", &bare)["tokens"].clone();
    assert_eq!(without, json!(with.as_array().unwrap()[1..]));
    let c = ok_json(
        &bos,
        "/v1/completions",
        &merged(bare, &json!({"max_tokens": 1})),
    );
    assert_eq!(
        c["usage"]["prompt_tokens"],
        without.as_array().unwrap().len()
    );
    // A chat counts as the chat request does (template included).
    let messages = json!([{"role": "user", "content": "hi"}]);
    let t = s
        .post_json("/tokenize", &json!({"messages": messages}))
        .json();
    let chat = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 1}),
        )
        .json();
    assert_eq!(t["count"], chat["usage"]["prompt_tokens"]);
    // vLLM's add_generation_prompt: false leaves the assistant's turn unopened.
    let closed = json!({"messages": messages, "add_generation_prompt": false});
    let shut = ok_json(&s, "/tokenize", &closed);
    assert!(shut["count"].as_u64() < t["count"].as_u64(), "{shut} {t}");
    let c = ok_json(
        &s,
        "/v1/chat/completions",
        &merged(closed, &json!({"max_tokens": 1})),
    );
    assert_eq!(c["usage"]["prompt_tokens"], shut["count"]);
    let assistant =
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": assistant, "continue_final_message": true, "add_generation_prompt": true}),
        ),
        (
            "/tokenize",
            json!({"messages": assistant, "continue_final_message": true, "add_generation_prompt": true}),
        ),
        (
            "/tokenize",
            json!({"prompt": "x", "add_generation_prompt": false}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "add_generation_prompt": false}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "add_special_tokens": 0}),
        ),
    ] {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, 400, "{body}");
        let param = r.json()["error"]["param"].clone();
        assert!(
            param.as_str().unwrap().starts_with("add_"),
            "{body}: {param}"
        );
    }
    // vLLM's chat_template_kwargs reach the template (the tiny one has Qwen3's thinking switch),
    // in /tokenize and in the chat request alike.
    let vars = json!({"enable_thinking": false});
    let t_off = s
        .post_json(
            "/tokenize",
            &json!({"messages": messages, "chat_template_kwargs": vars}),
        )
        .json();
    let chat_off = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 1, "chat_template_kwargs": vars}),
        )
        .json();
    let think = s
        .post_json("/tokenize", &json!({"prompt": "<think>\n\n</think>\n\n"}))
        .json();
    let n = |v: &Value| v.as_u64().unwrap();
    assert_eq!(n(&t_off["count"]), n(&t["count"]) + n(&think["count"]));
    assert_eq!(t_off["count"], chat_off["usage"]["prompt_tokens"]);
    for (path, body, param) in [
        (
            "/tokenize",
            json!({"messages": messages, "chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs.messages",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "chat_template_kwargs": {}}),
            "chat_template_kwargs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "chat_template_kwargs": [1]}),
            "chat_template_kwargs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": messages, "chat_template_kwargs": {"add_generation_prompt": false}}),
            "chat_template_kwargs.add_generation_prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "chat_template_kwargs": {}}),
            "chat_template_kwargs",
        ),
        ("/tokenize", json!({}), "prompt"),
        ("/tokenize", json!({"prompt": 5}), "prompt"),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": []}),
            "prompt",
        ),
        ("/tokenize", json!({"text": "a"}), "text"),
        ("/detokenize", json!({"tokens": [99999]}), "tokens[0]"),
        ("/detokenize", json!({"tokens": [1, -1]}), "tokens[1]"),
        ("/detokenize", json!({}), "tokens"),
    ] {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{path} {body}");
    }
    assert_eq!(s.get("/tokenize").status, 405);
}

/// Structured outputs on the tiny random model: `response_format` (a JSON schema, any JSON
/// object) and vLLM's `guided_regex` / `guided_choice` constrain what it writes, streamed or
/// not, in every choice of `n`, with speculation as without; a bad grammar is a 400 naming its
/// field. (A forced tool call: `qwen_calls_a_tool`, the tiny template has no tools.)
#[test]
fn structured_outputs_follow_their_grammar() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let post = |path: &str, extra: Value| -> Value {
        let mut body = if path.ends_with("chat/completions") {
            json!({"messages": [{"role": "user", "content": "Some JSON please"}]})
        } else {
            json!({"prompt": [40, 41, 42, 43, 40, 41]})
        };
        body["max_tokens"] = json!(300);
        body["temperature"] = json!(0);
        ok_json(&s, path, &merged(body, &extra))
    };
    let schema = json!({"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                       "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": false});
    let fits = |text: &str| -> bool {
        serde_json::from_str::<Value>(text).is_ok_and(|v| {
            v["n"].as_u64().is_some_and(|n| n <= 99)
                && v["ok"].is_boolean()
                && v.as_object().unwrap().len() == 2
        })
    };
    let rf = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema, "strict": true}}});
    let free = post("/v1/chat/completions", json!({}));
    assert!(
        !fits(&text_of(&free)),
        "the random model must not write it unasked"
    );
    let v = post("/v1/chat/completions", rf.clone());
    assert!(fits(&text_of(&v)), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    for spec in [json!("off"), json!({"draft": "prompt-lookup", "k": 4})] {
        let mut body = rf.clone();
        body["speculation"] = spec.clone();
        assert_eq!(
            text_of(&post("/v1/chat/completions", body)),
            text_of(&v),
            "{spec}"
        );
    }
    let mut sreq = rf.clone();
    sreq["messages"] = json!([{"role": "user", "content": "Some JSON please"}]);
    sreq["max_tokens"] = json!(300);
    sreq["temperature"] = json!(0);
    sreq["stream"] = json!(true);
    let (streamed, _, done) = stream_text(&s.open_stream("/v1/chat/completions", &sreq).collect());
    assert!(done);
    assert_eq!(streamed, text_of(&v));
    // Sampled choices each follow it.
    let mut many = rf.clone();
    many["n"] = json!(3);
    many["temperature"] = json!(1.0);
    many["seed"] = json!(5);
    let v = post("/v1/chat/completions", many);
    let cs = v["choices"].as_array().unwrap();
    assert_eq!(cs.len(), 3);
    for c in cs {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(fits(text), "{text:?}");
    }
    // Any JSON object: what the model writes parses as one once it stops.
    let v = post(
        "/v1/chat/completions",
        json!({"response_format": {"type": "json_object"}}),
    );
    let text = text_of(&v);
    assert!(text.trim_start().starts_with('{'), "{text:?}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(&text).unwrap().is_object(),
            "{text:?}"
        );
    }
    // vLLM's fields on completions.
    let v = post("/v1/completions", json!({"guided_regex": "[a-f]{4,8}z"}));
    let text = text_of(&v);
    assert!(
        text.ends_with('z')
            && text[..text.len() - 1]
                .bytes()
                .all(|b| (b'a'..=b'f').contains(&b)),
        "{text:?}"
    );
    let v = post(
        "/v1/completions",
        json!({"guided_choice": ["left", "right"], "n": 2, "temperature": 1.0, "seed": 2}),
    );
    for c in v["choices"].as_array().unwrap() {
        assert!(
            ["left", "right"].contains(&c["text"].as_str().unwrap()),
            "{v}"
        );
    }
    // ...and their newer name.
    let v = post(
        "/v1/completions",
        json!({"structured_outputs": {"choice": ["up", "down"]}, "n": 2, "temperature": 1.0, "seed": 3}),
    );
    for c in v["choices"].as_array().unwrap() {
        assert!(["up", "down"].contains(&c["text"].as_str().unwrap()), "{v}");
    }
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": schema}}]);
    // Bad grammars, and grammars that cannot go together.
    let msgs = json!([{"role": "user", "content": "x"}]);
    for (body, field) in [
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}}),
            "response_format",
        ),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs.regex",
        ),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
        ),
        (
            json!({"guided_regex": "a+", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
    ] {
        let mut b = body.clone();
        b["messages"] = msgs.clone();
        let r = s.post_json("/v1/chat/completions", &b);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], field, "{body}: {}", r.text());
    }
    // Grammars that compile and then fail are the request's fault too: a 400 naming the field,
    // not a server error. One allows no first token (found before the generation starts), one
    // exceeds llguidance's limits while generating.
    for (body, field, says) in [
        (
            json!({"guided_json": {"$ref": "#"}}),
            "guided_json",
            "allows no first token",
        ),
        (
            json!({"guided_regex": "a{1000}{1000}{1000}"}),
            "guided_regex",
            "the grammar failed",
        ),
    ] {
        let mut b = body.clone();
        b["messages"] = msgs.clone();
        let r = s.post_json("/v1/chat/completions", &b);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], field, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
    // The server is fine after all that.
    assert!(fits(&text_of(&post("/v1/chat/completions", rf))));
}

/// Events of a streamed Responses reply: each block's `event:` line and its data, checked to
/// agree.
fn response_events(raw: &str) -> Vec<Value> {
    raw.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let kind = b.lines().find_map(|l| l.strip_prefix("event: "));
            let data = b.lines().find_map(|l| l.strip_prefix("data: "));
            let v: Value = serde_json::from_str(data.unwrap_or_else(|| panic!("{b:?}"))).unwrap();
            assert_eq!(kind, v["type"].as_str(), "{b}");
            v
        })
        .collect()
}

#[test]
fn the_responses_api_runs_as_chat() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let chat = |messages: Value, extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/chat/completions",
            &merged(
                json!({"messages": messages, "max_tokens": 12, "temperature": 0}),
                &extra,
            ),
        )
    };
    let respond = |body: Value| -> Value {
        let r = s.post_json("/v1/responses", &body);
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        r.json()
    };
    let output_text = |r: &Value| -> String {
        r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["type"] == "message")
            .flat_map(|o| o["content"].as_array().unwrap())
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    // The same greedy text as the chat request it translates to.
    let want = chat(
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]),
        json!({}),
    );
    let r = respond(json!({"instructions": "Be brief.", "input": "Hello there",
                           "max_output_tokens": 12, "temperature": 0}));
    assert_eq!(r["object"], "response");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(output_text(&r), text_of(&want));
    assert_eq!(
        r["usage"]["input_tokens"], want["usage"]["prompt_tokens"],
        "{r}"
    );
    assert_eq!(
        r["usage"]["output_tokens"],
        want["usage"]["completion_tokens"]
    );
    let finish = want["choices"][0]["finish_reason"].as_str().unwrap();
    let (status, reason) = if finish == "length" {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    assert_eq!(r["status"], status);
    assert_eq!(r["incomplete_details"], reason);
    // A developer message is a system message; input items in parts.
    let r2 = respond(json!({"input": [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                            {"type": "input_text", "text": "there"}]}],
        "max_output_tokens": 12, "temperature": 0}));
    assert_eq!(output_text(&r2), text_of(&want));
    // Streamed: the typed events carry the same text and end with the whole response.
    let raw = s
        .request(
            "POST",
            "/v1/responses",
            &[("Content-Type", "application/json")],
            json!({"instructions": "Be brief.", "input": "Hello there", "stream": true,
                   "max_output_tokens": 12, "temperature": 0})
            .to_string()
            .as_bytes(),
        )
        .text();
    let events = response_events(&raw);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert_eq!(*kinds.last().unwrap(), format!("response.{status}"));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text_of(&want));
    let last = &events.last().unwrap()["response"];
    assert_eq!(output_text(last), deltas);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    // Logprobs (`include`, `top_logprobs`): the chat request's entries, whole and streamed.
    let want = chat(
        json!([{"role": "user", "content": "Hello there"}]),
        json!({"logprobs": true, "top_logprobs": 2}),
    );
    let want_lp = &want["choices"][0]["logprobs"]["content"];
    assert_eq!(want_lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let lp_req = json!({"input": "Hello there", "max_output_tokens": 12, "temperature": 0,
        "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
        "top_logprobs": 2});
    let r = respond(lp_req.clone());
    assert_eq!(&r["output"][0]["content"][0]["logprobs"], want_lp);
    let mut streamed = lp_req.clone();
    streamed["stream"] = json!(true);
    let events = response_events(
        &s.request(
            "POST",
            "/v1/responses",
            &[],
            streamed.to_string().as_bytes(),
        )
        .text(),
    );
    let deltas: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .flat_map(|e| e["logprobs"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&Value::Array(deltas), want_lp);
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_text.done")
        .unwrap();
    assert_eq!(&done["logprobs"], want_lp);
    // Without them, none.
    assert_eq!(
        respond(json!({"input": "Hello there", "max_output_tokens": 3}))["output"][0]["content"][0]
            ["logprobs"],
        json!([])
    );
    // Continuing a stored response reads the conversation so far (the earlier instructions
    // are not carried over, as OpenAI's API has it).
    let first = respond(json!({"input": "Hello there", "max_output_tokens": 8, "temperature": 0}));
    let next = respond(
        json!({"input": "And then?", "previous_response_id": first["id"],
                              "max_output_tokens": 8, "temperature": 0}),
    );
    assert_eq!(next["previous_response_id"], first["id"]);
    let want = chat(
        json!([{"role": "user", "content": "Hello there"},
               {"role": "assistant", "content": output_text(&first)},
               {"role": "user", "content": "And then?"}]),
        json!({"max_tokens": 8}),
    );
    assert_eq!(output_text(&next), text_of(&want));
    // The continuation's prompt starts with the first exchange: read from the prompt cache.
    assert!(
        next["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{next}"
    );
    // Stored responses: retrieve, delete; `store: false` keeps none.
    let id = first["id"].as_str().unwrap();
    let got = s.get(&format!("/v1/responses/{id}"));
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["output"], first["output"]);
    let r = s.request("DELETE", &format!("/v1/responses/{id}"), &[], b"");
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(s.get(&format!("/v1/responses/{id}")).status, 404);
    let r = s.post_json(
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": id, "max_output_tokens": 2}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["param"], "previous_response_id");
    let unstored = respond(json!({"input": "x", "store": false, "max_output_tokens": 2}));
    assert_eq!(
        s.get(&format!(
            "/v1/responses/{}",
            unstored["id"].as_str().unwrap()
        ))
        .status,
        404
    );
    // A JSON schema in `text.format` holds the output to it.
    // (Bounded: the random model writes digits forever otherwise.)
    let schema = json!({"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": false});
    let r = respond(
        json!({"input": "JSON please", "max_output_tokens": 60, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": true}}}),
    );
    let v: Value = serde_json::from_str(&output_text(&r)).unwrap_or_else(|e| panic!("{e}: {r}"));
    assert!(
        v["n"].as_u64().is_some_and(|n| n <= 99) && v["ok"].is_boolean(),
        "{v}"
    );
    assert_eq!(r["status"], "completed");
    // Bad requests name the Responses field.
    for (body, param) in [
        (json!({}), "input"),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"input": "x", "max_tokens": 5}), "max_tokens"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "nope"}}}}),
            "text.format",
        ),
        (json!({"input": "x", "model": "gpt-5"}), "model"),
        // This tiny model's template has no tools (the real Qwen's test below has).
        (
            json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}),
            "tools",
        ),
    ] {
        let r = s.post_json("/v1/responses", &body);
        assert!(r.status == 400 || r.status == 404, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text());
    }
    let r = s.request("PUT", "/v1/responses", &[], b"{}");
    assert_eq!(r.status, 405);
}

/// Anthropic's Messages API on the tiny models: the chat request it stands for gives the same
/// text, usage and stop, whole and streamed as the API's events; a final assistant message is
/// continued (the prompt is the conversation cut after its text); count_tokens; a JSON schema
/// in `output_config`; errors in the API's shape naming the field.
#[test]
fn the_messages_api_runs_as_chat() {
    let (dir, t, d) = q8_models(1024);
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(&["--model", &t, "--draft", &d], Some(dir), &log_dir);
    let post = |path: &str, body: &Value| -> Value {
        let r = s.post_json(path, body);
        assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
        r.json()
    };
    let message_text = |m: &Value| -> String {
        m["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "text")
            .map(|b| b["text"].as_str().unwrap().to_string())
            .collect()
    };
    let conversation = json!([{"role": "user", "content": "Hello there"}]);
    let want = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                "max_tokens": 12, "temperature": 0}),
    );
    let body = json!({"model": "tiny-target", "system": [{"type": "text", "text": "Be brief."}],
                      "messages": conversation, "max_tokens": 12, "temperature": 0});
    let m = post("/v1/messages", &body);
    assert_eq!(
        (m["type"].as_str(), m["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(message_text(&m), text_of(&want));
    let reason = match want["choices"][0]["finish_reason"].as_str().unwrap() {
        "length" => "max_tokens",
        _ => "end_turn",
    };
    assert_eq!(m["stop_reason"], reason, "{m}");
    assert_eq!(m["stop_sequence"], Value::Null);
    let u = &m["usage"];
    assert_eq!(u["output_tokens"], want["usage"]["completion_tokens"]);
    // The chat request left the prompt in the cache; reads count apart.
    assert!(u["cache_read_input_tokens"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap(),
        want["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(m["speculation"]["drafter"], "model");
    // count_tokens: the same prompt's length.
    let n = post("/v1/messages/count_tokens", &body);
    assert_eq!(n, json!({"input_tokens": want["usage"]["prompt_tokens"]}));

    // Streamed: the API's events, named in `event:` lines, carry the same text and usage.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = response_events(
        &s.request("POST", "/v1/messages", &[], streamed.to_string().as_bytes())
            .text(),
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[..3],
        ["message_start", "ping", "content_block_start"],
        "{kinds:?}"
    );
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert_eq!(
        events[0]["message"]["usage"]["input_tokens"],
        want["usage"]["prompt_tokens"]
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!(e["index"], 0);
            e["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, text_of(&want));
    let delta = &events[events.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], reason);
    assert_eq!(delta["usage"]["output_tokens"], u["output_tokens"]);

    // A stop sequence from the text ends it there and is named (chat names it too, as vLLM's
    // `stop_reason`).
    let long = post(
        "/v1/messages",
        &json!({"messages": conversation, "max_tokens": 40, "temperature": 0}),
    );
    let full = message_text(&long);
    let chars: Vec<char> = full.chars().collect();
    let stop: String = (3..chars.len().saturating_sub(2))
        .map(|i| chars[i..i + 2].iter().collect::<String>())
        .find(|w: &String| w.trim() == w)
        .unwrap_or_else(|| panic!("no stop sequence in {full:?}"));
    let cut = post(
        "/v1/messages",
        &json!({"messages": conversation, "max_tokens": 40, "temperature": 0, "stop_sequences": [stop]}),
    );
    assert_eq!(cut["stop_reason"], "stop_sequence", "{cut}");
    assert_eq!(cut["stop_sequence"], stop.as_str());
    assert_eq!(message_text(&cut), full[..full.find(&stop).unwrap()]);
    let chat_cut = post(
        "/v1/chat/completions",
        &json!({"messages": conversation, "max_tokens": 40, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(chat_cut["choices"][0]["stop_reason"], stop.as_str());
    assert_eq!(text_of(&chat_cut), message_text(&cut));
    assert_eq!(want["choices"][0]["stop_reason"], Value::Null);

    // A final assistant message is continued: the prompt is the conversation cut right after
    // its text, and the reply is what a completion of that prompt writes.
    let prefilled = json!([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Sure"}]);
    let ids = post(
        "/tokenize",
        &json!({"messages": prefilled, "continue_final_message": true}),
    )["tokens"]
        .clone();
    let prompt = post("/detokenize", &json!({"tokens": ids}))["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let fresh = post(
        "/detokenize",
        &json!({"tokens": post("/tokenize", &json!({"messages": conversation}))["tokens"]}),
    )["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(prompt, format!("{fresh}Sure"), "the continued prompt");
    let completion = post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 12, "temperature": 0}),
    );
    let m = post(
        "/v1/messages",
        &json!({"messages": prefilled, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(message_text(&m), text_of(&completion));
    assert_eq!(
        post("/v1/messages/count_tokens", &json!({"messages": prefilled}))["input_tokens"],
        ids.as_array().unwrap().len()
    );
    // The chat route takes vLLM's field for the same.
    let c = post(
        "/v1/chat/completions",
        &json!({"messages": prefilled, "continue_final_message": true, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(text_of(&c), text_of(&completion));

    // A JSON schema in `output_config.format` holds the output to it.
    let schema = json!({"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"], "additionalProperties": false});
    let r = post(
        "/v1/messages",
        &json!({"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 60, "temperature": 0,
                "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
    );
    let v: Value = serde_json::from_str(&message_text(&r)).unwrap_or_else(|e| panic!("{e}: {r}"));
    assert!(
        v["n"].as_u64().is_some_and(|n| n <= 99) && v["ok"].is_boolean(),
        "{v}"
    );

    // Errors: the API's shape, the field named.
    let user = json!([{"role": "user", "content": "x"}]);
    for (path, body, status, kind, field) in [
        (
            "/v1/messages",
            json!({"max_tokens": 4}),
            400,
            "invalid_request_error",
            "messages",
        ),
        // Anthropic's API requires it; count_tokens (below, without it) does not.
        (
            "/v1/messages",
            json!({"messages": user}),
            400,
            "invalid_request_error",
            "max_tokens is required",
        ),
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 0}),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 4, "stop": ["a"]}),
            400,
            "invalid_request_error",
            "stop_sequences",
        ),
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 4, "temperature": 3}),
            400,
            "invalid_request_error",
            "temperature",
        ),
        (
            "/v1/messages",
            json!({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            400,
            "invalid_request_error",
            "messages[0].content[0].type",
        ),
        // This tiny model's template has no tools (the real Qwen's test below has).
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 4, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}),
            400,
            "invalid_request_error",
            "tools",
        ),
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 4, "model": "claude-opus-4-5"}),
            404,
            "not_found_error",
            "claude-opus-4-5",
        ),
        (
            "/v1/messages",
            json!({"messages": user, "max_tokens": 4, "policy": "nope"}),
            400,
            "invalid_request_error",
            "nope",
        ),
        (
            "/v1/messages/count_tokens",
            json!({"messages": 1}),
            400,
            "invalid_request_error",
            "messages",
        ),
        (
            "/v1/messages/count_tokens",
            json!({"messages": user, "model": "gpt-5"}),
            404,
            "not_found_error",
            "gpt-5",
        ),
    ] {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, status, "{path} {body}: {}", r.text());
        let e = r.json();
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["type"], kind, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {e}"
        );
    }
    let r = s.request("GET", "/v1/messages", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = s.request("POST", "/v1/messages", &[], b"{not json");
    assert_eq!((r.status, r.json()["type"].as_str()), (400, Some("error")));
}

#[test]
fn api_keys_guard_every_route_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "old-key\nnew-key\n").unwrap();
    let admin = dir.path().join("admin");
    std::fs::write(&admin, "root\n").unwrap();
    let (k, a) = (keys.display().to_string(), admin.display().to_string());
    let s = tiny_server(
        256,
        &[
            "--api-key-file",
            &k,
            "--admin-token-file",
            &a,
            "--served-model-name",
            "team/tiny",
        ],
    );
    let call = |method: &str, path: &str, key: Option<&str>, body: &[u8]| {
        let h = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(h) = &h {
            headers.push(("Authorization", h.as_str()));
        }
        s.request(method, path, &headers, body)
    };
    // Probes, metrics and the version stay open.
    for path in ["/health", "/ready", "/metrics", "/version"] {
        assert_eq!(s.get(path).status, 200, "{path}");
    }
    assert_eq!(
        s.get("/version").json()["version"],
        env!("CARGO_PKG_VERSION")
    );
    // A client's request id comes back, on answers and on refusals alike.
    for key in [None, Some("new-key")] {
        let mut headers = vec![
            ("X-Request-Id", "req-42"),
            ("Content-Type", "application/json"),
        ];
        let bearer = key.map(|k| format!("Bearer {k}"));
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        let r = s.request("GET", "/v1/models", &headers, b"");
        assert_eq!(r.status, if key.is_some() { 200 } else { 401 });
        assert_eq!(r.header("x-request-id"), Some("req-42"), "{key:?}");
    }
    assert_eq!(s.get("/health").header("x-request-id"), None);
    let chat = json!({"model": "team/tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3})
    .to_string();
    let completion = json!({"prompt": "abc", "max_tokens": 3}).to_string();
    let responses = json!({"input": "hi", "max_output_tokens": 3}).to_string();
    let messages =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).to_string();
    let routes: [(&str, &str, &[u8]); 10] = [
        ("GET", "/v1/models", b""),
        ("GET", "/v1/models/team%2Ftiny", b""),
        ("POST", "/v1/chat/completions", chat.as_bytes()),
        ("POST", "/v1/completions", completion.as_bytes()),
        ("POST", "/v1/responses", responses.as_bytes()),
        ("POST", "/v1/messages", messages.as_bytes()),
        ("POST", "/v1/messages/count_tokens", messages.as_bytes()),
        ("POST", "/tokenize", br#"{"prompt": "abc"}"#),
        ("POST", "/detokenize", br#"{"tokens": [40, 41]}"#),
        ("GET", "/v1/policies", b""),
    ];
    for (m, path, body) in routes {
        let r = call(m, path, None, body);
        assert_eq!(r.status, 401, "{m} {path}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        // Anthropic's routes answer in their API's error shape.
        if path.starts_with("/v1/messages") {
            assert_eq!(r.json()["type"], "error");
            assert_eq!(r.json()["error"]["type"], "authentication_error");
        } else {
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("API key")
        );
        // The key may come as `x-api-key` (Anthropic's clients send it so).
        for (key, status) in [("new-key", 200), ("new-ke", 401), ("root", 401)] {
            let headers = [("Content-Type", "application/json"), ("x-api-key", key)];
            let r = s.request(m, path, &headers, body);
            assert_eq!(r.status, status, "{m} {path} x-api-key {key}: {}", r.text());
        }
        assert_eq!(
            call(m, path, Some("new-ke"), body).status,
            401,
            "{m} {path}"
        );
        assert_eq!(call(m, path, Some("root"), body).status, 401, "{m} {path}");
        for key in ["old-key", "new-key"] {
            let r = call(m, path, Some(key), body);
            assert_eq!(r.status, 200, "{m} {path} {key}: {}", r.text());
        }
    }
    // The served name is the model's id.
    let models = call("GET", "/v1/models", Some("old-key"), b"").json();
    assert_eq!(models["data"][0]["id"], "team/tiny");
    let other = json!({"model": "tiny-target", "prompt": "a", "max_tokens": 1}).to_string();
    assert_eq!(
        call("POST", "/v1/completions", Some("old-key"), other.as_bytes()).status,
        404
    );
    // Admin routes take the admin token, not an API key.
    let wasm = verdict::decide::builtin_wasm("threshold").expect("built-in threshold");
    assert_eq!(
        call("PUT", "/v1/policies/mine", Some("old-key"), wasm).status,
        401
    );
    assert_eq!(
        call("PUT", "/v1/policies/mine", Some("root"), wasm).status,
        201
    );
    assert_eq!(
        call("DELETE", "/v1/policies/mine", Some("root"), b"").status,
        200
    );
    assert!(s.metric("verdict_requests_total{route=\"unauthorized\",status=\"401\"}") >= 50.0);
    drop(s);

    // One key from the command line, no admin token: the key guards the admin routes too.
    let s = tiny_server(256, &["--api-key", "only"]);
    let call = |method: &str, path: &str, key: Option<&str>, body: &[u8]| {
        let h = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = h.iter().map(|h| ("Authorization", h.as_str())).collect();
        s.request(method, path, &headers, body)
    };
    assert_eq!(call("PUT", "/v1/policies/mine", None, wasm).status, 401);
    assert_eq!(
        call("PUT", "/v1/policies/mine", Some("only"), wasm).status,
        201
    );
    assert_eq!(call("GET", "/v1/models", Some("only"), b"").status, 200);
    // Blank keys and empty key files are refused at start.
    for args in [vec!["--api-key", " "], vec!["--api-key-file", "/dev/null"]] {
        let err = serve_fails(std::path::Path::new("/nonexistent.gguf"), &args);
        assert!(err.contains(args[0]), "{args:?}: {err}");
    }
}

#[test]
fn qwen_calls_a_tool_through_the_responses_api() {
    let s = real_server("qwen2.5-coder-0.5b.gguf");
    let respond = |body: Value| -> Value {
        let r = s.post_json("/v1/responses", &body);
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        r.json()
    };
    // A forced tool call is a function_call item, whole and streamed, and its output goes
    // back as the next input.
    let tools = json!([{"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
                       "required": ["zone"], "additionalProperties": false}}]);
    let call_req = json!({"input": "What time is it in Berlin?", "tools": tools, "tool_choice": "required",
                          "max_output_tokens": 60, "temperature": 0});
    let r = respond(call_req.clone());
    let out = r["output"].as_array().unwrap();
    assert_eq!(out.len(), 1, "{r}");
    assert_eq!(out[0]["type"], "function_call");
    assert_eq!(out[0]["name"], "get_time");
    let args: Value = serde_json::from_str(out[0]["arguments"].as_str().unwrap()).unwrap();
    assert!(
        ["utc", "cet"].contains(&args["zone"].as_str().unwrap()),
        "{args}"
    );
    let mut streamed = call_req.clone();
    streamed["stream"] = json!(true);
    let raw = s
        .request(
            "POST",
            "/v1/responses",
            &[],
            streamed.to_string().as_bytes(),
        )
        .text();
    let events = response_events(&raw);
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["output"][0]["name"], "get_time");
    assert_eq!(
        done["response"]["output"][0]["arguments"],
        out[0]["arguments"]
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "response.function_call_arguments.done"
                && e["arguments"] == out[0]["arguments"])
    );
    // The call's output goes back as the next input; the model answers from it.
    let back = respond(
        json!({"previous_response_id": r["id"], "tools": tools, "tool_choice": "none",
        "input": [{"type": "function_call_output", "call_id": out[0]["call_id"], "output": "12:34"}],
        "max_output_tokens": 30, "temperature": 0}),
    );
    assert_eq!(back["output"][0]["type"], "message", "{back}");
    let text = back["output"][0]["content"][0]["text"].as_str().unwrap();
    // (Only the call's output says 12:34.)
    assert!(text.contains("12:34"), "{text:?}");
    assert_eq!(back["previous_response_id"], r["id"]);
}

#[test]
fn qwen_calls_a_tool_through_the_messages_api() {
    let s = real_server("qwen2.5-coder-0.5b.gguf");
    let post = |body: &Value| -> Value {
        let r = s.post_json("/v1/messages", body);
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        r.json()
    };
    let tools = json!([{"name": "get_time", "description": "The time in a zone.",
        "input_schema": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}},
                         "required": ["zone"], "additionalProperties": false}}]);
    let ask = json!({"role": "user", "content": "What time is it in Berlin?"});
    // A forced call is a tool_use block, whole and streamed.
    let call_req = json!({"messages": [ask], "tools": tools, "tool_choice": {"type": "any"},
                          "max_tokens": 60, "temperature": 0});
    let m = post(&call_req);
    assert_eq!(m["stop_reason"], "tool_use", "{m}");
    let uses: Vec<&Value> = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .collect();
    assert_eq!(uses.len(), 1, "{m}");
    assert_eq!(uses[0]["name"], "get_time");
    assert!(
        ["utc", "cet"].contains(&uses[0]["input"]["zone"].as_str().unwrap()),
        "{m}"
    );
    let mut streamed = call_req.clone();
    streamed["stream"] = json!(true);
    let events = response_events(
        &s.request("POST", "/v1/messages", &[], streamed.to_string().as_bytes())
            .text(),
    );
    let start = events
        .iter()
        .find(|e| e["type"] == "content_block_start" && e["content_block"]["type"] == "tool_use")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(start["content_block"]["name"], "get_time");
    let json_text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta" && e["delta"]["type"] == "input_json_delta")
        .map(|e| e["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        uses[0]["input"]
    );
    assert_eq!(events[events.len() - 2]["delta"]["stop_reason"], "tool_use");
    // Its result goes back in a user turn; the model answers from it.
    let back = post(
        &json!({"tools": tools, "tool_choice": {"type": "none"}, "max_tokens": 30, "temperature": 0,
        "messages": [ask, {"role": "assistant", "content": m["content"]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0]["id"], "content": "12:34"}]}]}),
    );
    assert_eq!(back["content"][0]["type"], "text", "{back}");
    let text = back["content"][0]["text"].as_str().unwrap();
    // (Only the tool's result says 12:34.)
    assert!(text.contains("12:34"), "{text:?}");
}

/// A streamed chat reply's `reasoning_content` and `content`, each joined over its deltas;
/// no delta may hold `tag` (a reasoning parser's markers).
fn streamed_parts(events: &[String], tag: &str) -> (String, String) {
    let (mut thought, mut answer) = (String::new(), String::new());
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let d = &c["choices"][0]["delta"];
        thought.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        answer.push_str(d["content"].as_str().unwrap_or(""));
        assert!(
            !d.to_string().contains(tag),
            "{tag} leaked into a delta: {e}"
        );
    }
    (thought, answer)
}

/// `--reasoning-parser gpt-oss`: a harmony reply's `analysis` message comes back as
/// `reasoning_content`, its `final` one as `content`, and a message to a function as a tool
/// call, whole or streamed; no header reaches the client. (The tiny vocabulary spells the
/// markers in bytes; the parser reads text. `--chat-template` gives the tiny model a template
/// that lists tools.)
#[test]
fn harmony_reasoning_is_apart_from_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("tools.jinja");
    std::fs::write(
        &template,
        "{% if reasoning_effort %}Reasoning: {{ reasoning_effort }}\n{% endif %}\
         {% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let template = template.display().to_string();
    let s = tiny_server(
        1024,
        &[
            "--reasoning-parser",
            "gpt-oss",
            "--chat-template",
            &template,
        ],
    );
    let ask = |stream: bool| {
        json!({
            "messages": [{"role": "user", "content": "think first"}], "max_tokens": 200,
            "temperature": 0, "stream": stream,
            "guided_regex": r"<\|channel\|>analysis<\|message\|>[a-z]{3,12}<\|end\|><\|start\|>assistant<\|channel\|>final<\|message\|>[a-z]{2,8}",
        })
    };
    let r = s.post_json("/v1/chat/completions", &ask(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let m = &v["choices"][0]["message"];
    let thought = m["reasoning_content"].as_str().expect("reasoning_content");
    let answer = m["content"].as_str().expect("content");
    let lower = |t: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&t.len()) && t.chars().all(|c| c.is_ascii_lowercase())
    };
    assert!(lower(thought, 3..=12) && lower(answer, 2..=8), "{m}");
    let events = s.open_stream("/v1/chat/completions", &ask(true)).collect();
    assert_eq!(
        streamed_parts(&events, "<|"),
        (thought.into(), answer.into())
    );
    // A message to a function is a tool call, whole or streamed.
    let call = |stream: bool| {
        json!({
            "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 200,
            "temperature": 0, "stream": stream,
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "guided_regex": r#"<\|channel\|>analysis<\|message\|>[a-z]{3,12}<\|end\|><\|start\|>assistant<\|channel\|>commentary to=functions\.get_weather <\|constrain\|>json<\|message\|>\{"city": "[a-z]{2,8}"\}"#,
        })
    };
    let v = s.post_json("/v1/chat/completions", &call(false)).json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let m = &c["message"];
    assert!(
        m["reasoning_content"]
            .as_str()
            .is_some_and(|t| lower(t, 3..=12)),
        "{m}"
    );
    assert!(m["content"].is_null(), "{m}");
    let f = &m["tool_calls"][0]["function"];
    assert_eq!(f["name"], "get_weather", "{m}");
    let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    assert!(
        args["city"].as_str().is_some_and(|c| lower(c, 2..=8)),
        "{m}"
    );
    let events = s.open_stream("/v1/chat/completions", &call(true)).collect();
    let (mut names, mut finish) = (Vec::new(), None);
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        for t in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            names.push(t["function"]["name"].clone());
        }
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
        assert!(!ch.to_string().contains("<|"), "a marker leaked: {e}");
    }
    assert_eq!(names, vec![json!("get_weather")]);
    assert_eq!(finish, Some(json!("tool_calls")));
    // A forced call (`tool_choice` required, or naming a tool) is a harmony call message too,
    // its arguments matching the tool's schema.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
            "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
            "additionalProperties": false}}},
    ]);
    for (choice, names) in [
        (json!("required"), vec!["get_weather", "get_time"]),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            vec!["get_time"],
        ),
    ] {
        let v = s
            .post_json(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 200,
                        "temperature": 0, "tools": tools, "tool_choice": choice}),
            )
            .json();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{choice}: {v}");
        let f = &c["message"]["tool_calls"][0]["function"];
        let name = f["name"].as_str().unwrap_or_default();
        assert!(names.contains(&name), "{choice}: {v}");
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        let key = if name == "get_time" { "zone" } else { "city" };
        assert!(args[key].is_string(), "{choice}: {v}");
        assert!(!v.to_string().contains("<|"), "a marker leaked: {v}");
    }
    // OpenAI's `reasoning_effort` reaches the template (gpt-oss's `Reasoning: high` line).
    let prompt_tokens = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let v = s.post_json("/v1/chat/completions", &body).json();
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let line = s
        .post_json("/tokenize", &json!({"prompt": "Reasoning: high\n"}))
        .json()["count"]
        .as_u64()
        .unwrap();
    assert_eq!(
        prompt_tokens(json!({"reasoning_effort": "high"})),
        prompt_tokens(json!({})) + line
    );
    drop(s);
    // A template file that is missing, or does not compile, stops the server at start.
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}").unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    for (file, needle) in [
        (
            dir.path().join("missing.jinja"),
            "reading the chat template",
        ),
        (broken, "does not compile"),
    ] {
        let err = serve_fails(&target, &["--chat-template", &file.display().to_string()]);
        assert!(
            err.contains(&file.display().to_string()) && err.contains(needle),
            "{err}"
        );
    }
}

/// `--kv-cache-dtype f16`: the models keep half-precision caches (the log says so, with the
/// bytes per position), and strict speculation still answers with the target's own greedy text,
/// whichever the drafter, and again when the prompt cache hands the prompt's positions on.
#[test]
fn a_half_precision_kv_cache_serves_the_same_greedy_text_speculating_or_not() {
    let s = tiny_server(256, &["--kv-cache-dtype", "f16"]);
    let ask = |speculation: Value| {
        let r = s.post_json(
            "/v1/completions",
            &json!({"prompt": "the cat sat on", "max_tokens": 24, "temperature": 0,
                    "ignore_eos": true, "speculation": speculation}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        text_of(&r.json())
    };
    let plain = ask(json!("off"));
    assert_eq!(ask(json!({"draft": "model", "k": 3})), plain);
    assert_eq!(ask(json!({"draft": "prompt-lookup", "k": 4})), plain);
    assert_eq!(ask(json!("off")), plain);
    let log = s.log_text();
    assert!(
        log.contains("target: KV cache of f16, 0.2 KiB per position")
            && log.contains("draft: KV cache of f16"),
        "{log}"
    );
}

/// `--max-model-len 48`: `/v1/models` reports it, a request asking past it is refused naming
/// `max_tokens` (`context_length_exceeded`), one within it runs; a cap past the model's own
/// context stops the server at start, naming the flag and the model's context.
#[test]
fn a_context_cap_bounds_requests() {
    let s = tiny_server(256, &["--max-model-len", "48"]);
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["max_model_len"], 48, "{models}");
    let ask = |max_tokens: u64| {
        s.post_json(
            "/v1/completions",
            &json!({"prompt": "the cat sat on", "max_tokens": max_tokens, "temperature": 0}),
        )
    };
    let r = ask(100);
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );
    assert_eq!(ask(8).status, 200);
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    let err = serve_fails(&target, &["--max-model-len", "1000"]);
    assert!(
        err.contains("--max-model-len") && err.contains("1..=256"),
        "{err}"
    );
}

/// `--reasoning-parser qwen3`: a chat reply's `<think>` block comes back as
/// `reasoning_content`, the rest as `content`, whole or streamed (the same split either way);
/// a reply without the block is all content. The tiny model is made to write the block by a
/// grammar.
#[test]
fn reasoning_is_apart_from_the_answer() {
    let s = tiny_server(1024, &["--reasoning-parser", "qwen3"]);
    let messages = json!([{"role": "user", "content": "think first"}]);
    let ask = |regex: &str, stream: bool| {
        json!({
            "messages": messages, "max_tokens": 64, "temperature": 0,
            "guided_regex": regex, "stream": stream, "logprobs": true,
        })
    };
    let thinking = "<think>[a-z]{3,12}</think>[a-z]{2,8}";
    let r = s.post_json("/v1/chat/completions", &ask(thinking, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let m = &v["choices"][0]["message"];
    let thought = m["reasoning_content"].as_str().expect("reasoning_content");
    let answer = m["content"].as_str().expect("content");
    assert!(
        (3..=12).contains(&thought.len()) && thought.chars().all(|c| c.is_ascii_lowercase()),
        "{m}"
    );
    assert!(
        (2..=8).contains(&answer.len()) && answer.chars().all(|c| c.is_ascii_lowercase()),
        "{m}"
    );
    // The logprobs still cover every token, the tags' too.
    let lp: String = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(lp, format!("<think>{thought}</think>{answer}"));

    let events = s
        .open_stream("/v1/chat/completions", &ask(thinking, true))
        .collect();
    assert_eq!(
        streamed_parts(&events, "think>"),
        (thought.into(), answer.into())
    );

    // Anthropic's Messages API: a thinking block, then the answer's text block.
    let r = s.post_json(
        "/v1/messages",
        &json!({"messages": messages, "max_tokens": 64, "temperature": 0,
                "guided_regex": thinking}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c = &r.json()["content"];
    assert_eq!(c[0]["type"], "thinking", "{c}");
    assert_eq!(c[0]["thinking"], thought);
    assert_eq!(c[1], json!({"type": "text", "text": answer}));
    // Anthropic's `thinking` switch reaches the template as Qwen3's `enable_thinking` (the tiny
    // template then closes an empty block in the prompt).
    let count = |thinking: Value| {
        s.post_json(
            "/v1/messages/count_tokens",
            &json!({"messages": messages, "thinking": thinking}),
        )
        .json()["input_tokens"]
            .as_u64()
            .unwrap()
    };
    let block = s
        .post_json("/tokenize", &json!({"prompt": "<think>\n\n</think>\n\n"}))
        .json()["count"]
        .as_u64()
        .unwrap();
    assert_eq!(
        count(json!({"type": "disabled"})),
        count(Value::Null) + block
    );
    // A template that opens the block for the model (thinking on, here): the reply starts
    // inside it, so what comes before `</think>` is thinking though the model wrote no `<think>`.
    let v = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 64, "temperature": 0,
                    "guided_regex": "[a-z]{3,12}</think>[a-z]{2,8}",
                    "chat_template_kwargs": {"enable_thinking": true}}),
        )
        .json();
    let m = &v["choices"][0]["message"];
    let (t, a) = (m["reasoning_content"].as_str(), m["content"].as_str());
    assert!(t.is_some_and(|t| t.len() >= 3 && !t.contains('<')), "{m}");
    assert!(a.is_some_and(|a| a.len() >= 2 && !a.contains('<')), "{m}");
    // OpenAI's Responses API: a reasoning item, then the message.
    let r = s.post_json(
        "/v1/responses",
        &json!({"input": "think first", "max_output_tokens": 64, "temperature": 0,
                "guided_regex": thinking}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = &r.json()["output"];
    assert_eq!(out[0]["type"], "reasoning", "{out}");
    assert_eq!(out[1]["type"], "message", "{out}");
    let (t, a) = (&out[0]["content"][0]["text"], &out[1]["content"][0]["text"]);
    assert!(
        t.as_str().unwrap().chars().all(|c| c.is_ascii_lowercase()),
        "{out}"
    );
    assert!(
        a.as_str().unwrap().chars().all(|c| c.is_ascii_lowercase()),
        "{out}"
    );

    // No block: all content, and reasoning_content is null.
    let v = s
        .post_json("/v1/chat/completions", &ask("[a-z]{2,8}", false))
        .json();
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning_content"].is_null(), "{m}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{m}");
    // Completions are text: nothing is split there.
    let v = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "a", "max_tokens": 64, "temperature": 0, "guided_regex": thinking}),
        )
        .json();
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("<think>"),
        "{v}"
    );
}

/// `/v1/embeddings`: one vector per input, the same for a text however it is sent (string,
/// list, token ids), floats or base64 of their bytes, cut to `dimensions`; the pooling follows
/// `--pooling`; bad input names the field.
#[test]
fn embeddings_endpoint() {
    use base64::Engine as _;
    let s = tiny_server(64, &[]);
    let vector = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    // Texts of one request run batched: f32 kernels round a batch's rows a little differently.
    let close = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    };
    let r = s.post_json("/v1/embeddings", &json!({"input": "hello there"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let one = r.json();
    assert_eq!(one["object"], "list");
    assert_eq!(one["data"][0]["object"], "embedding");
    assert_eq!(one["data"][0]["index"], 0);
    let hello = vector(&one["data"][0]["embedding"]);
    assert_eq!(hello.len(), 64, "the tiny model's hidden size");
    assert!((norm(&hello) - 1.0).abs() < 1e-5);
    let ids = s
        .post_json("/tokenize", &json!({"prompt": "hello there"}))
        .json()["tokens"]
        .clone();
    assert_eq!(one["usage"]["prompt_tokens"], ids.as_array().unwrap().len());
    assert_eq!(
        s.metric("verdict_embedded_tokens_total"),
        ids.as_array().unwrap().len() as f64
    );
    assert_eq!(one["usage"]["total_tokens"], one["usage"]["prompt_tokens"]);
    // A list of texts, and the same text as token ids.
    let two = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": ["the end", "hello there"], "model": "tiny-target"}),
        )
        .json();
    assert_eq!(two["data"][1]["index"], 1);
    assert!(close(&vector(&two["data"][1]["embedding"]), &hello));
    assert!(!close(&vector(&two["data"][0]["embedding"]), &hello));
    let by_ids = s.post_json("/v1/embeddings", &json!({"input": ids})).json();
    assert_eq!(vector(&by_ids["data"][0]["embedding"]), hello);
    let nested = s
        .post_json("/v1/embeddings", &json!({"input": [ids, [5, 6]]}))
        .json();
    assert!(close(&vector(&nested["data"][0]["embedding"]), &hello));
    // base64: the little-endian bytes of the same floats.
    let b = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": "hello there", "encoding_format": "base64"}),
        )
        .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(floats, hello);
    // `dimensions` keeps the leading values, at unit length again.
    let cut = s
        .post_json(
            "/v1/embeddings",
            &json!({"input": "hello there", "dimensions": 16}),
        )
        .json();
    let cut = vector(&cut["data"][0]["embedding"]);
    assert_eq!(cut.len(), 16);
    assert!((norm(&cut) - 1.0).abs() < 1e-5);
    let scale = norm(&hello[..16]);
    assert!(
        cut.iter()
            .zip(&hello)
            .all(|(c, h)| (c * scale - h).abs() < 1e-5)
    );
    let long: Vec<u32> = (0..65).map(|i| i % 200).collect();
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": ["a", ""]}), "input[1]"),
        (json!({"input": [[1, 2], []]}), "input[1]"),
        (json!({"input": [1, 99999]}), "input[1]"),
        (json!({"input": [[1], [2, 99999]]}), "input[1][1]"),
        (json!({"input": [true]}), "input"),
        (json!({"input": 5}), "input"),
        (json!({"input": long}), "input"),
        (
            json!({"input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": "a", "dimensions": 0}), "dimensions"),
        (json!({"input": "a", "dimensions": 65}), "dimensions"),
        (json!({"input": "a", "temperature": 1}), "temperature"),
        (json!({"input": "a", "model": "nope"}), "model"),
    ] {
        let r = s.post_json("/v1/embeddings", &body);
        assert!(r.status == 400 || r.status == 404, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text());
    }
    let r = s.post_json("/v1/embeddings", &json!({"input": long}));
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert_eq!(s.get("/v1/embeddings").status, 405);
    // Mean pooling gives another vector (llama.cpp's of each pooling: tests/models.rs).
    let mean = tiny_server(64, &["--pooling", "mean"]);
    let m = mean
        .post_json("/v1/embeddings", &json!({"input": "hello there"}))
        .json();
    let m = vector(&m["data"][0]["embedding"]);
    assert!((norm(&m) - 1.0).abs() < 1e-5);
    assert_ne!(m, hello);
    // A vocabulary that says `add_eos_token` (embedding models such as Qwen3-Embedding): the
    // text is read with EOS after it. (The SentencePiece tiny model's `add_bos_token` key,
    // renamed: BOS stays its default for that vocabulary, on.)
    let dir = tempfile::tempdir().unwrap();
    let spm = dir.path().join("spm.gguf");
    verdict::models::testing::write_tiny_gguf(
        &spm,
        &verdict::models::testing::peer_spec("llama-spm").unwrap(),
    )
    .unwrap();
    let mut bytes = std::fs::read(&spm).unwrap();
    let key = b"tokenizer.ggml.add_bos_token";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at..at + key.len()].copy_from_slice(b"tokenizer.ggml.add_eos_token");
    std::fs::write(&spm, bytes).unwrap();
    let log_dir = dir.path().to_path_buf();
    let eos = Server::start(&["--model", spm.to_str().unwrap()], Some(dir), &log_dir);
    let t = eos
        .post_json("/tokenize", &json!({"prompt": "the end"}))
        .json();
    let e = eos
        .post_json("/v1/embeddings", &json!({"input": "the end"}))
        .json();
    let n = t["count"].as_u64().unwrap();
    assert_eq!(e["usage"]["prompt_tokens"], n + 1, "{e}");
    // The same ids sent with EOS appended by the client embed the same.
    let mut with_eos = t["tokens"].as_array().unwrap().clone();
    with_eos.push(json!(2));
    let e2 = eos
        .post_json("/v1/embeddings", &json!({"input": with_eos}))
        .json();
    assert_eq!(e["data"][0]["embedding"], e2["data"][0]["embedding"]);
}

/// `serve --lora` / `--lora-scaled` adapt the target; `--lora-modules NAME=PATH` serves the
/// adapted model beside the base, chosen per request by `model` (vLLM's way): listed by
/// /v1/models, echoed in the response, the same tokens as a server adapted at start, with
/// speculation (the base draft proposes) as without. A missing or foreign adapter, or a bad
/// module spec, stops the server at start, naming it.
#[test]
fn serve_applies_lora_adapters() {
    use verdict::models::testing::{TinyLora, TinySpec, write_tiny_lora_gguf};
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter.gguf");
    write_tiny_lora_gguf(&adapter, &TinySpec::default(), &TinyLora::small(9)).unwrap();
    let a = adapter.display().to_string();
    let ask = |s: &Server, model: Option<&str>, speculation: Value| {
        let mut body = json!({"prompt": "the weather", "max_tokens": 16, "temperature": 0,
                              "ignore_eos": true, "speculation": speculation});
        if let Some(m) = model {
            body["model"] = m.into();
        }
        let r = s.post_json("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            v["model"].as_str().unwrap().to_string(),
        )
    };
    let module = format!("ad={a}");
    let both = tiny_server(256, &["--lora-modules", &module, "--allow-lora-loading"]);
    let adapted = tiny_server(256, &["--lora", &a]);
    let scaled = tiny_server(256, &["--lora-scaled", &a, "0.5"]);
    let (base_text, base_name) = ask(&both, None, json!("off"));
    let (module_text, module_name) = ask(&both, Some("ad"), json!("off"));
    assert_eq!(module_name, "ad");
    assert_ne!(base_name, "ad");
    assert_ne!(module_text, base_text, "the adapter changed nothing");
    assert_eq!(ask(&adapted, None, json!("off")).0, module_text);
    let (half, _) = ask(&scaled, None, json!("off"));
    assert!(
        half != module_text && half != base_text,
        "the scale did nothing"
    );
    // The named base model is the base; speculation changes no output.
    assert_eq!(ask(&both, Some(&base_name), json!("off")).0, base_text);
    let drafted = json!({"draft": "model", "k": 3});
    assert_eq!(ask(&both, Some("ad"), drafted.clone()).0, module_text);
    assert_eq!(ask(&adapted, None, drafted).0, module_text);
    // Listed, each by id; an unknown name's 404 lists the served ones.
    let models = both.get("/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [base_name.as_str(), "ad"]);
    assert_eq!(models["data"][1]["parent"], base_name.as_str());
    assert_eq!(models["data"][1]["root"], a.as_str());
    assert_eq!(both.get("/v1/models/ad").status, 200);
    let r = both.post_json("/v1/completions", &json!({"prompt": "x", "model": "nope"}));
    assert_eq!(r.status, 404);
    assert!(r.text().contains("`ad`"), "{}", r.text());
    // Chat answers as the module too.
    let r = both.post_json(
        "/v1/chat/completions",
        &json!({"model": "ad", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "ad");
    let r = both.post_json("/v1/embeddings", &json!({"model": "ad", "input": "hi"}));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("LoRA module"), "{}", r.text());

    // Modules loaded and unloaded while the server runs (vLLM's routes).
    let load = |s: &Server, name: &str, path: &str| {
        s.post_json(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
    };
    let r = load(&both, "ad2", &a);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        ask(&both, Some("ad2"), json!("off")),
        (module_text.clone(), "ad2".into())
    );
    assert_eq!(both.get("/v1/models").json()["data"][2]["id"], "ad2");
    for (name, path, status, says) in [
        ("ad2", a.as_str(), 400, "already served"),
        ("ad", a.as_str(), 400, "already served"),
        ("x y", a.as_str(), 400, "spaces"),
        (
            "ad3",
            "/nonexistent/adapter.gguf",
            400,
            "/nonexistent/adapter.gguf",
        ),
    ] {
        let r = load(&both, name, path);
        assert_eq!(r.status, status, "{name} {path}: {}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
    }
    let r = both.post_json("/v1/load_lora_adapter", &json!({"lora_name": "ad3"}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("lora_path"))
    );
    let unload = |s: &Server, name: &str| {
        s.post_json("/v1/unload_lora_adapter", &json!({"lora_name": name}))
    };
    assert_eq!(unload(&both, "ad2").status, 200);
    let r = both.post_json("/v1/completions", &json!({"prompt": "x", "model": "ad2"}));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(unload(&both, "ad2").status, 404);
    assert_eq!(
        ask(&both, Some("ad"), json!("off")).0,
        module_text,
        "the other module stays"
    );
    // Off unless asked for; behind the admin token when one is set.
    let r = load(&adapted, "ad2", &a);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("--allow-lora-loading"), "{}", r.text());
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let guarded = tiny_server(
        256,
        &[
            "--allow-lora-loading",
            "--admin-token-file",
            &token.display().to_string(),
        ],
    );
    assert_eq!(load(&guarded, "ad2", &a).status, 401);
    let body = json!({"lora_name": "ad2", "lora_path": a}).to_string();
    let r = guarded.request(
        "POST",
        "/v1/load_lora_adapter",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer s3cret"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let (target, _) = tiny_models(dir.path(), 256);
    let missing = dir.path().join("missing.gguf");
    let t = target.display().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--lora".into(), missing.display().to_string()],
            missing.display().to_string(),
        ),
        (
            vec!["--lora".into(), t.clone()],
            "not a LoRA adapter".into(),
        ),
        (
            vec!["--lora-modules".into(), format!("m={}", missing.display())],
            missing.display().to_string(),
        ),
        (
            vec!["--lora-modules".into(), a.clone()],
            "expected NAME=PATH".into(),
        ),
        (
            vec!["--lora-modules".into(), module.clone(), module.clone()],
            "already served".into(),
        ),
        (
            vec!["--lora-modules".into(), format!("tiny-target={a}")],
            "already served".into(),
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = serve_fails(std::path::Path::new(&t), &args);
        assert!(
            err.contains(&needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// A `multipart/form-data` upload to `/v1/files` (what `client.files.create` sends).
fn upload(s: &Server, name: &str, purpose: &str, data: &[u8]) -> http_common::Response {
    let mut body = format!(
        "--XBOUNDARY\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--XBOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(b"\r\n--XBOUNDARY--\r\n");
    let ct = [("Content-Type", "multipart/form-data; boundary=XBOUNDARY")];
    s.request("POST", "/v1/files", &ct, &body)
}

/// Batch input lines: `(custom_id, url, body)` as JSONL.
fn batch_file(lines: &[(String, &str, Value)]) -> String {
    let lines: Vec<String> = (lines.iter())
        .map(|(id, url, body)| {
            json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string()
        })
        .collect();
    lines.join("\n") + "\n"
}

/// Polls a batch until it has ended.
fn wait_batch(s: &Server, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let b = s.get(&format!("/v1/batches/{id}")).json();
        let status = b["status"].as_str().unwrap_or_else(|| panic!("{b}"));
        if ["completed", "failed", "cancelled", "expired"].contains(&status) {
            return b;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{b}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` completions batch lines (`{prefix}-{i}`) that each generate `tokens` tokens.
fn long_lines(n: usize, prefix: &str, tokens: usize) -> Vec<(String, &'static str, Value)> {
    (0..n)
        .map(|i| {
            let body = json!({"prompt": format!("item {i}"), "max_tokens": tokens,
                              "ignore_eos": true, "temperature": 0});
            (format!("{prefix}-{i}"), "/v1/completions", body)
        })
        .collect()
}

/// Waits until `n` lines of a batch are answered.
fn wait_answered(s: &Server, id: &str, n: u64) {
    let t0 = Instant::now();
    let path = format!("/v1/batches/{id}");
    while s.get(&path).json()["request_counts"]["completed"].as_u64() < Some(n) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{n} lines not answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A stored file's JSONL lines.
fn file_lines(s: &Server, id: &Value) -> Vec<Value> {
    let r = s.get(&format!("/v1/files/{}/content", id.as_str().unwrap()));
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// OpenAI's Batch API: an uploaded JSONL file of requests runs in the background; each line's
/// answer is the one a direct request gets (the reference: the same bodies posted one by one),
/// 2xx answers in the output file and the others in the error file, in input order; a file
/// with bad lines fails the batch naming them; a cancel ends the lines still running; every bad
/// request is named.
#[test]
fn batch_api_runs_uploaded_files_in_the_background() {
    let s = tiny_server(256, &["--workers", "3", "--max-file-bytes", "20000"]);
    let bodies = [
        json!({"prompt": "the cat sat on", "max_tokens": 12, "temperature": 0}),
        json!({"prompt": "once upon", "max_tokens": 10, "temperature": 0,
               "speculation": {"draft": "model", "k": 3}}),
        json!({"prompt": ["a b a b", "zebra"], "max_tokens": 8, "temperature": 0.8, "seed": 5}),
        json!({"prompt": "hello", "max_tokens": -1}),
        json!({"prompt": "x y z", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ];
    let lines: Vec<(String, &str, Value)> = (bodies.iter().enumerate())
        .map(|(i, b)| (format!("job-{i}"), "/v1/completions", b.clone()))
        .collect();
    let input = batch_file(&lines);
    let up = upload(&s, "jobs.jsonl", "batch", input.as_bytes());
    assert_eq!(up.status, 200, "{}", up.text());
    let file = up.json();
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["filename"], "jobs.jsonl");
    assert_eq!(file["bytes"], input.len());
    let r = s.post_json(
        "/v1/batches",
        &json!({"input_file_id": file["id"], "endpoint": "/v1/completions",
                "completion_window": "24h", "metadata": {"run": "nightly"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let created = r.json();
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["request_counts"]["total"], 5);
    let done = wait_batch(&s, created["id"].as_str().unwrap());
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 4, "failed": 1})
    );
    assert_eq!(done["metadata"], json!({"run": "nightly"}));
    assert_eq!(done["input_file_id"], file["id"]);
    for t in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[t].as_u64().is_some(), "{t}: {done}");
    }
    assert_eq!(done["errors"], Value::Null);
    let out = file_lines(&s, &done["output_file_id"]);
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job-0", "job-1", "job-2", "job-4"]);
    for line in &out {
        let i: usize = line["custom_id"].as_str().unwrap()[4..].parse().unwrap();
        assert!(
            line["id"].as_str().unwrap().starts_with("batch_req_"),
            "{line}"
        );
        assert_eq!(line["error"], Value::Null);
        let resp = &line["response"];
        assert_eq!(resp["status_code"], 200);
        assert!(resp["request_id"].as_str().unwrap().starts_with("req_"));
        let direct = s.post_json("/v1/completions", &bodies[i]).json();
        let got = &resp["body"];
        assert_eq!(got["object"], "text_completion");
        assert_eq!(
            got["choices"].as_array().unwrap().len(),
            direct["choices"].as_array().unwrap().len()
        );
        for (a, b) in got["choices"]
            .as_array()
            .unwrap()
            .iter()
            .zip(direct["choices"].as_array().unwrap())
        {
            assert_eq!(a["text"], b["text"], "line {i}");
            // Logprobs within rounding (a batched forward, the prompt cache).
            assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"], "line {i}");
            let lp = |c: &Value| -> Vec<f64> {
                (c["logprobs"]["token_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten())
                .map(|x| x.as_f64().unwrap())
                .collect()
            };
            let (x, y) = (lp(a), lp(b));
            assert_eq!(x.len(), y.len(), "line {i}");
            assert!(
                x.iter().zip(&y).all(|(x, y)| (x - y).abs() < 1e-4),
                "line {i}: {x:?} {y:?}"
            );
        }
        // (The direct request reads the prompt cache the batch's filled.)
        for k in ["prompt_tokens", "completion_tokens"] {
            assert_eq!(got["usage"][k], direct["usage"][k], "line {i}");
        }
    }
    let errors = file_lines(&s, &done["error_file_id"]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "job-3");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    // The failure in `error` too, as vLLM's run_batch writes it.
    let message = &errors[0]["response"]["body"]["error"]["message"];
    assert_eq!(&errors[0]["error"]["message"], message);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["param"],
        "max_tokens"
    );
    let output = s
        .get(&format!(
            "/v1/files/{}",
            done["output_file_id"].as_str().unwrap()
        ))
        .json();
    assert_eq!(output["purpose"], "batch_output");
    let listed = s.get("/v1/files").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 3);
    assert_eq!(listed["data"][2]["id"], file["id"], "newest first");
    let inputs = s.get("/v1/files?purpose=batch").json();
    assert_eq!(inputs["data"].as_array().unwrap().len(), 1);
    let batches = s.get("/v1/batches?limit=1").json();
    assert_eq!(batches["data"][0]["id"], done["id"]);
    assert_eq!(batches["has_more"], false);

    // A file with bad lines fails the batch, each line named; nothing runs.
    let bad = batch_file(&[
        ("a".into(), "/v1/completions", json!({"prompt": "x"})),
        ("b".into(), "/v1/chat/completions", json!({"messages": []})),
        ("a".into(), "/v1/completions", json!({"prompt": "y"})),
    ]);
    let bad_file = upload(&s, "bad.jsonl", "batch", bad.as_bytes()).json();
    let r = s.post_json(
        "/v1/batches",
        &json!({"input_file_id": bad_file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let failed = r.json();
    assert_eq!(failed["status"], "failed");
    let errs: Vec<(u64, &str)> = (failed["errors"]["data"].as_array().unwrap().iter())
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(errs, [(2, "mismatched_url"), (3, "duplicate_custom_id")]);
    assert_eq!(failed["request_counts"]["total"], 0);
    assert_eq!(failed["output_file_id"], Value::Null);

    // A cancel: lines not started are not run, running ones end; the answers so far are kept.
    let long = long_lines(40, "long", 200);
    let long_file = upload(&s, "long.jsonl", "batch", batch_file(&long).as_bytes()).json();
    let b = s
        .post_json(
            "/v1/batches",
            &json!({"input_file_id": long_file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
        )
        .json();
    let id = b["id"].as_str().unwrap();
    // Cancelled while lines run (one has finished: the workers hold the next ones).
    wait_answered(&s, id, 1);
    wait_for("lines running", &s, Duration::from_secs(30), || {
        s.metric("verdict_active_generations") >= 1.0
    });
    let r = s.request("POST", &format!("/v1/batches/{id}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "cancelling");
    let cancelled = wait_batch(&s, id);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    // The running generations end with their lines.
    let t0 = Instant::now();
    while s.metric("verdict_active_generations") > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "generations still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let counts = &cancelled["request_counts"];
    let completed = counts["completed"].as_u64().unwrap();
    // Lines that got no answer count as neither completed nor failed.
    assert_eq!(counts["failed"], 0, "{counts}");
    assert!((1..40).contains(&completed), "{counts}");
    let stopped = file_lines(&s, &cancelled["error_file_id"]);
    assert_eq!(stopped.len() as u64, 40 - completed);
    assert!(
        stopped
            .iter()
            .all(|l| l["error"]["code"] == "batch_cancelled" && l["response"].is_null())
    );
    assert_eq!(
        file_lines(&s, &cancelled["output_file_id"]).len() as u64,
        completed
    );
    let r = s.request("POST", &format!("/v1/batches/{id}/cancel"), &[], b"");
    assert_eq!(r.status, 409, "{}", r.text());

    // Bad requests, each named.
    let json_ct = [("Content-Type", "application/json")];
    let r = s.request("POST", "/v1/files", &json_ct, b"{}");
    assert_eq!(r.status, 415, "{}", r.text());
    let r = upload(&s, "x.jsonl", "fine-tune", input.as_bytes());
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("purpose"))
    );
    let r = upload(&s, "big.jsonl", "batch", &vec![b' '; 25_000]);
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (413, json!("file"))
    );
    let create = |file: &Value, endpoint: &str| {
        s.post_json(
            "/v1/batches",
            &json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"}),
        )
    };
    let r = create(&json!("file-nosuch"), "/v1/completions");
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (404, json!("input_file_id"))
    );
    let r = create(&file["id"], "/v1/models");
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("endpoint"))
    );
    let r = create(&done["output_file_id"], "/v1/completions");
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("input_file_id"))
    );
    assert_eq!(s.get("/v1/batches/batch_nosuch").status, 404);
    let r = s.get("/v1/files?limit=0");
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("limit"))
    );
    assert_eq!(s.request("PUT", "/v1/files", &[], b"").status, 405);
    let path = format!("/v1/files/{}", file["id"].as_str().unwrap());
    let r = s.request("DELETE", &path, &[], b"");
    assert_eq!(
        r.json(),
        json!({"id": file["id"], "object": "file", "deleted": true})
    );
    assert_eq!(s.get(&path).status, 404);
    // The batch that read it still lists it.
    assert_eq!(
        s.get(&format!("/v1/batches/{}", done["id"].as_str().unwrap()))
            .json()["input_file_id"],
        file["id"]
    );
}

/// `verdict run-batch`: a file of requests to several routes answered offline, in input
/// order, each answer the server's own (the reference: a server on the same models); a bad file
/// is refused before the model loads, naming its lines, with nothing written.
#[test]
fn run_batch_answers_a_file_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = tiny_models(dir.path(), 256);
    let (t, d) = (t.display().to_string(), d.display().to_string());
    let lines = vec![
        (
            "c".to_string(),
            "/v1/completions",
            json!({"prompt": "the cat", "max_tokens": 9, "temperature": 0}),
        ),
        (
            "chat".to_string(),
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0}),
        ),
        (
            "e".to_string(),
            "/v1/embeddings",
            json!({"input": ["one", "two"]}),
        ),
        (
            "bad".to_string(),
            "/v1/completions",
            json!({"prompt": "x", "temperature": -1}),
        ),
    ];
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, batch_file(&lines)).unwrap();
    let output = dir.path().join("out.jsonl");
    let run = |args: &[&str], stdin: &[u8]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .arg("run-batch")
            .args(args)
            .args(["--model", &t, "--draft", &d])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(
        &[
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("4 requests") && stderr.contains("1 failed"),
        "{stderr}"
    );
    let answers: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| a["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c", "chat", "e", "bad"]);
    let s = Server::start(&["--model", &t, "--draft", &d], None, dir.path());
    for (a, (_, url, body)) in answers.iter().zip(&lines) {
        let direct = s.post_json(url, body);
        assert_eq!(a["response"]["status_code"], direct.status, "{a}");
        let (got, want) = (&a["response"]["body"], direct.json());
        match *url {
            "/v1/embeddings" => assert_eq!(got["data"], want["data"]),
            _ if direct.status == 200 => {
                assert_eq!(text_of(got), text_of(&want));
                assert_eq!(
                    got["usage"]["completion_tokens"],
                    want["usage"]["completion_tokens"]
                );
            }
            _ => assert_eq!(got["error"]["param"], want["error"]["param"]),
        }
    }
    drop(s);

    // stdin to stdout.
    let one = batch_file(&lines[..1]);
    let out = run(&["-i", "-", "-o", "-"], one.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line["response"]["body"]["choices"][0]["text"],
        answers[0]["response"]["body"]["choices"][0]["text"]
    );

    // A bad file: refused, its lines named, no output.
    let bad = format!(
        "{}\n{{\"custom_id\": \"c\"}}\nnot json\n",
        batch_file(&lines[..1]).trim_end()
    );
    std::fs::write(&input, bad).unwrap();
    let fresh = dir.path().join("fresh.jsonl");
    let out = run(
        &["-i", input.to_str().unwrap(), "-o", fresh.to_str().unwrap()],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2: method is missing"), "{stderr}");
    assert!(stderr.contains("line 3: not valid JSON"), "{stderr}");
    assert!(!fresh.exists());
}

/// A two-worker server's arguments on `t` and `d` keeping its batches in `kept`.
fn batch_dir_args(t: &str, d: &str, kept: &std::path::Path) -> Vec<String> {
    let kept = kept.display().to_string();
    [
        "--model",
        t,
        "--draft",
        d,
        "--workers",
        "2",
        "--batch-dir",
        &kept,
    ]
    .map(String::from)
    .to_vec()
}

/// Stops a `--batch-dir` server while batch `id` runs; returns the file of the answers it kept
/// and how many, checked to be at least `least` of `total`.
fn stop_mid_batch(
    mut s: Server,
    kept: &std::path::Path,
    id: &str,
    least: usize,
    total: usize,
) -> (std::path::PathBuf, usize) {
    s.terminate();
    assert!(s.wait_exit(Duration::from_secs(30)).is_some(), "no exit");
    let answers = kept.join(format!("batches/{id}.answers"));
    let answered = std::fs::read_to_string(&answers).unwrap().lines().count();
    assert!(
        (least..total).contains(&answered),
        "{answered} answers kept"
    );
    (answers, answered)
}

/// `--batch-dir`: files and batches outlive the server, and a batch running when it stops goes
/// on at the next start with only the lines not yet answered (the reference: the answers kept
/// on disk at the stop, plus the requests the second server runs, are every line once); what
/// ended stays as it ended, and a deleted file stays deleted.
#[test]
fn batches_survive_a_restart_with_batch_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d) = tiny_models(dir.path(), 256);
    let (t, d) = (t.display().to_string(), d.display().to_string());
    let kept = dir.path().join("kept");
    let args = batch_dir_args(&t, &d, &kept);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start(&args, None, dir.path());
    let lines = long_lines(30, "r", 150);
    let file = upload(&s, "jobs.jsonl", "batch", batch_file(&lines).as_bytes()).json();
    let other = upload(
        &s,
        "other.jsonl",
        "batch",
        batch_file(&lines[..1]).as_bytes(),
    )
    .json();
    let b = s
        .post_json(
            "/v1/batches",
            &json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
        )
        .json();
    let id = b["id"].as_str().unwrap().to_string();
    wait_answered(&s, &id, 3);
    let (answers, answered) = stop_mid_batch(s, &kept, &id, 3, 30);

    let s = Server::start(&args, None, dir.path());
    let files = s.get("/v1/files").json();
    assert_eq!(files["data"].as_array().unwrap().len(), 2, "{files}");
    let done = wait_batch(&s, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 30, "completed": 30, "failed": 0})
    );
    // Only the lines not answered before the stop ran again.
    let ran = s.metric("verdict_requests_total{route=\"/v1/completions\",status=\"200\"}");
    assert_eq!(ran, (30 - answered) as f64);
    let out = file_lines(&s, &done["output_file_id"]);
    let ids: Vec<String> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("r-{i}")).collect();
    assert_eq!(ids, want);
    for i in [0, 29] {
        let direct = s.post_json("/v1/completions", &lines[i].2).json();
        assert_eq!(
            text_of(&out[i]["response"]["body"]),
            text_of(&direct),
            "line {i}"
        );
    }
    // An ended batch keeps its record only (written after it shows as completed).
    wait_for(
        "the answers file to go",
        &s,
        Duration::from_secs(30),
        || !answers.exists(),
    );
    let path = format!("/v1/files/{}", other["id"].as_str().unwrap());
    assert_eq!(s.request("DELETE", &path, &[], b"").status, 200);
    drop(s);

    let s = Server::start(&args, None, dir.path());
    let again = s.get(&format!("/v1/batches/{id}")).json();
    assert_eq!(again["status"], "completed");
    assert_eq!(again["request_counts"], done["request_counts"]);
    assert_eq!(file_lines(&s, &again["output_file_id"]).len(), 30);
    assert_eq!(s.get(&path).status, 404);
    assert_eq!(
        s.metric("verdict_requests_total{route=\"/v1/completions\",status=\"200\"}"),
        0.0
    );
}

/// Anthropic message batch requests: `{custom_id, params}` of the Messages API.
fn message_requests(n: usize, prefix: &str, tokens: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("{prefix}-{i}"), "params": {
                "model": "tiny-target", "max_tokens": tokens, "temperature": 0,
                "messages": [{"role": "user", "content": format!("item {i}")}]}})
        })
        .collect()
}

/// Polls a message batch until its processing has ended.
fn wait_message_batch(s: &Server, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let b = s.get(&format!("/v1/messages/batches/{id}")).json();
        if b["processing_status"] == "ended" {
            return b;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{b}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A message batch's results, read from its `results_url` (its path: the test client's Host
/// header has no port).
fn message_results(s: &Server, b: &Value) -> Vec<Value> {
    let id = b["id"].as_str().unwrap();
    let path = format!("/v1/messages/batches/{id}/results");
    assert_eq!(b["results_url"], format!("http://localhost{path}"), "{b}");
    let r = s.get(&path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-jsonl"));
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Anthropic's Message Batches API: the requests run in the background through the Messages
/// route, each result what a direct request gets (the reference: the same params posted one by
/// one) or the error it gets; counts and times as Anthropic's object has them; a cancel leaves
/// `canceled` results; list pages newest first; an ended batch deletes with its results; bad
/// batches are refused naming the request, in Anthropic's error shape. The batches are apart
/// from OpenAI's (`/v1/batches`, `/v1/files` list none of them).
#[test]
fn message_batches_run_as_anthropic_runs_them() {
    let s = q8_server(1024, &["--workers", "2"]);
    let mut requests = message_requests(3, "m", 10);
    requests[1]["params"]["stop_sequences"] = json!(["the"]);
    // Refused when it runs (as Anthropic checks params): an errored result.
    requests.push(
        json!({"custom_id": "bad", "params": {"model": "tiny-target",
        "messages": [{"role": "user", "content": "hi"}]}}),
    );
    let r = s.post_json("/v1/messages/batches", &json!({"requests": requests}));
    assert_eq!(r.status, 200, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msgbatch_"), "{created}");
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["results_url"], Value::Null);
    assert_eq!(created["archived_at"], Value::Null);
    let counts = &created["request_counts"];
    let sum: u64 = ["processing", "succeeded", "errored", "canceled", "expired"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 4, "{created}");
    let created_at = created["created_at"].as_str().unwrap();
    assert!(
        created_at.ends_with('Z') && created_at.contains('T'),
        "{created}"
    );

    let done = wait_message_batch(&s, &id);
    assert_eq!(
        done["request_counts"],
        json!({"processing": 0, "succeeded": 3, "errored": 1, "canceled": 0, "expired": 0})
    );
    assert!(done["ended_at"].as_str().unwrap() >= created_at, "{done}");
    assert_eq!(done["cancel_initiated_at"], Value::Null);
    let results = message_results(&s, &done);
    let ids: Vec<&str> = (results.iter())
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m-0", "m-1", "m-2", "bad"]);
    for (i, line) in results[..3].iter().enumerate() {
        assert_eq!(line["result"]["type"], "succeeded", "{line}");
        let got = &line["result"]["message"];
        let direct = s.post_json("/v1/messages", &requests[i]["params"]).json();
        assert_eq!(got["type"], "message");
        assert_eq!(got["content"], direct["content"], "request {i}");
        assert_eq!(got["stop_reason"], direct["stop_reason"], "request {i}");
        assert_eq!(
            got["usage"]["output_tokens"], direct["usage"]["output_tokens"],
            "request {i}"
        );
    }
    let error = &results[3]["result"];
    assert_eq!(error["type"], "errored");
    assert_eq!(error["error"]["type"], "error");
    assert_eq!(error["error"]["error"]["type"], "invalid_request_error");
    let message = error["error"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_tokens"), "{message}");
    // Apart from OpenAI's batches and files.
    assert_eq!(s.get(&format!("/v1/batches/{id}")).status, 404);
    assert_eq!(s.get("/v1/batches").json()["data"], json!([]));
    assert_eq!(s.get("/v1/files").json()["data"], json!([]));
    let results_file = format!("/v1/files/file-{id}-results");
    assert_eq!(s.get(&results_file).status, 404);
    assert_eq!(s.request("DELETE", &results_file, &[], b"").status, 404);

    // A cancel: requests not started are canceled, running ones end.
    let long = message_requests(12, "long", 200);
    let r = s.post_json("/v1/messages/batches", &json!({"requests": long}));
    let cancelled = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/messages/batches/{cancelled}");
    wait_for("a long request done", &s, Duration::from_secs(60), || {
        s.get(&path).json()["request_counts"]["succeeded"].as_u64() >= Some(1)
    });
    // Not ended: no results yet, and not deleted.
    let early = s.get(&format!("{path}/results"));
    assert_eq!(early.status, 400, "{}", early.text());
    assert!(
        early.text().contains("still processing"),
        "{}",
        early.text()
    );
    let refused = s.request("DELETE", &path, &[], b"");
    assert_eq!(refused.status, 400);
    assert!(
        refused.text().contains("cancel it first"),
        "{}",
        refused.text()
    );
    let r = s.request("POST", &format!("{path}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let canceling = r.json();
    assert!(
        ["canceling", "ended"].contains(&canceling["processing_status"].as_str().unwrap()),
        "{canceling}"
    );
    assert!(canceling["cancel_initiated_at"].is_string(), "{canceling}");
    let ended = wait_message_batch(&s, &cancelled);
    let c = &ended["request_counts"];
    let (ok, canceled) = (
        c["succeeded"].as_u64().unwrap(),
        c["canceled"].as_u64().unwrap(),
    );
    assert!(ok >= 1 && canceled >= 1, "{ended}");
    assert_eq!(ok + canceled, 12, "{ended}");
    let results = message_results(&s, &ended);
    assert_eq!(results.len(), 12);
    let canceled_lines = (results.iter())
        .filter(|l| l["result"] == json!({"type": "canceled"}))
        .count();
    assert_eq!(canceled_lines as u64, canceled);
    // Cancelling an ended batch is refused.
    let again = s.request("POST", &format!("{path}/cancel"), &[], b"");
    assert_eq!(again.status, 409, "{}", again.text());

    // Listed newest first, paged by after_id and before_id (`beta`, which the clients' beta
    // routes add, is ignored).
    let list = s.get("/v1/messages/batches?limit=1&beta=true").json();
    assert_eq!(list["data"][0]["id"], cancelled.as_str());
    assert_eq!(
        (list["has_more"].as_bool(), list["last_id"].as_str()),
        (Some(true), Some(cancelled.as_str()))
    );
    let next = s
        .get(&format!(
            "/v1/messages/batches?limit=5&after_id={cancelled}"
        ))
        .json();
    assert_eq!(next["data"][0]["id"], id.as_str());
    assert_eq!(next["has_more"], false);
    let back = s
        .get(&format!("/v1/messages/batches?before_id={id}"))
        .json();
    assert_eq!(back["first_id"], cancelled.as_str());

    // Deleted with its results.
    let r = s.request("DELETE", &path, &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"id": cancelled, "type": "message_batch_deleted"})
    );
    let gone = s.get(&path);
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.json()["error"]["type"],
        "not_found_error",
        "{}",
        gone.text()
    );
    assert_eq!(s.get(&format!("{path}/results")).status, 404);
    assert_eq!(
        s.get("/v1/messages/batches").json()["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Bad batches are refused whole, the request named, in Anthropic's error shape.
    let two = message_requests(2, "x", 4);
    let cases = [
        (
            json!({"requests": [two[0], two[0]]}),
            "requests[1].custom_id",
        ),
        (json!({"requests": []}), "requests"),
        (
            json!({"requests": [{"custom_id": "a.b", "params": {}}]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [{"custom_id": "s", "params": {"stream": true}}]}),
            "requests[0].params.stream",
        ),
    ];
    for (body, param) in cases {
        let r = s.post_json("/v1/messages/batches", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(param), "{param}: {message}");
    }
    let bad_list = s.get("/v1/messages/batches?limit=0");
    assert_eq!(bad_list.status, 400);
    let put = s.request("PUT", "/v1/messages/batches", &[], b"");
    assert_eq!(put.status, 405);
}

/// With `--batch-dir` a message batch goes on after a restart from the requests not yet
/// answered, its results whole and in order; a deleted batch stays deleted, its results gone
/// from the directory too.
#[test]
fn message_batches_survive_a_restart() {
    let (dir, t, d) = q8_models(1024);
    let kept = dir.path().join("kept");
    let args = batch_dir_args(&t, &d, &kept);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start(&args, None, dir.path());
    let requests = message_requests(20, "r", 150);
    let r = s.post_json("/v1/messages/batches", &json!({"requests": requests}));
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/messages/batches/{id}");
    wait_for("two requests done", &s, Duration::from_secs(60), || {
        s.get(&path).json()["request_counts"]["succeeded"].as_u64() >= Some(2)
    });
    let (answers, answered) = stop_mid_batch(s, &kept, &id, 2, 20);

    let s = Server::start(&args, None, dir.path());
    let done = wait_message_batch(&s, &id);
    assert_eq!(done["request_counts"]["succeeded"], 20, "{done}");
    let ran = s.metric("verdict_requests_total{route=\"/v1/messages\",status=\"200\"}");
    assert_eq!(ran, (20 - answered) as f64);
    let results = message_results(&s, &done);
    let ids: Vec<String> = (results.iter())
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("r-{i}")).collect();
    assert_eq!(ids, want);
    for i in [0, 19] {
        let direct = s.post_json("/v1/messages", &requests[i]["params"]).json();
        assert_eq!(
            results[i]["result"]["message"]["content"], direct["content"],
            "request {i}"
        );
    }
    wait_for(
        "the answers file to go",
        &s,
        Duration::from_secs(30),
        || !answers.exists(),
    );
    let r = s.request("DELETE", &path, &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);

    let s = Server::start(&args, None, dir.path());
    assert_eq!(s.get(&path).status, 404);
    let left: Vec<_> = std::fs::read_dir(kept.join("files"))
        .unwrap()
        .chain(std::fs::read_dir(kept.join("batches")).unwrap())
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Polls a response until it has left `queued` and `in_progress`.
fn wait_response(s: &Server, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let r = s.get(&format!("/v1/responses/{id}")).json();
        let status = r["status"].as_str().unwrap_or_else(|| panic!("{r}"));
        if !["queued", "in_progress"].contains(&status) {
            return r;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Background responses (`background: true`): the request returns at once and the response is
/// polled to the same output a direct request gets (and continues a conversation); a streamed
/// one's events are read again from any sequence number; one that has ended stays as it ended
/// when cancelled; bad uses are refused, named.
#[test]
fn background_responses_run_on_after_the_request_returns() {
    let s = q8_server(4096, &[]);
    let body = json!({"instructions": "Be brief.", "input": "Hello there",
                      "max_output_tokens": 12, "temperature": 0});
    let direct = s.post_json("/v1/responses", &body).json();
    let r = s.post_json(
        "/v1/responses",
        &merged(body.clone(), &json!({"background": true})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let created = r.json();
    assert_eq!(created["background"], true);
    assert!(
        ["queued", "in_progress"].contains(&created["status"].as_str().unwrap()),
        "{created}"
    );
    assert_eq!(created["output"], json!([]));
    let id = created["id"].as_str().unwrap();
    let done = wait_response(&s, id);
    assert_eq!(done["status"], direct["status"], "{done}");
    assert_eq!(done["background"], true);
    assert_eq!(done["output"][0]["content"], direct["output"][0]["content"]);
    assert_eq!(
        done["usage"]["output_tokens"],
        direct["usage"]["output_tokens"]
    );
    // It continues a conversation as any stored response does.
    let next = s.post_json(
        "/v1/responses",
        &json!({"input": "More", "previous_response_id": id, "max_output_tokens": 4}),
    );
    assert_eq!(next.status, 200, "{}", next.text());
    // Not streamed: no events to read again; not background: nothing to cancel.
    let r = s.get(&format!("/v1/responses/{id}?stream=true"));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("stream"))
    );
    let r = s.request(
        "POST",
        &format!("/v1/responses/{}/cancel", direct["id"].as_str().unwrap()),
        &[],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("only a background response"),
        "{}",
        r.text()
    );
    assert_eq!(
        s.request("POST", "/v1/responses/resp_nope/cancel", &[], b"")
            .status,
        404
    );
    let r = s.post_json(
        "/v1/responses",
        &merged(body.clone(), &json!({"background": true, "store": false})),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("background"))
    );

    // Streamed: the connection gets the events as they come; read again after any of them.
    let raw = s
        .request(
            "POST",
            "/v1/responses",
            &[("Content-Type", "application/json")],
            merged(body.clone(), &json!({"background": true, "stream": true}))
                .to_string()
                .as_bytes(),
        )
        .text();
    let events = response_events(&raw);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    let last = &events.last().unwrap()["response"];
    assert_eq!(last["output"][0]["content"], direct["output"][0]["content"]);
    let sid = last["id"].as_str().unwrap();
    let again = response_events(
        &s.get(&format!("/v1/responses/{sid}?stream=true&starting_after=3"))
            .text(),
    );
    assert_eq!(again, events[4..]);
    assert_eq!(&s.get(&format!("/v1/responses/{sid}")).json(), last);

    // A request the model cannot run fails in the background, as a failed response.
    let long_input = "word ".repeat(5000);
    let r = s.post_json(
        "/v1/responses",
        &json!({"input": long_input, "max_output_tokens": 4, "background": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let failed = wait_response(&s, r.json()["id"].as_str().unwrap());
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("context"), "{message}");
    // Ended: a cancel leaves it as it ended; a delete forgets it.
    let r = s.request("POST", &format!("/v1/responses/{id}/cancel"), &[], b"");
    assert_eq!((r.status, &r.json()), (200, &done));
    assert_eq!(
        s.request("DELETE", &format!("/v1/responses/{sid}"), &[], b"")
            .status,
        200
    );
    assert_eq!(s.get(&format!("/v1/responses/{sid}")).status, 404);
    assert_eq!(
        s.get(&format!("/v1/responses/{sid}?stream=true")).status,
        404
    );
}

/// A real model (generating slowly enough to be caught running): a background response that
/// meets a full queue (one worker busy, one request waiting) waits for room, `queued`, and runs
/// once there is; a cancel stops a running one's generation and leaves it `cancelled` (again:
/// the same); a delete cancels one running and forgets it.
#[test]
fn background_responses_wait_for_room_and_stop_when_cancelled() {
    let s = real_server_with(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &["--workers", "1", "--max-queue", "1"],
    );
    let cancelled = || s.metric("verdict_generations_finished_total{reason=\"cancelled\"}");
    let status = |id: &str| s.get(&format!("/v1/responses/{id}")).json()["status"].clone();
    let create = |max: u64| -> String {
        let body = json!({"input": "Count to a thousand.", "max_output_tokens": max,
                          "temperature": 0, "ignore_eos": true, "background": true});
        let r = s.post_json("/v1/responses", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let busy = create(2000);
    wait_for(
        "the long response to run",
        &s,
        Duration::from_secs(60),
        || status(&busy) == "in_progress",
    );
    let waiting = create(4);
    wait_for(
        "the second to wait in the queue",
        &s,
        Duration::from_secs(30),
        || s.metric("verdict_queue_depth") >= 1.0,
    );
    let third = create(4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&third), "queued");
    let before = cancelled();
    let r = s.request("POST", &format!("/v1/responses/{busy}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "cancelled");
    wait_for(
        "the generation to stop",
        &s,
        Duration::from_secs(30),
        || cancelled() > before,
    );
    assert_eq!(status(&busy), "cancelled");
    let r = s.request("POST", &format!("/v1/responses/{busy}/cancel"), &[], b"");
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("cancelled"))
    );
    for id in [&waiting, &third] {
        let done = wait_response(&s, id);
        assert_eq!(done["status"], "incomplete", "{done}");
        assert_eq!(done["usage"]["output_tokens"], 4);
    }
    let gone = create(2000);
    wait_for("it to run", &s, Duration::from_secs(60), || {
        status(&gone) == "in_progress"
    });
    let before = cancelled();
    let r = s.request("DELETE", &format!("/v1/responses/{gone}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.get(&format!("/v1/responses/{gone}")).status, 404);
    wait_for(
        "the deleted one to stop",
        &s,
        Duration::from_secs(30),
        || cancelled() > before,
    );
}

/// SageMaker's routes, as vLLM serves them: `/ping` is `/ready` and open without a key;
/// `/invocations` runs each request on the route its fields name, with that route's answer
/// (streamed too) and errors; a body that names none is refused, saying what would.
#[test]
fn sagemaker_ping_and_invocations_route_by_fields() {
    let s = tiny_server(1024, &["--api-key", "sk-k"]);
    let auth = [
        ("Authorization", "Bearer sk-k"),
        ("Content-Type", "application/json"),
    ];
    for method in ["GET", "POST"] {
        let r = s.request(method, "/ping", &[], b"");
        assert_eq!(
            (r.status, r.json()["status"].clone()),
            (200, json!("ready"))
        );
    }
    let post =
        |path: &str, body: &Value| s.request("POST", path, &auth, body.to_string().as_bytes());
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 6, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "the cat", "max_tokens": 6, "temperature": 0}),
        ),
        ("/v1/embeddings", json!({"input": ["a b", "c"]})),
        (
            "/v1/rerank",
            json!({"query": "cat", "documents": ["a cat", "a dog"]}),
        ),
        (
            "/v1/score",
            json!({"text_1": "cat", "text_2": ["a cat", "a dog"]}),
        ),
    ];
    for (path, body) in &bodies {
        let (direct, via) = (post(path, body), post("/invocations", body));
        assert_eq!(
            (direct.status, via.status),
            (200, 200),
            "{path}: {}",
            via.text()
        );
        let (mut a, mut b) = (direct.json(), via.json());
        // (The second reads the prompt cache the first filled.)
        for v in [&mut a, &mut b] {
            for k in ["id", "created", "speculation"] {
                v.as_object_mut().unwrap().remove(k);
            }
            if let Some(u) = v["usage"].as_object_mut() {
                u.remove("prompt_tokens_details");
            }
        }
        assert_eq!(a, b, "{path}");
    }
    // Streamed, as the chat route streams.
    let mut streamed = bodies[0].1.clone();
    streamed["stream"] = json!(true);
    let raw = post("/invocations", &streamed).text();
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    // The route's own errors; no route named; the key is asked as anywhere.
    let r = post("/invocations", &json!({"prompt": "x", "max_tokens": -1}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("max_tokens"))
    );
    let r = post("/invocations", &json!({"text": "x"}));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("messages (chat)"), "{}", r.text());
    let r = s.request(
        "POST",
        "/invocations",
        &[],
        bodies[1].1.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(s.request("GET", "/invocations", &auth, b"").status, 405);
}

/// A batch line's generation waits behind client requests: with the one worker busy, a line
/// queued first still starts after a client request queued later (a real model, slow enough
/// that the order shows: the client's answer comes while the line has not run).
#[test]
fn batch_lines_queue_behind_client_requests() {
    let s = real_server_with("SmolLM2-135M-Instruct.Q4_1.gguf", &["--workers", "1"]);
    let job = |tokens: u64| {
        json!({"prompt": "Count to a thousand:", "max_tokens": tokens, "temperature": 0,
               "ignore_eos": true, "speculation": "off"})
    };
    let mut stream = job(120);
    stream["stream"] = json!(true);
    let mut busy = s.open_stream("/v1/completions", &stream);
    assert!(busy.next_event().is_some());
    let lines = [("line".to_string(), "/v1/completions", job(30))];
    let file = upload(&s, "b.jsonl", "batch", batch_file(&lines).as_bytes()).json();
    let b = s.post_json(
        "/v1/batches",
        &json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}),
    );
    let id = b.json()["id"].as_str().unwrap().to_string();
    wait_for("the line to queue", &s, Duration::from_secs(30), || {
        s.metric("verdict_queue_depth") >= 1.0
    });
    let client = s.post_json("/v1/completions", &job(10));
    assert_eq!(client.status, 200, "{}", client.text());
    let counts = s.get(&format!("/v1/batches/{id}")).json()["request_counts"].clone();
    assert_eq!(
        counts["completed"], 0,
        "the line ran before the client's request"
    );
    drop(busy.collect());
    assert_eq!(wait_batch(&s, &id)["request_counts"]["completed"], 1);
}

/// vLLM's `request_id` and the `X-Request-Id` header name the response (`cmpl-ID`,
/// `chatcmpl-ID`; the header first), streamed too; an empty one is refused.
#[test]
fn a_request_id_names_the_response() {
    let s = tiny_server(256, &[]);
    let r = ok_json(
        &s,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2, "request_id": "job-7"}),
    );
    assert_eq!(r["id"], "cmpl-job-7");
    let chat = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                      "request_id": "job-8"});
    assert_eq!(
        ok_json(&s, "/v1/chat/completions", &chat)["id"],
        "chatcmpl-job-8"
    );
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Request-Id", "trace-1"),
    ];
    let r = s.request(
        "POST",
        "/v1/chat/completions",
        &headers,
        chat.to_string().as_bytes(),
    );
    assert_eq!(r.json()["id"], "chatcmpl-trace-1");
    assert_eq!(r.header("x-request-id"), Some("trace-1"));
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = s.open_stream("/v1/chat/completions", &streamed).collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["id"], "chatcmpl-job-8");
    let r = s.post_json("/v1/completions", &json!({"prompt": "a", "request_id": ""}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("request_id"))
    );
    // Without either: an id of the server's own.
    let own = ok_json(
        &s,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2}),
    );
    assert!(
        own["id"].as_str().unwrap().len() > "cmpl-".len() + 8,
        "{own}"
    );
}

/// The text of a Responses output's message items.
fn output_text(r: &Value) -> String {
    (r["output"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter())
    .filter(|o| o["type"] == "message")
    .flat_map(|o| o["content"].as_array().unwrap())
    .map(|c| c["text"].as_str().unwrap().to_string())
    .collect()
}

/// OpenAI's Conversations API: a response naming a conversation reads its items as the
/// context (the same text as the chat request of those turns) and adds its input and output
/// to it; a response that fails adds nothing. Items are listed, paged, added, read and deleted;
/// `input_items` lists what a response was generated from; bad uses are refused, named.
#[test]
fn conversations_hold_the_turns_of_responses() {
    let s = q8_server(4096, &[]);
    let chat = |messages: Value| -> String {
        text_of(&ok_json(
            &s,
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
        ))
    };
    let conv = ok_json(
        &s,
        "/v1/conversations",
        &json!({"items": [{"role": "user", "content": "Hello there"}],
                "metadata": {"topic": "greeting"}}),
    );
    assert_eq!(conv["object"], "conversation");
    assert_eq!(conv["metadata"], json!({"topic": "greeting"}));
    let id = conv["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("conv_"), "{conv}");
    assert_eq!(s.get(&format!("/v1/conversations/{id}")).json(), conv);
    let items = |query: &str| -> Value {
        let r = s.get(&format!("/v1/conversations/{id}/items{query}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // What the turn's input counts, its context included (the conversation is only read).
    let count = ok_json(
        &s,
        "/v1/responses/input_tokens",
        &json!({"input": "And then?", "conversation": id}),
    );
    assert_eq!(count["object"], "response.input_tokens");
    // A turn: the conversation is its context.
    let first = ok_json(
        &s,
        "/v1/responses",
        &json!({"input": "And then?", "conversation": id, "max_output_tokens": 8,
                "temperature": 0}),
    );
    assert_eq!(first["conversation"], json!({"id": id}));
    assert_eq!(
        count["input_tokens"], first["usage"]["input_tokens"],
        "{first}"
    );
    let a1 = output_text(&first);
    assert_eq!(
        a1,
        chat(json!([{"role": "user", "content": "Hello there"},
                    {"role": "user", "content": "And then?"}]))
    );
    // Its input and output joined the conversation, oldest first with order=asc.
    let all = items("?order=asc");
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{all}");
    assert_eq!(data[1]["content"][0]["text"], "And then?");
    assert_eq!(data[2]["role"], "assistant");
    assert_eq!(data[2]["content"][0]["text"], a1.as_str());
    assert_eq!(data[2]["id"], first["output"][0]["id"]);
    // A second turn, streamed, named by object.
    let raw = s
        .request(
            "POST",
            "/v1/responses",
            &[],
            json!({"input": "Third", "conversation": {"id": id}, "max_output_tokens": 8,
                   "temperature": 0, "stream": true})
            .to_string()
            .as_bytes(),
        )
        .text();
    let second = response_events(&raw).last().unwrap()["response"].clone();
    assert_eq!(
        output_text(&second),
        chat(json!([{"role": "user", "content": "Hello there"},
                    {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": "Third"}]))
    );
    assert_eq!(items("")["data"].as_array().unwrap().len(), 5);
    // Newest first by default, paged.
    let page = items("?limit=2");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"][0]["id"], second["output"][0]["id"]);
    assert_eq!(page["data"][1]["content"][0]["text"], "Third");
    let next = items(&format!(
        "?limit=2&after={}",
        page["last_id"].as_str().unwrap()
    ));
    assert_eq!(next["data"][0]["id"], data[2]["id"]);
    // What the second response was generated from: the four items before it.
    let sid = second["id"].as_str().unwrap();
    let input = s
        .get(&format!("/v1/responses/{sid}/input_items?order=asc"))
        .json();
    let input = input["data"].as_array().unwrap();
    assert_eq!(input.len(), 4);
    assert_eq!(input[..3], data[..]);
    // A failing request adds nothing and leaves the conversation free.
    let bad = s.post_json(
        "/v1/responses",
        &json!({"input": "x", "conversation": id, "temperature": "hot"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(items("")["data"].as_array().unwrap().len(), 5);
    // Items added by hand, read, deleted.
    let added = ok_json(
        &s,
        &format!("/v1/conversations/{id}/items"),
        &json!({"items": [{"type": "message", "role": "user", "content": "Noted"}]}),
    );
    let item = added["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(added["first_id"], item.as_str());
    let got = s.get(&format!("/v1/conversations/{id}/items/{item}"));
    assert_eq!(got.json()["content"][0]["text"], "Noted");
    let dup = s.post_json(
        &format!("/v1/conversations/{id}/items"),
        &json!({"items": [{"id": item, "role": "user", "content": "again"}]}),
    );
    assert_eq!(dup.status, 400);
    assert_eq!(dup.json()["error"]["param"], "items[0].id");
    let r = s.request(
        "DELETE",
        &format!("/v1/conversations/{id}/items/{item}"),
        &[],
        b"",
    );
    assert_eq!(r.json()["id"], id.as_str(), "{}", r.text());
    assert_eq!(
        s.get(&format!("/v1/conversations/{id}/items/{item}"))
            .status,
        404
    );
    // Metadata is updated.
    let u = ok_json(
        &s,
        &format!("/v1/conversations/{id}"),
        &json!({"metadata": {"topic": "done"}}),
    );
    assert_eq!(u["metadata"]["topic"], "done");
    // input_items of a continued response: the earlier turn's input and output, then its own.
    let r1 = ok_json(
        &s,
        "/v1/responses",
        &json!({"input": "Hi", "max_output_tokens": 4}),
    );
    let r2 = ok_json(
        &s,
        "/v1/responses",
        &json!({"input": [{"role": "user", "content": "Go on"}],
                "previous_response_id": r1["id"], "max_output_tokens": 4}),
    );
    let listed = s
        .get(&format!(
            "/v1/responses/{}/input_items",
            r2["id"].as_str().unwrap()
        ))
        .json();
    let texts: Vec<&str> = (listed["data"].as_array().unwrap().iter())
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["Go on", output_text(&r1).as_str(), "Hi"],
        "{listed}"
    );
    assert_eq!(listed["first_id"], listed["data"][0]["id"]);
    // Counted: instructions and a previous response's items as the response reads them.
    let r3 = json!({"instructions": "Be brief.", "input": "Once more",
                    "previous_response_id": r2["id"], "max_output_tokens": 2});
    let counted = ok_json(&s, "/v1/responses/input_tokens", &r3);
    assert_eq!(
        counted["input_tokens"],
        ok_json(&s, "/v1/responses", &r3)["usage"]["input_tokens"]
    );
    // Refused, named.
    let refused = |method: &str, path: &str, body: Value, status: u16, param: Option<&str>| {
        let r = s.request(method, path, &[], body.to_string().as_bytes());
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.text());
        if let Some(p) = param {
            assert_eq!(r.json()["error"]["param"], p, "{}", r.text());
        }
    };
    refused(
        "POST",
        "/v1/responses",
        json!({"input": "x", "conversation": id, "previous_response_id": r1["id"]}),
        400,
        Some("conversation"),
    );
    refused(
        "POST",
        "/v1/conversations",
        json!({"items": [{"role": "robot", "content": "x"}]}),
        400,
        Some("items[0].role"),
    );
    refused(
        "POST",
        "/v1/conversations",
        json!({"metadata": {"k": 1}}),
        400,
        Some("metadata.k"),
    );
    refused("GET", "/v1/conversations", json!({}), 405, None);
    refused(
        "POST",
        "/v1/responses/input_tokens",
        json!({"input": [{"role": "robot", "content": "x"}]}),
        400,
        Some("input[0].role"),
    );
    refused(
        "POST",
        "/v1/responses/input_tokens",
        json!({"input": "x", "previous_response_id": "resp_nope"}),
        404,
        Some("previous_response_id"),
    );
    refused(
        "GET",
        &format!("/v1/conversations/{id}/items?order=sideways"),
        json!({}),
        400,
        Some("order"),
    );
    refused(
        "GET",
        "/v1/responses/resp_nope/input_items",
        json!({}),
        404,
        None,
    );
    refused(
        "GET",
        "/v1/conversations/conv_nope/items",
        json!({}),
        404,
        None,
    );
    let gone = s.request("DELETE", &format!("/v1/conversations/{id}"), &[], b"");
    assert_eq!(
        gone.json(),
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    refused(
        "POST",
        "/v1/responses",
        json!({"input": "x", "conversation": id}),
        404,
        Some("conversation"),
    );
}

/// `--conversation-dir`: a conversation and the turns responses added to it outlive the
/// server; the next server's response reads them as its context.
#[test]
fn conversations_survive_a_restart() {
    let (dir, t, d) = q8_models(1024);
    let kept = dir.path().join("conversations");
    let kept_arg = kept.display().to_string();
    let args = [
        "--model",
        &t,
        "--draft",
        &d,
        "--conversation-dir",
        &kept_arg,
    ];
    let mut s = Server::start(&args, None, dir.path());
    let conv = ok_json(
        &s,
        "/v1/conversations",
        &json!({"items": [{"role": "user", "content": "Hello there"}], "metadata": {"k": "v"}}),
    );
    let id = conv["id"].as_str().unwrap().to_string();
    let first = ok_json(
        &s,
        "/v1/responses",
        &json!({"input": "And then?", "conversation": id, "max_output_tokens": 6,
                "temperature": 0}),
    );
    let items = s
        .get(&format!("/v1/conversations/{id}/items?order=asc"))
        .json();
    assert_eq!(items["data"].as_array().unwrap().len(), 3, "{items}");
    s.terminate();
    assert!(s.wait_exit(Duration::from_secs(30)).is_some());

    let s = Server::start(&args, None, dir.path());
    assert_eq!(s.get(&format!("/v1/conversations/{id}")).json(), conv);
    assert_eq!(
        s.get(&format!("/v1/conversations/{id}/items?order=asc"))
            .json(),
        items
    );
    let next = ok_json(
        &s,
        "/v1/responses",
        &json!({"input": "Third", "conversation": id, "max_output_tokens": 6,
                "temperature": 0}),
    );
    let want = ok_json(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hello there"},
                             {"role": "user", "content": "And then?"},
                             {"role": "assistant", "content": output_text(&first)},
                             {"role": "user", "content": "Third"}],
                "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(output_text(&next), text_of(&want));
    let r = s.request("DELETE", &format!("/v1/conversations/{id}"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(std::fs::read_dir(&kept).unwrap().count(), 0);
}

/// OpenAI's stored chat completions: `store: true` keeps the answer (streamed too, as the
/// whole object a client would have gathered) with the messages sent; listed oldest first,
/// filtered by model and metadata, paged; read, updated, deleted; bad uses refused, named.
#[test]
fn stored_chat_completions_are_listed_read_and_deleted() {
    let s = q8_server(4096, &[]);
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]);
    let ask = |extra: Value| -> Value {
        merged(
            json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
            &extra,
        )
    };
    let kept = ok_json(
        &s,
        "/v1/chat/completions",
        &ask(json!({"store": true, "metadata": {"team": "a"}, "logprobs": true})),
    );
    ok_json(&s, "/v1/chat/completions", &ask(json!({})));
    let events = s
        .open_stream(
            "/v1/chat/completions",
            &ask(
                json!({"store": true, "stream": true, "metadata": {"team": "b"},
                        "stream_options": {"include_usage": true}}),
            ),
        )
        .collect();
    let (streamed_text, _, _) = stream_text(&events);
    let usage = (events.iter().filter(|e| *e != "[DONE]"))
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .next_back();
    let list = s.get("/v1/chat/completions").json();
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{list}");
    // The first as its client got it, with its metadata.
    assert_eq!(
        data[0],
        merged(kept.clone(), &json!({"metadata": {"team": "a"}}))
    );
    // The streamed one as a whole: its text, its usage.
    assert_eq!(text_of(&data[1]), streamed_text);
    assert_eq!(text_of(&data[1]), text_of(&kept));
    assert_eq!(Some(&data[1]["usage"]), usage.as_ref());
    let sid = data[1]["id"].as_str().unwrap();
    // Filters and paging.
    let ids = |path: &str| -> Vec<String> {
        let v = s.get(path).json();
        (v["data"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter())
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
    };
    assert_eq!(ids("/v1/chat/completions?metadata%5Bteam%5D=b"), [sid]);
    assert_eq!(ids("/v1/chat/completions?order=desc&limit=1"), [sid]);
    assert_eq!(ids("/v1/chat/completions?model=nope"), Vec::<String>::new());
    let id = kept["id"].as_str().unwrap();
    assert_eq!(ids(&format!("/v1/chat/completions?after={id}")), [sid]);
    assert_eq!(s.get(&format!("/v1/chat/completions/{id}")).json(), data[0]);
    // The messages sent, with ids; parts as text.
    let m = s.get(&format!("/v1/chat/completions/{id}/messages")).json();
    assert_eq!(m["data"][0]["id"], format!("{id}-0"));
    assert_eq!(m["data"][1]["content"], "Hello");
    assert_eq!(m["data"][1]["content_parts"][0]["text"], "Hello");
    // Updated, deleted.
    let u = ok_json(
        &s,
        &format!("/v1/chat/completions/{id}"),
        &json!({"metadata": {"team": "c"}}),
    );
    assert_eq!(u["metadata"], json!({"team": "c"}));
    let r = s.request("DELETE", &format!("/v1/chat/completions/{id}"), &[], b"");
    assert_eq!(
        r.json(),
        json!({"id": id, "object": "chat.completion.deleted", "deleted": true})
    );
    assert_eq!(s.get(&format!("/v1/chat/completions/{id}")).status, 404);
    // Refused, named.
    for (body, param) in [
        (ask(json!({"store": "yes"})), "store"),
        (
            ask(json!({"store": true, "metadata": {"k": 1}})),
            "metadata.k",
        ),
    ] {
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["param"], param);
    }
    let r = s.get("/v1/chat/completions?order=sideways");
    assert_eq!(r.json()["error"]["param"], "order");
    assert_eq!(s.get("/v1/chat/completions/nope/messages").status, 404);
}

/// OpenAI's predicted outputs: a chat request's `prediction` drafts the answer where it agrees
/// (the same text as without it, strict being lossless), and the usage counts the predicted
/// tokens accepted and rejected; bad predictions are refused, named.
#[test]
fn a_prediction_drafts_the_answer_and_changes_no_text() {
    let s = q8_server(4096, &[]);
    let ask = |extra: Value| -> Value {
        ok_json(
            &s,
            "/v1/chat/completions",
            &merged(
                json!({"messages": [{"role": "user", "content": "Hello there"}],
                       "max_tokens": 32, "temperature": 0}),
                &extra,
            ),
        )
    };
    let plain = ask(json!({}));
    let text = text_of(&plain);
    assert!(plain["usage"].get("completion_tokens_details").is_none());
    let exact = ask(json!({"prediction": {"type": "content", "content": text}}));
    assert_eq!(text_of(&exact), text);
    let details = &exact["usage"]["completion_tokens_details"];
    // Every predicted token drafted was right; each step adds the target's own next token.
    let accepted = details["accepted_prediction_tokens"].as_u64().unwrap();
    let steps = exact["speculation"]["steps"].as_u64().unwrap();
    assert_eq!(details["rejected_prediction_tokens"], 0, "{exact}");
    assert_eq!(
        accepted + steps + 1,
        plain["usage"]["completion_tokens"].as_u64().unwrap(),
        "{exact}"
    );
    assert!(exact["speculation"]["drafter_steps"]["prediction"].as_u64() > Some(0));
    assert_eq!(
        s.metric("verdict_accepted_prediction_tokens_total"),
        accepted as f64
    );
    // A prediction with an edit in it, given as text parts: the same text.
    let cut = text.chars().count() / 2;
    let edited: String = text
        .chars()
        .take(cut)
        .chain("XYZ".chars())
        .chain(text.chars().skip(cut + 2))
        .collect();
    let r = ask(json!({"prediction": {"type": "content",
                                      "content": [{"type": "text", "text": edited}]}}));
    assert_eq!(text_of(&r), text);
    assert!(r["usage"]["completion_tokens_details"]["rejected_prediction_tokens"].is_u64());
    // Streamed too.
    let events = s
        .open_stream(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 32,
                    "temperature": 0, "stream": true,
                    "prediction": {"type": "content", "content": text}}),
        )
        .collect();
    assert_eq!(stream_text(&events).0, text);
    for (prediction, param) in [
        (json!("text"), "prediction"),
        (json!({"type": "file", "content": "x"}), "prediction.type"),
        (json!({"type": "content"}), "prediction.content"),
        (
            json!({"type": "content", "content": [{"type": "image"}]}),
            "prediction.content[0].type",
        ),
        (
            json!({"type": "content", "content": "x", "extra": 1}),
            "prediction.extra",
        ),
    ] {
        let r = s.post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "prediction": prediction}),
        );
        assert_eq!(r.status, 400, "{prediction}");
        assert_eq!(r.json()["error"]["param"], param, "{prediction}");
    }
}
