//! Tool calls in a chat reply. Models trained on the Hermes format (Qwen2.5 among them) answer a
//! request that lists `tools` with `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//! blocks; the small Qwen2.5-Coder models often write the JSON object alone, as their whole
//! reply, which counts as one call too. OpenAI's API returns the calls as `message.tool_calls`,
//! each with its arguments as a JSON string, and the text before the first block as `content`.

use serde_json::{Value, json};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A reply's tool calls, when it makes any: the text before them (`None` when blank) and the
/// calls in OpenAI's shape. `None` when the reply has no call block, or one that is not a JSON
/// object with a string `name` (then the reply is plain text, as the model wrote it).
pub fn parse(text: &str) -> Option<(Option<String>, Vec<Value>)> {
    let Some(start) = text.find(OPEN) else {
        // A reply that is nothing but one call object.
        let call: Value = serde_json::from_str(text.trim()).ok()?;
        call.get("arguments")?;
        return Some((None, vec![openai_call(&call)?]));
    };
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find(OPEN) {
        let body_at = open + OPEN.len();
        // A block cut off by max_tokens runs to the end of the text.
        let (body, next) = match rest[body_at..].find(CLOSE) {
            Some(close) => (
                &rest[body_at..body_at + close],
                &rest[body_at + close + CLOSE.len()..],
            ),
            None => (&rest[body_at..], ""),
        };
        let call: Value = serde_json::from_str(body.trim()).ok()?;
        calls.push(openai_call(&call)?);
        rest = next;
    }
    let content = text[..start].trim();
    Some(((!content.is_empty()).then(|| content.to_string()), calls))
}

/// `{"name": ..., "arguments": ...}` as OpenAI's call object, or `None` without a string name.
fn openai_call(call: &Value) -> Option<Value> {
    let name = call.get("name")?.as_str()?;
    let arguments = match call.get("arguments") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "{}".to_string(),
    };
    Some(json!({
        "id": format!("call_{:016x}", rand::random::<u64>()),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_the_text_before_them() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse(text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    }

    #[test]
    fn plain_text_and_broken_blocks_stay_text() {
        assert!(parse("no calls here").is_none());
        // A bare call object is a call; other JSON is text.
        let (content, calls) = parse(" {\"name\": \"f\", \"arguments\": {\"x\": 1}}\n").unwrap();
        assert_eq!(content, None);
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        assert!(parse("{\"name\": \"f\"}").is_none());
        assert!(parse("{\"a\": 1}").is_none());
        assert!(parse("<tool_call>\nnot json\n</tool_call>").is_none());
        assert!(parse("<tool_call>{\"arguments\": {}}</tool_call>").is_none());
        // A call cut at max_tokens after its JSON still counts; the text before is blank.
        let (content, calls) =
            parse("<tool_call>\n{\"name\": \"f\", \"arguments\": \"{}\"}").unwrap();
        assert_eq!(content, None);
        assert_eq!(calls[0]["function"]["arguments"], "{}");
    }
}
