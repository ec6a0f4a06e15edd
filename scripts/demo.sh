#!/usr/bin/env bash
# The main job: install fedcore (CPU torch first) and run the demo federation over TLS on
# 127.0.0.1. Extra arguments go to `fedcore demo` (e.g. --dataset digits --rounds 3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        dataset-fashion-mnist >/dev/null) || echo "Fashion-MNIST not installed; the demo uses digits"
fi
# The CPU wheel index, named: PyPI's torch pulls a multi-GB CUDA build. Point
# TORCH_INDEX_URL at a mirror of it where download.pytorch.org is out of reach.
python3 -m pip install -q torch==2.13.0 \
    --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
python3 -m pip install -q -e .
exec fedcore demo "$@"
