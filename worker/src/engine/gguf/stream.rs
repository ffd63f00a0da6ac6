//! Turns generated token bytes into text that is safe to stream: whole UTF-8 only, stop sequences held back.
//!
//! Byte-level BPE tokens are bytes, not characters: one emoji can be split over several tokens,
//! and a stop sequence can be split over several tokens too. This module buffers just enough to
//! never hand the caller half a character or the first half of a stop sequence.

/// What pushing one token's bytes produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text that may be emitted now (possibly empty).
    pub text: String,
    /// A stop sequence was completed; `text` holds everything before it and generation must end.
    pub stopped: bool,
}

/// Incremental UTF-8 decoder plus stop-sequence matcher for one generation.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes of an incomplete UTF-8 sequence at the end of the last token (at most 3).
    partial: Vec<u8>,
    /// Decoded text not yet emitted because it might be the start of a stop sequence.
    held: String,
    stop: Vec<String>,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        Self {
            partial: Vec::new(),
            held: String::new(),
            // An empty stop sequence would match everywhere and end every generation at once.
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Adds one token's bytes and returns what can be emitted now.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        self.partial.extend_from_slice(bytes);
        let decoded = take_complete_utf8(&mut self.partial);
        self.held.push_str(&decoded);

        if let Some(at) = self.earliest_stop() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Pushed {
                text,
                stopped: true,
            };
        }
        let keep_from = self.hold_back_start();
        let text = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        Pushed {
            text,
            stopped: false,
        }
    }

    /// Whatever is still buffered when generation ends for another reason (EOS, max_tokens).
    /// Incomplete UTF-8 at the very end becomes U+FFFD, as llama.cpp's lossy detokenizer does.
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        if !self.partial.is_empty() {
            text.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
        text
    }

    /// Byte offset in `held` of the earliest complete stop sequence.
    fn earliest_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Byte offset from which `held` could still grow into a stop sequence; everything before it
    /// is safe to emit.
    fn hold_back_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stop.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

/// Removes and returns the longest decodable prefix of `buf`, leaving an incomplete trailing
/// sequence in place. Invalid bytes (not merely incomplete) become U+FFFD so that a model
/// emitting garbage cannot stall the stream forever.
fn take_complete_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // `valid` is valid UTF-8 by construction; lossy conversion cannot alter it.
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        rest = &after[n..];
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *buf = keep;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], tokens: &[&[u8]]) -> (Vec<String>, bool, String) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stop);
        let mut out = Vec::new();
        for t in tokens {
            let p = s.push(t);
            out.push(p.text);
            if p.stopped {
                return (out, true, String::new());
            }
        }
        let tail = s.finish();
        (out, false, tail)
    }

    #[test]
    fn plain_ascii_passes_through() {
        let (out, stopped, tail) = run(&[], &[b"Hello", b" world"]);
        assert_eq!(out, ["Hello", " world"]);
        assert!(!stopped);
        assert_eq!(tail, "");
    }

    #[test]
    fn multibyte_char_split_over_tokens_is_emitted_whole() {
        let euro = "€".as_bytes(); // e2 82 ac
        let (out, _, tail) = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(out, ["a", "", "", "€", "b"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn invalid_bytes_become_replacement_char() {
        let (out, _, _) = run(&[], &[b"x\xffy"]);
        assert_eq!(out, ["x\u{FFFD}y"]);
    }

    #[test]
    fn incomplete_tail_is_flushed_lossily() {
        let (out, _, tail) = run(&[], &[b"ok\xe2\x82"]);
        assert_eq!(out, ["ok"]);
        assert_eq!(tail, "\u{FFFD}");
    }

    #[test]
    fn stop_sequence_split_over_tokens_is_never_emitted() {
        let (out, stopped, _) = run(&["\nUser:"], &[b"Hi", b" there\nUs", b"er:", b"more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hi there");
        assert_eq!(out, ["Hi", " there", ""]);
    }

    #[test]
    fn false_alarm_prefix_is_released() {
        let (out, stopped, tail) = run(&["STOP"], &[b"ST", b"ART"]);
        assert!(!stopped);
        assert_eq!(out, ["", "START"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn held_prefix_is_flushed_at_finish() {
        let (out, stopped, tail) = run(&["STOP"], &[b"go ST"]);
        assert!(!stopped);
        assert_eq!(out, ["go "]);
        assert_eq!(tail, "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["b", "a"], &[b"xab"]);
        assert!(stopped);
        assert_eq!(out, ["x"]);
    }

    #[test]
    fn empty_stop_sequence_is_ignored() {
        let (out, stopped, _) = run(&[""], &[b"abc"]);
        assert!(!stopped);
        assert_eq!(out, ["abc"]);
    }
}
