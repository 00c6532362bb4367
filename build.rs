//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates tonic code;
//! with the `server` feature, also a descriptor set of Envoy's `Authorization` service (for
//! reflection).

use prost::Message;
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/clerk/auth/v1/auth.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(protos)?
        .file_descriptor_set();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("clerk_auth_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Holds a token: its Debug (src/lib.rs) prints a fingerprint instead.
        .skip_debug([".clerk.auth.v1.VerifyTokenRequest"])
        .compile_fds(fds)?;

    // Envoy's `Authorization` service, for server reflection only (the Rust types come from
    // envoy-types): the vendored protos (proto/envoy-vendored/README.md), `server` feature only.
    if env::var_os("CARGO_FEATURE_SERVER").is_some() {
        let vendored = "proto/envoy-vendored";
        println!("cargo:rerun-if-changed={vendored}");
        let includes = ["data-plane-api", "googleapis", "protoc-gen-validate", "xds"]
            .map(|d| format!("{vendored}/{d}"));
        let fds = protox::Compiler::new(includes)?
            .include_imports(true)
            .open_files(["envoy/service/auth/v3/external_auth.proto"])?
            .file_descriptor_set();
        fs::write(out.join("envoy_auth_descriptor.bin"), fds.encode_to_vec())?;
    }

    // The examples' (and tests') Orders service and the load generator's bare Echo service:
    // generated only with the `demo` feature, included only by them.
    if env::var_os("CARGO_FEATURE_DEMO").is_none() {
        return Ok(());
    }
    for (proto, descriptor) in [
        (
            "proto/examples/orders/v1/orders.proto",
            "orders_descriptor.bin",
        ),
        ("proto/examples/echo/v1/echo.proto", "echo_descriptor.bin"),
    ] {
        println!("cargo:rerun-if-changed={proto}");
        let fds = protox::Compiler::new(["proto"])?
            .include_imports(true)
            .open_files([proto])?
            .file_descriptor_set();
        fs::write(out.join(descriptor), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
