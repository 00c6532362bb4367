# clerk-grpc-auth: multi-stage build, minimal non-root runtime.
#   docker build -t clerk-grpc-auth .
#   docker run --rm -p 50051:50051 -p 8081:8081 -p 9090:9090 -e CLERK_SECRET_KEY=sk_live_… clerk-grpc-auth
# gRPC on 50051, Clerk webhooks on 8081, /metrics /livez /readyz on 9090.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# The workspace's other member (bench/) only has to load: its manifest and stub targets.
COPY bench/Cargo.toml bench/
RUN mkdir -p src examples/common bench/src bench/benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs bench/src/lib.rs \
 && for b in verify verify_ratio layer; do echo 'fn main() {}' > bench/benches/$b.rs; done \
 && cargo build --release --locked --bin clerk-grpc-auth 2>/dev/null || true
COPY src src
COPY examples examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin clerk-grpc-auth

# distroless "cc": glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/clerk-grpc-auth /usr/local/bin/clerk-grpc-auth
USER nonroot:nonroot
# In a container the service must listen on every interface.
ENV CLERK_AUTH_LISTEN=0.0.0.0:50051 \
    CLERK_AUTH_HTTP_LISTEN=0.0.0.0:8081 \
    CLERK_AUTH_METRICS_LISTEN=0.0.0.0:9090 \
    CLERK_AUTH_LOG_FORMAT=json
EXPOSE 50051 8081 9090
ENTRYPOINT ["/usr/local/bin/clerk-grpc-auth"]
CMD ["serve"]
