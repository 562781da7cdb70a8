//! Tool calls in a chat reply. Models trained on the Hermes format (Qwen2.5 among them) answer a
//! request that lists `tools` with `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//! blocks; the small Qwen2.5-Coder models often write the JSON object alone, as their whole
//! reply, or alone in a fenced code block (its first token is a near-tie between the two), and
//! either counts as one call too. OpenAI's API returns the calls as `message.tool_calls`,
//! each with its arguments as a JSON string, and the text before the first block as `content`.

use serde_json::{Value, json};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// How a reply that is one fenced call object starts (after any whitespace).
const FENCES: [&str; 2] = ["```json\n", "```\n"];

/// The object of a reply that is nothing but one fenced JSON code block.
fn fenced(text: &str) -> Option<&str> {
    let t = text.trim();
    let body = FENCES.iter().find_map(|f| t.strip_prefix(f))?;
    body.strip_suffix("```")
}

/// A reply's tool calls, when it makes any: the text before them (`None` when blank) and the
/// calls in OpenAI's shape. `None` when the reply has no call block, or one that is not a JSON
/// object with a string `name` (then the reply is plain text, as the model wrote it).
pub fn parse(text: &str) -> Option<(Option<String>, Vec<Value>)> {
    let Some(start) = text.find(OPEN) else {
        // A reply that is nothing but one call object, bare or fenced.
        let object = fenced(text).unwrap_or(text);
        let call: Value = serde_json::from_str(object.trim()).ok()?;
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

/// What a streamed reply to a request with tools holds back: the text streams as it comes until
/// it may be a call (from a `<tool_call>` tag on, or the whole reply when it starts with `{` or
/// a JSON code fence, a bare or fenced call object); that part is sent at the end, as calls
/// when it parses as them ([`parse`]). `E`: what goes with the text (its tokens' logprobs).
#[derive(Debug)]
pub struct Holder<E> {
    text: String,
    with: Vec<E>,
    /// `None`: nothing but whitespace yet; `Some(false)`: plain text so far; `Some(true)`: a
    /// call may be under way, everything is held.
    call: Option<bool>,
}

impl<E> Default for Holder<E> {
    fn default() -> Self {
        Holder {
            text: String::new(),
            with: Vec::new(),
            call: None,
        }
    }
}

impl<E> Holder<E> {
    /// Adds a piece of the reply; returns what may be sent now.
    pub fn push(&mut self, text: &str, with: Vec<E>) -> Option<(String, Vec<E>)> {
        self.text.push_str(text);
        self.with.extend(with);
        if self.call.is_none() {
            let t = self.text.trim_start();
            // Undecided while it may still become a JSON fence.
            if t.is_empty() || FENCES.iter().any(|f| f.starts_with(t) && f.len() > t.len()) {
                return None;
            }
            self.call = Some(t.starts_with('{') || FENCES.iter().any(|f| t.starts_with(f)));
        }
        if self.call == Some(true) {
            return None;
        }
        let send = match self.text.find(OPEN) {
            Some(at) => {
                self.call = Some(true);
                at
            }
            // Hold a tail that may be the start of the tag.
            None => self.text.len() - super::stop::tag_start_len(&self.text, OPEN),
        };
        if send == 0 {
            return None;
        }
        let rest = self.text.split_off(send);
        let sent = std::mem::replace(&mut self.text, rest);
        Some((sent, std::mem::take(&mut self.with)))
    }

    /// The end of the reply: what is still held.
    pub fn finish(&mut self) -> (String, Vec<E>) {
        (
            std::mem::take(&mut self.text),
            std::mem::take(&mut self.with),
        )
    }
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
    fn a_holder_streams_text_and_holds_what_may_be_a_call() {
        let mut h = Holder::<u8>::default();
        assert_eq!(h.push("  ", vec![1]), None);
        assert_eq!(
            h.push("Sure. <to", vec![2]),
            Some(("  Sure. ".to_string(), vec![1, 2]))
        );
        // The tag completes: nothing more is sent until the end.
        assert_eq!(h.push("ol_call>\n{\"name\"", vec![3]), None);
        assert_eq!(h.push(": \"f\"}</tool_call>", vec![]), None);
        let (held, with) = h.finish();
        assert_eq!(with, vec![3]);
        assert_eq!(parse(&held).unwrap().1[0]["function"]["name"], "f");
        // A tail that only looked like a tag is sent on.
        let mut h = Holder::<u8>::default();
        assert_eq!(h.push("a <", vec![]), Some(("a ".to_string(), vec![])));
        assert_eq!(h.push("b", vec![]), Some(("<b".to_string(), vec![])));
        // A reply starting with `{` is held whole.
        let mut h = Holder::<u8>::default();
        assert_eq!(h.push("\n{\"name\": \"f\",", vec![]), None);
        assert_eq!(h.push(" \"arguments\": {}}", vec![]), None);
        assert_eq!(h.finish().0, "\n{\"name\": \"f\", \"arguments\": {}}");
        // So is one starting with a JSON fence, arriving a piece at a time; another fence is
        // text, sent once it is told apart.
        let mut h = Holder::<u8>::default();
        assert_eq!(h.push("``", vec![]), None);
        assert_eq!(h.push("`json", vec![]), None);
        assert_eq!(
            h.push("\n{\"name\": \"f\", \"arguments\": {}}\n```", vec![]),
            None
        );
        assert_eq!(parse(&h.finish().0).unwrap().1[0]["function"]["name"], "f");
        let mut h = Holder::<u8>::default();
        assert_eq!(h.push("```", vec![1]), None);
        assert_eq!(
            h.push("python\n", vec![2]),
            Some(("```python\n".to_string(), vec![1, 2]))
        );
    }

    #[test]
    fn plain_text_and_broken_blocks_stay_text() {
        assert!(parse("no calls here").is_none());
        // A bare call object is a call; other JSON is text.
        let (content, calls) = parse(" {\"name\": \"f\", \"arguments\": {\"x\": 1}}\n").unwrap();
        assert_eq!(content, None);
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        assert!(parse("{\"name\": \"f\"}").is_none());
        // Fenced alone, as Qwen2.5-Coder also writes it.
        let fenced = "```json\n{\n  \"name\": \"f\",\n  \"arguments\": {\"x\": 1}\n}\n```";
        assert_eq!(parse(fenced).unwrap().1[0]["function"]["name"], "f");
        assert!(parse("```json\n{\"a\": 1}\n```").is_none());
        assert!(parse("Here:\n```json\n{\"name\": \"f\", \"arguments\": {}}\n```").is_none());
        assert!(parse("```python\nprint(1)\n```").is_none());
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
