//! Lane sessions: the secret a pool manager shares with one worker incarnation, and the MAC that
//! binds every lane request to it.
//!
//! The secret travels over the worker's stdin pipe at spawn (never argv, env or a file), so a
//! process that can merely write a lane cannot forge a request the worker will run. The MAC
//! covers every field of the request, so none can be edited in the lane either. It does not
//! stop a captured request from being sent again: the worker refuses any `seq` not greater than
//! the last one it accepted on that lane generation (`worker/src/serve.rs`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: a MAC over a lane request never verifies as anything else, and a change
/// to what is covered changes the tag.
const DOMAIN: &[u8] = b"skep lane request v4\0";

/// Every field of a lane request except the MAC itself: what the MAC covers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestFields<'a> {
    pub seq: u64,
    pub job_id: &'a str,
    pub model: &'a str,
    pub prompt: &'a str,
    pub max_tokens: u32,
    pub deadline_ns: u64,
    /// Sampling: the floats are covered by their bit patterns.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Non-zero: the request cancels the job sent as this seq (and runs nothing).
    pub cancel_seq: u64,
}

/// MAC over every field of a lane request. Variable-length fields are length-prefixed, so no
/// two different requests encode to the same bytes.
pub fn request_mac(session: &Secret, req: &RequestFields<'_>) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(session.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(DOMAIN);
    mac.update(&req.seq.to_le_bytes());
    mac.update(&req.deadline_ns.to_le_bytes());
    mac.update(&req.max_tokens.to_le_bytes());
    mac.update(&req.temperature.to_bits().to_le_bytes());
    mac.update(&req.top_p.to_bits().to_le_bytes());
    mac.update(&req.seed.to_le_bytes());
    mac.update(&req.cancel_seq.to_le_bytes());
    for field in [req.job_id, req.model, req.prompt] {
        mac.update(&(field.len() as u64).to_le_bytes());
        mac.update(field.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time check of a presented MAC.
pub fn verify_request(session: &Secret, req: &RequestFields<'_>, presented: &[u8]) -> bool {
    let expected = request_mac(session, req);
    presented.len() == expected.len() && bool::from(expected.ct_eq(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: RequestFields<'static> = RequestFields {
        seq: 1,
        job_id: "job",
        model: "model",
        prompt: "prompt",
        max_tokens: 16,
        deadline_ns: 99,
        temperature: 0.8,
        top_p: 0.9,
        seed: 42,
        cancel_seq: 0,
    };

    #[test]
    fn mac_binds_every_field_and_the_session() {
        let s = Secret::generate();
        let other = Secret::generate();
        let m = request_mac(&s, &REQ);
        assert!(verify_request(&s, &REQ, &m));
        assert!(!verify_request(&other, &REQ, &m));
        let edits = [
            RequestFields { seq: 2, ..REQ },
            RequestFields {
                job_id: "jo",
                ..REQ
            },
            RequestFields {
                model: "other",
                ..REQ
            },
            RequestFields {
                prompt: "prompt!",
                ..REQ
            },
            RequestFields {
                max_tokens: 17,
                ..REQ
            },
            RequestFields {
                deadline_ns: 100,
                ..REQ
            },
            RequestFields {
                temperature: 0.0,
                ..REQ
            },
            RequestFields { top_p: 1.0, ..REQ },
            RequestFields { seed: 43, ..REQ },
            RequestFields {
                cancel_seq: 1,
                ..REQ
            },
        ];
        for edited in edits {
            assert!(!verify_request(&s, &edited, &m), "{edited:?}");
        }
        assert!(!verify_request(&s, &REQ, &m[..31]));
        assert!(!verify_request(&s, &REQ, &[]));
    }

    #[test]
    fn bytes_cannot_move_between_the_string_fields() {
        let s = Secret::generate();
        let a = RequestFields {
            job_id: "ab",
            model: "c",
            ..REQ
        };
        let b = RequestFields {
            job_id: "a",
            model: "bc",
            ..REQ
        };
        assert!(!verify_request(&s, &b, &request_mac(&s, &a)));
    }
}
