# syntax=docker/dockerfile:1
# Gateway image. Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t chat/gateway .
# Run alone it is the embedded single-node product (in-process broker, SQLite
# under /var/lib/chat); with CHAT_REDIS_URL + CHAT_HISTORY_URL it is one
# stateless node of the scaled-out deployment (deploy/compose.yaml, k8s/).

# ---- build: full Rust toolchain, compiles only the gateway package.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds (BuildKit); the
# binary is copied out of the cached target/ because cache mounts are not part
# of the image. --locked: build exactly what Cargo.lock says.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway \
 && install -D -m 0755 target/release/gateway /out/gateway

# ---- runtime: Debian slim, not distroless, because the k8s preStop hook runs
# `sleep` and compose health checks use bash; ca-certificates for TLS to an
# OTLP collector. Same Debian release as the builder, so glibc matches.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid chat --home-dir /nonexistent --shell /usr/sbin/nologin chat \
 && install -d -o 10001 -g 10001 /var/lib/chat
COPY --from=builder /out/gateway /usr/local/bin/gateway
# Numeric ids so Kubernetes runAsNonRoot can verify them without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/chat
# Listen on all interfaces inside the container (the binary's own default is
# loopback); JSON logs for log shippers.
ENV CHAT_LISTEN=0.0.0.0:8080 \
    CHAT_DATA_DIR=/var/lib/chat \
    CHAT_LOG_FORMAT=json
EXPOSE 8080
# The gateway drains on SIGTERM (CHAT_DRAIN_SECONDS): give it the time with
# `docker stop -t 30` / stop_grace_period / terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gateway"]
