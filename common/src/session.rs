//! Lane sessions: the secret a pool manager shares with one worker incarnation, and the MAC that
//! binds every lane request to it.
//!
//! The secret travels over the worker's stdin pipe at spawn (never argv, env or a file), so a
//! process that can merely write a lane file cannot forge a request the worker will run.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// MAC over the fields of a lane request that decide what work is done and until when.
pub fn request_mac(
    session: &Secret,
    seq: u64,
    job_id: &str,
    deadline_ns: u64,
    prompt: &str,
) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(session.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(&seq.to_le_bytes());
    mac.update(&deadline_ns.to_le_bytes());
    mac.update(&(job_id.len() as u64).to_le_bytes());
    mac.update(job_id.as_bytes());
    mac.update(prompt.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Constant-time check of a presented MAC.
pub fn verify_request(
    session: &Secret,
    seq: u64,
    job_id: &str,
    deadline_ns: u64,
    prompt: &str,
    presented: &[u8],
) -> bool {
    let expected = request_mac(session, seq, job_id, deadline_ns, prompt);
    presented.len() == expected.len() && bool::from(expected.ct_eq(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_binds_every_field_and_the_session() {
        let s = Secret::generate();
        let other = Secret::generate();
        let m = request_mac(&s, 1, "job", 99, "prompt");
        assert!(verify_request(&s, 1, "job", 99, "prompt", &m));
        assert!(!verify_request(&other, 1, "job", 99, "prompt", &m));
        assert!(!verify_request(&s, 2, "job", 99, "prompt", &m));
        assert!(!verify_request(&s, 1, "jo", 99, "prompt", &m));
        assert!(!verify_request(&s, 1, "job", 100, "prompt", &m));
        assert!(!verify_request(&s, 1, "job", 99, "prompt!", &m));
        assert!(!verify_request(&s, 1, "job", 99, "prompt", &m[..31]));
        assert!(!verify_request(&s, 1, "job", 99, "prompt", &[]));
    }
}
