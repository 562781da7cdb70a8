//! Our GGUF tokenizer against llama.cpp's ids for the same strings on the real models
//! (tests/fixtures/tokenizer.json, made by scripts/make-fixtures.py), plus the chat templates
//! against Jinja2 renders (tests/fixtures/chat.json) and error cases on generated vocabularies.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use serde::Deserialize;
use verdict::models::chat::{ChatTemplate, Message};
use verdict::models::tokenizer::Tokenizer;

fn models_dir() -> PathBuf {
    std::env::var_os("VERDICT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/verdict/models")
        })
}

fn read_gguf(file: &str) -> Content {
    let path = models_dir().join(file);
    let mut f = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models)", path.display()));
    Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture parses")
}

#[derive(Deserialize)]
struct TokFixture {
    strings: Vec<String>,
    models: HashMap<String, TokModel>,
}

#[derive(Deserialize)]
struct TokModel {
    file: String,
    special: Vec<Vec<u32>>,
    plain: Vec<Vec<u32>>,
}

fn check_model(key: &str) {
    let fx: TokFixture = fixture("tokenizer.json");
    let m = &fx.models[key];
    let content = read_gguf(&m.file);
    let tok = Tokenizer::from_gguf(&content).expect("tokenizer builds");
    let mut failures = Vec::new();
    for (i, s) in fx.strings.iter().enumerate() {
        for (special, want) in [(true, &m.special[i]), (false, &m.plain[i])] {
            let got = tok.encode(s, special).expect("encodes");
            if &got != want {
                failures.push(format!(
                    "{key} special={special} {s:?}:\n   ours      {got:?}\n   llama.cpp {want:?}"
                ));
            }
        }
        // Byte-level BPE is lossless: decoding gives the text back, all at once or streamed.
        let ids = tok.encode(s, true).expect("encodes");
        let text = tok.decode(&ids, false).expect("decodes");
        if &text != s {
            failures.push(format!("{key}: decode(encode({s:?})) = {text:?}"));
        }
        let mut stream = tok.stream(false);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&stream.push(&tok, id).expect("valid id"));
        }
        streamed.push_str(&stream.finish());
        if &streamed != s {
            failures.push(format!("{key}: streamed decode of {s:?} = {streamed:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        fx.strings.len() * 2,
        failures.join("\n")
    );
}

#[test]
fn smollm2_ids_equal_llama_cpp() {
    check_model("smol");
}

#[test]
fn qwen05_ids_equal_llama_cpp() {
    check_model("qwen05");
}

#[test]
fn qwen15_ids_equal_llama_cpp() {
    check_model("qwen15");
}

#[test]
fn special_tokens_and_eos() {
    let qwen = Tokenizer::from_gguf(&read_gguf("qwen2.5-coder-0.5b.gguf")).unwrap();
    assert_eq!(qwen.vocab_size(), 151936);
    let im_end = qwen.token_id("<|im_end|>").unwrap();
    let eot = qwen.token_id("<|endoftext|>").unwrap();
    assert!(
        qwen.is_eos(im_end) && qwen.is_eos(eot),
        "{:?}",
        qwen.eos_ids()
    );
    assert!(!qwen.is_eos(qwen.token_id("<|im_start|>").unwrap()));
    assert_eq!(qwen.encode("<|im_end|>", true).unwrap(), vec![im_end]);
    assert!(qwen.encode("<|im_end|>", false).unwrap().len() > 1);
    // Control tokens vanish from text when skipped, stay when not.
    let ids = qwen.encode("<|im_start|>hi<|im_end|>", true).unwrap();
    assert_eq!(qwen.decode(&ids, true).unwrap(), "hi");
    assert_eq!(
        qwen.decode(&ids, false).unwrap(),
        "<|im_start|>hi<|im_end|>"
    );
    assert!(qwen.decode(&[151936], false).is_err());

    let smol = Tokenizer::from_gguf(&read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert!(smol.is_eos(smol.token_id("<|im_end|>").unwrap()));
    assert!(smol.is_eos(smol.token_id("<|endoftext|>").unwrap()));
    assert!(!smol.add_bos());
}

#[test]
fn fill_in_the_middle_tokens() {
    let qwen = Tokenizer::from_gguf(&read_gguf("qwen2.5-coder-0.5b.gguf")).unwrap();
    let fim = qwen.fim().expect("Qwen2.5-Coder has FIM tokens");
    let id = |t: &str| qwen.token_id(t).unwrap();
    assert_eq!(
        (fim.prefix, fim.suffix, fim.middle),
        (
            id("<|fim_prefix|>"),
            id("<|fim_suffix|>"),
            id("<|fim_middle|>")
        )
    );
    for t in ["<|fim_pad|>", "<|file_sep|>", "<|endoftext|>", "<|im_end|>"] {
        assert!(fim.stops.contains(&id(t)), "{t} ends the middle");
    }
    assert_eq!(
        fim.prompt(None, &[7, 8], &[9]),
        vec![fim.prefix, 7, 8, fim.suffix, 9, fim.middle]
    );
    assert_eq!(fim.prompt(Some(1), &[], &[])[..2], [1, fim.prefix]);
}

#[test]
fn draft_and_target_share_a_tokenizer_fingerprint() {
    let q05 = Tokenizer::from_gguf(&read_gguf("qwen2.5-coder-0.5b.gguf")).unwrap();
    let q15 = Tokenizer::from_gguf(&read_gguf("qwen2.5-coder-1.5b.gguf")).unwrap();
    let smol = Tokenizer::from_gguf(&read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    q05.ensure_same(&q15)
        .expect("the two Qwen files share a tokenizer");
    assert_eq!(q05, q15);
    let err = q05.ensure_same(&smol).unwrap_err().to_string();
    assert!(err.contains("tokenizers differ"), "{err}");
    assert_ne!(q05, smol);
}

#[test]
fn streaming_holds_back_split_characters() {
    let smol = Tokenizer::from_gguf(&read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    // An emoji is 4 bytes; find ids whose pieces are its single bytes.
    let s = "😀";
    let ids = smol.encode(s, false).unwrap();
    assert!(
        ids.len() > 1,
        "expected the emoji to take several byte tokens: {ids:?}"
    );
    let mut stream = smol.stream(false);
    let outs: Vec<String> = ids
        .iter()
        .map(|&id| stream.push(&smol, id).unwrap())
        .collect();
    assert!(
        outs[..outs.len() - 1].iter().all(String::is_empty),
        "{outs:?}"
    );
    assert_eq!(outs.last().unwrap(), s);
    // A character cut off at the end of the generation becomes U+FFFD.
    let mut stream = smol.stream(false);
    assert_eq!(stream.push(&smol, ids[0]).unwrap(), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
}

#[derive(Deserialize)]
struct ChatFixture {
    conversations: Vec<Vec<Message>>,
    models: HashMap<String, ChatModel>,
}

#[derive(Deserialize)]
struct ChatModel {
    file: String,
    rendered: Vec<Rendered>,
}

#[derive(Deserialize)]
struct Rendered {
    add_generation_prompt: bool,
    text: String,
}

#[test]
fn chat_templates_render_like_jinja2() {
    let fx: ChatFixture = fixture("chat.json");
    for (key, m) in &fx.models {
        let content = read_gguf(&m.file);
        let tok = Tokenizer::from_gguf(&content).unwrap();
        let tmpl = ChatTemplate::from_gguf(&content, &tok).unwrap();
        assert!(!tmpl.is_fallback(), "{key} has a template");
        let cases = fx.conversations.iter().flat_map(|c| [c, c]);
        for (conv, want) in cases.zip(&m.rendered) {
            let got = tmpl.render(conv, want.add_generation_prompt).unwrap();
            assert_eq!(
                got, want.text,
                "{key}, {conv:?}, agp={}",
                want.add_generation_prompt
            );
        }
    }
    // Qwen's default system prompt appears when the conversation has none.
    let content = read_gguf("qwen2.5-coder-0.5b.gguf");
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let s = ChatTemplate::from_gguf(&content, &tok)
        .unwrap()
        .render(&[Message::user("hi")], true)
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[derive(Deserialize)]
struct ThinkingFixture {
    thinking_template: Vec<ThinkingCase>,
}

#[derive(Deserialize)]
struct ThinkingCase {
    messages: Vec<Message>,
    tools: Option<serde_json::Value>,
    vars: serde_json::Map<String, serde_json::Value>,
    add_generation_prompt: bool,
    text: String,
}

/// A template with Qwen3-style constructs (tests/fixtures/thinking-template.jinja: a namespace
/// set in a reversed loop, string methods, thinking cut out of earlier turns, tool calls and
/// responses, `enable_thinking` from `chat_template_kwargs`) renders as Jinja2 renders it, in
/// 96 cases.
#[test]
fn a_thinking_template_renders_like_jinja2() {
    let source = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/thinking-template.jinja"),
    )
    .unwrap();
    let tmpl = ChatTemplate::new(&source, "", "").unwrap();
    let fx: ThinkingFixture = fixture("chat.json");
    assert_eq!(fx.thinking_template.len(), 96);
    for c in &fx.thinking_template {
        let vars = (!c.vars.is_empty()).then_some(&c.vars);
        let got = tmpl
            .render_with_tools(&c.messages, c.tools.as_ref(), c.add_generation_prompt, vars)
            .unwrap();
        assert_eq!(
            got,
            c.text,
            "{:?} tools={} vars={:?}",
            c.messages,
            c.tools.is_some(),
            c.vars
        );
    }
}

// ---- generated vocabularies: structure and error cases ----

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A tiny byte-level vocabulary: "a", "b", "ab", "Ġ", "Ġab" and two control tokens.
fn tiny() -> Content {
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        strings(&["a", "b", "ab", "Ġ", "Ġab", "<|im_start|>", "<|im_end|>"]),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array([1, 1, 1, 1, 1, 3, 3].into_iter().map(Value::I32).collect()),
    );
    md.insert("tokenizer.ggml.merges".into(), strings(&["a b", "Ġ ab"]));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(6));
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

#[test]
fn tiny_vocabulary_encodes_and_decodes() {
    let tok = Tokenizer::from_gguf(&tiny()).unwrap();
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![2, 4]);
    assert_eq!(
        tok.encode("<|im_start|>ab<|im_end|>", true).unwrap(),
        vec![5, 2, 6]
    );
    assert_eq!(tok.decode(&[5, 2, 4, 6], true).unwrap(), "ab ab");
    assert_eq!(tok.eos_ids(), &[6]);
    // ChatML fallback when the file has no template.
    let tmpl = ChatTemplate::from_gguf(&tiny(), &tok).unwrap();
    assert!(tmpl.is_fallback());
}

/// gpt-oss's harmony vocabulary, read as llama.cpp reads it: the message markers print (a
/// reply's reader needs them), and `<|end|>`, which closes the reasoning before the answer,
/// ends nothing where `<|return|>` and `<|call|>` end a reply.
#[test]
fn harmony_markers_print_and_replies_end_at_return_or_call() {
    let harmony = |call: &str| {
        let mut c = tiny();
        let tokens = [
            "a",
            "b",
            "ab",
            "Ġ",
            "Ġab",
            "<|start|>",
            "<|channel|>",
            "<|message|>",
            "<|end|>",
            "<|return|>",
            call,
            "<|constrain|>",
        ];
        c.metadata
            .insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        c.metadata.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3]
                    .into_iter()
                    .map(Value::I32)
                    .collect(),
            ),
        );
        c.metadata
            .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(9));
        Tokenizer::from_gguf(&c).unwrap()
    };
    let tok = harmony("<|call|>");
    assert_eq!(tok.eos_ids(), &[9, 10]);
    assert_eq!(
        tok.encode("<|channel|>ab<|message|>ab<|end|>", true)
            .unwrap(),
        vec![6, 2, 7, 2, 8]
    );
    // Skipping special tokens keeps the markers and drops the end of the reply.
    assert_eq!(
        tok.decode(&[5, 6, 2, 7, 4, 8, 9], true).unwrap(),
        "<|start|><|channel|>ab<|message|> ab<|end|>"
    );
    // Without `<|call|>` it is no harmony vocabulary: `<|end|>` ends a reply (Phi-3's does).
    let other = harmony("<|cull|>");
    assert_eq!(other.eos_ids(), &[8, 9]);
    assert_eq!(other.decode(&[2, 8], true).unwrap(), "ab");
}

