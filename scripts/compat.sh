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

# One version: its venv, the instrumentation with its test extras, its tests. The frameworks tests need the root
# package's `frameworks` extra (Litestar, Quart, Django, Falcon, hypercorn, granian), not the instrumentation's own:
# they run in the main suite only.
run_version() {
  local version=$1 python venv stamp
  if ! python=$(find_python "$version"); then
    echo "compat: Python $version not found, skipped"
    return 0
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
  PYTHONPATH="$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/instrumentation \
    --ignore-glob='*test_instr_frameworks*'
}

# The versions run side by side (each mostly one core: a venv, pip, a pytest process); their output is printed
# whole, one version after the other, and the script fails if any of them failed.
pids=()
logs=()
for version in ${COMPAT_PYTHONS:-3.12 3.13}; do
  log=$(mktemp)
  run_version "$version" >"$log" 2>&1 &
  pids+=("$!")
  logs+=("$log")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || status=1
  cat "${logs[$i]}"
  rm -f "${logs[$i]}"
done
exit "$status"
