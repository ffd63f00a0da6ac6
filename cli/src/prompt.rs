//! Where `skep submit` gets its prompt: the argument, stdin (`-`) or a file (`--prompt-file`).
//!
//! Reads are bounded by the queen's prompt limit, so piping a huge file fails here with a clear
//! message instead of buffering it all and being refused after the upload.

use std::io::Read;
use std::path::Path;

use skep_common::validate::MAX_PROMPT_BYTES;

use crate::exit::Failure;

/// The prompt named by the command line: `arg` itself, stdin when `arg` is `-`, or `file`.
pub fn resolve(arg: Option<String>, file: Option<&Path>) -> Result<String, Failure> {
    match (arg, file) {
        (Some(_), Some(_)) => Err(Failure::usage(
            "give the prompt either as an argument or with --prompt-file, not both",
        )),
        (Some(p), None) if p == "-" => read_bounded(std::io::stdin().lock(), "stdin"),
        (Some(p), None) => Ok(p),
        (None, Some(path)) => {
            let f = std::fs::File::open(path)
                .map_err(|e| Failure::usage(format!("--prompt-file {}: {e}", path.display())))?;
            read_bounded(f, &path.display().to_string())
        }
        (None, None) => Err(Failure::usage(
            "no prompt: give it as an argument, `-` to read stdin, or --prompt-file FILE",
        )),
    }
}

/// Reads at most one byte past the limit, so an oversized input is detected without holding it.
fn read_bounded(r: impl Read, what: &str) -> Result<String, Failure> {
    let mut buf = Vec::new();
    r.take(MAX_PROMPT_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::usage(format!("reading the prompt from {what}: {e}")))?;
    if buf.len() > MAX_PROMPT_BYTES {
        return Err(Failure::usage(format!(
            "the prompt from {what} is over the {MAX_PROMPT_BYTES}-byte limit"
        )));
    }
    String::from_utf8(buf)
        .map_err(|_| Failure::usage(format!("the prompt from {what} is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usage error a refused input gives.
    #[track_caller]
    fn refusal(r: Result<String, Failure>) -> String {
        match r {
            Ok(p) => panic!("accepted a {}-byte prompt", p.len()),
            Err(f) => {
                let (code, text) = f.text();
                assert_eq!(code, crate::exit::USAGE, "{text}");
                text.to_owned()
            }
        }
    }

    #[test]
    fn a_prompt_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let at = vec![b'a'; MAX_PROMPT_BYTES];
        assert_eq!(
            read_bounded(&at[..], "t").ok().unwrap().len(),
            MAX_PROMPT_BYTES
        );
        let over = vec![b'a'; MAX_PROMPT_BYTES + 1];
        assert!(refusal(read_bounded(&over[..], "t")).contains("over the 65536-byte limit"));
        assert!(refusal(read_bounded(&[0xff, 0xfe][..], "t")).contains("not valid UTF-8"));
    }

    #[test]
    fn both_or_neither_source_is_a_usage_error() {
        assert!(refusal(resolve(None, None)).starts_with("no prompt"));
        let both = resolve(Some("x".into()), Some(Path::new("f")));
        assert!(refusal(both).contains("not both"));
        let missing = resolve(None, Some(Path::new("/nonexistent/prompt.txt")));
        assert!(refusal(missing).contains("--prompt-file /nonexistent/prompt.txt"));
        assert_eq!(resolve(Some("hello".into()), None).ok().unwrap(), "hello");
    }
}
