//! Who may ask AuthService what: the caller rules of the identity queries (`WhoAmI`,
//! `GetUser`, `ListOrganizationMemberships`, `GetSession`, `RevokeSession`) and of the
//! revocation feed (`WatchRevocations`), in one place.
//!
//! A caller is one of:
//!
//! * **trusted** — may read anyone, revoke sessions and follow the revocation feed:
//!   * an mTLS client whose certificate's one SPIFFE ID is on the allowlist, or
//!   * an M2M token whose machine is on the allowlist **and whose `scopes` name AuthService's
//!     own machine id** ([`AccessConfig::machine_id`]). Clerk's M2M `scopes` are the machines
//!     the issuing machine may call: the tokens of a machine A that is not scoped to
//!     AuthService — say one that only calls service B — are refused here, so B cannot replay
//!     them. Without a configured machine id no M2M token is trusted at all. A machine
//!     scoped to AuthService *and* to B hands B replayable tokens (they are bearer tokens):
//!     [`AccessConfig::exclusive_scope`] refuses such machines, mTLS binds callers to their
//!     workload.
//! * **a user speaking for itself** — a session token (always), an OAuth access token or a
//!   user-owned API key when [`AccessConfig::caller_types`] lets them in. It may read its own
//!   profile, memberships and sessions; an OAuth token only for the RPCs whose scopes
//!   ([`AccessConfig::oauth_scopes`]) it holds.
//!
//! Everything else is refused: `PERMISSION_DENIED` with `CALLER_NOT_ALLOWED` (not on the
//! allowlist, or asking about someone else), `MACHINE_NOT_ALLOWED` (an allowlisted machine's
//! token not scoped to AuthService), `SCOPE_REQUIRED` (an OAuth token without the RPC's
//! scopes) or `PEER_NOT_ALLOWED` (`RevokeSession` configured to need mTLS *and* an M2M token).
//! A token type that is not let in is refused before it is verified
//! (`UNAUTHENTICATED` / `TOKEN_TYPE_MISMATCH`, as Clerk's `acceptsToken`), so an opaque OAuth
//! token or API key that would not be allowed costs no Backend API call.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::{
    authz::{peer::PeerIdentity, Unmet},
    clerk::api::is_clerk_id,
    error::Denial,
    token::identity::{Identity, TokenType},
};

/// An RPC whose caller [`Access`] judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `WhoAmI`: the caller's own identity and profile.
    WhoAmI,
    /// `GetUser`.
    GetUser,
    /// `ListOrganizationMemberships`.
    ListOrganizationMemberships,
    /// `GetSession`.
    GetSession,
    /// `RevokeSession`: trusted callers only.
    RevokeSession,
    /// `WatchRevocations`: trusted callers only.
    WatchRevocations,
}

impl Rpc {
    /// Every RPC, in proto order.
    pub const ALL: [Rpc; 6] = [
        Rpc::WhoAmI,
        Rpc::GetUser,
        Rpc::ListOrganizationMemberships,
        Rpc::GetSession,
        Rpc::RevokeSession,
        Rpc::WatchRevocations,
    ];

    /// The RPC's name in the proto.
    pub const fn name(self) -> &'static str {
        match self {
            Rpc::WhoAmI => "WhoAmI",
            Rpc::GetUser => "GetUser",
            Rpc::ListOrganizationMemberships => "ListOrganizationMemberships",
            Rpc::GetSession => "GetSession",
            Rpc::RevokeSession => "RevokeSession",
            Rpc::WatchRevocations => "WatchRevocations",
        }
    }

    /// The RPC named `name` exactly (proto spelling, case-sensitive).
    pub fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether only trusted callers may use the RPC.
    pub const fn trusted_only(self) -> bool {
        matches!(self, Rpc::RevokeSession | Rpc::WatchRevocations)
    }
}