fn err_of(content: Content) -> String {
    format!("{:#}", Tokenizer::from_gguf(&content).unwrap_err())
}

#[test]
fn malformed_metadata_gives_clear_errors() {
    let mut c = tiny();
    c.metadata.remove("tokenizer.ggml.model");
    assert!(err_of(c).contains("tokenizer.ggml.model"));

    let mut c = tiny();
    c.metadata
        .insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let e = err_of(c);
    assert!(
        e.contains("\"bert\"") && e.contains("gpt2") && e.contains("llama"),
        "{e}"
    );

    // SentencePiece: a score per token.
    let mut c = tiny();
    c.metadata
        .insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    c.metadata.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0)]),
    );
    let e = err_of(c);
    assert!(e.contains("scores has 1 entries"), "{e}");

    let mut c = tiny();
    c.metadata.insert(
        "tokenizer.ggml.pre".into(),
        Value::String("nonesuch".into()),
    );
    assert!(err_of(c).contains("nonesuch"));

    let mut c = tiny();
    c.metadata.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    let e = err_of(c);
    assert!(e.contains("token_type has 1 entries"), "{e}");

    let mut c = tiny();
    c.metadata
        .insert("tokenizer.ggml.merges".into(), strings(&["a zz"]));
    let e = err_of(c);
    assert!(e.contains("merges") && e.contains("zz"), "{e}");

    let mut c = tiny();
    c.metadata
        .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(99));
    let e = err_of(c);
    assert!(e.contains("eos_token_id = 99"), "{e}");

    let mut c = tiny();
    c.metadata
        .insert("tokenizer.ggml.tokens".into(), Value::U32(3));
    let e = err_of(c);
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
}

