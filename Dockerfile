# sluicegate container image.
#
#   docker build -t sluicegate .
#   openssl rand -hex 32 > admin-token                     # the admin API's bearer token
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/admin-token:/run/secrets/sluicegate-admin-token:ro" sluicegate
#                                                          # embedded emulator, no AWS needed
#
# The admin listener binds all interfaces in the image, so /admin/* needs
# `Authorization: Bearer <token>`, read from /run/secrets/sluicegate-admin-token (a Docker
# or compose secret, or a Kubernetes Secret volume); sluicegate refuses to start without
# it. SLUICEGATE_SERVER__ADMIN_TOKEN=... overrides the file (but shows in `docker inspect`).
# /metrics and /healthz need no token.
#
# The image runs `sluicegate serve --config /etc/sluicegate/sluicegate.toml`; mount your own
# file there (or pass `--config`) for real deployments, see deploy/. The same image runs the
# standalone Lambda emulator with `emulate --config FILE` (docker-compose.yml does).
# Works with both the classic builder and BuildKit: no `RUN --mount`, no `COPY --chmod`.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when the manifests or the
# lockfile change, not on every source edit (the AWS SDK takes most of the build time).
# Cargo must see every workspace member and every declared target to load the manifest,
# so the crates get stub sources here and benches/ (declared `[[bench]]` targets) is
# copied as is.
COPY Cargo.toml Cargo.lock ./
COPY examples/rust-handler/Cargo.toml examples/rust-handler/Cargo.toml
COPY benches benches
RUN mkdir -p src examples/rust-handler/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs examples/rust-handler/src/lib.rs \
 && echo 'fn main() {}' > examples/rust-handler/src/main.rs \
 && cargo build --release --locked --bin sluicegate

# The real sources. COPY keeps the build context's mtimes, which are usually older than
# the stub build above, so touch the crate roots or cargo would call the stubs fresh.
COPY src src
COPY config config
COPY examples/rust-handler examples/rust-handler
# The image gets a stripped binary (the release profile keeps line tables for profiling,
# most of the binary's size); the debug info stays in this stage as sluicegate.debug, linked
# from the binary by its build id, for symbolizing a core dump or a profile.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin sluicegate \
 && objcopy --only-keep-debug target/release/sluicegate /build/sluicegate.debug \
 && objcopy --strip-debug --strip-unneeded \
        --add-gnu-debuglink=/build/sluicegate.debug \
        target/release/sluicegate /usr/local/bin/sluicegate \
 && chmod 0755 /usr/local/bin/sluicegate

# The image's default config is the repository's, except that both listeners bind all
# interfaces (a container's loopback is unreachable from outside it, so 127.0.0.1 would
# make `docker run -p` useless) and the admin token comes from a mounted secret file (a
# non-loopback admin listener needs one). The greps fail the build if the config's lines
# change and the edit silently stops applying; check-config proves the result still loads
# (given a token, as a running container gets one from the secret).
RUN sed -e '1i # The image copy of config/sluicegate.toml, listening on all interfaces (see the Dockerfile).' \
        -e 's/^listen = "127\.0\.0\.1:8080"/listen = "0.0.0.0:8080"/' \
        -e 's/^admin_listen = "127\.0\.0\.1:9090"/admin_listen = "0.0.0.0:9090"/' \
        -e '/^admin_listen = "0\.0\.0\.0:9090"/a admin_token_file = "/run/secrets/sluicegate-admin-token"' \
        config/sluicegate.toml > sluicegate.container.toml \
 && grep -q '^listen = "0\.0\.0\.0:8080"' sluicegate.container.toml \
 && grep -q '^admin_listen = "0\.0\.0\.0:9090"' sluicegate.container.toml \
 && grep -q '^admin_token_file = "/run/secrets/sluicegate-admin-token"' sluicegate.container.toml \
 && SLUICEGATE_SERVER__ADMIN_TOKEN=build-check sluicegate check-config sluicegate.container.toml > /dev/null

# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to the Lambda, SQS and STS endpoints. Nothing else is installed;
# health checks use bash's /dev/tcp (deploy/docker/http-probe), not curl. Not pinned to a
# version: bookworm's archive drops superseded versions, and CA updates should be taken.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid (10001) so Kubernetes `runAsNonRoot` can verify it and volume
# ownership is predictable. /var/lib/sluicegate is the working directory, so the default
# config's relative dead-letter file (data/dlq.jsonl) lands somewhere writable.
RUN groupadd --system --gid 10001 sluicegate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluicegate \
        --no-create-home --shell /usr/sbin/nologin sluicegate \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/sluicegate /var/lib/sluicegate/data

COPY --from=builder /usr/local/bin/sluicegate /usr/local/bin/sluicegate
COPY --from=builder /build/sluicegate.container.toml /etc/sluicegate/sluicegate.toml
COPY deploy/docker/http-probe /usr/local/bin/http-probe
RUN chmod 0755 /usr/local/bin/http-probe

WORKDIR /var/lib/sluicegate
USER 10001:10001
# One JSON object per log line, for log shippers; override with SLUICEGATE_LOG_FORMAT=text.
ENV SLUICEGATE_LOG_FORMAT=json
# 8080: data plane; 9090: admin (/metrics, /healthz, /admin/*).
EXPOSE 8080 9090
# sluicegate is PID 1 and handles SIGTERM itself (drains for server.shutdown_grace), so no
# init wrapper is needed; give it a stop timeout longer than shutdown_grace.
ENTRYPOINT ["sluicegate"]
CMD ["serve", "--config", "/etc/sluicegate/sluicegate.toml"]
