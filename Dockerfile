# syntax=docker/dockerfile:1
#
# One image with the Stagecoach binaries (`coordinator`, `worker`, and the
# `stagecoach` CLI) for every service of docker-compose.yml:
#
#   docker build -t stagecoach:local .
#   docker run --rm -p 50051:50051 -v $PWD/tokens:/tokens \
#     -e STAGECOACH_AUTH_TOKENS=/tokens stagecoach:local  # a coordinator on SQLite
#
# (`coordinator token create` makes the tokens file's lines; without one the
# coordinator refuses the container's non-loopback address unless given
# --allow-unauthenticated.)
#
# tests/tests/compose.rs checks that the binaries built here are the ones the
# compose services run.

# --- build: the official Rust image, release build of the two binaries -----
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and the target directory between
# builds; the binaries are copied out in the same step because the cached
# target directory is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin coordinator --bin worker --bin stagecoach \
 && mkdir -p /out \
 && cp target/release/coordinator target/release/worker target/release/stagecoach /out/

# --- run: slim Debian of the same release as the build image (same glibc) --
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --uid 10001 \
        --home-dir /var/lib/stagecoach --create-home --shell /usr/sbin/nologin stagecoach \
 # The workers' shared directory: a named volume mounted here starts out
 # with this ownership, so the non-root user can write to it.
 && mkdir -p /var/lib/stagecoach/shared \
 && chown -R stagecoach:stagecoach /var/lib/stagecoach
COPY --from=build /out/coordinator /out/worker /out/stagecoach /usr/local/bin/
USER stagecoach
WORKDIR /var/lib/stagecoach
ENV STAGECOACH_SHARED_DIR=/var/lib/stagecoach/shared
EXPOSE 50051 9464
# It needs a tokens file (STAGECOACH_AUTH_TOKENS) or --allow-unauthenticated
# to serve on this non-loopback address; the compose file gives tokens.
CMD ["coordinator", "serve", "--listen", "0.0.0.0:50051", "--database", "sqlite:///var/lib/stagecoach/stagecoach.db"]
