//! A vocabulary's strings (or byte strings) in one buffer, looked up by id.
//!
//! Gemma 3 has 262 144 tokens: as a `Vec<String>` that is a quarter of a million allocations
//! and about 15 MB per copy in every worker, for ~3 MB of text. One buffer and an end offset
//! per entry hold the same in the text's size plus four bytes an entry.

/// Entries `0..len()`, entry `i` being `bytes[ends[i - 1]..ends[i]]`.
#[derive(Default)]
pub struct ByteTable {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl ByteTable {
    /// Entry `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.bytes[start..end])
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    fn push(&mut self, entry: &[u8]) {
        self.bytes.extend_from_slice(entry);
        // Vocabularies are a few MB; past 4 GiB the offsets would wrap, so saturate and let
        // `get` fail its slice rather than return another entry's bytes.
        self.ends
            .push(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX));
    }

    fn shrink(mut self) -> Self {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
        self
    }
}

impl<B: AsRef<[u8]>> FromIterator<B> for ByteTable {
    fn from_iter<I: IntoIterator<Item = B>>(iter: I) -> Self {
        let mut t = ByteTable::default();
        for b in iter {
            t.push(b.as_ref());
        }
        t.shrink()
    }
}

/// A [`ByteTable`] of strings.
#[derive(Default)]
pub struct StrTable {
    text: String,
    ends: Vec<u32>,
}

impl StrTable {
    /// Entry `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..end)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// `(id, entry)` for every entry.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        (0..self.len()).map(|i| (i as u32, self.get(i).unwrap_or("")))
    }
}

impl<S: AsRef<str>> FromIterator<S> for StrTable {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut t = StrTable::default();
        for s in iter {
            t.text.push_str(s.as_ref());
            t.ends.push(u32::try_from(t.text.len()).unwrap_or(u32::MAX));
        }
        t.text.shrink_to_fit();
        t.ends.shrink_to_fit();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_as_they_went_in() {
        let words = ["", "a", "▁the", "", "<0x0A>", "é"];
        let t: StrTable = words.iter().collect();
        assert_eq!(t.len(), words.len());
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.get(i), Some(*w));
        }
        assert_eq!(t.get(words.len()), None);
        assert_eq!(t.iter().map(|(_, s)| s).collect::<Vec<_>>(), words);
        let b: ByteTable = [&b"\xff"[..], b"", b"ab"].into_iter().collect();
        assert_eq!(
            (b.len(), b.get(0), b.get(1), b.get(2)),
            (3, Some(&b"\xff"[..]), Some(&b""[..]), Some(&b"ab"[..]))
        );
        assert_eq!(b.get(3), None);
    }
}
