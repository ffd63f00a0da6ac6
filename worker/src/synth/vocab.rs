//! The tokenizer and chat template of a synthetic model: generated vocabularies of the real
//! files' kinds and sizes, with the real models' control tokens and chat templates.
//!
//! Llama presets get a GPT-2 byte-level BPE (`pre = "smollm"`, SmolLM2's control tokens and
//! ChatML template); Gemma 3 presets a SentencePiece vocabulary with scores, byte tokens and
//! Gemma's turn markers and template. Past the control tokens and the single characters, the
//! vocabulary is made by merging pairs of earlier tokens, chosen by a fixed generator that leans
//! to early (short, common) tokens, so ordinary text tokenizes into a mix of merged tokens as it
//! would with a trained vocabulary. The vocabulary depends only on its size, never on the seed.

use std::collections::HashSet;

use candle_core::quantized::gguf_file::Value;

use super::SynthError;

/// SmolLM2-135M-Instruct's chat template, verbatim from its GGUF metadata.
const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The chat template of the instruction-tuned Gemma 3 models (gemma-3-*-it); also what the
/// tests give the base Gemma 3 file, which has none.
pub const GEMMA3_IT_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// SmolLM2's first control tokens: end of text (also unknown), turn start (BOS), turn end (EOS).
const LLAMA_CONTROL: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Gemma 3's: pad, EOS, BOS, unknown, mask, and the turn markers.
const GEMMA3_CONTROL: &[&str] = &[
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
];

/// Longest merged token, in characters.
const MAX_TOKEN_CHARS: usize = 12;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

/// `tokenizer.*` metadata of a byte-level BPE vocabulary of `size` tokens.
pub fn llama(size: usize) -> Result<Vec<(String, Value)>, SynthError> {
    let mut tokens: Vec<String> = LLAMA_CONTROL.iter().map(|s| s.to_string()).collect();
    let first = tokens.len();
    tokens.extend(gpt2_alphabet());
    let mut types = vec![CONTROL; first];
    types.resize(tokens.len(), NORMAL);
    let merges = grow(&mut tokens, first, size, |t: &str| t.starts_with('Ġ'))?;
    types.resize(tokens.len(), NORMAL);
    Ok(vec![
        md("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        md("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        md("tokenizer.ggml.model", string("gpt2")),
        md("tokenizer.ggml.pre", string("smollm")),
        md("tokenizer.ggml.tokens", strings(tokens)),
        md("tokenizer.ggml.token_type", ints(&types)),
        md("tokenizer.ggml.merges", strings(merges)),
        md("tokenizer.ggml.bos_token_id", Value::U32(1)),
        md("tokenizer.ggml.eos_token_id", Value::U32(2)),
        md("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        md("tokenizer.ggml.padding_token_id", Value::U32(2)),
        md("tokenizer.chat_template", string(CHATML_TEMPLATE)),
    ])
}

/// `tokenizer.*` metadata of a SentencePiece vocabulary of `size` tokens.
pub fn gemma3(size: usize) -> Result<Vec<(String, Value)>, SynthError> {
    let mut tokens: Vec<String> = GEMMA3_CONTROL.iter().map(|s| s.to_string()).collect();
    let mut types = vec![CONTROL; tokens.len()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.resize(tokens.len(), BYTE);
    let first = tokens.len();
    // Spaces are U+2581 in SentencePiece pieces; other characters outside printable ASCII fall
    // back to byte tokens.
    tokens.push("\u{2581}".into());
    tokens.extend((b'!'..=b'~').map(|b| char::from(b).to_string()));
    grow(&mut tokens, first, size, |t: &str| {
        t.starts_with('\u{2581}')
    })?;
    types.resize(tokens.len(), NORMAL);
    // Earlier tokens win merges, as a trained vocabulary's more frequent pieces do.
    let scores: Vec<Value> = (0..tokens.len())
        .map(|i| match types[i] {
            CONTROL => Value::F32(-1000.0),
            BYTE => Value::F32(0.0),
            _ => Value::F32(-(i as f32)),
        })
        .collect();
    Ok(vec![
        md("tokenizer.ggml.model", string("llama")),
        md("tokenizer.ggml.pre", string("default")),
        md("tokenizer.ggml.tokens", strings(tokens)),
        md("tokenizer.ggml.scores", Value::Array(scores)),
        md("tokenizer.ggml.token_type", ints(&types)),
        md("tokenizer.ggml.bos_token_id", Value::U32(2)),
        md("tokenizer.ggml.eos_token_id", Value::U32(1)),
        md("tokenizer.ggml.unknown_token_id", Value::U32(3)),
        md("tokenizer.ggml.padding_token_id", Value::U32(0)),
        md("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        md("tokenizer.ggml.add_sep_token", Value::Bool(false)),
        md("tokenizer.ggml.add_eos_token", Value::Bool(false)),
        md("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        md("tokenizer.chat_template", string(GEMMA3_IT_TEMPLATE)),
    ])
}

/// Appends merged tokens to `tokens` until it holds `size`, merging pairs of tokens from
/// `first` on; returns the merges (`"left right"`). `word_start(t)`: `t` begins a word, so it is
/// never the right side of a merge (pre-tokenizers split before a space).
fn grow(
    tokens: &mut Vec<String>,
    first: usize,
    size: usize,
    word_start: impl Fn(&str) -> bool,
) -> Result<Vec<String>, SynthError> {
    if size < tokens.len() {
        return Err(SynthError::Shape(format!(
            "a vocabulary of {size} cannot hold the {} control and character tokens",
            tokens.len()
        )));
    }
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::with_capacity(size - tokens.len());
    // A fixed stream: the vocabulary is the same for every seed.
    let mut state: u64 = 0x736b_6570;
    let mut pick = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        // Cubed: most merges join early (short, frequent) tokens.
        (u * u * u * n as f64) as usize
    };
    let mut attempts = 0usize;
    while tokens.len() < size {
        attempts += 1;
        if attempts > 1000 * size {
            return Err(SynthError::Shape(format!("cannot generate {size} tokens")));
        }
        let n = tokens.len() - first;
        let (a, b) = (&tokens[first + pick(n)], &tokens[first + pick(n)]);
        if word_start(b) || a.chars().count() + b.chars().count() > MAX_TOKEN_CHARS {
            continue;
        }
        let merged = format!("{a}{b}");
        if seen.contains(&merged) {
            continue;
        }
        merges.push(format!("{a} {b}"));
        seen.insert(merged.clone());
        tokens.push(merged);
    }
    Ok(merges)
}

/// GPT-2's byte alphabet (each byte as the character byte-level BPE writes it), the word-start
/// space and letters first so that merges favour them.
fn gpt2_alphabet() -> Vec<String> {
    let mut shifted = 0u32;
    let mut chars: Vec<(u8, char)> = (0..=255u8)
        .map(|b| {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (b, c)
        })
        .collect();
    let rank = |b: u8| match b {
        b' ' => 0,
        b'a'..=b'z' => 1,
        b'A'..=b'Z' => 2,
        b'!'..=b'~' => 3,
        _ => 4,
    };
    chars.sort_by_key(|&(b, _)| (rank(b), b));
    chars.into_iter().map(|(_, c)| c.to_string()).collect()
}

fn md(key: &str, v: Value) -> (String, Value) {
    (key.to_string(), v)
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

fn ints(v: &[i32]) -> Value {
    Value::Array(v.iter().map(|&t| Value::I32(t)).collect())
}
