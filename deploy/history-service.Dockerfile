# syntax=docker/dockerfile:1
# history-service image. Build from the repository root:
#   docker build -f deploy/history-service.Dockerfile -t chat/history-service .
# Serves the history API on 8081 and consumes the Redis persistence stream;
# `history-service migrate` (same image, args ["migrate"]) applies the
# ScyllaDB schema.

# ---- build: compiles only the history-service package.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p history-service \
 && install -D -m 0755 target/release/history-service /out/history-service

# ---- runtime: see gateway.Dockerfile for why Debian slim.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid chat --home-dir /nonexistent --shell /usr/sbin/nologin chat \
 && install -d -o 10001 -g 10001 /var/lib/chat
COPY --from=builder /out/history-service /usr/local/bin/history-service
USER 10001:10001
WORKDIR /var/lib/chat
# Default store: SQLite in the data dir (mount a volume there). Production sets
# CHAT_STORE=scylla://host:9042/keyspace.
ENV CHAT_LISTEN=0.0.0.0:8081 \
    CHAT_STORE=sqlite:///var/lib/chat/history.db \
    CHAT_LOG_FORMAT=json
EXPOSE 8081
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/history-service"]
