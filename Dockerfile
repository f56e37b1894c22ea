# syntax=docker/dockerfile:1
# Container image of leaderlink: the release binary on distroless/cc (glibc, libgcc, CA
# certificates; no shell, no package manager), running as the non-root UID 65532.
#
#   docker build -t leaderlink:0.1.0 .
#   docker run --rm -p 50051:50051 -p 50052:50052 -p 9464:9464 \
#     -v "$PWD/leaderlink.toml:/etc/leaderlink/leaderlink.toml:ro" leaderlink:0.1.0
#
# The config file must listen on 0.0.0.0 (the defaults are 127.0.0.1, unreachable from outside
# the container); helm/leaderlink renders one. Not built in CI: the CI machines have no
# container engine.

ARG RUST_VERSION=1.95

# --- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
# rdkafka (default-features = false) builds its bundled librdkafka with librdkafka's own
# ./configure (mklove, a shell script: checks for python3 and pkg-config) and make (C and C++
# compilers), without zlib, OpenSSL, SASL or curl. protoc comes from the protoc-bin-vendored
# crate, so no protobuf compiler is installed. No cmake: rdkafka's cmake-build feature is off.
# Debian bookworm package versions move with point releases; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# The workspace's other member (the load generator): its manifest must be there for cargo.
COPY bench ./bench
# Default features: `dev-cluster` keeps the embedded librdkafka mock cluster in the image (the
# chart's dev values run it); add --no-default-features for an image without librdkafka.
# Cache mounts keep the crates.io downloads and compiled dependencies between builds; the binary
# is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p leaderlink --bin leaderlink \
    && install -D -m 0755 target/release/leaderlink /out/leaderlink

# --- run -----------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="leaderlink" \
      org.opencontainers.image.description="gRPC front that forwards produce requests to Kafka partition leaders" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/leaderlink /usr/local/bin/leaderlink
# Numeric, so Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 65532:65532
# 50051 Forwarder gRPC, 50052 Admin gRPC (and health), 9464 Prometheus /metrics.
EXPOSE 50051 50052 9464
ENTRYPOINT ["leaderlink"]
CMD ["serve", "--config", "/etc/leaderlink/leaderlink.toml"]
