//! The `clerk.auth.v1.AuthService` gRPC implementation: translates protobuf ↔ domain and calls
//! the [`TokenVerifier`]. Errors become [`Status`] through [`crate::error`]'s one mapping.

pub mod watch;

use std::{collections::HashSet, sync::Arc};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    authz::{is_role_key, Unmet},
    clerk::{
        api::is_clerk_id,
        directory::{
            Directory, MAX_MEMBER_OFFSET, MAX_ROLE_FILTERS, MAX_SESSION_OFFSET, SESSION_STATUSES,
        },
    },
    error::{AuthError, Denial, Reason, VerifyError},
    layer::TokenSources,
    pb::{self, auth_service_server::AuthService},
    secret::TokenDigest,
    server::{
        access::{Access, Caller, Rpc},
        events::{Event, Events},
        metrics::Observer,
    },
    token::identity::{Identity, TokenType},
    TokenVerifier, VerifyRequest,
};

/// The AuthService. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthServiceImpl {
    verifier: TokenVerifier,
    events: Events,
    identity: Option<IdentityQueries>,
    access: Access,
    observer: Observer,
    forwarders: Forwarders,
    watch: watch::WatchHub,
}

/// The callers allowed to say whom a request is for (`VerifyTokenRequest.client_ip`, the
/// source address of an Envoy `CheckRequest`): machine ids (`mch_…`, by the M2M token in the
/// call's own `authorization`) and SPIFFE IDs (`spiffe://…`, by the mTLS certificate). Cheap
/// to clone.
#[derive(Debug, Clone, Default)]
pub struct Forwarders {
    ids: Arc<HashSet<String>>,
}

impl Forwarders {
    /// Forwarders by machine id or SPIFFE ID.
    pub fn new(ids: impl IntoIterator<Item = String>) -> Self {
        Self {
            ids: Arc::new(ids.into_iter().collect()),
        }
    }

    /// Whether the caller of `request` is a forwarder: its mTLS SPIFFE ID is listed, or its
    /// M2M token's machine is listed *and* the token is scoped to AuthService's machine id
    /// (see [`Access::scoped_to_us`]: a token issued to call another service is not replayed
    /// here). A missing or failing caller token just means "no".
    pub async fn admit<T>(
        &self,
        request: &Request<T>,
        verifier: &TokenVerifier,
        access: &Access,
    ) -> bool {
        if self.ids.is_empty() {
            return false;
        }
        if self.ids.iter().any(|f| f.starts_with("spiffe://"))
            && crate::authz::peer::PeerIdentity::from_request(request).any_in(self.ids.iter())
        {
            return true;
        }
        let Ok(token) = TokenSources::default()
            .with_session_cookie(false)
            .extract(request.metadata().as_ref())
        else {
            return false;
        };
        verifier
            .verify(&VerifyRequest {
                token,
                accepted_types: &[TokenType::M2mToken],
                source: request.remote_addr().map(|a| a.ip()),
                ..VerifyRequest::default()
            })
            .await
            .ok()
            .filter(|id| access.scoped_to_us(id).is_ok())
            .and_then(|id| id.machine.as_ref()?.machine_id.clone())
            .is_some_and(|m| self.ids.contains(&m))
    }
}

/// What the identity-query RPCs need.
#[derive(Debug, Clone)]
pub struct IdentityQueries {
    /// Cached Backend API access.
    pub directory: Directory,
}

fn denied() -> AuthError {
    AuthError::Denied(Denial {
        unmet: Unmet::CallerNotAllowed,
        required: Vec::new(),
    })
}

impl AuthServiceImpl {
    /// A service verifying with `verifier` (identity queries answer FAILED_PRECONDITION;
    /// revocations stay in this process).
    pub fn new(verifier: TokenVerifier) -> Self {
        let events = Events::local(verifier.revocations().clone(), None);
        Self {
            verifier,
            events,
            identity: None,
            access: Access::default(),
            observer: Observer::default(),
            forwarders: Forwarders::default(),
            watch: watch::WatchHub::default(),
        }
    }

    /// A service applying and sharing revocations through `events`, and answering identity
    /// queries when `identity` is given.
    pub fn with_events(
        verifier: TokenVerifier,
        events: Events,
        identity: Option<IdentityQueries>,
    ) -> Self {
        Self {
            verifier,
            events,
            identity,
            access: Access::default(),
            observer: Observer::default(),
            forwarders: Forwarders::default(),
            watch: watch::WatchHub::default(),
        }
    }

