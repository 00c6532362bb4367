//! Talking to Clerk: the one Backend API client ([`api::ClerkApi`]: one HTTP client, one
//! `Retry-After` gate and request budget per Clerk ([`budget`]), one bounded reader, one error
//! classification), used by the identity directory (users, memberships, sessions, behind
//! caches; [`directory`]), opaque machine-token verification ([`machines`]) and the outgoing
//! M2M token source ([`crate::credentials::m2m`]); and Svix webhook signatures ([`svix`]).
//!
//! May import: `token`, `error`, `retry`, `secret`, `canonical`.

pub mod api;
pub mod budget;
pub mod directory;
pub mod machines;
pub mod svix;
