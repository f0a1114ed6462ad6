# convoflow worker image (CPU build of the Kafka spine). The CUDA/libtorch base image arrives
# with the model runtime. Not buildable on the project's build machines (no Docker engine).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
RUN cargo build --release --locked --bin convoflow && strip target/release/convoflow

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/convoflow /usr/local/bin/convoflow
COPY convoflow.yaml /etc/convoflow/convoflow.yaml
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/convoflow"]
CMD ["run", "--config", "/etc/convoflow/convoflow.yaml"]
