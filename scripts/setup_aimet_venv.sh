#!/usr/bin/env bash
# Create .venv-aimet: AIMET (aimet-torch 2.42) for the AIMET rows of scripts/bench_quality.py.
#
# AIMET pulls about 70 packages (bokeh, cvxpy, tensorboard, ...) that the project does not need, so it
# lives in its own virtual environment; scripts/aimet_runner.py runs there as a subprocess. aimet-torch
# is a pure-Python wheel that leaves torch unpinned, so pip resolves the same torch as the project's
# .venv where the local wheels allow it. Re-running is cheap: the stamp file records the last install.
#
# Usage: bash scripts/setup_aimet_venv.sh [PYTHON]     (PYTHON defaults to python3; Python >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
VENV=.venv-aimet
SPEC='aimet-torch==2.42.*'
STAMP=$VENV/.installed-stamp
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet "$SPEC"
"$VENV/bin/python" -c 'import aimet_torch, torch; print("aimet-torch", aimet_torch.__version__,
                                                         "torch", torch.__version__)'
echo "$SPEC" > "$STAMP"
