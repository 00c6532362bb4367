//! Who may ask AuthService what: the caller rules of the identity queries (`WhoAmI`,
//! `GetUser`, `ListOrganizationMemberships`, `GetSession`, `ListSessions`, `RevokeSession`,
//! `GetOrganization`, `ListOrganizationMembers`) and of the revocation feed
//! (`WatchRevocations`), in one place.
//!
//! A caller is one of:
//!
//! * **trusted** — may read anyone, revoke any session and follow the revocation feed:
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
//!   profile, memberships and sessions, and revoke its own sessions as
//!   [`AccessConfig::self_revoke`] allows (its current one always — signing out —, the others
//!   with a recent second factor by default); an OAuth token only for the RPCs whose scopes
//!   ([`AccessConfig::oauth_scopes`]) it holds.
//! * **a member reading its organization** — a session token whose active organization
//!   (`o.id`) is the one asked, holding what [`AccessConfig::org_read`] names (by default
//!   Clerk's `org:sys_memberships:read`, looked up at Clerk since tokens never carry system
//!   permissions). OAuth tokens and API keys carry no active organization and read none.
//!
//! Everything else is refused: `PERMISSION_DENIED` with `CALLER_NOT_ALLOWED` (not on the
//! allowlist, or asking about someone else or another organization), `ORG_PERMISSION_REQUIRED`
//! / `ORG_ROLE_REQUIRED` (a member without what the organization policy names),
//! `REVERIFICATION_REQUIRED` (revoking another of one's sessions without a fresh second
//! factor), `MACHINE_NOT_ALLOWED` (an allowlisted machine's
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
    authz::{is_key_part, peer::PeerIdentity, Check, Unmet},
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
    /// `ListSessions`.
    ListSessions,
    /// `RevokeSession`: trusted callers, and users for their own sessions
    /// ([`AccessConfig::self_revoke`]).
    RevokeSession,
    /// `GetOrganization`: trusted callers, and session tokens for their active organization
    /// as [`AccessConfig::org_read`] allows.
    GetOrganization,
    /// `ListOrganizationMembers`: as `GetOrganization`.
    ListOrganizationMembers,
    /// `WatchRevocations`: trusted callers only.
    WatchRevocations,
}

impl Rpc {
    /// Every RPC, in proto order.
    pub const ALL: [Rpc; 9] = [
        Rpc::WhoAmI,
        Rpc::GetUser,
        Rpc::ListOrganizationMemberships,
        Rpc::GetSession,
        Rpc::ListSessions,
        Rpc::RevokeSession,
        Rpc::GetOrganization,
        Rpc::ListOrganizationMembers,
        Rpc::WatchRevocations,
    ];

    /// The RPC's name in the proto.
    pub const fn name(self) -> &'static str {
        match self {
            Rpc::WhoAmI => "WhoAmI",
            Rpc::GetUser => "GetUser",
            Rpc::ListOrganizationMemberships => "ListOrganizationMemberships",
            Rpc::GetSession => "GetSession",
            Rpc::ListSessions => "ListSessions",
            Rpc::RevokeSession => "RevokeSession",
            Rpc::GetOrganization => "GetOrganization",
            Rpc::ListOrganizationMembers => "ListOrganizationMembers",
            Rpc::WatchRevocations => "WatchRevocations",
        }
    }

    /// The RPC named `name` exactly (proto spelling, case-sensitive).
    pub fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether only trusted callers may use the RPC.
    pub const fn trusted_only(self) -> bool {
        matches!(self, Rpc::WatchRevocations)
    }

    /// Whether the RPC reads an organization (users need it active and [`OrgRead`]).
    pub const fn organization_scoped(self) -> bool {
        matches!(self, Rpc::GetOrganization | Rpc::ListOrganizationMembers)
    }
}

