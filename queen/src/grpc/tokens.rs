//! `skep.v1.Tokens`: create, list and revoke API tokens (admin only).

use std::time::Duration;

use skep_common::auth::TokenDigest;
use skep_common::secret::Secret;
use skep_common::validate;
use skep_proto::v1::tokens_server::Tokens;
use skep_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, RevokeTokenResponse, TokenInfo,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::require;
use crate::Error;
use crate::audit::events;
use crate::auth::{BookError, Role, TokenEntry};
use crate::job::Services;
use crate::model::unix_ms;
use skep_approval::{Action, SpecHash};
use skep_audit::Fields;

const LAST_ADMIN: Action = Action::TokenRevokeLastAdmin;

/// Largest per-token share of live jobs (the queen holds 1024 live jobs by default).
const MAX_JOBS_PER_TOKEN: u32 = 4096;

/// Longest lifetime a token may be given.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub struct TokensService {
    svc: Services,
}

impl TokensService {
    pub fn new(svc: Services) -> Self {
        TokensService { svc }
    }
}

fn info(e: &TokenEntry) -> TokenInfo {
    TokenInfo {
        fingerprint: e.fingerprint(),
        role: e.role.as_str().to_owned(),
        label: e.label.clone(),
        created_unix_ms: e.created_unix_ms,
        expires_unix_ms: e.expires_unix_ms,
        revoked: e.revoked,
        max_jobs: e.max_jobs,
    }
}

#[tonic::async_trait]
impl Tokens for TokensService {
    async fn create(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = require(&req, Role::Admin)?;
        let r = req.into_inner();
        let role = Role::parse(&r.role)
            .filter(|r| *r != Role::Node)
            .ok_or_else(|| {
                Status::invalid_argument("role must be \"admin\", \"submit\" or \"enroll\"")
            })?;
        let label = if r.label.is_empty() {
            "unnamed".to_owned()
        } else {
            r.label
        };
        validate::identifier("label", &label).map_err(Error::from)?;
        if r.max_jobs > MAX_JOBS_PER_TOKEN {
            return Err(Status::invalid_argument(format!(
                "max_jobs must be at most {MAX_JOBS_PER_TOKEN} (0 = the queen's default)"
            )));
        }
        if r.max_jobs > 0 && role == Role::Enroll {
            return Err(Status::invalid_argument(
                "max_jobs applies to admin and submit tokens, not enrollment tokens",
            ));
        }
        let ttl = Duration::from_millis(r.ttl_ms);
        if ttl > MAX_TTL {
            return Err(Status::invalid_argument("ttl must be at most 10 years"));
        }
        let now = unix_ms();
        let token = Secret::generate();
        let entry = TokenEntry {
            digest: TokenDigest::of(token.expose()),
            role,
            label,
            created_unix_ms: now,
            expires_unix_ms: if r.ttl_ms == 0 {
                0
            } else {
                now.saturating_add(r.ttl_ms)
            },
            revoked: false,
            node_id: String::new(),
            max_jobs: r.max_jobs,
        };
        self.svc.store.insert_token(entry.clone()).await?;
        self.svc.tokens.add(entry.clone());
        info!(caller = %who.fingerprint, token = %entry.fingerprint(), role = role.as_str(), "token created");
        let fields = Fields::new()
            .str(events::field::TOKEN_FP, &entry.fingerprint())
            .str("role", role.as_str());
        self.svc
            .audit
            .record(events::TOKEN_CREATED, &who.fingerprint, fields);
        Ok(Response::new(CreateTokenResponse {
            token: token.expose().to_owned(),
            fingerprint: entry.fingerprint(),
            expires_unix_ms: entry.expires_unix_ms,
            ca_fingerprint: self
                .svc
                .tls
                .as_ref()
                .map(|t| t.ca.fingerprint.clone())
                .unwrap_or_default(),
        }))
    }

    async fn list(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        require(&req, Role::Admin)?;
        let tokens = self.svc.tokens.list().iter().map(info).collect();
        Ok(Response::new(ListTokensResponse {
            tokens,
            cluster_id: self.svc.approvals.cluster_id().to_owned(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let who = require(&req, Role::Admin)?;
        let RevokeTokenRequest {
            fingerprint: fp,
            approval,
        } = req.into_inner();
        if fp.len() != 6 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument("fingerprint must be 6 hex digits"));
        }
        let entry = self.svc.tokens.find(&fp).map_err(Error::from)?;
        match self.svc.tokens.check_revocable(&entry, unix_ms()) {
            Ok(()) => {}
            // Revoking the last admin token is a governed action: refused outright, unless
            // the queen requires (and so accepts) an approval for it and one is presented.
            Err(BookError::LastAdmin) if self.svc.approvals.required(LAST_ADMIN) => {
                // The spec is the token's fingerprint as `skep token list` shows it.
                let spec = SpecHash::of(entry.fingerprint().as_bytes());
                self.svc
                    .approvals
                    .check(
                        LAST_ADMIN,
                        &spec,
                        &approval,
                        &who.fingerprint,
                        &self.svc.store,
                        &self.svc.audit,
                    )
                    .await?;
            }
            Err(e) => return Err(Error::from(e).into()),
        }
        self.svc.store.revoke_token(&entry.digest).await?;
        self.svc.tokens.revoke(&entry.digest);
        info!(caller = %who.fingerprint, token = %fp, "token revoked");
        let fields = Fields::new().str(events::field::TOKEN_FP, &fp);
        self.svc
            .audit
            .record(events::TOKEN_REVOKED, &who.fingerprint, fields);
        Ok(Response::new(RevokeTokenResponse {
            token: Some(info(&TokenEntry {
                revoked: true,
                ..entry
            })),
        }))
    }
}
