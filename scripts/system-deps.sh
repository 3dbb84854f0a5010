#!/usr/bin/env bash
# Install the Debian packages a target needs when they are missing:
#   demo: prometheus (promtool)
#   test: prometheus, prometheus-alertmanager, chromium, and the tools docs/deploy.md runs (jq, curl, kubectl)
# Without apt (or without root/sudo) it warns and carries on: the demo says what it skipped,
# and the tests that need a missing binary are skipped with the reason.
set -uo pipefail
target=${1:-test}
declare -A bin_of=([prometheus]=promtool [prometheus-alertmanager]=prometheus-alertmanager [chromium]=chromium
  [jq]=jq [curl]=curl [kubernetes-client]=kubectl)
pkgs=(prometheus)
[ "$target" = test ] && pkgs+=(prometheus-alertmanager chromium jq curl kubernetes-client)

missing=()
for p in "${pkgs[@]}"; do command -v "${bin_of[$p]}" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: apt-get not found; missing: ${missing[*]} (tests that need them will be skipped)" >&2
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
    echo "system-deps: not root and no sudo; missing: ${missing[*]}" >&2; exit 0; fi
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >/dev/null 2>&1 || true
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "system-deps: apt-get install ${missing[*]} failed; continuing without them" >&2
exit 0
