//! A token's bytes to a verdict, with no I/O: decoding (the one-pass claims scanner and the
//! JavaScript-faithful reference), JWK keys and signatures, the pure check in Clerk's order
//! ([`check`]), machine-token formats (`machine`) and the [`Identity`](identity::Identity) a
//! verified token carries.
//!
//! May import: `error`, `canonical`, `secret`, `pb`. Nothing here opens a socket or spawns a task.

pub mod check;
pub(crate) mod claims;
pub mod identity;
pub mod keys;
pub(crate) mod machine;
