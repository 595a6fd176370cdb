# syntax=docker/dockerfile:1
#
# crewmesh: one image, one binary. `crewmesh serve <service>` runs one mesh service,
# `crewmesh certs init` writes a development PKI, `crewmesh simulated-upstream` runs
# the simulated model upstream.
#
#   docker build -t crewmesh:dev .

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG RUST_VERSION
# etcd-client's build script runs protoc. Package versions are not pinned (DL3008):
# Debian drops superseded versions from its mirrors, so pins would break rebuilds;
# the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
# Use the image's toolchain as is (rust-toolchain.toml would also fetch rustfmt and clippy).
# SQLX_OFFLINE: sqlx's compile-time checks use the committed query data, no database.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    SQLX_OFFLINE=true
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin crewmesh \
    && install -D -m 0755 target/release/crewmesh /out/crewmesh

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
LABEL org.opencontainers.image.title="crewmesh" \
      org.opencontainers.image.description="crewmesh: a control plane for LLM agents (gateway and mTLS gRPC mesh services)" \
      org.opencontainers.image.source="https://github.com/crewmesh/crewmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
# ca-certificates: the router verifies model providers against the system trust store.
# The directories are where the non-root user writes: the dev PKI (compose) and the
# audit client's spool; volumes mounted there start with this ownership.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -m 0750 -o 65532 -g 65532 /etc/crewmesh/tls /var/lib/crewmesh /var/lib/crewmesh/spool
COPY --from=builder /out/crewmesh /usr/local/bin/crewmesh
# Health probe for runtimes without HTTP checks of their own (docker compose):
# `crewmesh-healthcheck [PORT [PATH]]`, `crewmesh-healthcheck tcp PORT`.
COPY --chmod=0755 deploy/compose/crewmesh-healthcheck /usr/local/bin/crewmesh-healthcheck
USER 65532:65532
WORKDIR /var/lib/crewmesh
# gRPC (mTLS only): router 7001, agent-runtime 7002, audit 7003, config 7004, metrics 7005.
# Gateway HTTP 8080; admin HTTP 9090 on every service; simulated upstream 8090.
EXPOSE 7001 7002 7003 7004 7005 8080 8090 9090
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 CMD ["/usr/local/bin/crewmesh-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/crewmesh"]
CMD ["--help"]
