//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`, e.g. SmolLM2) from GGUF metadata: the HF
//! tokenizers pipeline for text with no special tokens in it, and the bytes of each token.
//!
//! The vocabulary given to HF tokenizers has no control tokens, so text can never become one;
//! they are split out beforehand by `special.rs`, and only outside the user's text.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use tokenizers::Tokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use super::{
    Parts, Splitter, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TokenizerError, malformed,
    string_array,
};

/// Byte-level BPE: the HF tokenizers pipeline, and each token's bytes.
pub(super) fn parts(
    md: &HashMap<String, Value>,
    pre: &str,
    tokens: &[String],
    types: &[i64],
) -> Result<Parts, TokenizerError> {
    let pre_tokenizer = pre_tokenizer_for(pre)?;
    // Control tokens are left out of the vocabulary (and any merge that would make one), so
    // that no text can ever become one; they are split out by `Specials` instead.
    let control: HashSet<&str> = tokens
        .iter()
        .zip(types)
        .filter(|&(_, &ty)| ty == TOKEN_TYPE_CONTROL)
        .map(|(t, _)| t.as_str())
        .collect();
    let merges = string_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(malformed("tokenizer.ggml.merges", format!("entry {m:?}"))),
        })
        .filter(|m| match m {
            Ok((a, b)) => ![a.as_str(), b.as_str(), &format!("{a}{b}")]
                .iter()
                .any(|t| control.contains(t)),
            Err(_) => true,
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !control.contains(t.as_str()))
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    let unicode_to_byte = unicode_to_byte();
    let pieces = tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match ty {
            TOKEN_TYPE_CONTROL => Vec::new(),
            TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            _ => byte_level_decode(t, &unicode_to_byte),
        })
        .collect();
    Ok((Splitter::Bpe(Box::new(inner)), pieces))
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value, as HF tokenizers parts.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    // ByteLevel(add_prefix_space = false, trim_offsets, use_regex = true) is the GPT-2 split
    // `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    let gpt2 = || ByteLevel::new(false, true, true);
    match pre {
        "gpt-2" | "gpt2" | "phi-2" | "roberta-bpe" => Ok(gpt2().into()),
        // llama.cpp's LLAMA_VOCAB_PRE_TYPE_STARCODER family: `\p{N}` (every digit alone), then
        // the GPT-2 split; identical to HF's Digits(individual) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into())
        }
        other => Err(TokenizerError::Unsupported(format!(
            "tokenizer.ggml.pre = {other:?} (its split rules are not implemented)"
        ))),
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the other 68 are
/// shifted to U+0100.. so every byte has a visible, non-space character.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER);
            shifted += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

/// Bytes a byte-level BPE token stands for. A character outside the byte alphabet (which a
/// well-formed vocab never has) is kept as its own UTF-8 rather than dropped.
fn byte_level_decode(token: &str, table: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_matching_gpt2() {
        let t = unicode_to_byte();
        assert_eq!(t.len(), 256);
        // The well-known anchors of GPT-2's table: space is Ġ, newline is Ċ, tab is ĉ.
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'ĉ'], b'\t');
        assert_eq!(t[&'!'], b'!');
        assert_eq!(byte_level_decode("ĠHello", &t), b" Hello");
    }
}
