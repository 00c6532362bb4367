//! Authorization checks in Clerk's `has()` terms (org role, org permission, feature, plan,
//! reverification), with exactly the rules of Clerk's `createCheckAuthorization`
//! (Clerk's `has()` in `@clerk/backend`, "authorization" rules):
//!
//! * a token without a user id (and every machine token) has nothing: `false`;
//! * each asked dimension — organization (role / permission), billing (feature / plan),
//!   reverification — passes, fails or is skipped when not asked;
//! * the result is *at least one dimension passes and none fails*, so asking for nothing is
//!   `false` and asking across dimensions is an AND.
//!
//! [`Check::evaluate`] gives the same verdict as [`Identity::has`] and, when it is `false`, which
//! requirement was not met — the auth layer turns that into a `PERMISSION_DENIED` reason.
//!
//! Layer: authorization, no I/O. May import `token`, `error`, `canonical`, `pb`, `secret`.

pub mod peer;
pub mod policy;

use serde::Deserialize;

use crate::token::identity::{Identity, TokenType};

/// One `has()` call: the requirements asked together (all must hold).
///
/// Deserializes from TOML / JSON as `{ role = "…", permission = "…", feature = "…",
/// plan = "…", reverification = "strict" | { level = "…", after_minutes = N } }`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// An organization role (`admin` and `org:admin` are the same role).
    pub role: Option<String>,
    /// An organization permission (`org:<feature>:<permission>`; an unprefixed value gets `org:`).
    pub permission: Option<String>,
    /// A feature, optionally scoped: `u:`/`user:` or `o:`/`org:`/`organization:`.
    pub feature: Option<String>,
    /// A plan, optionally scoped like a feature.
    pub plan: Option<String>,
    /// A recent-verification requirement.
    pub reverification: Option<Reverification>,
}

/// How recently the user must have verified a factor (Clerk's `reverification`).
///
/// Deserializes from a preset name or `{ level = "…", after_minutes = N }`; any other key in
/// the custom form is an error (a typo never loosens the check).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(from = "ReverificationRepr")]
pub enum Reverification {
    /// One of Clerk's presets.
    Preset(ReverificationPreset),
    /// An explicit level and age.
    Custom {
        /// Which factors must be fresh.
        level: ReverificationLevel,
        /// The verification must be younger than this many minutes (strictly).
        after_minutes: f64,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReverificationRepr {
    Preset(ReverificationPreset),
    Custom(CustomReverification),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomReverification {
    level: ReverificationLevel,
    #[serde(alias = "afterMinutes")]
    after_minutes: f64,
}

impl From<ReverificationRepr> for Reverification {
    fn from(r: ReverificationRepr) -> Self {
        match r {
            ReverificationRepr::Preset(p) => Reverification::Preset(p),
            ReverificationRepr::Custom(c) => Reverification::Custom {
                level: c.level,
                after_minutes: c.after_minutes,
            },
        }
    }
}

/// Clerk's reverification presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverificationPreset {
    /// `multi_factor` within 10 minutes.
    StrictMfa,
    /// `second_factor` within 10 minutes.
    Strict,
    /// `second_factor` within 60 minutes.
    Moderate,
    /// `second_factor` within 1 440 minutes.
    Lax,
}

/// Which factors a reverification requirement looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverificationLevel {
    /// The first factor must be fresh.
    FirstFactor,
    /// The second factor must be fresh (or the first, when there is no second).
    SecondFactor,
    /// Both factors must be fresh (or the first, when there is no second).
    MultiFactor,
}

pub use crate::error::Unmet;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dim {
    Pass,
    Fail,
    Skip,
}

// === impl Check ===

impl Check {
    /// A check for an organization role.
    pub fn role(role: impl Into<String>) -> Self {
        Self {
            role: Some(role.into()),
            ..Self::default()
        }
    }

    /// A check for an organization permission.
    pub fn permission(permission: impl Into<String>) -> Self {
        Self {
            permission: Some(permission.into()),
            ..Self::default()
        }
    }

    /// A check for a feature.
    pub fn feature(feature: impl Into<String>) -> Self {
        Self {
            feature: Some(feature.into()),
            ..Self::default()
        }
    }

    /// A check for a plan.
    pub fn plan(plan: impl Into<String>) -> Self {
        Self {
            plan: Some(plan.into()),
            ..Self::default()
        }
    }

