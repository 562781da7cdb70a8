//! Chat templates: the model's own Jinja template (`tokenizer.chat_template` in the GGUF),
//! rendered with minijinja configured like Hugging Face's `apply_chat_template` (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`, a Python-compatible `tojson`), so a
//! conversation becomes exactly the text the model was trained on. Models without a template
//! get ChatML.

use anyhow::{Context, Result, anyhow};
use candle_core::quantized::gguf_file::Content;
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use super::tokenizer::Tokenizer;

/// ChatML, for models that ship no template: `<|im_start|>role\ncontent<|im_end|>\n` per message.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' \
+ message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The template variables the renderer sets itself from the request.
pub const SERVER_VARS: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls, as templates read them: `[{"type": "function",
    /// "function": {"name": ..., "arguments": {...}}}]` (arguments as an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message's answer to this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fallback", &self.fallback)
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the texts the template may insert.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        Self::build(source, bos_token, eos_token, false)
    }

    /// ChatML (see [`CHATML`]).
    pub fn chatml(bos_token: &str, eos_token: &str) -> Self {
        // The constant is known to compile (tested), so this cannot fail.
        Self::build(CHATML, bos_token, eos_token, true)
            .unwrap_or_else(|e| unreachable!("the built-in ChatML template is valid: {e:#}"))
    }

    /// The template stored in the GGUF (`tokenizer.chat_template`), or ChatML when there is none.
    pub fn from_gguf(content: &Content, tokenizer: &Tokenizer) -> Result<Self> {
        match content.metadata.get("tokenizer.chat_template") {
            None => {
                let (bos, eos) = bos_eos(tokenizer);
                Ok(Self::chatml(&bos, &eos))
            }
            Some(v) => {
                let source = v
                    .to_string()
                    .map_err(|e| anyhow!("GGUF metadata tokenizer.chat_template: {e}"))?;
                Self::for_tokenizer(source, tokenizer)
                    .context("compiling the GGUF's tokenizer.chat_template")
            }
        }
    }

    /// A template of the caller's (`serve --chat-template`) with `tokenizer`'s BOS and EOS text.
    pub fn for_tokenizer(source: &str, tokenizer: &Tokenizer) -> Result<Self> {
        let (bos, eos) = bos_eos(tokenizer);
        Self::new(source, &bos, &eos)
    }

    fn build(source: &str, bos_token: &str, eos_token: &str, fallback: bool) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face (and llama.cpp) render chat templates with these two on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Jinja2's default: an undefined value is falsy and prints as nothing.
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            fallback,
        })
    }

    /// Whether this is the ChatML fallback (the model shipped no template).
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt, None)
    }

    /// [`ChatTemplate::render`] with the functions the model may call (OpenAI's `tools` list,
    /// as Hugging Face passes it to templates; one without tool support ignores it) and more
    /// variables for the template (vLLM's `chat_template_kwargs`, e.g. Qwen3's
    /// `enable_thinking`). Those cannot replace the [`SERVER_VARS`].
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        vars: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| anyhow!("chat template: {e:#}"))?;
        // The names listed first win over the spread ones.
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..Value::from_serialize(vars)
        })
        .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }

    /// Whether the template reads a `tools` list (it mentions `tools`).
    pub fn takes_tools(&self) -> bool {
        self.env
            .get_template(NAME)
            .is_ok_and(|t| t.source().contains("tools"))
    }
}

/// The text of the tokenizer's BOS and EOS tokens (empty where it has none).
fn bos_eos(tokenizer: &Tokenizer) -> (String, String) {
    let text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or_default()
    };
    (text(tokenizer.bos_id()), text(tokenizer.eos_id()))
}

/// Templates call `raise_exception("...")` to reject a conversation (e.g. roles out of order).
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the chat template rejected the conversation: {msg}"),
    ))
}

/// `strftime_now(format)`: the time now (UTC), as transformers gives templates it: gpt-oss's
/// and Llama 3's write today's date into the system message with it.
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(&format, now)
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))
}

/// C's `strftime` of the UTC time `unix` seconds after 1970, for the directives templates use:
/// `%Y %y %m %d %e %j %H %M %S %a %A %b %B %%`.
fn strftime(format: &str, unix: u64) -> std::result::Result<String, String> {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // The civil date of a day count (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    // 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("%{other} is not a directive verdict knows")),
            None => return Err("the format ends in a lone %".into()),
        }
    }
    Ok(out)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, which
/// is what Hugging Face's `tojson` is: `", "` and `": "` separators, non-ASCII kept as is.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a non-negative integer, got {v}"),
            )
        })?),
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter::new(indent));
    let written = if sort_keys {
        // A round trip through serde_json's value, its objects sorted (its maps keep insertion
        // order when a dependency turns on `preserve_order`).
        serde_json::to_value(value).and_then(|mut v| {
            v.sort_all_objects();
            v.serialize(&mut ser)
        })
    } else {
        // Straight from the template value, which keeps Python's insertion order.
        value.serialize(&mut ser)
    };
    written.map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    let s = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, "tojson: not UTF-8").with_source(e))?;
    // Marked safe so that an auto-escaping template does not escape the JSON again.
    Ok(Value::from_safe_string(s))
}

