//! SentencePiece-style tokenization from GGUF metadata (`tokenizer.ggml.model = "llama"`, with
//! per-token scores), done the way llama.cpp does it so the ids match:
//!
//! 1. Special tokens are split out of the text first (`special.rs`; control tokens only outside
//!    the user's text). This module encodes the text between them.
//! 2. In each piece of text, spaces become U+2581 (`▁`); no space is prefixed when
//!    `tokenizer.ggml.add_space_prefix` is false (Gemma).
//! 3. The piece starts as one symbol per character; repeatedly, the adjacent pair whose
//!    concatenation is a vocabulary token with the highest score (leftmost on ties) is merged.
//!    Control tokens are not in the merge vocabulary, so no text ever merges into one.
//! 4. Each final symbol is its token; a character outside the vocabulary becomes its UTF-8
//!    bytes as `<0xXX>` tokens (byte fallback).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use super::tokenizer::table::StrTable;

/// The vocabulary, as needed for encoding.
pub struct Spm {
    /// Every token's text (shared with the tokenizer's vocabulary).
    texts: Arc<StrTable>,
    /// Every token but the control tokens (what text may merge into), sorted by text, the
    /// lowest id of equal texts only: a binary search instead of a map of a quarter of a
    /// million strings, which cost Gemma 3's workers ~20 MB each.
    sorted: Vec<u32>,
    scores: Vec<f32>,
    bytes: [Option<u32>; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the candidate was made: a stale candidate (one side
    /// changed since) no longer matches and is skipped.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// `kinds[i]` is llama.cpp's token type: 3 control, 4 user-defined, 6 byte.
    pub fn new(
        texts: Arc<StrTable>,
        scores: Vec<f32>,
        kinds: &[i64],
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Spm {
        let mut sorted = Vec::with_capacity(texts.len());
        let mut bytes = [None; 256];
        for ((id, t), &kind) in texts.iter().zip(kinds) {
            // llama.cpp looks merges up in the whole vocabulary, so text like `<end_of_turn>`
            // could merge into the control token when special parsing is off; here it cannot.
            if kind != 3 {
                sorted.push(id);
            }
            if kind == 6 {
                let hex = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    bytes[b as usize] = Some(id);
                }
            }
        }
        // By text, then id, so that the first of equal texts is the lowest id.
        sorted.sort_by(|&a, &b| {
            texts
                .get(a as usize)
                .cmp(&texts.get(b as usize))
                .then(a.cmp(&b))
        });
        sorted.dedup_by(|b, a| texts.get(*a as usize) == texts.get(*b as usize));
        sorted.shrink_to_fit();
        Spm {
            texts,
            sorted,
            scores,
            bytes,
            unknown,
            add_space_prefix,
        }
    }

    /// The id of the non-control token whose text is `text`.
    fn id(&self, text: &str) -> Option<u32> {
        self.sorted
            .binary_search_by(|&id| self.texts.get(id as usize).unwrap_or("").cmp(text))
            .ok()
            .map(|i| self.sorted[i])
    }

    /// Token ids of `text` as plain text (no special tokens are parsed), no BOS.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        self.encode_piece(text, out);
    }

    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            s.push('\u{2581}');
        }
        s.push_str(&text.replace(' ', "\u{2581}"));
        let n = s.chars().count();
        let mut syms: Vec<Symbol> = s
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n).then_some(i + 1),
            })
            .collect();
        let mut heap = BinaryHeap::new();
        let candidate = |syms: &[Symbol], heap: &mut BinaryHeap<Bigram>, l: usize, r: usize| {
            let (a, b) = (syms[l], syms[r]);
            let text = &s[a.start..b.start + b.len];
            if let Some(id) = self.id(text) {
                heap.push(Bigram {
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    left: l,
                    right: r,
                    len: text.len(),
                });
            }
        };
        for i in 1..n {
            candidate(&syms, &mut heap, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.len {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.left].next = r.next;
            syms[bg.right].len = 0;
            if let Some(nx) = r.next {
                syms[nx].prev = Some(bg.left);
            }
            if let Some(p) = syms[bg.left].prev {
                candidate(&syms, &mut heap, p, bg.left);
            }
            if let Some(nx) = syms[bg.left].next {
                candidate(&syms, &mut heap, bg.left, nx);
            }
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let sym = syms[i];
            let text = &s[sym.start..sym.start + sym.len];
            match self.id(text) {
                Some(id) => out.push(id),
                None => {
                    for b in text.bytes() {
                        if let Some(id) = self.bytes[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
            at = sym.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Spm {
        // id: 0 <unk>(ctl) 1 <s>(ctl) 2 ▁ 3 a 4 b 5 ab 6 ▁a 7 ▁ab 8 <0x21> 9 <b>(user) 10 bb
        // 11 ba(ctl, best score of all: text must still never merge into it)
        let tokens: StrTable = [
            "<unk>", "<s>", "▁", "a", "b", "ab", "▁a", "▁ab", "<0x21>", "<b>", "bb", "ba",
        ]
        .iter()
        .collect();
        let scores = vec![
            0.0, 0.0, -1.0, -2.0, -2.0, -1.5, -1.2, -0.5, 0.0, 0.0, -3.0, 10.0,
        ];
        let kinds = [3, 3, 1, 1, 1, 1, 1, 1, 6, 4, 1, 3];
        Spm::new(Arc::new(tokens), scores, &kinds, Some(0), false)
    }

    fn encode(v: &Spm, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        v.encode(text, &mut out);
        out
    }

    #[test]
    fn merges_by_score_and_escapes_spaces() {
        let v = vocab();
        // "a b": a, ▁, b: "▁b" is not a token, so a | ▁ | b.
        assert_eq!(encode(&v, "a b"), vec![3, 2, 4]);
        // " ab": ▁,a,b → best pair "▁a" (-1.2) vs "ab" (-1.5): ▁a, then "▁ab" (-0.5).
        assert_eq!(encode(&v, " ab"), vec![7]);
        // "ab" (-1.5) outranks "bb" (-3.0); "abb" is not a token, so ab | b.
        assert_eq!(encode(&v, "abb"), vec![5, 4]);
    }

    #[test]
    fn text_never_merges_into_a_control_token() {
        let v = vocab();
        // "ba" is a control token with the best score in the vocabulary.
        assert_eq!(encode(&v, "ba"), vec![4, 3]);
        // A control token's text is plain text here: '<', 's', '>' are not tokens.
        assert_eq!(encode(&v, "<s>"), vec![0, 0, 0]);
    }

    #[test]
    fn unknown_chars_fall_back_to_bytes() {
        let v = vocab();
        // '!' is only known as a byte token; 'é' has no byte tokens here: unknown.
        assert_eq!(encode(&v, "a!"), vec![3, 8]);
        assert_eq!(encode(&v, "é"), vec![0, 0]);
        assert_eq!(encode(&v, ""), Vec::<u32>::new());
    }
}
