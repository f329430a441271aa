# syntax=docker/dockerfile:1
# The shoal image: the release binary and ONNX Runtime's shared library (from the
# same onnxruntime==1.31.1 PyPI wheel the tests use), on debian:bookworm-slim, non-root.
#   docker build -t shoal:0.1.0 .
#   docker run --rm -p 8000-8002:8000-8002 -v "$PWD/model_repository:/models:ro" shoal:0.1.0 --bind 0.0.0.0
# Not built in this repository's CI (no container engine there); the Helm chart
# (helm/shoal) runs this image.

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Symbols stripped and no debug info: the release profile keeps line tables for profiling.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shoal --bin shoal \
    && install -D -m 0755 target/release/shoal /out/shoal

FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
# The wheel for this platform; only its shared library is kept.
RUN pip download --no-deps --only-binary=:all: --dest /wheel "onnxruntime==${ORT_VERSION}" \
    && python -c "import glob, sys, zipfile; \
z = zipfile.ZipFile(glob.glob('/wheel/onnxruntime-*.whl')[0]); \
name = 'onnxruntime/capi/libonnxruntime.so.' + sys.argv[1]; \
open('/libonnxruntime.so.' + sys.argv[1], 'wb').write(z.read(name))" "${ORT_VERSION}"

FROM debian:bookworm-slim
ARG ORT_VERSION
# ONNX Runtime needs libstdc++6 and libgcc-s1, which the slim image already has
# (apt depends on them); shoal itself needs only glibc.
COPY --from=build /out/shoal /usr/local/bin/shoal
COPY --from=ort /libonnxruntime.so.${ORT_VERSION} /usr/local/lib/shoal/libonnxruntime.so.${ORT_VERSION}
ENV ORT_DYLIB_PATH=/usr/local/lib/shoal/libonnxruntime.so.${ORT_VERSION} \
    SHOAL_MODEL_REPOSITORY=/models
# Numeric, so the kubelet can check runAsNonRoot against it.
USER 65532:65532
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/local/bin/shoal"]
