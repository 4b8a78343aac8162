#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need on a fresh machine: Java for TorchServe's
# frontend, a virtual environment, torch pinned first, then this package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! command -v java >/dev/null 2>&1; then
    echo "setup: java not found; TorchServe's frontend needs a JRE 17"
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless
    else
        echo "setup: apt-get is not available; install a Java 17 runtime and re-run" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first and pinned: anything resolved before it could pull a multi-gigabyte CUDA build.
$PIP install --quiet -c constraints.txt torch==2.13.0
$PIP install --quiet -c constraints.txt -e ".[dev]"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, ts; print("torch", torch.__version__, "torchserve", ts.__version__)'))"