/// serde_json formatter that writes what Python's json module writes.
struct PyFormatter {
    indent: Option<usize>,
    level: usize,
    has_value: bool,
}

impl PyFormatter {
    fn new(indent: Option<usize>) -> Self {
        Self {
            indent,
            level: 0,
            has_value: false,
        }
    }

    fn separator<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        match self.indent {
            None if first => Ok(()),
            None => w.write_all(b", "),
            Some(n) => {
                if !first {
                    w.write_all(b",")?;
                }
                w.write_all(b"\n")?;
                w.write_all(" ".repeat(n * self.level).as_bytes())
            }
        }
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.level -= 1;
        if let (Some(n), true) = (self.indent, self.has_value) {
            w.write_all(b"\n")?;
            w.write_all(" ".repeat(n * self.level).as_bytes())?;
        }
        self.has_value = true;
        w.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders() {
        let t = ChatTemplate::chatml("", "");
        let s = t
            .render(&[Message::system("be brief"), Message::user("hi")], true)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let s = t.render(&[Message::user("hi")], false).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::new(
            "{% set x = {'name': 'f', 'args': [1, 'é', {'a': none}]} %}{{ x | tojson }}|\
             {{ x | tojson(indent=2) }}|{{ y | tojson }}|{{ e | tojson }}|{{ x | tojson(sort_keys=true) }}",
            "",
            "",
        )
        .unwrap();
        let env = &t.env;
        let out = env
            .get_template(NAME)
            .unwrap()
            .render(minijinja::context! {
                y => vec![1.5, 2.0],
                e => Vec::<u8>::new(),
            })
            .unwrap();
        // json.dumps(x), json.dumps(x, indent=2), json.dumps([1.5, 2.0]), json.dumps([]),
        // json.dumps(x, sort_keys=True)
        assert_eq!(
            out,
            "{\"name\": \"f\", \"args\": [1, \"é\", {\"a\": null}]}|{\n  \"name\": \"f\",\n  \
             \"args\": [\n    1,\n    \"é\",\n    {\n      \"a\": null\n    }\n  ]\n}|[1.5, 2.0]|[]|\
             {\"args\": [1, \"é\", {\"a\": null}], \"name\": \"f\"}"
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2023-11-14T22:13:20Z, a Tuesday, the 318th day; 2024-02-29 (a leap day) at 05:06:07.
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %e %%", 1_700_000_000).unwrap(),
            "2023-11-14 22:13:20 Tue Tuesday Nov November 318 23 14 %"
        );
        assert_eq!(
            strftime("%d %b %Y, day %j, %H:%M:%S", 1_709_183_167).unwrap(),
            "29 Feb 2024, day 060, 05:06:07"
        );
        assert_eq!(strftime("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert!(strftime("%Q", 0).unwrap_err().contains("%Q"));
        assert!(strftime("50%", 0).is_err());
        // Templates call it (gpt-oss's and Llama 3's date line).
        let t = ChatTemplate::new("Today: {{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
        let today = t.render(&[], false).unwrap();
        assert!(
            today.len() == "Today: 2026-12-06".len() && today.starts_with("Today: 2"),
            "{today}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[Message::assistant("x")], true).unwrap_err();
        assert!(format!("{err:#}").contains("first must be user"), "{err:#}");
        assert!(t.render(&[Message::user("x")], true).is_ok());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}", "", "").unwrap();
        assert_eq!(t.render(&[Message::user("  hi ")], false).unwrap(), "HI");
    }

    #[test]
    fn template_variables_reach_the_template() {
        // Qwen3's switch: an empty thinking block when `enable_thinking` is false.
        let t = ChatTemplate::new(
            "{{ messages[0].content }}|{% if add_generation_prompt %}A:{% if enable_thinking is \
             defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let vars = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let msgs = [Message::user("hi")];
        let render = |v: Option<&serde_json::Map<String, serde_json::Value>>| {
            t.render_with_tools(&msgs, None, true, v).unwrap()
        };
        assert_eq!(render(None), "hi|A:");
        let off = vars(serde_json::json!({"enable_thinking": false}));
        assert_eq!(render(Some(&off)), "hi|A:<think></think>");
        let on = vars(serde_json::json!({"enable_thinking": true}));
        assert_eq!(render(Some(&on)), "hi|A:");
        // The request's own variables win over a same-named extra one.
        let clash = vars(
            serde_json::json!({"messages": [{"content": "x"}], "add_generation_prompt": false}),
        );
        assert_eq!(render(Some(&clash)), "hi|A:");
    }

    #[test]
    fn broken_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(format!("{err:#}").contains("does not compile"), "{err:#}");
    }
}
