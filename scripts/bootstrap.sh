#!/usr/bin/env bash
# Create the virtual environment and install every llmpath part editable, with test extras.
# torch: the CPU build is installed explicitly first (an unpinned `torch` would pull a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# Run pip quietly, dropping the harmless "Location ... is ignored" lines some pip configurations print.
run_pip() { "${pip[@]}" "$@" 2>&1 | { grep -v "is ignored" || true; }; return "${PIPESTATUS[0]}"; }

# -W: torch warns that NumPy is missing until the parts below bring it in.
if ! "$venv/bin/python" -W ignore::UserWarning -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch (${TORCH_SPEC:-torch==2.13.0})"
  run_pip install "${TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -W ignore::UserWarning -c "import torch" || { echo "bootstrap: torch failed to install" >&2; exit 1; }
fi

echo "bootstrap: installing llmpath parts (editable, with test extras)"
run_pip install \
  -e "./instrumentation[test]" \
  -e "./backends[engine,test]" \
  -e "./gateway[test]" \
  -e "./slo[test]" \
  -e "./dashboards[test]" \
  -e "./runbooks[test]" \
  -e ".[test]"
"$venv/bin/python" -c "import llmpath.instrumentation, llmpath.backends, llmpath.gateway, llmpath.slo, llmpath.dashboards, llmpath.runbooks, llmpath.cli" \
  || { echo "bootstrap: llmpath parts failed to install" >&2; exit 1; }
echo "bootstrap: done ($venv/bin/llmpath)"