/// Settings of [`Access`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessConfig {
    /// AuthService's own machine id (`mch_…`, `CLERK_AUTH_MACHINE_ID`): an M2M caller is
    /// trusted only when its token's scopes name it. `None`: no M2M caller is trusted.
    pub machine_id: Option<String>,
    /// Trusted callers (`CLERK_AUTH_IDENTITY_ALLOWLIST`): machine ids (`mch_…`, by their M2M
    /// token) and SPIFFE IDs (`spiffe://…`, by their mTLS client certificate).
    pub allowlist: Vec<String>,
    /// Which user tokens may speak for their user (`CLERK_AUTH_IDENTITY_CALLER_TYPES`), besides
    /// session tokens which always may: [`TokenType::OauthToken`], [`TokenType::ApiKey`].
    /// Default: none.
    pub caller_types: Vec<TokenType>,
    /// The OAuth scopes an OAuth access token needs, per RPC
    /// (`CLERK_AUTH_IDENTITY_OAUTH_SCOPES`). An RPC without an entry refuses OAuth tokens.
    pub oauth_scopes: HashMap<Rpc, Vec<String>>,
    /// `RevokeSession` needs both an allowlisted mTLS certificate and a trusted M2M token
    /// (`CLERK_AUTH_REVOKE_REQUIRES_MTLS`). Default: either.
    pub revoke_requires_mtls: bool,
    /// An M2M token counts only when AuthService's machine id is its *only* scope
    /// (`CLERK_AUTH_MACHINE_SCOPE_EXCLUSIVE`): a machine that may also call other services
    /// (whose tokens those services could replay here) is not trusted. Default: off.
    pub exclusive_scope: bool,
}

/// Who is asking, once [`Access`] has let the call in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// May read anyone: an allowlisted machine id (`mch_…`) or SPIFFE ID.
    Trusted {
        /// The machine id or SPIFFE ID (also the caller's budget key).
        id: String,
    },
    /// A user speaking for itself.
    User {
        /// `user_…`.
        user_id: String,
        /// The session of a session token (`None` for OAuth tokens and API keys).
        session_id: Option<String>,
    },
}

impl Caller {
    /// Whom the caller's Backend API cost is charged to.
    pub fn budget_key(&self) -> &str {
        match self {
            Caller::Trusted { id } => id,
            Caller::User { user_id, .. } => user_id,
        }
    }

    /// Whether the caller may read `user_id`'s profile and memberships.
    pub fn may_read_user(&self, user_id: &str) -> bool {
        match self {
            Caller::Trusted { .. } => true,
            Caller::User { user_id: own, .. } => own == user_id,
        }
    }
}

#[derive(Debug)]
struct Inner {
    machine_id: Option<String>,
    machines: HashSet<String>,
    peers: HashSet<String>,
    accepted: Vec<TokenType>,
    oauth_scopes: HashMap<Rpc, Vec<String>>,
    revoke_requires_mtls: bool,
    exclusive_scope: bool,
}

/// The caller rules (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

impl Default for Access {
    /// Nobody is trusted; session tokens speak for their user.
    fn default() -> Self {
        Self::new(AccessConfig::default()).expect("the default access configuration is valid")
    }
}