    /// A check for a recent verification.
    pub fn reverification(r: Reverification) -> Self {
        Self {
            reverification: Some(r),
            ..Self::default()
        }
    }

    /// [`Check::evaluate`] as a refusal: the first requirement not met, with what it asked
    /// (`role`, `permission`, `feature`, `plan`; `level` and `after_minutes` for
    /// reverification) as the `ErrorInfo` metadata.
    pub fn judge(&self, identity: &Identity) -> Result<(), crate::error::Denial> {
        self.evaluate(identity)
            .map_err(|unmet| crate::error::Denial {
                unmet,
                required: self.required(unmet),
            })
    }

    /// What the check asked on the dimension `unmet`.
    fn required(&self, unmet: Unmet) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                out.push((k, v.clone()));
            }
        };
        match unmet {
            Unmet::Role => put("role", &self.role),
            Unmet::Permission => put("permission", &self.permission),
            Unmet::Feature => put("feature", &self.feature),
            Unmet::Plan => put("plan", &self.plan),
            Unmet::Reverification => {
                if let Some(r) = self.reverification {
                    let (level, after) = r.resolve();
                    out.push(("level", level.as_str().to_owned()));
                    out.push(("after_minutes", after.to_string()));
                }
            }
            _ => {}
        }
        out
    }

    /// Clerk's `has()` verdict for `identity`; on `false`, the first requirement not met.
    pub fn evaluate(&self, identity: &Identity) -> Result<(), Unmet> {
        if identity.token_type != TokenType::SessionToken || identity.user_id.is_empty() {
            return Err(Unmet::NotAUser);
        }
        let org = self.org_dimension(identity);
        let billing = self.billing_dimension(identity);
        let reverification = match self.reverification {
            None => Dim::Skip,
            Some(r) if r.is_met(identity.factor_verification_age_exact()) => Dim::Pass,
            Some(_) => Dim::Fail,
        };
        for (dim, unmet) in [org, billing, (reverification, Unmet::Reverification)] {
            if dim == Dim::Fail {
                return Err(unmet);
            }
        }
        if [org.0, billing.0, reverification].contains(&Dim::Pass) {
            Ok(())
        } else {
            Err(Unmet::NothingAsked)
        }
    }

    fn org_dimension(&self, id: &Identity) -> (Dim, Unmet) {
        if self.role.is_none() && self.permission.is_none() {
            return (Dim::Skip, Unmet::Role);
        }
        let org = id.organization.as_ref().filter(|o| !o.id.is_empty());
        if let Some(asked) = &self.role {
            let ok = org
                .and_then(|o| o.role.as_deref())
                .is_some_and(|r| !r.is_empty() && norm(r) == norm(asked));
            if !ok {
                return (Dim::Fail, Unmet::Role);
            }
        }
        if let Some(asked) = &self.permission {
            let asked = norm(asked);
            let ok = org.is_some_and(|o| o.permissions.contains(&asked));
            if !ok {
                return (Dim::Fail, Unmet::Permission);
            }
        }
        (Dim::Pass, Unmet::Role)
    }

    fn billing_dimension(&self, id: &Identity) -> (Dim, Unmet) {
        if self.feature.is_none() && self.plan.is_none() {
            return (Dim::Skip, Unmet::Feature);
        }
        if let Some(asked) = &self.feature {
            if !scoped_match(asked, &id.features) {
                return (Dim::Fail, Unmet::Feature);
            }
        }
        if let Some(asked) = &self.plan {
            if !scoped_match(asked, &id.plans) {
                return (Dim::Fail, Unmet::Plan);
            }
        }
        (Dim::Pass, Unmet::Feature)
    }

    /// Checks the values for what Clerk would treat as an invalid `has()` argument (an empty
    /// value, an unknown scope, a non-positive age): such a check can never pass, so a policy
    /// holding one is refused when it is built.
    pub fn validate(&self) -> Result<(), String> {
        let empty = |what: &str, v: &Option<String>| match v {
            Some(s) if s.trim().is_empty() => Err(format!("{what} is empty")),
            _ => Ok(()),
        };
        empty("role", &self.role)?;
        empty("permission", &self.permission)?;
        empty("feature", &self.feature)?;
        empty("plan", &self.plan)?;
        for (what, v) in [("feature", &self.feature), ("plan", &self.plan)] {
            if let Some(v) = v {
                let mut parts = v.split(':');
                let first = parts.next().unwrap_or_default();
                if let Some(second) = parts.next() {
                    if !matches!(first, "o" | "org" | "organization" | "u" | "user") {
                        return Err(format!(
                            "{what} {v:?}: scope {first:?} is not one of o, org, organization, u, user"
                        ));
                    }
                    if second.is_empty() {
                        return Err(format!("{what} {v:?} names no {what} after the scope"));
                    }
                }
            }
        }
        if let Some(Reverification::Custom { after_minutes, .. }) = self.reverification {
            if !(after_minutes.is_finite() && after_minutes > 0.0) {
                return Err(format!(
                    "reverification after_minutes must be a number > 0, got {after_minutes}"
                ));
            }
        }
        if *self == Check::default() {
            return Err("asks for nothing (Clerk's has({}) is always false)".into());
        }
        Ok(())
    }
}

