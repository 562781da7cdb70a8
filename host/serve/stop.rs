//! Stop strings on streamed text. Text that could still grow into a stop string is held back
//! until it either completes one (the generation ends before it) or cannot any more, so a client
//! never sees the start of a stop string.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop string is sent as part of the text (vLLM's `include_stop_str_in_output`).
    include: bool,
}

/// What a piece of new text produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Text safe to send now.
    pub emit: String,
    /// The stop string completed (the earliest in the text): the generation ends after `emit`.
    pub stop: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            include: false,
        }
    }

    /// The same matcher sending the stop string that ends the text with it.
    pub fn including_stop(mut self, include: bool) -> Self {
        self.include = include;
        self
    }

    pub fn push(&mut self, text: &str) -> Pushed {
        if self.stops.is_empty() {
            return Pushed {
                emit: text.to_string(),
                stop: None,
            };
        }
        self.held.push_str(text);
        // The earliest stop string wins.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, s)) = first {
            let stop = Some(s.clone());
            let end = if self.include { at + s.len() } else { at };
            let emit = self.held[..end].to_string();
            self.held.clear();
            return Pushed { emit, stop };
        }
        // Hold the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep].to_string();
        self.held.drain(..keep);
        Pushed { emit, stop: None }
    }

    /// The generation ended without a stop string: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// How many bytes at the end of `text` may be the start of `tag` (a proper prefix of it): what a
/// stream holds back until the next piece tells (a tool-call tag, `</think>`).
pub fn tag_start_len(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .filter(|&n| tag.is_char_boundary(n))
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let (out, stop) = matched(stops, pieces);
        (out, stop.is_some())
    }

    /// The output, and the stop string that ended it.
    fn matched(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stop.is_some() {
                return (out, r.stop);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn an_included_stop_string_is_sent_with_the_text() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]).including_stop(true);
        assert_eq!(m.push("abc E").emit, "abc ");
        let p = m.push("ND tail");
        assert_eq!((p.emit.as_str(), p.stop.as_deref()), ("END", Some("END")));
    }

    #[test]
    fn stops_across_pieces() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
        assert_eq!(
            run(&["\n\n"], &["a\n", "b\n", "\nc"]),
            ("a\nb".into(), true)
        );
    }

    #[test]
    fn releases_false_starts() {
        assert_eq!(run(&["END"], &["E", "N", "d"]), ("ENd".into(), false));
        let mut m = StopMatcher::new(vec!["xyz".into()]);
        assert_eq!(m.push("abx").emit, "ab");
        assert_eq!(m.push("q").emit, "xq");
    }

    #[test]
    fn a_tags_start_is_held() {
        assert_eq!(tag_start_len("text </th", "</think>"), 4);
        assert_eq!(tag_start_len("text <", "</think>"), 1);
        assert_eq!(tag_start_len("text", "</think>"), 0);
        // The whole tag is found by the caller, not held.
        assert_eq!(tag_start_len("a</think>", "</think>"), 0);
        // A tag with a wide character is cut only at its boundaries.
        assert_eq!(tag_start_len("x\u{2581}", "\u{2581}a"), 3);
    }

    #[test]
    fn earliest_stop_wins_and_unicode() {
        assert_eq!(
            matched(&["b", "a"], &["xxab"]),
            ("xx".into(), Some("a".into()))
        );
        assert_eq!(
            matched(&["END", "\n\n"], &["abc E", "N", "D"]),
            ("abc ".into(), Some("END".into()))
        );
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}
