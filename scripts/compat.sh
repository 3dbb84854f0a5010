#!/usr/bin/env bash
# The instrumentation is installed into other people's applications, on whatever Python they run: run its test
# suite on every other supported Python this machine has (python3.12, python3.13 on PATH or under pyenv), each in
# its own venv (.venv-3.12, ...). A version that is not installed is reported and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # prints a working interpreter for version $1, or fails
  local version=$1 candidate
  for candidate in "python$version" "$(pyenv root 2>/dev/null)"/versions/"$version".*/bin/"python$version"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

for version in ${COMPAT_PYTHONS:-3.12 3.13}; do
  if ! python=$(find_python "$version"); then
    echo "compat: Python $version not found, skipped"
    continue
  fi
  venv=".venv-$version"
  if [ ! -x "$venv/bin/python" ]; then
    echo "compat: creating $venv ($python)"
    "$python" -m venv "$venv"
  fi
  # The instrumentation with its test extras, redone when a pyproject changes. The tests' shared fixtures
  # (llmpath.demo.supervisor, standard library only) come from src/ on PYTHONPATH: installing the root package
  # would pull in every part (or, without its dependencies, make pip report conflicts).
  stamp="$venv/.llmpath-installed"
  if [ ! -e "$stamp" ] || [ instrumentation/pyproject.toml -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip --disable-pip-version-check -q install -e "./instrumentation[test]" pytest-timeout \
      2>&1 | { grep -v "is ignored" || true; }
    touch "$stamp"
  fi
  echo "compat: the instrumentation's tests on $("$venv/bin/python" -V)"
  PYTHONPATH="$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/instrumentation
done