impl Access {
    /// Checks and builds the rules; an entry that cannot be what it claims is an error.
    pub fn new(config: AccessConfig) -> Result<Self, String> {
        if let Some(id) = &config.machine_id {
            if !is_clerk_id(id, "mch_") {
                return Err(format!(
                    "machine id {id:?} is not a Clerk machine id (mch_…)"
                ));
            }
        }
        let mut machines = HashSet::new();
        let mut peers = HashSet::new();
        for entry in &config.allowlist {
            if is_clerk_id(entry, "mch_") {
                machines.insert(entry.clone());
            } else if crate::authz::peer::is_spiffe_id(entry) {
                peers.insert(entry.clone());
            } else {
                return Err(format!(
                    "{entry:?} is neither a machine id (mch_…) nor a SPIFFE ID (spiffe://…)"
                ));
            }
        }
        let mut accepted = vec![TokenType::SessionToken];
        for t in &config.caller_types {
            match t {
                TokenType::SessionToken => {}
                TokenType::OauthToken | TokenType::ApiKey => {
                    if !accepted.contains(t) {
                        accepted.push(*t);
                    }
                }
                TokenType::M2mToken => {
                    return Err(
                        "m2m_token is not a user token: machines are trusted through \
                                the allowlist and the machine id"
                            .into(),
                    )
                }
                TokenType::Unspecified => return Err("unknown caller token type".into()),
            }
        }
        for (rpc, scopes) in &config.oauth_scopes {
            if rpc.trusted_only() {
                return Err(format!(
                    "{}: only trusted callers may use it, OAuth scopes cannot open it",
                    rpc.name()
                ));
            }
            if scopes.is_empty() || scopes.iter().any(|s| !is_scope(s)) {
                return Err(format!(
                    "{}: OAuth scopes must be non-empty words without spaces, got {scopes:?}",
                    rpc.name()
                ));
            }
        }
        // M2M tokens are verified only when a machine could be trusted (allowlisted machines
        // and a machine id): otherwise they are refused as a token type, like any type not let
        // in, and an opaque one costs no Backend API call.
        if !machines.is_empty() && config.machine_id.is_some() {
            accepted.push(TokenType::M2mToken);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                machine_id: config.machine_id,
                machines,
                peers,
                accepted,
                oauth_scopes: config.oauth_scopes,
                revoke_requires_mtls: config.revoke_requires_mtls,
                exclusive_scope: config.exclusive_scope,
            }),
        })
    }

    /// What an operator should be told at startup: settings that refuse callers they seem to
    /// allow.
    pub fn warnings(&self) -> Vec<String> {
        let i = &self.inner;
        let mut out = Vec::new();
        if !i.machines.is_empty() && i.machine_id.is_none() {
            out.push(
                "CLERK_AUTH_IDENTITY_ALLOWLIST names machines but CLERK_AUTH_MACHINE_ID is not \
                 set: M2M tokens are refused for identity queries and the revocation feed \
                 (TOKEN_TYPE_MISMATCH; give AuthService a machine id and scope the callers to it)"
                    .to_owned(),
            );
        }
        if i.revoke_requires_mtls && (i.peers.is_empty() || i.machines.is_empty()) {
            out.push(
                "CLERK_AUTH_REVOKE_REQUIRES_MTLS is set but the allowlist does not name both a \
                 SPIFFE ID and a machine: RevokeSession is refused to everyone"
                    .to_owned(),
            );
        }
        if i.accepted.contains(&TokenType::OauthToken) && i.oauth_scopes.is_empty() {
            out.push(
                "OAuth tokens are identity-query callers but CLERK_AUTH_IDENTITY_OAUTH_SCOPES \
                 names no RPC: every OAuth caller is refused"
                    .to_owned(),
            );
        }
        out
    }

    /// The token types a caller's token is verified as (anything else is refused unverified).
    pub fn accepted_types(&self) -> &[TokenType] {
        &self.inner.accepted
    }

    /// Whether `RevokeSession` needs an allowlisted certificate and a trusted M2M token.
    pub fn revoke_requires_mtls(&self) -> bool {
        self.inner.revoke_requires_mtls
    }

    /// AuthService's own machine id, when configured.
    pub fn machine_id(&self) -> Option<&str> {
        self.inner.machine_id.as_deref()
    }

    /// The allowlisted SPIFFE ID of an mTLS caller (its certificate holds exactly one URI SAN,
    /// see [`crate::authz::peer`]).
    pub fn trusted_peer(&self, peer: &PeerIdentity) -> Option<String> {
        if self.inner.peers.is_empty() {
            return None;
        }
        peer.spiffe_ids
            .iter()
            .find(|id| self.inner.peers.contains(*id))
            .cloned()
    }

    /// Whether `rpc` may be answered on the mTLS certificate alone, without a token.
    pub fn peer_suffices(&self, rpc: Rpc) -> bool {
        match rpc {
            // WhoAmI describes the caller's token.
            Rpc::WhoAmI => false,
            Rpc::RevokeSession => !self.inner.revoke_requires_mtls,
            _ => true,
        }
    }

    /// Whether an M2M identity speaks for AuthService: its token's scopes name AuthService's
    /// machine id. (`Err`: why not.) Used for the allowlist and for the `client_ip`
    /// forwarders alike.
    pub fn scoped_to_us(&self, identity: &Identity) -> Result<(), Denial> {
        let scopes = identity.machine.as_ref().map_or(&[][..], |m| &m.scopes[..]);
        let exclusive = self.inner.exclusive_scope;
        match &self.inner.machine_id {
            Some(own)
                if scopes.iter().any(|s| s == own)
                    && (!exclusive || scopes.iter().all(|s| s == own)) =>
            {
                Ok(())
            }
            own => Err(Denial {
                unmet: Unmet::MachineNotAllowed,
                required: vec![(
                    "machine_id",
                    own.clone()
                        .unwrap_or_else(|| "(AuthService has no machine id)".into()),
                )],
            }),
        }
    }

    /// Judges a caller whose token verified as `identity` (and, with mTLS, whose certificate
    /// named `peer`, already matched by [`Access::trusted_peer`]).
    pub fn decide(
        &self,
        rpc: Rpc,
        identity: &Identity,
        peer: Option<&str>,
    ) -> Result<Caller, Denial> {
        let deny = |unmet| Denial {
            unmet,
            required: Vec::new(),
        };
        let i = &self.inner;
        let caller = match identity.token_type {
            TokenType::M2mToken => {
                let machine = identity
                    .machine
                    .as_ref()
                    .and_then(|m| m.machine_id.as_deref())
                    .filter(|m| i.machines.contains(*m))
                    .ok_or(deny(Unmet::CallerNotAllowed))?;
                self.scoped_to_us(identity)?;
                Caller::Trusted {
                    id: machine.to_owned(),
                }
            }
            TokenType::SessionToken if !identity.user_id.is_empty() => Caller::User {
                user_id: identity.user_id.clone(),
                session_id: identity.session_id.clone(),
            },
            TokenType::OauthToken
                if i.accepted.contains(&TokenType::OauthToken)
                    && is_clerk_id(&identity.user_id, "user_") =>
            {
                let Some(needed) = i.oauth_scopes.get(&rpc) else {
                    return Err(deny(Unmet::CallerNotAllowed));
                };
                let held = identity.machine.as_ref().map_or(&[][..], |m| &m.scopes[..]);
                if let Some(missing) = needed.iter().find(|s| !held.contains(s)) {
                    return Err(Denial {
                        unmet: Unmet::Scope,
                        required: vec![("scope", missing.clone())],
                    });
                }
                Caller::User {
                    user_id: identity.user_id.clone(),
                    session_id: None,
                }
            }
            // A user-owned API key; an organization's key speaks for no user.
            TokenType::ApiKey
                if i.accepted.contains(&TokenType::ApiKey)
                    && is_clerk_id(&identity.user_id, "user_") =>
            {
                Caller::User {
                    user_id: identity.user_id.clone(),
                    session_id: None,
                }
            }
            _ => return Err(deny(Unmet::CallerNotAllowed)),
        };
        if rpc.trusted_only() && !matches!(caller, Caller::Trusted { .. }) {
            return Err(deny(Unmet::CallerNotAllowed));
        }
        if rpc == Rpc::RevokeSession && i.revoke_requires_mtls && peer.is_none() {
            return Err(deny(Unmet::PeerNotAllowed));
        }
        Ok(caller)
    }
}

