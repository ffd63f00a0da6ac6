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

/// Resolves a requested token count: 0 means the default; otherwise 1..=MAX_TOKENS.
pub fn max_tokens(n: u32) -> Result<u32, ValidationError> {
    match n {
        0 => Ok(DEFAULT_MAX_TOKENS),
        1..=MAX_TOKENS => Ok(n),
        _ => Err(ValidationError::MaxTokens),
    }
}

#[cfg(test)]
mod tests;