    /// Callers whose `VerifyTokenRequest.client_ip` is honoured: machine ids (`mch_…`, by
    /// their M2M token in the call's `authorization`) and SPIFFE IDs (`spiffe://…`, by their
    /// mTLS certificate). Anyone else's `client_ip` is ignored: the call counts under the
    /// caller's own address, so one caller cannot spread its Backend API cost over invented
    /// sources.
    pub fn with_forwarders(mut self, forwarders: Forwarders) -> Self {
        self.forwarders = forwarders;
        self
    }

    /// Who may ask what (identity queries, the revocation feed); default: session tokens
    /// speak for their user, nobody is trusted. Warnings about the rules are logged once here.
    pub fn with_access(mut self, access: Access) -> Self {
        for w in access.warnings() {
            tracing::warn!("{w}");
        }
        self.access = access;
        self
    }

    /// Serves `WatchRevocations` within `hub`'s limits (default: [`watch::WatchConfig`]'s).
    pub fn with_watch(mut self, hub: watch::WatchHub) -> Self {
        self.watch = hub;
        self
    }

    /// Sends every decision to `observer` (metrics and the audit log).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }

    fn queries(&self) -> Result<&IdentityQueries, AuthError> {
        self.identity
            .as_ref()
            .ok_or(AuthError::Misconfigured(Reason::SecretKeyMissing))
    }

    /// Lets the caller of `rpc` in, or refuses it ([`crate::server::access`]): an allowlisted mTLS
    /// peer where a certificate suffices, else the call's own token, verified as one of the
    /// types let in and judged by the rules. Records the caller for the audit line. Returns
    /// the verified token's identity too (`None` when the certificate sufficed).
    async fn caller<T>(
        &self,
        rpc: Rpc,
        request: &Request<T>,
    ) -> Result<(Caller, Option<Arc<Identity>>), AuthError> {
        let peer = self
            .access
            .trusted_peer(&crate::authz::peer::PeerIdentity::from_request(request));
        if let Some(id) = &peer {
            if self.access.peer_suffices(rpc) {
                return Ok((Caller::Trusted { id: id.clone() }, None));
            }
        }
        let token = TokenSources::default()
            .with_session_cookie(false)
            .extract(request.metadata().as_ref())?;
        let identity = self
            .verifier
            .verify(&VerifyRequest {
                token,
                accepted_types: self.access.accepted_types(),
                source: request.remote_addr().map(|a| a.ip()),
                ..VerifyRequest::default()
            })
            .await?;
        let _ = CALLER.try_with(|c| *c.borrow_mut() = Some(identity.clone()));
        let caller = self
            .access
            .decide(rpc, &identity, peer.as_deref())
            .map_err(AuthError::Denied)?;
        Ok((caller, Some(identity)))
    }

    /// The caller of `rpc`, which must be allowed to read `user_id`. Refused before anything
    /// is fetched.
    async fn caller_for_user<T>(
        &self,
        rpc: Rpc,
        request: &Request<T>,
        user_id: &str,
    ) -> Result<Caller, AuthError> {
        let (caller, _) = self.caller(rpc, request).await?;
        if caller.may_read_user(user_id) {
            Ok(caller)
        } else {
            Err(denied())
        }
    }

    /// The caller of `rpc`, which must be allowed to read the organization `org_id`: a
    /// trusted caller, or a session token with `org_id` active that holds what the
    /// organization policy asks ([`crate::server::access::OrgRead`]; a system permission is
    /// looked up in the user's memberships at Clerk, cached). Refused before anything about
    /// the organization is fetched, the same way whether it exists or not.
    async fn caller_for_org<T>(
        &self,
        rpc: Rpc,
        request: &Request<T>,
        org_id: &str,
    ) -> Result<Caller, AuthError> {
        let (caller, identity) = self.caller(rpc, request).await?;
        let (Caller::User { user_id, .. }, Some(identity)) = (&caller, &identity) else {
            return Ok(caller);
        };
        let policy = self.access.org_read();
        let active = identity
            .organization
            .as_ref()
            .is_some_and(|o| o.id == org_id);
        let held = if active && policy.needs_memberships() {
            let memberships = self
                .queries()?
                .directory
                .memberships(user_id, Some(user_id))
                .await?;
            memberships
                .iter()
                .find(|m| m.organization.id == org_id)
                .map(|m| m.permissions.clone())
        } else {
            None
        };
        policy
            .allows(identity, org_id, held.as_deref())
            .map_err(AuthError::Denied)?;
        Ok(caller)
    }

