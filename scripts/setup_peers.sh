#!/usr/bin/env bash
# The peers `make bench-peers` measures against, in an environment of their own (.venv-peers) so
# their pins never touch the project's: LitServe (sentence-transformers' encode inside) and
# Infinity (torch engine), plus the native load generator hey. Never part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}

if ! command -v hey >/dev/null 2>&1; then
    echo "setup_peers: installing hey (the load generator) with apt"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first and pinned, as in setup.sh: the peers' own requirements would pull a CUDA build.
$PIP install --quiet -c constraints.txt torch==2.13.0
$PIP install --quiet -c constraints.txt \
    "litserve==0.2.19" "infinity-emb[torch,server]==0.0.78"
echo "setup_peers: ready ($("$VENV/bin/python" -c 'import litserve, infinity_emb; print("litserve", litserve.__version__, "infinity", infinity_emb.__version__)'))"
