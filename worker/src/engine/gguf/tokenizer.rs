//! The tokenizer of a GGUF model, rebuilt from its `tokenizer.ggml.*` metadata to match llama.cpp.
//!
//! Two kinds are supported: GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`, e.g.
//! SmolLM2) with the pre-tokenizers whose split rules we reproduce exactly, and SentencePiece
//! style with scores (`"llama"`, e.g. Gemma 3; see `spm.rs`). Anything else is refused at load
//! time rather than tokenized subtly differently from llama.cpp.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's `llama_token_type` values as stored in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    Missing(&'static str),
    #[error("GGUF metadata key `{key}` is malformed: {why}")]
    Malformed { key: &'static str, why: String },
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenizers: {0}")]
    Tokenizers(String),
}

/// How text is split into ids.
enum Splitter {
    Bpe(Box<Tokenizer>),
    Spm(Box<super::spm::Spm>),
}

/// A tokenizer built from GGUF metadata.
pub struct GgufTokenizer {
    inner: Splitter,
    /// The vocabulary as stored in the file.
    tokens: Vec<String>,
    /// Raw bytes each token id stands for, for streaming decode. Control tokens map to nothing,
    /// as in llama.cpp's `token_to_piece(.., special = false)`.
    pieces: Vec<Vec<u8>>,
    /// End-of-generation tokens: generation stops when one is sampled.
    eog: HashSet<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.pieces.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish()
    }
}

impl GgufTokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self, TokenizerError> {
        let md = &ct.metadata;
        let model = string(md, "tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {model:?} (implemented: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
            )));
        }
        let spm = model == "llama";
        let pre = match md.get("tokenizer.ggml.pre") {
            Some(v) => v
                .to_string()
                .map_err(|e| malformed("tokenizer.ggml.pre", e))?
                .clone(),
            None => "gpt-2".to_string(),
        };
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let n_vocab = tokens.len();
        if n_vocab == 0 {
            return Err(malformed("tokenizer.ggml.tokens", "empty vocabulary"));
        }
        let types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let arr = v
                    .to_vec()
                    .map_err(|e| malformed("tokenizer.ggml.token_type", e))?;
                if arr.len() != n_vocab {
                    return Err(malformed(
                        "tokenizer.ggml.token_type",
                        format!("{} entries for {n_vocab} tokens", arr.len()),
                    ));
                }
                arr.iter()
                    .map(|v| int(v).ok_or_else(|| malformed("tokenizer.ggml.token_type", v)))
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => vec![TOKEN_TYPE_NORMAL; n_vocab],
        };
        let bos = optional_id(md, "tokenizer.ggml.bos_token_id", n_vocab)?;
        let eos = optional_id(md, "tokenizer.ggml.eos_token_id", n_vocab)?;
        let (inner, pieces) = if spm {
            spm_parts(md, &tokens, &types)?
        } else {
            bpe_parts(md, &pre, &tokens, &types)?
        };
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|e| malformed("tokenizer.ggml.add_bos_token", e))?,
            None => false,
        };
        let mut eog: HashSet<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = optional_id(md, key, n_vocab)? {
                eog.insert(id);
            }
        }
        // llama.cpp also treats these well-known end-of-turn control tokens as end of generation
        // even when the metadata names a different EOS (SmolLM2's EOS is <|im_end|>, but a chat
        // model may still produce <|endoftext|>).
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            let known = matches!(
                t.as_str(),
                "<|im_end|>" | "<|endoftext|>" | "<|eot_id|>" | "<end_of_turn>" | "<|end|>"
            );
            if known && ty == TOKEN_TYPE_CONTROL {
                eog.insert(i as u32);
            }
        }

        Ok(Self {
            inner,
            tokens,
            pieces,
            eog,
            bos,
            eos,
            add_bos,
        })
    }

    /// Token ids for `text`, parsing special tokens written in it (as llama.cpp does for a
    /// rendered chat prompt) and without adding BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner {
            Splitter::Bpe(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Splitter::Spm(spm) => Ok(spm.encode(text)),
        }
    }

    /// Token ids for a whole prompt: `encode` plus BOS when the model asks for it and the text
    /// does not already start with it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The raw bytes of one token (empty for control tokens), or `None` for an id outside the vocab.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Text of a sequence of ids; invalid UTF-8 becomes U+FFFD. Control tokens are dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter_map(|&id| self.piece(id))
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The vocabulary entry for `id`, exactly as stored in the GGUF (e.g. `"Ġthe"`).
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The text of a token as a template variable (`bos_token`, `eos_token`).
    pub fn special_text(&self, id: Option<u32>) -> String {
        id.and_then(|id| self.token(id)).unwrap_or_default()
    }
}