/// An OAuth scope as Clerk writes them: printable ASCII without spaces (RFC 6749 §3.3).
fn is_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// Parses `CLERK_AUTH_IDENTITY_OAUTH_SCOPES`: `Rpc=scope scope;Rpc=scope`, e.g.
/// `WhoAmI=profile email;GetUser=profile`.
pub fn parse_oauth_scopes(s: &str) -> Result<HashMap<Rpc, Vec<String>>, String> {
    let mut out = HashMap::new();
    // Errors say which entry, never echo it (configuration errors carry no values).
    for (n, entry) in s
        .split(';')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
    {
        let n = n + 1;
        let (rpc, scopes) = entry
            .split_once('=')
            .ok_or_else(|| format!("entry {n} is not RPC=scope scope…"))?;
        let rpc = Rpc::from_name(rpc.trim())
            .ok_or_else(|| format!("entry {n} does not name an AuthService identity RPC"))?;
        let scopes: Vec<String> = scopes.split_whitespace().map(str::to_owned).collect();
        if out.insert(rpc, scopes).is_some() {
            return Err(format!("{} is named twice", rpc.name()));
        }
    }
    Ok(out)
}

/// Parses `CLERK_AUTH_IDENTITY_CALLER_TYPES`: comma-separated `oauth_token`, `api_key`
/// (`session_token` is always a caller type and may be listed).
pub fn parse_caller_types(s: &str) -> Result<Vec<TokenType>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "session_token" => Ok(TokenType::SessionToken),
            "oauth_token" => Ok(TokenType::OauthToken),
            "api_key" => Ok(TokenType::ApiKey),
            "m2m_token" => Err("m2m_token: machines are trusted through \
                                CLERK_AUTH_IDENTITY_ALLOWLIST and CLERK_AUTH_MACHINE_ID"
                .to_owned()),
            _ => Err("an entry is not one of session_token, oauth_token, api_key".to_owned()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::identity::MachineInfo;

    const US: &str = "mch_authservice";
    const A: &str = "mch_machineA";

    fn machine(t: TokenType, subject: &str, scopes: &[&str]) -> Identity {
        Identity::for_machine(
            t,
            "tok_1".into(),
            MachineInfo {
                subject: subject.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                machine_id: (t == TokenType::M2mToken).then(|| subject.into()),
                client_id: None,
                name: None,
            },
            serde_json::Map::new(),
            None,
            None,
            f64::INFINITY,
            None,
        )
    }

    fn m2m(id: &str, scopes: &[&str]) -> Identity {
        machine(TokenType::M2mToken, id, scopes)
    }

    fn user(t: TokenType, user: &str, scopes: &[&str]) -> Identity {
        if t != TokenType::SessionToken {
            return machine(t, user, scopes);
        }
        Identity::from_proto(crate::pb::Identity {
            token_type: t as i32,
            user_id: user.into(),
            session_id: "sess_1".into(),
            ..Default::default()
        })
    }

    fn access(machine_id: Option<&str>) -> Access {
        Access::new(AccessConfig {
            machine_id: machine_id.map(str::to_owned),
            allowlist: vec![A.into(), "spiffe://example.org/ops".into()],
            caller_types: vec![TokenType::OauthToken],
            oauth_scopes: parse_oauth_scopes("WhoAmI=profile;GetUser=profile email").unwrap(),
            revoke_requires_mtls: false,
            exclusive_scope: false,
        })
        .unwrap()
    }

    fn unmet(r: Result<Caller, Denial>) -> Unmet {
        r.unwrap_err().unmet
    }

    #[test]
    fn an_m2m_token_speaks_only_for_its_audience() {
        let a = access(Some(US));
        // A's token to call service B, replayed here by B: refused.
        let replayed = m2m(A, &["mch_serviceB"]);
        assert_eq!(
            unmet(a.decide(Rpc::GetUser, &replayed, None)),
            Unmet::MachineNotAllowed
        );
        // Scoped to AuthService: trusted, for everything.
        let ok = m2m(A, &["mch_serviceB", US]);
        for rpc in Rpc::ALL {
            assert_eq!(
                a.decide(rpc, &ok, None),
                Ok(Caller::Trusted { id: A.into() }),
                "{rpc:?}"
            );
        }
        // Scoped to AuthService but not allowlisted.
        assert_eq!(
            unmet(a.decide(Rpc::GetUser, &m2m("mch_other", &[US]), None)),
            Unmet::CallerNotAllowed
        );
        // No machine id configured: no M2M caller, however scoped; M2M tokens are not even
        // verified.
        let none = access(None);
        assert_eq!(
            unmet(none.decide(Rpc::GetUser, &ok, None)),
            Unmet::MachineNotAllowed
        );
        assert!(!none.accepted_types().contains(&TokenType::M2mToken));
        assert!(a.accepted_types().contains(&TokenType::M2mToken));
        assert_eq!(none.warnings().len(), 1, "{:?}", none.warnings());
        // Exclusive scope: a machine that may call other services too is not trusted.
        let exclusive = Access::new(AccessConfig {
            machine_id: Some(US.into()),
            allowlist: vec![A.into()],
            exclusive_scope: true,
            ..AccessConfig::default()
        })
        .unwrap();
        assert_eq!(
            unmet(exclusive.decide(Rpc::GetUser, &ok, None)),
            Unmet::MachineNotAllowed
        );
        assert!(exclusive.decide(Rpc::GetUser, &m2m(A, &[US]), None).is_ok());
        assert!(a.warnings().is_empty(), "{:?}", a.warnings());
    }

    #[test]
    fn user_tokens_get_what_they_were_granted() {
        let a = access(Some(US));
        let session = user(TokenType::SessionToken, "user_a", &[]);
        assert_eq!(
            a.decide(Rpc::GetSession, &session, None),
            Ok(Caller::User {
                user_id: "user_a".into(),
                session_id: Some("sess_1".into())
            })
        );
        for rpc in [Rpc::RevokeSession, Rpc::WatchRevocations] {
            assert_eq!(
                unmet(a.decide(rpc, &session, None)),
                Unmet::CallerNotAllowed
            );
        }
        let email_only = user(TokenType::OauthToken, "user_a", &["email"]);
        assert_eq!(
            unmet(a.decide(Rpc::WhoAmI, &email_only, None)),
            Unmet::Scope
        );
        let profile = user(TokenType::OauthToken, "user_a", &["profile"]);
        assert!(a.decide(Rpc::WhoAmI, &profile, None).is_ok());
        // GetUser needs profile *and* email.
        assert_eq!(unmet(a.decide(Rpc::GetUser, &profile, None)), Unmet::Scope);
        // No entry for GetSession: OAuth tokens may not use it, whatever their scopes.
        let all = user(TokenType::OauthToken, "user_a", &["profile", "email"]);
        assert!(a.decide(Rpc::GetUser, &all, None).is_ok());
        assert_eq!(
            unmet(a.decide(Rpc::GetSession, &all, None)),
            Unmet::CallerNotAllowed
        );
        // API keys are not let in by this configuration …
        let key = user(TokenType::ApiKey, "user_a", &[]);
        assert_eq!(
            unmet(a.decide(Rpc::GetUser, &key, None)),
            Unmet::CallerNotAllowed
        );
        assert!(!a.accepted_types().contains(&TokenType::ApiKey));
        // … and by default neither are OAuth tokens.
        let d = Access::default();
        assert_eq!(d.accepted_types(), &[TokenType::SessionToken]);
        assert_eq!(
            unmet(d.decide(Rpc::WhoAmI, &all, None)),
            Unmet::CallerNotAllowed
        );
    }

    #[test]
    fn an_organization_api_key_or_a_hostile_subject_speaks_for_nobody() {
        let a = Access::new(AccessConfig {
            caller_types: vec![TokenType::ApiKey],
            ..AccessConfig::default()
        })
        .unwrap();
        let org_key = user(TokenType::ApiKey, "org_1", &[]);
        assert_eq!(
            unmet(a.decide(Rpc::WhoAmI, &org_key, None)),
            Unmet::CallerNotAllowed
        );
        let hostile = user(TokenType::ApiKey, "user_x/../../sessions/sess_1", &[]);
        assert_eq!(
            unmet(a.decide(Rpc::WhoAmI, &hostile, None)),
            Unmet::CallerNotAllowed
        );
        assert!(a
            .decide(Rpc::WhoAmI, &user(TokenType::ApiKey, "user_1", &[]), None)
            .is_ok());
    }

    #[test]
    fn revoke_may_require_mtls_and_a_token() {
        let mut config = AccessConfig {
            machine_id: Some(US.into()),
            allowlist: vec![A.into(), "spiffe://example.org/ops".into()],
            revoke_requires_mtls: true,
            ..AccessConfig::default()
        };
        let a = Access::new(config.clone()).unwrap();
        let ok = m2m(A, &[US]);
        assert!(!a.peer_suffices(Rpc::RevokeSession));
        assert!(a.peer_suffices(Rpc::GetUser));
        assert_eq!(
            unmet(a.decide(Rpc::RevokeSession, &ok, None)),
            Unmet::PeerNotAllowed
        );
        assert!(a
            .decide(Rpc::RevokeSession, &ok, Some("spiffe://example.org/ops"))
            .is_ok());
        config.allowlist.truncate(1);
        assert_eq!(Access::new(config).unwrap().warnings().len(), 1);
    }

    #[test]
    fn configuration_is_checked() {
        let bad = |c: AccessConfig| Access::new(c).unwrap_err();
        bad(AccessConfig {
            machine_id: Some("mch_x/..".into()),
            ..AccessConfig::default()
        });
        bad(AccessConfig {
            allowlist: vec!["service-b".into()],
            ..AccessConfig::default()
        });
        bad(AccessConfig {
            caller_types: vec![TokenType::M2mToken],
            ..AccessConfig::default()
        });
        bad(AccessConfig {
            oauth_scopes: parse_oauth_scopes("RevokeSession=admin").unwrap(),
            ..AccessConfig::default()
        });
        assert!(parse_oauth_scopes("WhoAmI=profile;WhoAmI=email").is_err());
        assert!(parse_oauth_scopes("whoami=profile").is_err());
        assert!(parse_oauth_scopes("WhoAmI").is_err());
        assert!(parse_oauth_scopes("GetUser=")
            .map(|m| Access::new(AccessConfig {
                oauth_scopes: m,
                ..AccessConfig::default()
            }))
            .unwrap()
            .is_err());
        assert_eq!(
            parse_caller_types("oauth_token, api_key").unwrap(),
            vec![TokenType::OauthToken, TokenType::ApiKey]
        );
        assert!(parse_caller_types("m2m_token").is_err());
        assert!(parse_caller_types("OAuth_Token").is_err());
        // No machines on the allowlist: M2M tokens are not even verified.
        assert!(!Access::default()
            .accepted_types()
            .contains(&TokenType::M2mToken));
    }
}