    /// The generated tonic server for this service.
    pub fn into_server(self) -> pb::auth_service_server::AuthServiceServer<Self> {
        pb::auth_service_server::AuthServiceServer::new(self)
    }
}

fn check_id(id: &str, prefix: &str, what: &'static str) -> Result<(), AuthError> {
    if is_clerk_id(id, prefix) {
        Ok(())
    } else {
        Err(AuthError::InvalidRequest(what))
    }
}

/// A page request's size and offset: `page_size` 1..=100 (0: 20), `page_token` empty or
/// one we issued (`o` and the offset in canonical decimal, at most `max_offset`). Every other
/// shape (`o+5`, `o05`, `o 5`, a huge number) is refused, never read as something close.
fn page(page_size: i32, page_token: &str, max_offset: usize) -> Result<(usize, usize), AuthError> {
    let size = match page_size {
        0 => 20,
        n @ 1..=100 => n as usize,
        _ => return Err(AuthError::InvalidRequest("page_size must be 1..=100")),
    };
    if page_token.is_empty() {
        return Ok((size, 0));
    }
    let bad = AuthError::InvalidRequest("page_token is not one we issued");
    let digits = page_token.strip_prefix('o').ok_or(bad.clone())?;
    let canonical = !digits.is_empty()
        && digits.len() <= 9
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    match digits.parse::<usize>() {
        Ok(n) if canonical && n <= max_offset => Ok((size, n)),
        _ => Err(bad),
    }
}

/// The role filter of a member query, canonical: every entry a role key as Clerk writes it
/// (`org:admin`), at most [`MAX_ROLE_FILTERS`], no repeats; sorted (the order asked does not
/// matter, so that the same filter is one cache entry). Anything else is refused.
fn role_filter(roles: &[String]) -> Result<Vec<String>, AuthError> {
    if roles.len() > MAX_ROLE_FILTERS {
        return Err(AuthError::InvalidRequest("at most 10 roles"));
    }
    if !roles.iter().all(|r| is_role_key(r)) {
        return Err(AuthError::InvalidRequest(
            "a role is not a Clerk role key (org: and lowercase letters, digits, _)",
        ));
    }
    let mut sorted = roles.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != roles.len() {
        return Err(AuthError::InvalidRequest("a role is named twice"));
    }
    Ok(sorted)
}

/// The `next_page_token` after a page of `got` entries from `offset` out of `total`; none
/// past `max_offset`, where [`page`] would refuse it.
fn next_page(offset: usize, got: usize, total: usize, max_offset: usize) -> String {
    let next = offset + got;
    if got > 0 && next < total && next <= max_offset {
        format!("o{next}")
    } else {
        String::new()
    }
}

tokio::task_local! {
    /// The caller of the identity query being served, once its token is verified (for the
    /// audit line).
    static CALLER: std::cell::RefCell<Option<Arc<Identity>>>;
}

/// Runs an RPC body in a span with the method and outcome, records the decision (metrics,
/// audit log with the caller and `what` the target asked about), and maps errors once.
async fn traced<T>(
    observer: &Observer,
    method: &'static str,
    what: &str,
    body: impl std::future::Future<Output = Result<T, AuthError>>,
) -> Result<Response<T>, Status> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "rpc",
        method,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty
    );
    async move {
        let (result, caller) = CALLER
            .scope(std::cell::RefCell::new(None), async {
                let result = body.await;
                (result, CALLER.with(|c| c.borrow_mut().take()))
            })
            .await;
        observer.decision(
            method,
            what,
            caller.as_deref(),
            None,
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        let span = tracing::Span::current();
        match &result {
            Ok(_) => {
                span.record("outcome", "ok");
            }
            Err(e) => {
                span.record("outcome", "refused");
                span.record("reason", e.reason_str());
                tracing::info!(code = ?e.code(), "call refused");
            }
        }
        result.map(Response::new).map_err(Status::from)
    }
    .instrument(span)
    .await
}