/// Whether `s` is one part of a Clerk role or permission key: lowercase ASCII letters, digits, `_`.
pub fn is_key_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `s` is a Clerk role key as Clerk writes it: `org:` and one key part
/// (`org:admin`, `org:billing_manager`). Any other shape — case, spaces, `org:org:admin`, a
/// bare `admin` — is not one.
pub fn is_role_key(s: &str) -> bool {
    s.strip_prefix("org:").is_some_and(is_key_part)
}

/// Replaces any run of leading `org:` prefixes by a single `org:`.
fn norm(v: &str) -> String {
    let mut rest = v;
    while let Some(r) = rest.strip_prefix("org:") {
        rest = r;
    }
    format!("org:{rest}")
}

/// `scope:id` (first two `:`-parts) against the user / organization lists; no scope → either.
fn scoped_match(asked: &str, lists: &crate::token::identity::Entitlements) -> bool {
    let mut parts = asked.split(':');
    let first = parts.next().unwrap_or_default();
    match parts.next() {
        None => lists
            .user
            .iter()
            .chain(&lists.organization)
            .any(|v| v == first),
        Some(id) => match first {
            "o" | "org" | "organization" => lists.organization.iter().any(|v| v == id),
            "u" | "user" => lists.user.iter().any(|v| v == id),
            _ => false,
        },
    }
}

// === impl Reverification ===

impl Reverification {
    /// The level and age this requirement stands for.
    pub fn resolve(self) -> (ReverificationLevel, f64) {
        match self {
            Reverification::Preset(ReverificationPreset::StrictMfa) => {
                (ReverificationLevel::MultiFactor, 10.0)
            }
            Reverification::Preset(ReverificationPreset::Strict) => {
                (ReverificationLevel::SecondFactor, 10.0)
            }
            Reverification::Preset(ReverificationPreset::Moderate) => {
                (ReverificationLevel::SecondFactor, 60.0)
            }
            Reverification::Preset(ReverificationPreset::Lax) => {
                (ReverificationLevel::SecondFactor, 1440.0)
            }
            Reverification::Custom {
                level,
                after_minutes,
            } => (level, after_minutes),
        }
    }

    /// Clerk's rule over the `fva` ages (`None` when `fva` is absent or malformed → `false`).
    pub fn is_met(self, fva: Option<[f64; 2]>) -> bool {
        let (level, after) = self.resolve();
        if !(after.is_finite() && after > 0.0) {
            return false;
        }
        let Some([f1, f2]) = fva else { return false };
        let fresh = |x: f64| x != -1.0 && after > x;
        if f1 == -1.0 && f2 == -1.0 {
            return false;
        }
        match level {
            ReverificationLevel::FirstFactor => fresh(f1),
            ReverificationLevel::SecondFactor => {
                if f2 == -1.0 {
                    fresh(f1)
                } else {
                    fresh(f2)
                }
            }
            ReverificationLevel::MultiFactor => {
                if f2 == -1.0 {
                    fresh(f1)
                } else if f1 == -1.0 {
                    false
                } else {
                    fresh(f1) && fresh(f2)
                }
            }
        }
    }
}

impl ReverificationLevel {
    /// Clerk's name of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            ReverificationLevel::FirstFactor => "first_factor",
            ReverificationLevel::SecondFactor => "second_factor",
            ReverificationLevel::MultiFactor => "multi_factor",
        }
    }
}

// === impl Unmet ===