/// Qwen2.5-Coder's own template with tools: the functions are listed in the system turn, an
/// assistant's call is written as a `<tool_call>` block with its arguments as an object, and
/// the tool's answer as a `<tool_response>`.
#[test]
fn qwen_template_renders_tools_and_calls() {
    let content = read_gguf("qwen2.5-coder-0.5b.gguf");
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let chat = ChatTemplate::from_gguf(&content, &tok).unwrap();
    assert!(chat.takes_tools());
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let call = serde_json::json!([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]);
    let msgs = [
        Message::user("weather?"),
        Message {
            tool_calls: Some(call),
            ..Message::assistant("")
        },
        Message {
            tool_call_id: Some("call_1".into()),
            ..Message::new("tool", "21 C")
        },
    ];
    let text = chat
        .render_with_tools(&msgs, Some(&tools), true, None)
        .unwrap();
    assert!(
        text.contains("<tools>") && text.contains("\"name\": \"get_weather\""),
        "{text}"
    );
    assert!(
        text.contains(
            r#"<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>"#
        ),
        "{text}"
    );
    assert!(
        text.contains("<tool_response>\n21 C\n</tool_response>"),
        "{text}"
    );
    assert!(!chat.render(&msgs[..1], true).unwrap().contains("<tools>"));
}
