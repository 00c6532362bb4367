//! Talking to Clerk: the Backend API client ([`api`]) with its shared `Retry-After` gate and
//! request budget ([`budget`]), the identity directory (users, memberships, sessions, behind
//! caches; [`directory`]), opaque machine-token verification ([`machines`]) and Svix webhook
//! signatures ([`svix`]).
//!
//! May import: `token`, `error`, `retry`, `secret`, `canonical`.

pub mod api;
pub mod budget;
pub mod directory;
pub mod machines;
pub mod svix;
