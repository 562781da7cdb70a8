//! A reasoning model's thinking, apart from its answer (vLLM's `--reasoning-parser`, llama.cpp's
//! `--reasoning-format`): Qwen3 and DeepSeek-R1 write `<think> ... </think>` before the reply,
//! gpt-oss writes harmony messages (an `analysis` channel, then a `final` one), and clients read
//! the thinking as `reasoning_content` beside `content`.
//!
//! One [`Splitter`] serves both a stream (pieces in, labelled pieces out, holding back only what
//! may be the start of a tag) and a finished reply ([`split`]), so the two always agree.

/// Which models' convention the server reads (`serve --reasoning-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Parser {
    /// Qwen3: thinking only inside `<think> ... </think>` at the reply's start; a reply that
    /// does not open with the tag (thinking switched off) is all answer.
    Qwen3,
    /// DeepSeek-R1 and its distills: the template opens the thinking in the prompt, so
    /// everything before `</think>` is thinking (a leading `<think>` is dropped as well).
    #[value(name = "deepseek_r1")]
    DeepSeekR1,
    /// gpt-oss: the reply is harmony messages, each a header and a body,
    /// `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...`;
    /// the `analysis` channel's bodies are thinking, the others' (`final`, `commentary`) the
    /// answer, and the headers are dropped (vLLM's `openai_gptoss`).
    #[value(name = "gpt-oss", alias = "openai_gptoss")]
    GptOss,
}

impl Parser {
    /// How this parser reads a reply whose prompt ended inside a thinking block (`open`: the
    /// template wrote `<think>` for the model, as newer Qwen templates and DeepSeek-R1's do).
    pub fn reading(self, open: bool) -> Reading {
        Reading { parser: self, open }
    }
}

/// How one reply is read: the server's parser, and whether the prompt opened the thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub parser: Parser,
    pub open: bool,
}