impl Unmet {
    /// The `ErrorInfo.reason` of a `PERMISSION_DENIED` for this requirement.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unmet::NotAUser => "NOT_A_USER",
            Unmet::NothingAsked => "POLICY_DENIED",
            Unmet::Role => "ORG_ROLE_REQUIRED",
            Unmet::Permission => "ORG_PERMISSION_REQUIRED",
            Unmet::Feature => "FEATURE_REQUIRED",
            Unmet::Plan => "PLAN_REQUIRED",
            Unmet::Reverification => "REVERIFICATION_REQUIRED",
            Unmet::Scope => "SCOPE_REQUIRED",
            Unmet::MachineNotAllowed => "MACHINE_NOT_ALLOWED",
            Unmet::ApiKeyOwner => "API_KEY_OWNER_MISMATCH",
            Unmet::CallerNotAllowed => "CALLER_NOT_ALLOWED",
            Unmet::PeerNotAllowed => "PEER_NOT_ALLOWED",
        }
    }
}

// === impl Identity (has) ===

impl Identity {
    /// Clerk's `has()`: `true` when every requirement of `check` holds (§5.3 rules).
    pub fn has(&self, check: &Check) -> bool {
        check.evaluate(self).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_keys_are_taken_exactly_as_clerk_writes_them() {
        for ok in ["org:admin", "org:member", "org:billing_manager", "org:r2"] {
            assert!(is_role_key(ok), "{ok}");
        }
        let long = format!("org:{}", "a".repeat(65));
        for bad in [
            "",
            "admin",
            "org:",
            "org:Admin",
            "ORG:admin",
            "org:org:admin",
            "org:a:b",
            "org:ad min",
            " org:admin",
            "org:admin\n",
            "org:admin&role=x",
            "org:a%3Ab",
            "org:\u{0430}dmin",
            "org:admin-x",
            &long,
        ] {
            assert!(!is_role_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn norm_collapses_org_prefixes() {
        assert_eq!(norm("admin"), "org:admin");
        assert_eq!(norm("org:admin"), "org:admin");
        assert_eq!(norm("org:org:admin"), "org:admin");
    }

    #[test]
    fn reverification_rules() {
        use ReverificationLevel::*;
        let c = |level, after| Reverification::Custom {
            level,
            after_minutes: after,
        };
        let cases: &[(Reverification, Option<[f64; 2]>, bool)] = &[
            (c(FirstFactor, 10.0), Some([3.0, -1.0]), true),
            (c(FirstFactor, 3.0), Some([3.0, -1.0]), false), // strictly younger
            (c(FirstFactor, 10.0), Some([-1.0, 2.0]), false),
            (c(SecondFactor, 10.0), Some([3.0, -1.0]), true), // no 2nd → 1st
            (c(SecondFactor, 10.0), Some([-1.0, 3.0]), true),
            (c(SecondFactor, 10.0), Some([3.0, 30.0]), false),
            (c(MultiFactor, 10.0), Some([3.0, -1.0]), true),
            (c(MultiFactor, 10.0), Some([-1.0, 3.0]), false),
            (c(MultiFactor, 10.0), Some([3.0, 4.0]), true),
            (c(MultiFactor, 10.0), Some([3.0, 40.0]), false),
            (c(FirstFactor, 10.0), Some([-1.0, -1.0]), false),
            (c(FirstFactor, 10.0), None, false),
            (c(FirstFactor, 0.0), Some([0.0, 0.0]), false),
            (c(FirstFactor, f64::NAN), Some([0.0, 0.0]), false),
        ];
        for (i, (r, fva, want)) in cases.iter().enumerate() {
            assert_eq!(r.is_met(*fva), *want, "case {i}: {r:?} {fva:?}");
        }
    }

    #[test]
    fn validate_refuses_checks_that_can_never_pass() {
        assert!(Check::default().validate().is_err());
        assert!(Check::role(" ").validate().is_err());
        assert!(Check::feature("team:x").validate().is_err());
        assert!(Check::plan("u:").validate().is_err());
        assert!(Check::reverification(Reverification::Custom {
            level: ReverificationLevel::FirstFactor,
            after_minutes: 0.0
        })
        .validate()
        .is_err());
        assert!(Check::feature("org:teams").validate().is_ok());
        assert!(Check::permission("org:orders:delete").validate().is_ok());
    }
}
