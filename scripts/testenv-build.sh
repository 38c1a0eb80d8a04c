#!/usr/bin/env bash
# Builds the real parts of the test environment once per machine and caches them outside the repo:
# etcd, kube-apiserver, kube-controller-manager, kubectl (one pinned Kubernetes version) and helm,
# all from the Go module proxy; installs Debian's docker-registry when it is missing.
# Prints where each binary is, as KEY=path lines on stdout (etcd, kube-apiserver, …); progress goes
# to stderr. Override the cache with PEAT_TESTENV_CACHE, the versions with PEAT_*_VERSION.
set -euo pipefail

K8S_VERSION="${PEAT_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${PEAT_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${PEAT_HELM_VERSION:-v3.21.4}"
ORAS_VERSION="${PEAT_ORAS_VERSION:-v1.3.6}"
MLSERVER_VERSION="${PEAT_MLSERVER_VERSION:-1.7.1}"
CACHE="${PEAT_TESTENV_CACHE:-$HOME/.cache/peat-testenv}"
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/build"

say() { printf '[testenv-build] %s\n' "$*" >&2; }
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# Go prints little while compiling a big tree: show which package it is on, every 20 s.
run_with_progress() {
  local what="$1"; shift
  local log; log="$(mktemp)"
  local start=$SECONDS
  ( "$@" ) >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20 & wait $! || true
    kill -0 "$pid" 2>/dev/null && say "$what: still building ($((SECONDS - start)) s)…"
  done
  if ! wait "$pid"; then say "$what failed:"; tail -n 50 "$log" >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
  say "$what: done in $((SECONDS - start)) s"
}

ensure_registry() {
  if command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ]; then return; fi
  say "installing Debian's docker-registry with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # The package's postinst starts a service only under systemd; we run our own instance.
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends docker-registry >&2
  # Do not leave a system instance on :5000 around (our environments use their own ports).
  if command -v service >/dev/null 2>&1; then service docker-registry stop >/dev/null 2>&1 || true; fi
}

build_etcd() {
  local out="$BIN/etcd-$ETCD_VERSION"
  [ -x "$out" ] && return
  say "building etcd $ETCD_VERSION from the Go module proxy"
  local dir="$CACHE/build/etcd-$ETCD_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  go mod init peat-testenv/etcd >/dev/null 2>&1
  run_with_progress "etcd" bash -c "go get go.etcd.io/etcd/server/v3@$ETCD_VERSION && go build -trimpath -o '$out.tmp' go.etcd.io/etcd/server/v3"
  mv "$out.tmp" "$out"
}

build_kube() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local outdir="$BIN/kube-$K8S_VERSION"
  local cmds="kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy" c missing=""
  for c in $cmds; do [ -x "$outdir/$c" ] || missing=1; done
  [ -z "$missing" ] && return
  say "building $cmds $K8S_VERSION from the Go module proxy (the first build takes many minutes)"
  local dir="$CACHE/build/kube-$K8S_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  go mod init peat-testenv/kube >/dev/null 2>&1
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging paths;
  # outside its tree those must point at the published v0.Y.Z tags. Read the list, don't hard-code it.
  local staging
  staging="$(go mod edit -json "$gomod" | python3 -c '
import json, sys
m = json.load(sys.stdin)
for r in m.get("Require") or []:
    if r["Path"].startswith("k8s.io/") and r["Version"] == "v0.0.0":
        print(r["Path"])
')"
  local args=(-require="k8s.io/kubernetes@$K8S_VERSION")
  for p in $staging; do args+=(-replace="$p=$p@v0.$minor.${K8S_VERSION##*.}"); done
  go mod edit "${args[@]}"
  local ldflags=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ldflags+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$outdir.tmp"
  local gets="" pkgs=""
  for c in $cmds; do gets+=" k8s.io/kubernetes/cmd/$c@$K8S_VERSION"; pkgs+=" k8s.io/kubernetes/cmd/$c"; done
  run_with_progress "kube $K8S_VERSION" bash -c "go get $gets && go build -trimpath -ldflags '$ldflags' -o '$outdir.tmp/' $pkgs"
  rm -rf "$outdir"; mv "$outdir.tmp" "$outdir"
}

build_helm() {
  local out="$BIN/helm-$HELM_VERSION"
  [ -x "$out" ] && return
  say "building helm $HELM_VERSION from the Go module proxy"
  local dir="$CACHE/build/helm-$HELM_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"
  run_with_progress "helm" env GOBIN="$dir" go install -trimpath \
    -ldflags "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$dir/helm" "$out"
}

