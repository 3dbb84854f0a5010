#!/usr/bin/env bash
# Create the virtual environment and install every llmpath part editable, with test extras.
# torch: the CPU build is installed explicitly first (an unpinned `torch` would pull a multi-GB CUDA build, and so
# does `torch==…` from PyPI alone on Linux: where PyTorch's CPU index answers, the pinned release comes from there).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# Run pip quietly, dropping the harmless "Location ... is ignored" lines some pip configurations print.
run_pip() { "${pip[@]}" "$@" 2>&1 | { grep -v "is ignored" || true; }; return "${PIPESTATUS[0]}"; }

# -W: torch warns that NumPy is missing until the parts below bring it in.
if ! "$venv/bin/python" -W ignore::UserWarning -c "import torch" 2>/dev/null; then
  cpu_index=()
  if [ -z "${TORCH_SPEC:-}" ] && "$venv/bin/python" -c "import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$TORCH_CPU_INDEX" 2>/dev/null; then
    cpu_index=(--extra-index-url "$TORCH_CPU_INDEX")  # its 2.13.0+cpu sorts above PyPI's 2.13.0
  fi
  echo "bootstrap: installing torch (${TORCH_SPEC:-torch==2.13.0}${cpu_index[*]:+, also looking in $TORCH_CPU_INDEX})"
  run_pip install "${cpu_index[@]}" "${TORCH_SPEC:-torch==2.13.0}"
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
  -e ".[test,frameworks]"
"$venv/bin/python" -c "import llmpath.instrumentation, llmpath.backends, llmpath.gateway, llmpath.slo, llmpath.dashboards, llmpath.runbooks, llmpath.cli" \
  || { echo "bootstrap: llmpath parts failed to install" >&2; exit 1; }
echo "bootstrap: done ($venv/bin/llmpath)"
