//! Input validation at the edge: identifiers, model names, prompts and token counts.
//!
//! Every service calls these before acting on a request. Messages say what rule was broken
//! without echoing the offending input (which could be huge, or carry escapes into a log).

/// Longest identifier (model name, node name, job id).
pub const MAX_ID_LEN: usize = 64;
/// Longest prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Most tokens a single job may ask for.
pub const MAX_TOKENS: u32 = 8192;
/// What a job gets when it does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 64;
/// Bytes of the session MAC (HMAC-SHA256) every lane request carries.
pub const LANE_MAC_BYTES: usize = 32;
/// Largest encoded `LaneRequest` (the pool → worker lane entry) any request that passes these
/// checks can produce: a job id and a model name of `MAX_ID_LEN`, a prompt of
/// `MAX_PROMPT_BYTES`, and every integer at its widest. The pool refuses to start with a lane
/// whose `max_entry` is below this, so a valid job never overflows a worker's lane.
pub const MAX_LANE_REQUEST_BYTES: usize =
    lane_request_len(MAX_ID_LEN, MAX_ID_LEN, MAX_PROMPT_BYTES);

/// Bytes of a protobuf varint holding `v`.
const fn varint_len(v: u64) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v != 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Bytes of a length-delimited protobuf field (field numbers below 16: a one-byte tag).
const fn bytes_field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Upper bound of an encoded `LaneRequest` (`proto/skep/v1/lane.proto`) with strings of these
/// lengths: `seq`, `deadline_mono_ns`, `max_tokens` and `seed` are counted at their widest
/// varints, `temperature` and `top_p` as fixed 4-byte floats, and every field as present
/// (proto3 leaves empty ones out, which is only shorter).
pub const fn lane_request_len(job_id: usize, model: usize, prompt: usize) -> usize {
    let seq = 1 + varint_len(u64::MAX);
    let max_tokens = 1 + varint_len(u32::MAX as u64);
    let deadline = 1 + varint_len(u64::MAX);
    // temperature and top_p: a one-byte tag and a fixed32 each; seed: a varint.
    let sampling = 2 * (1 + 4) + 1 + varint_len(u64::MAX);
    seq + bytes_field_len(job_id)
        + bytes_field_len(model)
        + bytes_field_len(prompt)
        + max_tokens
        + deadline
        + bytes_field_len(LANE_MAC_BYTES)
        + sampling
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} may contain only letters, digits, '.', '_' and '-'")]
    BadChars { field: &'static str },
    #[error("{field} must not contain '..'")]
    Traversal { field: &'static str },
    #[error("prompt contains a NUL byte")]
    Nul,
    #[error("max_tokens must be between 1 and {MAX_TOKENS}")]
    MaxTokens,
    #[error(
        "temperature must be between 0 and {}",
        crate::sampling::MAX_TEMPERATURE
    )]
    Temperature,
    #[error("top_p must be between 0 and 1")]
    TopP,
    #[error("the request would take more than {max} bytes on a worker's lane")]
    LaneRequestTooLarge { max: usize },
    #[error("{field} has more than {max} entries")]
    TooMany { field: &'static str, max: usize },
}

/// Identifiers: `[A-Za-z0-9._-]{1,64}`, no `..`, not starting with `.` or `-`.
pub fn identifier(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if s.len() > MAX_ID_LEN {
        return Err(ValidationError::TooLong {
            field,
            max: MAX_ID_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || s.starts_with(['.', '-'])
    {
        return Err(ValidationError::BadChars { field });
    }
    if s.contains("..") {
        return Err(ValidationError::Traversal { field });
    }
    Ok(())
}

pub fn model_name(s: &str) -> Result<(), ValidationError> {
    identifier("model", s)
}

pub fn prompt(s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty { field: "prompt" });
    }
    if s.len() > MAX_PROMPT_BYTES {
        return Err(ValidationError::TooLong {
            field: "prompt",
            max: MAX_PROMPT_BYTES,
        });
    }
    if s.contains('\0') {
        return Err(ValidationError::Nul);
    }
    Ok(())
}

/// Checks that a job whose job id, model name and prompt have these lengths (in bytes) fits in
/// a lane entry of `max_entry` bytes (`MAX_LANE_REQUEST_BYTES`: what every pool's lanes hold).
/// Every job that passes the other checks fits; this keeps a mismatch between the limits from
/// ever reaching a worker.
pub fn lane_request(
    job_id: usize,
    model: usize,
    prompt: usize,
    max_entry: usize,
) -> Result<(), ValidationError> {
    if lane_request_len(job_id, model, prompt) > max_entry {
        return Err(ValidationError::LaneRequestTooLarge { max: max_entry });
    }
    Ok(())
}

/// Resolves a requested token count: 0 means the default; otherwise 1..=MAX_TOKENS.
pub fn max_tokens(n: u32) -> Result<u32, ValidationError> {
    match n {
        0 => Ok(DEFAULT_MAX_TOKENS),
        1..=MAX_TOKENS => Ok(n),
        _ => Err(ValidationError::MaxTokens),
    }
}

/// Sampling settings: temperature in `[0, MAX_TEMPERATURE]`, top_p in `[0, 1]` (NaN is
/// neither). The error names the field.
pub fn sampling(s: &crate::sampling::Sampling) -> Result<(), ValidationError> {
    if !(0.0..=crate::sampling::MAX_TEMPERATURE).contains(&s.temperature) {
        return Err(ValidationError::Temperature);
    }
    if !(0.0..=1.0).contains(&s.top_p) {
        return Err(ValidationError::TopP);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