# A real node (tests/real_node.rs, `make env NODE=1`): Debian's containerd, runc, CNI plugins,
# iptables and conntrack (kube-proxy), busybox-static (the test pods' image); the pause binary of
# the sandboxes, from the kubernetes module's own source (no package ships one).
ensure_node() {
  local pkgs="" p
  for p in containerd runc containernetworking-plugins iptables conntrack busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || pkgs+=" $p"
  done
  if [ -n "$pkgs" ]; then
    say "installing$pkgs with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs >&2
    # Debian starts a system containerd under systemd only; ours run with their own state.
    if command -v service >/dev/null 2>&1; then service containerd stop >/dev/null 2>&1 || true; fi
  fi
  local out="$BIN/pause-$K8S_VERSION"
  [ -x "$out" ] && return
  command -v gcc >/dev/null || { apt-get update -qq >&2; apt-get install -y -qq gcc libc6-dev >&2; }
  local src
  src="$(cd "$CACHE/build/kube-$K8S_VERSION" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/build/pause/linux/pause.c"
  [ -f "$src" ] || { say "no pause.c at $src"; return 1; }
  gcc -Os -static -Wall -Werror -DVERSION="$K8S_VERSION" -o "$out.tmp" "$src"
  strip "$out.tmp" 2>/dev/null || true
  mv "$out.tmp" "$out"
}

# oras: the ORAS compatibility test pushes with it, the pull benchmark compares against it.
build_oras() {
  local out="$BIN/oras-$ORAS_VERSION"
  [ -x "$out" ] && return
  say "building oras $ORAS_VERSION from the Go module proxy"
  local dir="$CACHE/build/oras-$ORAS_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"
  run_with_progress "oras" env GOBIN="$dir" CGO_ENABLED=0 go install -trimpath "oras.land/oras/cmd/oras@$ORAS_VERSION"
  mv "$dir/oras" "$out"
}

# MLServer (the Open Inference Protocol server of tests/serving.rs) and its scikit-learn runtime,
# from PyPI into a virtualenv of their own.
ensure_mlserver() {
  local dir="$BIN/mlserver-$MLSERVER_VERSION"
  [ -f "$dir/.complete" ] && return
  say "installing MLServer $MLSERVER_VERSION and mlserver-sklearn from PyPI"
  local py; py="$(command -v python3 || true)"
  if [ -z "$py" ] || ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
    py="$(command -v python3)"
  fi
  # Built where it stays (a venv's scripts name its directory); marked complete at the end.
  rm -rf "$dir"
  "$py" -m venv "$dir"
  run_with_progress "MLServer" "$dir/bin/pip" install -q --disable-pip-version-check \
    "mlserver==$MLSERVER_VERSION" "mlserver-sklearn==$MLSERVER_VERSION" || { rm -rf "$dir"; return 1; }
  touch "$dir/.complete"
}

# One build at a time per cache (parallel test binaries, make env beside make test).
exec 9>"$CACHE/.lock"
flock 9

what="${1:-all}"
case "$what" in
  all) ensure_registry; build_etcd; build_kube; build_helm; build_oras; ensure_node; ensure_mlserver ;;
  registry) ensure_registry ;;
  etcd) build_etcd ;;
  kube) build_kube ;;
  helm) build_helm ;;
  oras) build_oras ;;
  node) build_kube; ensure_node ;;
  mlserver) ensure_mlserver ;;
  *) echo "usage: $0 [all|registry|etcd|kube|helm|oras|node|mlserver]" >&2; exit 2 ;;
esac
cat <<PATHS
ETCD=$BIN/etcd-$ETCD_VERSION
KUBE_APISERVER=$BIN/kube-$K8S_VERSION/kube-apiserver
KUBE_CONTROLLER_MANAGER=$BIN/kube-$K8S_VERSION/kube-controller-manager
KUBECTL=$BIN/kube-$K8S_VERSION/kubectl
KUBE_SCHEDULER=$BIN/kube-$K8S_VERSION/kube-scheduler
KUBELET=$BIN/kube-$K8S_VERSION/kubelet
KUBE_PROXY=$BIN/kube-$K8S_VERSION/kube-proxy
PAUSE=$BIN/pause-$K8S_VERSION
CONTAINERD=$(command -v containerd || echo /usr/bin/containerd)
CTR=$(command -v ctr || echo /usr/bin/ctr)
RUNC=$(command -v runc || echo /usr/sbin/runc)
BUSYBOX=/bin/busybox
CNI_BIN_DIR=/usr/lib/cni
HELM=$BIN/helm-$HELM_VERSION
ORAS=$BIN/oras-$ORAS_VERSION
MLSERVER=$BIN/mlserver-$MLSERVER_VERSION/bin/mlserver
REGISTRY=$(command -v docker-registry || echo /usr/bin/docker-registry)
PATHS