/// What a user needs in an organization to read it — its profile and its members
/// (`CLERK_AUTH_ORG_READ`). Whatever it says, the organization must be the one active in the
/// caller's session token (`o.id`); a trusted caller reads any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgRead {
    /// A permission key, `org:<feature>:<permission>` (default: Clerk's system permission
    /// `org:sys_memberships:read`, which Clerk's `org:admin` and `org:member` roles have).
    /// System permissions (`org:sys_*`) are never in session tokens, so they are read from
    /// the user's memberships at Clerk (cached, dropped by `organizationMembership.*`
    /// webhooks); other permissions from the token, as Clerk's `has()`.
    Permission(String),
    /// A role key, `org:<role>`, from the token (as Clerk's `has({ role })`).
    Role(String),
    /// Users read no organization; only trusted callers do (`never`).
    Never,
}

impl Default for OrgRead {
    fn default() -> Self {
        OrgRead::Permission("org:sys_memberships:read".into())
    }
}

impl OrgRead {
    /// Parses `never`, a role key (`org:admin`) or a permission key
    /// (`org:sys_memberships:read`, `org:members:read`), exactly as Clerk writes them.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "never" {
            return Ok(OrgRead::Never);
        }
        let Some(rest) = s.strip_prefix("org:") else {
            return Err("not never, org:<role> or org:<feature>:<permission>".to_owned());
        };
        match rest.split_once(':') {
            None if is_key_part(rest) => Ok(OrgRead::Role(s.to_owned())),
            Some((f, p)) if is_key_part(f) && is_key_part(p) => {
                Ok(OrgRead::Permission(s.to_owned()))
            }
            _ => Err("not never, org:<role> or org:<feature>:<permission> \
                      (lowercase letters, digits, _)"
                .to_owned()),
        }
    }

    /// Whether the permission asked is a system permission, read from Clerk rather than from
    /// the token.
    pub fn needs_memberships(&self) -> bool {
        matches!(self, OrgRead::Permission(p) if p.starts_with("org:sys_"))
    }

    /// Whether `identity` (a session token's) may read `org_id`. `clerk_permissions`: the
    /// user's permissions in `org_id` as Clerk has them (`None`: not a member there), needed
    /// when [`OrgRead::needs_memberships`]. Another organization than the active one is
    /// `CALLER_NOT_ALLOWED` whether it exists or not; a missing permission or role names
    /// what is needed.
    pub fn allows(
        &self,
        identity: &Identity,
        org_id: &str,
        clerk_permissions: Option<&[String]>,
    ) -> Result<(), Denial> {
        let not_allowed = Denial {
            unmet: Unmet::CallerNotAllowed,
            required: Vec::new(),
        };
        let active = identity.token_type == TokenType::SessionToken
            && identity
                .organization
                .as_ref()
                .is_some_and(|o| o.id == org_id);
        if !active {
            return Err(not_allowed);
        }
        match self {
            OrgRead::Never => Err(not_allowed),
            // From the token, as Clerk's `has()`.
            OrgRead::Role(role) => Check::role(role.as_str()).judge(identity),
            OrgRead::Permission(p) if !self.needs_memberships() => {
                Check::permission(p.as_str()).judge(identity)
            }
            // A system permission, from Clerk.
            OrgRead::Permission(p) => match clerk_permissions {
                Some(held) if held.contains(p) => Ok(()),
                Some(_) => Err(Denial {
                    unmet: Unmet::Permission,
                    required: vec![("permission", p.clone())],
                }),
                // Clerk no longer has the user in the organization.
                None => Err(not_allowed),
            },
        }
    }
}

/// Whether and how a user may revoke its own sessions (`CLERK_AUTH_SELF_REVOKE`). Its current
/// session (signing out) is always allowed unless [`SelfRevoke::Never`]; the others need what
/// this says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SelfRevoke {
    /// Users revoke nothing; only trusted callers do (`never`).
    Never,
    /// A user may revoke any of its sessions, no fresh factor asked (`any`). A stolen token
    /// can then sign its owner out everywhere.
    Any,
    /// A user may revoke its other sessions when its token shows this reverification (a
    /// preset name, e.g. `strict`, Clerk's `second_factor` within 10 minutes — the default).
    Reverify(crate::authz::Reverification),
}

impl Default for SelfRevoke {
    fn default() -> Self {
        SelfRevoke::Reverify(crate::authz::Reverification::Preset(
            crate::authz::ReverificationPreset::Strict,
        ))
    }
}

