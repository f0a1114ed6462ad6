# convoflow worker image: CUDA 13 runtime with libtorch 2.11 (the torch 2.11.0 wheel from PyPI,
# whose libtorch tch 0.24 links, with its CUDA/cuDNN libraries); the same binary runs on CPU
# when no GPU is visible. Not buildable on the project's build machines (no Docker engine);
# tests/deploy_files.rs checks it against the repository.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        curl ca-certificates build-essential cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# libtorch 2.11.0 from the torch wheel (tch 0.24 needs exactly this version)
RUN python3 -m venv /opt/torch && /opt/torch/bin/pip install --no-cache-dir torch==2.11.0
ENV LIBTORCH=/opt/torch/lib/python3.12/site-packages/torch
ENV LD_LIBRARY_PATH=${LIBTORCH}/lib
# the toolchain rust-toolchain.toml pins (qdrant-edge needs Rust 1.96)
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.96.0
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY rust-toolchain.toml Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
RUN cargo build --release --locked --bin convoflow && strip target/release/convoflow

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends libssl3t64 zlib1g libcurl4t64 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# the binary finds libtorch by its rpath, the same path as at build time
COPY --from=build /opt/torch /opt/torch
COPY --from=build /src/target/release/convoflow /usr/local/bin/convoflow
COPY convoflow.yaml /etc/convoflow/convoflow.yaml
ENV CONVOFLOW__TELEMETRY__LISTEN=0.0.0.0:9464 \
    CONVOFLOW__QDRANT__DATA_DIR=/var/lib/convoflow/qdrant
RUN mkdir -p /var/lib/convoflow && chown 65532:65532 /var/lib/convoflow
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/convoflow"]
CMD ["run", "--config", "/etc/convoflow/convoflow.yaml"]