#[tonic::async_trait]
impl AuthService for AuthServiceImpl {
    type WatchRevocationsStream = watch::RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        traced(&self.observer, "WatchRevocations", "", async {
            // Trusted callers only ([`crate::server::access`]): an allowlisted SPIFFE ID (mTLS), or an
            // M2M token of an allowlisted machine scoped to AuthService. A token's expiry ends
            // the stream: it never outlives the credentials that opened it.
            let (_, identity) = self.caller(Rpc::WatchRevocations, &request).await?;
            let expires_at = identity.map(|i| i.expires_at);
            self.watch
                .open(&self.events, request.remote_addr(), expires_at)
        })
        .await
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        traced(&self.observer, "WhoAmI", "", async {
            let (caller, identity) = self.caller(Rpc::WhoAmI, &request).await?;
            let identity = identity.ok_or(AuthError::InvalidRequest("WhoAmI needs a token"))?;
            let user = match &caller {
                Caller::Trusted { .. } => None,
                Caller::User { user_id, .. } => {
                    let q = self.queries()?;
                    Some(q.directory.user(user_id, Some(user_id)).await?.to_proto())
                }
            };
            Ok(pb::WhoAmIResponse {
                identity: Some(identity.to_proto()),
                user,
            })
        })
        .await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let what = request.get_ref().user_id.clone();
        traced(&self.observer, "GetUser", &what, async {
            let user_id = request.get_ref().user_id.clone();
            check_id(&user_id, "user_", "user_id is not a Clerk user id")?;
            let caller = self
                .caller_for_user(Rpc::GetUser, &request, &user_id)
                .await?;
            let q = self.queries()?;
            Ok(q.directory
                .user(&user_id, Some(caller.budget_key()))
                .await?
                .to_proto())
        })
        .await
    }

    async fn list_organization_memberships(
        &self,
        request: Request<pb::ListOrganizationMembershipsRequest>,
    ) -> Result<Response<pb::ListOrganizationMembershipsResponse>, Status> {
        let what = request.get_ref().user_id.clone();
        traced(
            &self.observer,
            "ListOrganizationMemberships",
            &what,
            async {
                let r = request.get_ref();
                let user_id = r.user_id.clone();
                check_id(&user_id, "user_", "user_id is not a Clerk user id")?;
                let (size, offset) = page(r.page_size, &r.page_token, usize::MAX)?;
                let caller = self
                    .caller_for_user(Rpc::ListOrganizationMemberships, &request, &user_id)
                    .await?;
                let q = self.queries()?;
                let all = q
                    .directory
                    .memberships(&user_id, Some(caller.budget_key()))
                    .await?;
                let page: Vec<_> = all
                    .iter()
                    .skip(offset)
                    .take(size)
                    .map(|m| m.to_proto())
                    .collect();
                Ok(pb::ListOrganizationMembershipsResponse {
                    next_page_token: next_page(offset, page.len(), all.len(), usize::MAX),
                    memberships: page,
                    total_count: i32::try_from(all.len()).unwrap_or(i32::MAX),
                })
            },
        )
        .await
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let what = request.get_ref().session_id.clone();
        traced(&self.observer, "GetSession", &what, async {
            let session_id = request.get_ref().session_id.clone();
            check_id(&session_id, "sess_", "session_id is not a Clerk session id")?;
            let (caller, _) = self.caller(Rpc::GetSession, &request).await?;
            let q = self.queries()?;
            match &caller {
                Caller::Trusted { id } => {
                    Ok(q.directory.session(&session_id, Some(id)).await?.to_proto())
                }
                // A user may read its own sessions. Any other session is refused the same way
                // whether it exists or not, and a refusal once known (its owner, or Clerk's
                // "not found") is answered again without asking Clerk.
                Caller::User {
                    user_id,
                    session_id: Some(own),
                } if *own == session_id => Ok(pb::Session {
                    is_current: true,
                    ..q.directory
                        .session(&session_id, Some(user_id))
                        .await?
                        .to_proto()
                }),
                Caller::User { user_id, .. } => {
                    match q.directory.session_of_user(&session_id, user_id).await? {
                        Some(s) => Ok(s.to_proto()),
                        None => Err(denied()),
                    }
                }
            }
        })
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let what = request.get_ref().user_id.clone();
        traced(&self.observer, "ListSessions", &what, async {
            let r = request.get_ref();
            check_id(&r.user_id, "user_", "user_id is not a Clerk user id")?;
            let status = match r.status.as_str() {
                "" => None,
                s if SESSION_STATUSES.contains(&s) => Some(s),
                _ => {
                    return Err(AuthError::InvalidRequest(
                        "status is not a Clerk session status",
                    ))
                }
            };
            let (size, offset) = page(r.page_size, &r.page_token, MAX_SESSION_OFFSET)?;
            let caller = self
                .caller_for_user(Rpc::ListSessions, &request, &r.user_id)
                .await?;
            let current = match &caller {
                Caller::User { session_id, .. } => session_id.as_deref(),
                Caller::Trusted { .. } => None,
            };
            let q = self.queries()?;
            let got = q
                .directory
                .sessions_of(&r.user_id, status, offset, size, Some(caller.budget_key()))
                .await?;
            Ok(pb::ListSessionsResponse {
                sessions: got
                    .sessions
                    .iter()
                    .map(|s| pb::Session {
                        is_current: current == Some(s.id.as_str()),
                        ..s.to_proto()
                    })
                    .collect(),
                next_page_token: next_page(
                    offset,
                    got.sessions.len(),
                    got.total_count,
                    MAX_SESSION_OFFSET,
                ),
                total_count: i32::try_from(got.total_count).unwrap_or(i32::MAX),
            })
        })
        .await
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let what = request.get_ref().session_id.clone();
        traced(&self.observer, "RevokeSession", &what, async {
            let session_id = request.get_ref().session_id.clone();
            check_id(&session_id, "sess_", "session_id is not a Clerk session id")?;
            let (caller, identity) = self.caller(Rpc::RevokeSession, &request).await?;
            let q = self.queries()?;
            if let (Caller::User { user_id, .. }, Some(identity)) = (&caller, &identity) {
                // Its own sessions only, refused alike whether another's or made up; then
                // the self-revocation policy (a fresh factor for the other sessions).
                if q.directory
                    .session_of_user(&session_id, user_id)
                    .await?
                    .is_none()
                {
                    return Err(denied());
                }
                self.access
                    .self_revoke()
                    .allows(identity, &session_id)
                    .map_err(AuthError::Denied)?;
            }
            let session = q
                .directory
                .revoke_session(&session_id, Some(caller.budget_key()))
                .await?;
            self.events
                .publish(Event::SessionRevoked {
                    id: session_id.clone(),
                })
                .await;
            if crate::clerk::api::is_clerk_id(&session.user_id, "user_") {
                // Other replicas' pages of the user's sessions.
                self.events
                    .publish(Event::SessionsChanged {
                        user_id: session.user_id.clone(),
                    })
                    .await;
            }
            tracing::info!(session = %session_id, "session revoked");
            Ok(session.to_proto())
        })
        .await
    }

    async fn get_organization(
        &self,
        request: Request<pb::GetOrganizationRequest>,
    ) -> Result<Response<pb::OrganizationProfile>, Status> {
        let what = request.get_ref().organization_id.clone();
        traced(&self.observer, "GetOrganization", &what, async {
            let org_id = request.get_ref().organization_id.clone();
            check_id(
                &org_id,
                "org_",
                "organization_id is not a Clerk organization id",
            )?;
            let caller = self
                .caller_for_org(Rpc::GetOrganization, &request, &org_id)
                .await?;
            let q = self.queries()?;
            Ok(q.directory
                .organization(&org_id, Some(caller.budget_key()))
                .await?
                .to_proto())
        })
        .await
    }

    async fn list_organization_members(
        &self,
        request: Request<pb::ListOrganizationMembersRequest>,
    ) -> Result<Response<pb::ListOrganizationMembersResponse>, Status> {
        let what = request.get_ref().organization_id.clone();
        traced(&self.observer, "ListOrganizationMembers", &what, async {
            let r = request.get_ref();
            check_id(
                &r.organization_id,
                "org_",
                "organization_id is not a Clerk organization id",
            )?;
            let roles = role_filter(&r.roles)?;
            let (size, offset) = page(r.page_size, &r.page_token, MAX_MEMBER_OFFSET)?;
            let caller = self
                .caller_for_org(Rpc::ListOrganizationMembers, &request, &r.organization_id)
                .await?;
            let q = self.queries()?;
            let got = q
                .directory
                .members_of(
                    &r.organization_id,
                    &roles,
                    offset,
                    size,
                    Some(caller.budget_key()),
                )
                .await?;
            Ok(pb::ListOrganizationMembersResponse {
                members: got.members.iter().map(|m| m.to_member_proto()).collect(),
                next_page_token: next_page(
                    offset,
                    got.members.len(),
                    got.total_count,
                    MAX_MEMBER_OFFSET,
                ),
                total_count: i32::try_from(got.total_count).unwrap_or(i32::MAX),
            })
        })
        .await
    }

    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        // One audit line per decision (the observer) is the log of this call: it carries the
        // token's fingerprint, verdict and reason. No span, no second line on the hot path.
        let started = std::time::Instant::now();
        let source = self.source_of(&request, peer).await;
        let req = request.into_inner();
        // Hashed once: the verdict cache's key and the audit line's fingerprint.
        let digest = TokenDigest::of(&req.token);
        let result = match source {
            Ok(source) => self.verify(&req, &digest, source).await,
            Err(e) => Err(e),
        };
        self.observer.decision(
            "VerifyToken",
            "",
            result.as_ref().ok().map(|(_, id)| &**id),
            Some(&digest),
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        match result {
            Ok((identity, _)) => Ok(Response::new(pb::VerifyTokenResponse {
                identity: Some(identity),
                cache_for: match crate::token::machine::opaque_type(&req.token) {
                    Some(_) => Box::pin(self.cache_for(&req.token)).await,
                    None => None,
                },
            })),
            Err(e) => {
                if matches!(e, AuthError::Unavailable(_)) {
                    tracing::warn!(
                        token = %digest.fingerprint(),
                        reason = e.reason_str(),
                        "token not verified: keys unavailable"
                    );
                }
                Err(Status::from(e))
            }
        }
    }
}