/// Whether a prompt ends inside a thinking block: its text ends with `<think>` (and white
/// space), so the model starts thinking without writing the tag.
pub fn opens_thinking(prompt_tail: &str) -> bool {
    prompt_tail.trim_end().ends_with(OPEN)
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";
/// Harmony's markers: a message's header starts with one of the first two and ends with the
/// third; the fourth ends its body.
const START: &str = "<|start|>";
const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
const END: &str = "<|end|>";
/// A harmony header longer than this is not one (the text is read as answer).
const MAX_HEADER: usize = 256;
/// How a harmony function call's block ends (its arguments' object, then the tag).
const CALL_CLOSE: &str = "}</tool_call>";

/// The function a harmony header addresses (`to=functions.NAME`, in the channel's part or the
/// role's), if any.
fn recipient(header: &str) -> Option<&str> {
    const TO: &str = "to=functions.";
    let rest = &header[header.find(TO)? + TO.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '<')
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// Which field a piece of the reply belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Reasoning,
    Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but (maybe) the start of `<think>` yet.
    Start,
    Thinking,
    /// Right after `</think>`: the line breaks that separate the answer are dropped (as Qwen3's
    /// template drops them when the reply goes back into a prompt).
    AfterThinking,
    Answer,
    /// Harmony: a message's header (up to `<|message|>`).
    Header,
    /// Harmony: a message's body, up to `<|end|>`, and the part it goes to.
    Body(Part),
}

/// A reply read piece by piece. `E` goes with the text (its tokens' logprobs) and leaves with
/// the piece it came in with (or the first one after it, when its text was held back).
#[derive(Debug)]
pub struct Splitter<E> {
    parser: Parser,
    phase: Phase,
    held: String,
    with: Vec<E>,
    /// Harmony: the body is a function call's arguments, written out as a Hermes
    /// `<tool_call>` block (closed at the body's end).
    call: bool,
}

impl<E> Splitter<E> {
    pub fn new(reading: Reading) -> Self {
        Splitter {
            parser: reading.parser,
            phase: match (reading.parser, reading.open) {
                // A harmony reply starts with a header, whatever the prompt's end.
                (Parser::GptOss, _) => Phase::Header,
                (_, true) => Phase::Thinking,
                (_, false) => Phase::Start,
            },
            held: String::new(),
            with: Vec::new(),
            call: false,
        }
    }

    /// Adds a piece of the reply; returns the labelled pieces that may be sent now.
    pub fn push(&mut self, text: &str, with: Vec<E>) -> Vec<(Part, String, Vec<E>)> {
        self.held.push_str(text);
        self.with.extend(with);
        let mut out = Vec::new();
        if self.parser == Parser::GptOss {
            self.push_harmony(&mut out);
            return out;
        }
        if self.phase == Phase::Start {
            let t = self.held.trim_start();
            if t.len() < OPEN.len() && OPEN.starts_with(t) {
                return out; // may still become the tag
            }
            self.phase = match (t.strip_prefix(OPEN), self.parser) {
                (Some(rest), _) => {
                    self.held = rest.to_string();
                    Phase::Thinking
                }
                (None, Parser::DeepSeekR1) => Phase::Thinking,
                (None, Parser::Qwen3 | Parser::GptOss) => Phase::Answer,
            };
        }
        if self.phase == Phase::Thinking {
            match self.held.find(CLOSE) {
                Some(at) => {
                    let answer = self.held.split_off(at + CLOSE.len());
                    self.held.truncate(at);
                    let thought = std::mem::replace(&mut self.held, answer);
                    self.phase = Phase::AfterThinking;
                    // The tags' tokens go with the thinking, even when it is empty.
                    if !thought.is_empty() || !self.with.is_empty() {
                        out.push((Part::Reasoning, thought, std::mem::take(&mut self.with)));
                    }
                }
                None => {
                    // Hold a tail that may be the start of `</think>`.
                    let keep = super::stop::tag_start_len(&self.held, CLOSE);
                    let tail = self.held.split_off(self.held.len() - keep);
                    let thought = std::mem::replace(&mut self.held, tail);
                    if !thought.is_empty() {
                        out.push((Part::Reasoning, thought, std::mem::take(&mut self.with)));
                    }
                    return out;
                }
            }
        }
        if self.phase == Phase::AfterThinking {
            let answer = self.held.trim_start_matches(['\n', '\r']);
            if answer.is_empty() {
                // The dropped line breaks' tokens stay with the thinking.
                self.held.clear();
                if !self.with.is_empty() {
                    out.push((
                        Part::Reasoning,
                        String::new(),
                        std::mem::take(&mut self.with),
                    ));
                }
                return out;
            }
            self.held = answer.to_string();
            self.phase = Phase::Answer;
        }
        if !self.held.is_empty() || !self.with.is_empty() {
            let text = std::mem::take(&mut self.held);
            out.push((Part::Content, text, std::mem::take(&mut self.with)));
        }
        out
    }

    /// Harmony: headers are dropped (their companions go with the next body), bodies go out
    /// as their channel's part, holding back only what may be the start of `<|end|>`. A
    /// message to a function (`to=functions.NAME`) becomes a Hermes `<tool_call>` block of
    /// the answer, which the tool-call reader takes from there (`tools.rs`).
    fn push_harmony(&mut self, out: &mut Vec<(Part, String, Vec<E>)>) {
        loop {
            match self.phase {
                Phase::Body(part) => match self.held.find(END) {
                    Some(at) => {
                        let rest = self.held.split_off(at + END.len());
                        self.held.truncate(at);
                        let mut body = std::mem::replace(&mut self.held, rest);
                        if std::mem::take(&mut self.call) {
                            body.push_str(CALL_CLOSE);
                        }
                        if !body.is_empty() || !self.with.is_empty() {
                            out.push((part, body, std::mem::take(&mut self.with)));
                        }
                        self.phase = Phase::Header;
                    }
                    None => {
                        let keep = super::stop::tag_start_len(&self.held, END);
                        let tail = self.held.split_off(self.held.len() - keep);
                        let body = std::mem::replace(&mut self.held, tail);
                        if !body.is_empty() {
                            out.push((part, body, std::mem::take(&mut self.with)));
                        }
                        return;
                    }
                },
                _ => {
                    if let Some(at) = self.held.find(MESSAGE) {
                        let header = &self.held[..at];
                        let part = match (recipient(header), header.contains("analysis")) {
                            (Some(name), _) => {
                                let open = format!(
                                    "<tool_call>{{\"name\": {}, \"arguments\": ",
                                    serde_json::Value::from(name)
                                );
                                out.push((Part::Content, open, std::mem::take(&mut self.with)));
                                self.call = true;
                                Part::Content
                            }
                            (None, true) => Part::Reasoning,
                            (None, false) => Part::Content,
                        };
                        self.held.drain(..at + MESSAGE.len());
                        self.phase = Phase::Body(part);
                        continue;
                    }
                    // A header opens with a marker and is short; text that cannot be one is
                    // the answer, as it is.
                    let t = self.held.as_str();
                    let opens = [START, CHANNEL]
                        .iter()
                        .any(|m| t.starts_with(m) || m.starts_with(t));
                    if opens && t.len() <= MAX_HEADER {
                        return;
                    }
                    self.phase = Phase::Body(Part::Content);
                }
            }
        }
    }

    /// The end of the reply: whatever was held back, as the part it was in.
    pub fn finish(&mut self) -> Vec<(Part, String, Vec<E>)> {
        if self.parser == Parser::GptOss {
            // A body cut off (or ended by `<|return|>` / `<|call|>`) is complete; an unfinished
            // header is dropped, its companions going out as an empty answer piece.
            let (part, mut text) = match self.phase {
                Phase::Body(part) => (part, std::mem::take(&mut self.held)),
                _ => {
                    self.held.clear();
                    (Part::Content, String::new())
                }
            };
            if std::mem::take(&mut self.call) {
                text.push_str(CALL_CLOSE);
            }
            if text.is_empty() && self.with.is_empty() {
                return Vec::new();
            }
            return vec![(part, text, std::mem::take(&mut self.with))];
        }
        let part = match (self.phase, self.parser) {
            (Phase::Thinking, _) | (Phase::Start, Parser::DeepSeekR1) => Part::Reasoning,
            (Phase::Body(part), _) => part,
            (Phase::AfterThinking | Phase::Answer | Phase::Header, _)
            | (Phase::Start, Parser::Qwen3 | Parser::GptOss) => Part::Content,
        };
        if self.held.is_empty() && self.with.is_empty() {
            return Vec::new();
        }
        vec![(
            part,
            std::mem::take(&mut self.held),
            std::mem::take(&mut self.with),
        )]
    }
}

/// A finished reply's thinking (`None` when it has none) and answer.
pub fn split(reading: Reading, text: &str) -> (Option<String>, String) {
    let mut s = Splitter::<()>::new(reading);
    let mut pieces = s.push(text, Vec::new());
    pieces.extend(s.finish());
    let (mut thought, mut answer) = (None::<String>, String::new());
    for (part, text, _) in pieces {
        match part {
            Part::Reasoning if text.is_empty() => {}
            Part::Reasoning => thought.get_or_insert_with(String::new).push_str(&text),
            Part::Content => answer.push_str(&text),
        }
    }
    (thought, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_reply_splits_at_the_tags() {
        let q = Parser::Qwen3.reading(false);
        assert_eq!(
            split(q, "<think>\nsum them\n</think>\n\nIt is 4."),
            (Some("\nsum them\n".into()), "It is 4.".into())
        );
        // Thinking switched off: no tag, all answer; an empty block leaves its blank lines.
        assert_eq!(split(q, "It is 4."), (None, "It is 4.".into()));
        assert_eq!(split(q, "<think>\n\n</think>\n\nIt is 4.").1, "It is 4.");
        // Cut off while thinking: all of it is thinking.
        assert_eq!(
            split(q, "<think>let me"),
            (Some("let me".into()), "".into())
        );
        assert_eq!(split(q, "<thi"), (None, "<thi".into()));
        // A tag later in the answer is text.
        assert_eq!(split(q, "Use <think> tags").1, "Use <think> tags");
        let r = Parser::DeepSeekR1.reading(false);
        assert_eq!(
            split(r, "sum them</think>It is 4."),
            (Some("sum them".into()), "It is 4.".into())
        );
        assert_eq!(
            split(r, "still thinking"),
            (Some("still thinking".into()), "".into())
        );
        // The prompt opened the block (newer Qwen templates): the reply starts inside it.
        let open = Parser::Qwen3.reading(true);
        assert_eq!(
            split(open, "plan\n</think>\n\nIt is 4."),
            (Some("plan\n".into()), "It is 4.".into())
        );
        assert_eq!(split(open, "still"), (Some("still".into()), "".into()));
        assert!(opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
    }

    #[test]
    fn harmony_replies_split_by_channel() {
        let g = Parser::GptOss.reading(false);
        assert_eq!(
            split(
                g,
                "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final<|message|>It is 4."
            ),
            (Some("Add them.".into()), "It is 4.".into())
        );
        // No analysis (a low reasoning effort may skip it), or a commentary preamble: answer.
        assert_eq!(
            split(g, "<|channel|>final<|message|>It is 4."),
            (None, "It is 4.".into())
        );
        assert_eq!(
            split(
                g,
                "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>Done."
            ),
            (None, "Checking.Done.".into())
        );
        // Cut off in the analysis, or in the next header.
        assert_eq!(
            split(g, "<|channel|>analysis<|message|>Let me"),
            (Some("Let me".into()), "".into())
        );
        assert_eq!(
            split(g, "<|channel|>analysis<|message|>a<|end|><|start|>assis"),
            (Some("a".into()), "".into())
        );
        // A message to a function is a Hermes tool call of the answer (the tool-call reader's
        // input), its recipient in the channel's part or the role's.
        for reply in [
            "<|channel|>analysis<|message|>need it<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}",
            "<|channel|>analysis<|message|>need it<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\": \"Paris\"}<|end|>",
        ] {
            let (thought, answer) = split(g, reply);
            assert_eq!(thought.as_deref(), Some("need it"));
            assert_eq!(
                answer,
                "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"
            );
            let (content, calls) = super::super::tools::parse(&answer).unwrap();
            assert_eq!(content, None);
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        }
        // A built-in tool's recipient (not `functions.`) is no call.
        assert_eq!(
            split(g, "<|channel|>commentary to=browser.search<|message|>q").1,
            "q"
        );
        // Text with no header is the answer as it is; the prompt's end changes nothing.
        assert_eq!(split(g, "plain <|end|> text"), (None, "plain  text".into()));
        assert_eq!(
            split(Parser::GptOss.reading(true), "<|channel|>final<|message|>x"),
            (None, "x".into())
        );
    }

    /// Every way of cutting a reply into pieces gives the same parts as the whole, and no piece
    /// carries part of a tag.
    #[test]
    fn a_stream_splits_as_the_whole_reply() {
        let harmony = [
            "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.",
            "<|channel|>final<|message|>x<|end|>",
            "<|channel|>analysis<|message|>a<|end|><|start|>assis",
            "<|chan",
            "plain <|end|> text",
            "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
            "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"a\": 1}",
        ];
        for text in harmony {
            stream_matches_whole(Parser::GptOss.reading(false), text);
        }
        for parser in [
            Parser::Qwen3.reading(false),
            Parser::DeepSeekR1.reading(false),
            Parser::Qwen3.reading(true),
        ] {
            for text in [
                "<think>\nsum them\n</think>\n\nIt is 4.",
                "  <think>a</think>b",
                "plain answer with </think> inside",
                "<think>never closed </thi",
                "<th",
                "x</think>",
                "<think>a</think>\n\n\n",
                "<think>a</think>\n \nb",
            ] {
                stream_matches_whole(parser, text);
            }
        }
    }

    fn stream_matches_whole(parser: Reading, text: &str) {
        // Cut into pieces of 1 to 4 characters, each with its index as the companion.
        let whole = split(parser, text);
        for step in 1..=4 {
            let mut s = Splitter::new(parser);
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for (i, chunk) in chars.chunks(step).enumerate() {
                let piece: String = chunk.iter().collect();
                pieces.extend(s.push(&piece, vec![i]));
            }
            pieces.extend(s.finish());
            let (mut thought, mut answer) = (None::<String>, String::new());
            let mut seen = Vec::new();
            for (part, t, with) in pieces {
                assert!(!t.contains(OPEN) || part == Part::Content, "{t:?}");
                if parser.parser == Parser::GptOss {
                    assert!(!t.contains("<|"), "{t:?} of {text:?}");
                }
                seen.extend(with);
                match part {
                    Part::Reasoning if t.is_empty() => {}
                    Part::Reasoning => thought.get_or_insert_with(String::new).push_str(&t),
                    Part::Content => answer.push_str(&t),
                }
            }
            assert_eq!((thought, answer), whole, "{parser:?} {text:?} by {step}");
            // Every piece's companion comes out once, in order.
            assert_eq!(seen, (0..chars.len().div_ceil(step)).collect::<Vec<_>>());
        }
    }
}
