#!/usr/bin/env bash
# Fails when a test-environment process (started under DIR) outlived the test run, or when a real
# node of the tests (tests/real_node.rs) left a network namespace, mounts, kubelet cgroups or
# processes behind.
set -euo pipefail
dir="${1:?usage: check-orphans.sh STATE_DIR}"
left=""
# Process names as the kernel keeps them (15 characters): etcd-v3.x, kube-apiserver, kube-controller, docker-registry,
# kube-scheduler, kubelet, kube-proxy, containerd (its shims name the node's /run directory).
for pid in $(pgrep -f '^[^ ]*(etcd[^ /]*|kube-apiserver|kube-controller-manager|docker-registry|kube-scheduler|kubelet|kube-proxy|containerd[^ ]*)( |$)' || true); do
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  [[ "$cmd" == *"$dir"* ]] && left+="process $pid $cmd"$'\n'
done
# Real nodes of the tests: their /run/peat-node-* directory records their environment directory.
live_node=""
for ns in $(ls /run/netns 2>/dev/null | grep '^peat-node-' || true); do
  envdir=$(cat "/run/$ns/env-dir" 2>/dev/null || true)
  if [[ -z "$envdir" || "$envdir" == "$dir"* ]]; then
    left+="network namespace $ns (environment ${envdir:-unknown})"$'\n'
  else
    live_node=1   # a node of `make env NODE=1`, not of the tests
  fi
done
while read -r mnt; do
  [[ "$mnt" == "$dir"* || "$mnt" == /run/peat-node-* ]] && left+="mount $mnt"$'\n'
done < <(awk '{print $5}' /proc/self/mountinfo)
if [ -z "$live_node" ]; then
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$cg" ] && left+="cgroup $cg"$'\n'
  done
fi
if [ -n "$left" ]; then
  echo "left behind by the tests:" >&2
  printf '%s' "$left" >&2
  exit 1
fi
echo "no test-environment process, mount, cgroup or network namespace outlived the tests"