/// Most authorized parties one request may name.
pub const MAX_AUTHORIZED_PARTIES: usize = 64;
/// Longest authorized party accepted, in bytes.
pub const MAX_AUTHORIZED_PARTY_BYTES: usize = 2048;

impl AuthServiceImpl {
    /// How long a caller may keep a verdict on `token`: for an opaque machine token, what is
    /// left of the machine verifier's cache entry (its `max_age` if the entry is already
    /// gone), so caches in front of AuthService do not add to it; `None` for JWTs.
    async fn cache_for(&self, token: &str) -> Option<prost_types::Duration> {
        crate::token::machine::opaque_type(token)?;
        let machine = self.verifier.machine()?;
        let left = machine
            .cache_left(token)
            .await
            .unwrap_or_else(|| machine.max_age());
        prost_types::Duration::try_from(left).ok()
    }

    /// Who the verification is for: the request's `client_ip` when the caller is a
    /// forwarder (a delegated layer), else the caller's own address.
    async fn source_of(
        &self,
        request: &Request<pb::VerifyTokenRequest>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Option<std::net::IpAddr>, AuthError> {
        let claimed = request.get_ref().client_ip.as_str();
        if claimed.is_empty() {
            return Ok(peer);
        }
        if !Box::pin(self.forwarders.admit(request, &self.verifier, &self.access)).await {
            tracing::debug!("client_ip ignored: the caller is not an allowed forwarder");
            return Ok(peer);
        }
        if claimed.len() > 64 {
            return Err(AuthError::InvalidRequest("client_ip is not an IP address"));
        }
        claimed
            .parse()
            .map(Some)
            .map_err(|_| AuthError::InvalidRequest("client_ip is not an IP address"))
    }

    async fn verify(
        &self,
        req: &pb::VerifyTokenRequest,
        digest: &TokenDigest,
        source: Option<std::net::IpAddr>,
    ) -> Result<(pb::Identity, Arc<Identity>), AuthError> {
        if req.authorized_parties.len() > MAX_AUTHORIZED_PARTIES {
            return Err(AuthError::InvalidRequest(
                "authorized_parties holds more than 64 entries",
            ));
        }
        if req
            .authorized_parties
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_AUTHORIZED_PARTY_BYTES)
        {
            return Err(AuthError::InvalidRequest(
                "authorized_parties holds an empty entry or one over 2 KiB",
            ));
        }
        if req.accepted_token_types.len() > 8 {
            return Err(AuthError::InvalidRequest(
                "accepted_token_types holds more than 8 entries",
            ));
        }
        let types = req
            .accepted_token_types
            .iter()
            .map(|t| match TokenType::try_from(*t) {
                Ok(TokenType::Unspecified) | Err(_) => Err(AuthError::InvalidRequest(
                    "accepted_token_types holds an unknown token type",
                )),
                Ok(t) => Ok(t),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identity = self
            .verifier
            .verify_digested(
                &VerifyRequest {
                    token: &req.token,
                    authorized_parties: &req.authorized_parties,
                    accept_pending: req.accept_pending_session,
                    accepted_types: &types,
                    source,
                },
                digest,
            )
            .await?;
        if req.check_session_online {
            // Boxed, as the other awaits that ask the network here: their state would
            // otherwise be part of every call's future, copied on every call.
            Box::pin(self.confirm_online(&identity, req.accept_pending_session)).await?;
        }
        let proto = if req.claims_struct {
            identity.to_proto_with_claims_struct()
        } else {
            identity.to_proto()
        };
        Ok((proto, identity))
    }

    /// Asks Clerk (cached for the session TTL) whether the token's session is still live.
    async fn confirm_online(
        &self,
        identity: &Identity,
        accept_pending: bool,
    ) -> Result<(), AuthError> {
        let Some(sid) = identity.session_id.as_deref() else {
            return Ok(());
        };
        let q = self.queries()?;
        // The service's own cost (bounded by the replica-wide budget), not the token's user's:
        // someone else emptying that user's budget must not fail the user's online checks.
        let gone = match q.directory.session(sid, None).await {
            Ok(s) if s.is_live(accept_pending) => return Ok(()),
            // Pending (not accepted): refused now, but the session may still become active.
            Ok(s) if s.status == "pending" => false,
            Ok(_) | Err(crate::clerk::api::ApiError::NotFound) => true,
            Err(e) => return Err(e.into()),
        };
        if gone {
            // Ended, revoked, removed, expired…: its other tokens are refused from now on.
            self.events
                .publish(Event::SessionRevoked { id: sid.to_owned() })
                .await;
        }
        Err(AuthError::Rejected(VerifyError::new(
            Reason::SessionRevoked,
            "The session is no longer active at Clerk.",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_taken_only_as_issued() {
        assert_eq!(page(0, "", 100).ok(), Some((20, 0)));
        assert_eq!(page(7, "o40", 100).ok(), Some((7, 40)));
        assert_eq!(page(100, "o100", 100).ok(), Some((100, 100)));
        for (size, token) in [
            (101, ""),
            (-1, ""),
            (i32::MIN, ""),
            (0, "o"),
            (0, "o0"),
            (0, "o05"),
            (0, "o+5"),
            (0, "o-5"),
            (0, "o 5"),
            (0, "o5 "),
            (0, "O5"),
            (0, "5"),
            (0, "o1e3"),
            (0, "o\u{0665}"),
            (0, "o101"),
            (0, "o1234567890"),
            (0, "o99999999999999999999"),
        ] {
            assert!(page(size, token, 100).is_err(), "{size} {token:?}");
        }
        // What is issued is what is taken back, and nothing past the bound is issued.
        for (offset, got, total) in [(0, 20, 45), (20, 20, 45), (40, 5, 45), (90, 10, 500)] {
            let next = next_page(offset, got, total, 100);
            if next.is_empty() {
                assert!(offset + got >= total || offset + got > 100);
            } else {
                assert_eq!(page(0, &next, 100).ok(), Some((20, offset + got)));
            }
        }
        assert_eq!(next_page(95, 10, 500, 100), "");
        assert_eq!(next_page(0, 0, 10, 100), "");
    }

    #[test]
    fn role_filters_are_canonical_or_refused() {
        let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            role_filter(&roles(&["org:member", "org:admin"])).ok(),
            Some(roles(&["org:admin", "org:member"]))
        );
        assert_eq!(role_filter(&[]).ok(), Some(vec![]));
        for bad in [
            &["org:admin", "org:admin"][..],
            &["admin"],
            &["org:Admin"],
            &["org:admin&role=org:member"],
            &["org:admin "],
        ] {
            assert!(role_filter(&roles(bad)).is_err(), "{bad:?}");
        }
        let eleven: Vec<String> = (0..11).map(|n| format!("org:r{n}")).collect();
        assert!(role_filter(&eleven).is_err());
    }
}
