//! Benchmarks for `clerk-grpc-auth`; the code is in `benches/`. This package is not published
//! and has no library API: it exists so that the benchmarks' dependencies (criterion,
//! jsonwebtoken) stay out of the main package's dependency graph.
//!
//! ```text
//! cargo bench -p clerk-grpc-auth-bench --bench verify        # criterion: verifier, gRPC
//! cargo bench -p clerk-grpc-auth-bench --bench layer         # criterion: the tower layer
//! cargo bench -p clerk-grpc-auth-bench --bench verify_ratio  # interleaved core/raw/openssl
//! cargo bench -p clerk-grpc-auth-bench -- --test             # all three once, quickly
//! ```
