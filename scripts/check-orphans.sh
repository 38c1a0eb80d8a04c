#!/usr/bin/env bash
# Fails when a test-environment process (started under DIR) outlived the test run.
set -euo pipefail
dir="${1:?usage: check-orphans.sh STATE_DIR}"
left=""
# Process names as the kernel keeps them (15 characters): etcd-v3.x, kube-apiserver, kube-controller, docker-registry.
for pid in $(pgrep -f '^[^ ]*(etcd[^ /]*|kube-apiserver|kube-controller-manager|docker-registry)( |$)' || true); do
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  [[ "$cmd" == *"$dir"* ]] && left+="$pid $cmd"$'\n'
done
if [ -n "$left" ]; then
  echo "orphaned test-environment processes:" >&2
  printf '%s' "$left" >&2
  exit 1
fi
echo "no test-environment process outlived the tests"
