# syntax=docker/dockerfile:1
# Multi-stage build with cargo-chef: dependencies are compiled in their own
# layer and reused until Cargo.toml/Cargo.lock change.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# The build context has no .git: the commit for `--version` and build_info
# comes in as a build argument (`--build-arg COMMIT=$(git rev-parse --short=12 HEAD)`).
ARG COMMIT=unknown
ENV AVATAR_WARDEN_COMMIT=${COMMIT}
RUN cargo build --release --locked --bin avatar-warden

FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="avatar-warden" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.description="Keeps third-party avatars alive: mirrors valid ones to S3, flags users whose avatar expired for re-authorization." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# CA certificates for HTTPS avatar origins and S3 endpoints; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=builder /app/target/release/avatar-warden /usr/local/bin/avatar-warden
COPY config ./config
# config/production.toml is layered over the built-in defaults (JSON logs, s3
# storage); everything site-specific comes from AVATAR_WARDEN__* variables.
ENV AVATAR_WARDEN_ENV=production
# A numeric non-root UID, so Kubernetes runAsNonRoot can verify it.
USER 10001:10001
STOPSIGNAL SIGTERM
# No HEALTHCHECK: the same image runs one-shot `scan` and `gc`, which serve
# nothing. For `run`: --health-cmd 'avatar-warden healthcheck --ready' (compose does).
EXPOSE 9898
ENTRYPOINT ["avatar-warden"]
CMD ["run"]
