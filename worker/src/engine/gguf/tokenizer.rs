//! The tokenizer of a GGUF model, rebuilt from its `tokenizer.ggml.*` metadata to match llama.cpp.
//!
//! Two kinds are supported: GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`, e.g.
//! SmolLM2) with the pre-tokenizers whose split rules we reproduce exactly, and SentencePiece
//! style with scores (`"llama"`, e.g. Gemma 3; see `spm.rs`). Anything else is refused at load
//! time rather than tokenized subtly differently from llama.cpp.
//!
//! Unlike llama.cpp, text from a user is never matched against control-token strings: only the
//! chat template's own markup can produce `<|im_start|>` or `<start_of_turn>` (see `special.rs`).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::Tokenizer;

use super::special::{Frag, Specials};

mod bpe;
pub(super) mod table;

use self::table::{ByteTable, StrTable};

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
    /// Plain text came out as a control token; the encoders' vocabularies exclude them, so this
    /// is a bug, refused rather than fed to the model.
    #[error("plain text produced control token {0}")]
    ControlInText(u32),
}

/// A chat prompt's token ids, and which of them carry the user's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    pub ids: Vec<u32>,
    /// The tokens made (at least partly) from the user's bytes; none is a control token. Text
    /// fragments are tokenized whole, so a few template tokens next to the user's text (e.g.
    /// `user`, `\n`) may fall inside.
    pub user: Range<usize>,
}

/// How plain text (no special tokens) is split into ids; neither knows any control token.
enum Splitter {
    Bpe(Box<Tokenizer>),
    Spm(Box<super::spm::Spm>),
}

/// A tokenizer built from GGUF metadata.
pub struct GgufTokenizer {
    inner: Splitter,
    /// Control and user-defined tokens, split out of text before `inner` sees it.
    specials: Specials,
    /// `control[id]`: the token is a control token (type 3).
    control: Vec<bool>,
    /// The token SentencePiece's byte fallback uses for a byte it has no token for.
    fallback: Option<u32>,
    /// The vocabulary as stored in the file.
    tokens: Arc<StrTable>,
    /// Raw bytes each token id stands for, for streaming decode. Control tokens map to nothing,
    /// as in llama.cpp's `token_to_piece(.., special = false)`.
    pieces: ByteTable,
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
        let table: Arc<StrTable> = Arc::new(tokens.iter().collect());
        let ((inner, pieces), fallback) = if spm {
            spm_parts(md, &table, &types)?
        } else {
            (bpe::parts(md, &pre, &tokens, &types)?, None)
        };
        let control: Vec<bool> = types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect();
        // llama.cpp splits control and user-defined tokens out of the text before BPE or
        // SentencePiece; user-defined ones stand for their own text and are split everywhere.
        let specials = Specials::new(
            tokens
                .iter()
                .zip(&types)
                .enumerate()
                .filter(|&(_, (_, &ty))| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
                .map(|(i, (t, &ty))| (t.clone(), i as u32, ty == TOKEN_TYPE_CONTROL)),
        );
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
            specials,
            control,
            fallback,
            tokens: table,
            pieces: pieces.iter().collect(),
            eog,
            bos,
            eos,
            add_bos,
        })
    }

    /// Token ids for trusted `text` (a rendered template, an operator's benchmark prompt),
    /// parsing every special token written in it as llama.cpp does, without adding BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_parts(text, &(0..0))?.0)
    }

    /// Token ids for untrusted `text`: a control token's text in it is ordinary text. No BOS.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_parts(text, &(0..text.len()))?.0)
    }

    /// Token ids for trusted `text` as a whole prompt: `encode` plus BOS when the model asks for
    /// it and the text does not already start with it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_chat(text, &(0..0))?.ids)
    }

    /// Token ids for a rendered chat prompt whose bytes `user` are the user's: control tokens
    /// come only from the rest (the template's markup). BOS as in `encode_prompt`.
    pub fn encode_chat(
        &self,
        text: &str,
        user: &Range<usize>,
    ) -> Result<PromptTokens, TokenizerError> {
        let (mut ids, mut range) = self.encode_parts(text, user)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
            range = range.start + 1..range.end + 1;
        }
        Ok(PromptTokens { ids, user: range })
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<start_of_turn>`, `<bos>`, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// The ids of `text`, control tokens recognised only outside `user`, and the range of ids
    /// that came from fragments touching `user`.
    fn encode_parts(
        &self,
        text: &str,
        user: &Range<usize>,
    ) -> Result<(Vec<u32>, Range<usize>), TokenizerError> {
        let mut out = Vec::new();
        // Tokens wholly before, and wholly after, the user's bytes.
        let (mut before, mut after) = (0, 0);
        for frag in self.specials.partition(text, user) {
            let n = out.len();
            match &frag {
                Frag::Token { id, .. } => out.push(*id),
                Frag::Text(r) => self.encode_plain(&text[r.clone()], &mut out)?,
            }
            let span = frag.span();
            if span.end <= user.start {
                before = out.len();
            } else if span.start >= user.end {
                after += out.len() - n;
            }
        }
        let end = out.len() - after;
        Ok((out, before..end.max(before)))
    }

    /// Appends the ids of text that holds no special token.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let start = out.len();
        match &self.inner {
            Splitter::Bpe(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
            }
            Splitter::Spm(spm) => spm.encode(text, out),
        }
        // The encoders' vocabularies have no control tokens (SentencePiece's unknown-byte
        // fallback aside); checked anyway, because the template's safety rests on it.
        match out[start..]
            .iter()
            .find(|&&id| self.is_control(id) && Some(id) != self.fallback)
        {
            Some(&id) => Err(TokenizerError::ControlInText(id)),
            None => Ok(()),
        }
    }

    /// The raw bytes of one token (empty for control tokens), or `None` for an id outside the vocab.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize)
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
        self.tokens.get(id as usize).map(str::to_owned)
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

/// SentencePiece with scores: the merge tables, and each token's bytes (`▁` is a space, byte
/// tokens are their byte, control tokens are nothing).
fn spm_parts(
    md: &HashMap<String, Value>,
    tokens: &Arc<StrTable>,
    types: &[i64],
) -> Result<(Parts, Option<u32>), TokenizerError> {
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
        .map(|((_, t), &ty)| match ty {
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
    let spm = super::spm::Spm::new(Arc::clone(tokens), scores, types, unknown, add_space_prefix);
    Ok(((Splitter::Spm(Box::new(spm)), pieces), unknown))
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