type Parts = (Splitter, Vec<Vec<u8>>);

/// Byte-level BPE: the HF tokenizers pipeline, and each token's bytes.
fn bpe_parts(
    md: &HashMap<String, Value>,
    pre: &str,
    tokens: &[String],
    types: &[i64],
) -> Result<Parts, TokenizerError> {
    let pre_tokenizer = pre_tokenizer_for(pre)?;
    let merges = string_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(malformed("tokenizer.ggml.merges", format!("entry {m:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    // llama.cpp splits control and user-defined tokens out of the text before BPE (when
    // parsing specials, which chat prompts do); registering them as added tokens does that.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|&(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    inner
        .add_special_tokens(specials)
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
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

/// SentencePiece with scores: the merge tables, and each token's bytes (`▁` is a space, byte
/// tokens are their byte, control tokens are nothing).
fn spm_parts(
    md: &HashMap<String, Value>,
    tokens: &[String],
    types: &[i64],
) -> Result<Parts, TokenizerError> {
    let scores = md
        .get("tokenizer.ggml.scores")
        .ok_or(TokenizerError::Missing("tokenizer.ggml.scores"))?
        .to_vec()
        .map_err(|e| malformed("tokenizer.ggml.scores", e))?
        .iter()
        .map(|v| {
            v.to_f32()
                .map_err(|e| malformed("tokenizer.ggml.scores", e))
        })
        .collect::<Result<Vec<f32>, _>>()?;
    if scores.len() != tokens.len() {
        return Err(malformed(
            "tokenizer.ggml.scores",
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    // llama.cpp's default for SentencePiece vocabularies is to prefix a space.
    let add_space_prefix = match md.get("tokenizer.ggml.add_space_prefix") {
        Some(v) => v
            .to_bool()
            .map_err(|e| malformed("tokenizer.ggml.add_space_prefix", e))?,
        None => true,
    };
    let unknown = optional_id(md, "tokenizer.ggml.unknown_token_id", tokens.len())?;
    let pieces = tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match ty {
            TOKEN_TYPE_CONTROL => Vec::new(),
            TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            TOKEN_TYPE_BYTE => t
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map_or_else(Vec::new, |b| vec![b]),
            _ => t.replace('\u{2581}', " ").into_bytes(),
        })
        .collect();
    let spm = super::spm::Spm::new(tokens, scores, types, unknown, add_space_prefix);
    Ok((Splitter::Spm(Box::new(spm)), pieces))
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

fn malformed(key: &'static str, why: impl std::fmt::Debug) -> TokenizerError {
    TokenizerError::Malformed {
        key,
        why: format!("{why:?}"),
    }
}

fn string<'a>(
    md: &'a HashMap<String, Value>,
    key: &'static str,
) -> Result<&'a str, TokenizerError> {
    md.get(key)
        .ok_or(TokenizerError::Missing(key))?
        .to_string()
        .map(String::as_str)
        .map_err(|e| malformed(key, e))
}

fn string_array(
    md: &HashMap<String, Value>,
    key: &'static str,
) -> Result<Vec<String>, TokenizerError> {
    md.get(key)
        .ok_or(TokenizerError::Missing(key))?
        .to_vec()
        .map_err(|e| malformed(key, e))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| malformed(key, e)))
        .collect()
}

/// Any integer GGUF value as i64; GGUF writers differ in which integer type they use for ids.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// A token id from metadata, checked against the vocab size. Negative means "none" (llama.cpp
/// writes -1 for absent ids).
fn optional_id(
    md: &HashMap<String, Value>,
    key: &'static str,
    n_vocab: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = int(v).ok_or_else(|| malformed(key, v))?;
    if id < 0 {
        return Ok(None);
    }
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
        _ => Err(malformed(
            key,
            format!("id {id} outside a vocab of {n_vocab}"),
        )),
    }
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
