#!/usr/bin/env bash
# Fails when a test-environment process (started under DIR) outlived the test run, or when a real
# node of the tests (tests/real_node.rs) left a network namespace, mounts, cgroups or processes
# behind. (tests/real_node.rs itself also compares the kernel settings and fixed directories a
# kubelet changes before and after.)
set -euo pipefail
dir="${1:?usage: check-orphans.sh STATE_DIR}"
left=""
# Process names as the kernel keeps them (15 characters): etcd-v3.x, kube-apiserver, kube-controller, docker-registry,
# kube-scheduler, kubelet, kube-proxy, containerd (its shims name the node's /run directory).
for pid in $(pgrep -f '^[^ ]*(etcd[^ /]*|kube-apiserver|kube-controller-manager|docker-registry|kube-scheduler|kubelet|kube-proxy|containerd[^ ]*)( |$)' || true); do
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  [[ "$cmd" == *"$dir"* ]] && left+="process $pid $cmd"$'\n'
done
# Real nodes of the tests: their /run/peat-node-* directory records their environment directory;
# a node of `make env NODE=1` records one outside DIR and is left alone.
ours() {  # ours NAME: whether the node NAME belongs to the tests (or to nobody any more)
  local envdir
  envdir=$(cat "/run/$1/env-dir" 2>/dev/null || true)
  [[ -z "$envdir" || "$envdir" == "$dir"* ]]
}
for ns in $(ls /run/netns 2>/dev/null | grep '^peat-node-' || true); do
  ours "$ns" && left+="network namespace $ns"$'\n'
done
while read -r mnt; do
  if [[ "$mnt" == "$dir"* ]]; then left+="mount $mnt"$'\n'; fi
  if [[ "$mnt" =~ ^/run/(peat-node-[0-9]+)/ ]] && ours "${BASH_REMATCH[1]}"; then left+="mount $mnt"$'\n'; fi
done < <(awk '{print $5}' /proc/self/mountinfo)
for cg in /sys/fs/cgroup/*/peat-node-*; do
  [ -d "$cg" ] && ours "$(basename "$cg")" && left+="cgroup $cg"$'\n'
done
if [ -n "$left" ]; then
  echo "left behind by the tests:" >&2
  printf '%s' "$left" >&2
  exit 1
fi
echo "no test-environment process, mount, cgroup or network namespace outlived the tests"