impl SelfRevoke {
    /// Parses `never`, `any`, or one of Clerk's presets (`strict_mfa`, `strict`, `moderate`,
    /// `lax`), exactly (lowercase).
    pub fn parse(s: &str) -> Result<Self, String> {
        use crate::authz::{Reverification::Preset, ReverificationPreset as P};
        Ok(match s {
            "never" => SelfRevoke::Never,
            "any" => SelfRevoke::Any,
            "strict_mfa" => SelfRevoke::Reverify(Preset(P::StrictMfa)),
            "strict" => SelfRevoke::Reverify(Preset(P::Strict)),
            "moderate" => SelfRevoke::Reverify(Preset(P::Moderate)),
            "lax" => SelfRevoke::Reverify(Preset(P::Lax)),
            _ => return Err("not one of never, any, strict_mfa, strict, moderate, lax".to_owned()),
        })
    }

    /// Whether `identity` (the caller's own token) may revoke its user's session
    /// `target`, already known to be that user's: `Err` says what is missing, with Clerk's
    /// reverification hint (`level`, `after_minutes`) as metadata.
    pub fn allows(&self, identity: &Identity, target: &str) -> Result<(), Denial> {
        let current = identity.session_id.as_deref() == Some(target);
        match self {
            SelfRevoke::Never => Err(Denial {
                unmet: Unmet::CallerNotAllowed,
                required: Vec::new(),
            }),
            SelfRevoke::Any => Ok(()),
            _ if current => Ok(()),
            // Only session tokens carry an `fva`: an OAuth token or API key could never show
            // the factor, so it is not told to.
            SelfRevoke::Reverify(_) if identity.token_type != TokenType::SessionToken => {
                Err(Denial {
                    unmet: Unmet::CallerNotAllowed,
                    required: Vec::new(),
                })
            }
            // Clerk's rule, from the token's `fva`.
            SelfRevoke::Reverify(r) => Check::reverification(*r).judge(identity),
        }
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
    /// Whether and how users revoke their own sessions (`CLERK_AUTH_SELF_REVOKE`). Default:
    /// their current one always, the others with Clerk's `strict` reverification (the
    /// server's configuration makes it [`SelfRevoke::Never`] when `revoke_requires_mtls` is
    /// set and no policy is named). OAuth tokens and API keys carry no `fva`: they revoke
    /// only under [`SelfRevoke::Any`].
    pub self_revoke: SelfRevoke,
    /// What a user needs in its active organization to read it (`CLERK_AUTH_ORG_READ`).
    /// Default: Clerk's `org:sys_memberships:read`.
    pub org_read: OrgRead,
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
    self_revoke: SelfRevoke,
    org_read: OrgRead,
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
            if rpc.organization_scoped() {
                return Err(format!(
                    "{}: organizations are read in a session's name (its active \
                     organization), OAuth scopes cannot open it",
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
                self_revoke: config.self_revoke,
                org_read: config.org_read,
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

    /// Whether and how users revoke their own sessions.
    pub fn self_revoke(&self) -> SelfRevoke {
        self.inner.self_revoke
    }

    /// What users need to read their active organization.
    pub fn org_read(&self) -> &OrgRead {
        &self.inner.org_read
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
        let trusted = matches!(caller, Caller::Trusted { .. });
        if rpc.trusted_only() && !trusted {
            return Err(deny(Unmet::CallerNotAllowed));
        }
        if rpc == Rpc::RevokeSession && !trusted && i.self_revoke == SelfRevoke::Never {
            return Err(deny(Unmet::CallerNotAllowed));
        }
        // An organization is read in a session's name (its active organization), never an
        // OAuth token's or an API key's, which carry none.
        if rpc.organization_scoped()
            && !trusted
            && (identity.token_type != TokenType::SessionToken || i.org_read == OrgRead::Never)
        {
            return Err(deny(Unmet::CallerNotAllowed));
        }
        // Revoking *anyone's* session with mTLS and a token; a user's own go by `self_revoke`.
        if rpc == Rpc::RevokeSession && trusted && i.revoke_requires_mtls && peer.is_none() {
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
            self_revoke: SelfRevoke::default(),
            org_read: OrgRead::default(),
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
        assert_eq!(
            unmet(a.decide(Rpc::WatchRevocations, &session, None)),
            Unmet::CallerNotAllowed
        );
        // Its own sessions it may revoke (what it needs for which is `SelfRevoke`'s) …
        assert!(a.decide(Rpc::RevokeSession, &session, None).is_ok());
        // … unless users revoke nothing.
        let never = Access::new(AccessConfig {
            self_revoke: SelfRevoke::Never,
            ..AccessConfig::default()
        })
        .unwrap();
        assert_eq!(
            unmet(never.decide(Rpc::RevokeSession, &session, None)),
            Unmet::CallerNotAllowed
        );
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
    fn self_revocation_needs_a_fresh_factor_for_other_sessions() {
        let token = |fva: Option<[i64; 2]>| {
            let mut claims = serde_json::json!({"sub": "user_a", "sid": "sess_own"});
            if let Some(f) = fva {
                claims["fva"] = serde_json::json!(f);
            }
            Identity::from_proto(crate::pb::Identity {
                token_type: TokenType::SessionToken as i32,
                user_id: "user_a".into(),
                session_id: "sess_own".into(),
                claims_json: claims.to_string(),
                factor_verification_age: fva.map(|[a, b]| crate::pb::FactorVerificationAge {
                    first_factor_minutes: a as i32,
                    second_factor_minutes: b as i32,
                }),
                ..Default::default()
            })
        };
        let strict = SelfRevoke::default();
        assert_eq!(SelfRevoke::parse("strict"), Ok(strict));
        // Signing out is always allowed; other sessions need the second factor within 10 min.
        assert!(strict.allows(&token(None), "sess_own").is_ok());
        let d = strict.allows(&token(None), "sess_other").unwrap_err();
        assert_eq!(d.unmet, Unmet::Reverification);
        assert_eq!(
            d.required,
            vec![
                ("level", "second_factor".to_owned()),
                ("after_minutes", "10".to_owned())
            ]
        );
        assert!(strict.allows(&token(Some([30, 2])), "sess_other").is_ok());
        assert!(strict.allows(&token(Some([2, 30])), "sess_other").is_err());
        assert!(strict.allows(&token(Some([30, 10])), "sess_other").is_err());
        // No second factor enabled: the first counts (Clerk's rule).
        assert!(strict.allows(&token(Some([3, -1])), "sess_other").is_ok());
        assert!(SelfRevoke::parse("lax")
            .unwrap()
            .allows(&token(Some([30, 600])), "sess_other")
            .is_ok());
        assert!(SelfRevoke::Any.allows(&token(None), "sess_other").is_ok());
        // An OAuth token or API key never shows a factor: not told to, refused outright.
        let mut key = token(Some([0, 0]));
        key.token_type = TokenType::ApiKey;
        key.session_id = None;
        let d = strict.allows(&key, "sess_own").unwrap_err();
        assert_eq!((d.unmet, d.required), (Unmet::CallerNotAllowed, vec![]));
        assert!(SelfRevoke::Any.allows(&key, "sess_own").is_ok());
        assert!(SelfRevoke::Never.allows(&token(None), "sess_own").is_err());
        for bad in ["Strict", "", "none", "strict "] {
            assert!(SelfRevoke::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_organization_is_read_in_its_active_session_with_the_permission() {
        let token = |kind: TokenType, org: &str, role: &str, per: &[&str]| {
            Identity::from_proto(crate::pb::Identity {
                token_type: kind as i32,
                user_id: "user_a".into(),
                session_id: "sess_a".into(),
                organization: (!org.is_empty()).then(|| crate::pb::Organization {
                    id: org.into(),
                    slug: String::new(),
                    role: role.into(),
                    permissions: per.iter().map(|p| p.to_string()).collect(),
                }),
                claims_json: "{}".into(),
                ..Default::default()
            })
        };
        let session = TokenType::SessionToken;
        let sys = OrgRead::default();
        assert!(sys.needs_memberships());
        let member = token(session, "org_a", "org:member", &[]);
        let clerk = ["org:sys_memberships:read".to_owned()];
        assert!(sys.allows(&member, "org_a", Some(&clerk)).is_ok());
        // Clerk says the permission is missing: named in the refusal.
        let d = sys.allows(&member, "org_a", Some(&[])).unwrap_err();
        assert_eq!(
            (d.unmet, d.required),
            (
                Unmet::Permission,
                vec![("permission", "org:sys_memberships:read".to_owned())]
            )
        );
        // A system permission in the token is not believed (Clerk never puts one there) …
        let claims_it = token(
            session,
            "org_a",
            "org:member",
            &["org:sys_memberships:read"],
        );
        assert!(sys.allows(&claims_it, "org_a", Some(&[])).is_err());
        // … and Clerk no longer knowing the membership refuses like another organization.
        let not_member = sys.allows(&member, "org_a", None).unwrap_err();
        assert_eq!(not_member.unmet, Unmet::CallerNotAllowed);
        // Another organization than the active one, or none active: refused alike.
        for (who, org) in [(&member, "org_b"), (&token(session, "", "", &[]), "org_a")] {
            let d = sys.allows(who, org, Some(&clerk)).unwrap_err();
            assert_eq!((d.unmet, d.required), (Unmet::CallerNotAllowed, vec![]));
        }
        // Only session tokens carry an active organization.
        let oauth = token(TokenType::OauthToken, "org_a", "org:admin", &[]);
        assert!(sys.allows(&oauth, "org_a", Some(&clerk)).is_err());
        // A custom permission is read from the token; a role from the token too.
        let custom = OrgRead::parse("org:members:read").unwrap();
        assert!(!custom.needs_memberships());
        let reader = token(session, "org_a", "org:member", &["org:members:read"]);
        assert!(custom.allows(&reader, "org_a", None).is_ok());
        assert_eq!(
            custom
                .allows(&member, "org_a", Some(&clerk))
                .unwrap_err()
                .unmet,
            Unmet::Permission
        );
        let admins = OrgRead::parse("org:admin").unwrap();
        assert!(admins
            .allows(&token(session, "org_a", "org:admin", &[]), "org_a", None)
            .is_ok());
        let d = admins.allows(&member, "org_a", None).unwrap_err();
        assert_eq!(
            (d.unmet, d.required),
            (Unmet::Role, vec![("role", "org:admin".to_owned())])
        );
        assert!(OrgRead::Never
            .allows(&member, "org_a", Some(&clerk))
            .is_err());

        // The caller rules: session tokens only (unless trusted), never with `never`.
        let a = Access::default();
        assert!(a
            .decide(Rpc::ListOrganizationMembers, &member, None)
            .is_ok());
        let never = Access::new(AccessConfig {
            org_read: OrgRead::Never,
            ..AccessConfig::default()
        })
        .unwrap();
        assert!(never.decide(Rpc::GetOrganization, &member, None).is_err());
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
            oauth_scopes: parse_oauth_scopes("WatchRevocations=admin").unwrap(),
            ..AccessConfig::default()
        });
        bad(AccessConfig {
            oauth_scopes: parse_oauth_scopes("ListOrganizationMembers=org").unwrap(),
            ..AccessConfig::default()
        });
        assert_eq!(OrgRead::parse("never"), Ok(OrgRead::Never));
        assert_eq!(
            OrgRead::parse("org:admin"),
            Ok(OrgRead::Role("org:admin".into()))
        );
        assert_eq!(
            OrgRead::parse("org:sys_memberships:read"),
            Ok(OrgRead::default())
        );
        for shape in [
            "",
            "admin",
            "org:",
            "org:Admin",
            "ORG:admin",
            "org:a:b:c",
            "org:a:",
            "org::b",
            " org:admin",
            "org:admin ",
            "org:ad min",
            "org:adm\u{0130}n",
            "Never",
        ] {
            assert!(OrgRead::parse(shape).is_err(), "{shape:?}");
        }
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
