# fedcore container image: one image for the root aggregator, relays, clients and the
# one-shot setup commands (`fedcore certs|keygen|federation`). Multi-stage: the build stage
# compiles fedcore's native fold engine (fedcore/crypto/_montfold.c, needs gcc and OpenSSL's
# headers) into a wheel and installs it with the CPU-only torch wheel into a venv; the
# runtime stage copies only that venv. No keys, certificates, state or datasets are baked
# in: mount them at run time (see docs/deploy.md).
#
#   docker build -t fedcore:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://mirror.example/whl/cpu -t fedcore .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

# The CPU wheel index: a bare torch requirement from PyPI can pull a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc + libssl-dev build fedcore.crypto._montfold (it links libcrypto). Debian stable
# versions are not pinned: the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/fedcore
ENV PATH=/opt/fedcore/bin:${PATH}

# torch first, from the CPU index, so fedcore's `torch>=2.2` is already satisfied.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fedcore ./fedcore
COPY protocol ./protocol
COPY bench ./bench

# setup.py marks the extension optional (fedcore falls back to gmpy2); in the image it is
# required, so the build fails here if the wheel came out without it (-I: import the
# installed package, not ./fedcore).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob('/wheels/fedcore-*.whl')[0]).namelist(); sys.exit(0 if any(n.startswith('fedcore/crypto/_montfold') and n.endswith('.so') for n in names) else 'native fold engine missing from the wheel')" \
    && pip install --no-cache-dir /wheels/fedcore-*.whl \
    && python -I -c "import fedcore.crypto._montfold, fedcore.cli"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fedcore" \
      org.opencontainers.image.description="Privacy-preserving federated learning: packed Paillier over mutual TLS" \
      org.opencontainers.image.licenses="Apache-2.0"

# The slim image already ships libssl3 (libcrypto), which the native extension links.
RUN groupadd --gid 10001 fedcore \
    && useradd --uid 10001 --gid 10001 --home-dir /home/fedcore --create-home \
        --shell /usr/sbin/nologin fedcore \
    && mkdir -p /var/lib/fedcore /etc/fedcore \
    && chown 10001:10001 /var/lib/fedcore

COPY --from=build /opt/fedcore /opt/fedcore

ENV PATH=/opt/fedcore/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1

# Fail the build if the runtime stage cannot load the extension (e.g. libcrypto missing).
RUN python -c "import fedcore.crypto._montfold, fedcore.cli"

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/fedcore

# 8765: clients and relays (mutual TLS); 9100: /metrics and /healthz (plain HTTP).
EXPOSE 8765 9100

# Aggregator and relay serve /healthz on metrics_port (9100). Slim has no curl: use Python.
# Clients serve no HTTP: compose turns this check off for them.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["fedcore"]
CMD ["--help"]
