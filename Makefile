# peat-operator — contract targets (DESIGN.md §2). `make test` is what CI runs.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PREFIX ?= $(HOME)/.cargo
ENV_DIR := target/peat-env

.PHONY: test lint unit integration crds crds-check env env-down install image image-multiarch testenv-bins toolchain demo bench bench-tools test-tools check-orphans

## test: everything CI runs — lint, unit tests, CRD drift check, integration tests on the real environment
test: lint testenv-bins test-tools
	$(CARGO) test --workspace --lib --bins --tests --no-fail-fast
	$(MAKE) --no-print-directory check-orphans

## test-tools: Debian's lua5.1, for the Argo CD health check's tests
test-tools:
	@command -v lua5.1 >/dev/null || { apt-get update -qq && apt-get install -y -qq lua5.1; }

## lint: rustfmt, clippy with -D warnings, and helm lint of the chart (the pinned helm)
lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@eval "$$(bash scripts/testenv-build.sh helm)"; "$$HELM" lint charts/peat-operator --kube-version 1.37.2 --strict

## unit: the pure tests only (no environment needed): plan/, the agent core (agent::decide), the transfer steps, …
unit:
	$(CARGO) test --workspace --lib

## crds: regenerate crds/ from the Rust types
crds:
	$(CARGO) run --quiet --bin peat -- crds > crds/peat.dev.yaml
	@if [ -d charts/peat-operator/crds ]; then cp crds/peat.dev.yaml charts/peat-operator/crds/peat.dev.yaml; fi
	@echo "wrote crds/peat.dev.yaml"

## env: start etcd + kube-apiserver + kube-controller-manager + registry in the background; NODE=1 adds a real node (containerd, kubelet, kube-proxy, kube-scheduler, all controllers) in a network namespace of its own, with the peat image in its registry
env: testenv-bins $(if $(NODE),image)
	$(CARGO) run --quiet -p peat-testenv -- --dir $(ENV_DIR) up $(if $(NODE),--node --peat-image target/image/peat)

## env-down: stop the environment and remove its state
env-down:
	$(CARGO) run --quiet -p peat-testenv -- --dir $(ENV_DIR) down

## install: peat and kubectl-peat into $(PREFIX)/bin
install:
	$(CARGO) build --release --bin peat
	install -d $(PREFIX)/bin
	install -m 0755 target/release/peat $(PREFIX)/bin/peat
	ln -sf peat $(PREFIX)/bin/kubectl-peat
	@echo "installed $(PREFIX)/bin/peat and $(PREFIX)/bin/kubectl-peat"

## image: the peat image as an OCI image layout, without a container engine: linux/amd64 in target/image/peat; ARCH=arm64 cross-builds linux/arm64 into target/image/peat-arm64 (Rust target and Debian's cross gcc installed on first use); PUSH=host:port/peat:tag also pushes it (INSECURE=1 for plain HTTP)
ARCH ?= amd64
image:
ifeq ($(ARCH),amd64)
	$(CARGO) build --release --locked --bin peat
	$(CARGO) run --quiet -p peat-testenv -- image --binary target/release/peat --out target/image/peat \
		$(if $(PUSH),--push $(PUSH)) $(if $(INSECURE),--insecure)
else ifeq ($(ARCH),arm64)
	@bash scripts/cross-toolchain.sh arm64
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
		AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
		$(CARGO) build --release --locked --bin peat --target aarch64-unknown-linux-gnu
	$(CARGO) run --quiet -p peat-testenv -- image --binary target/aarch64-unknown-linux-gnu/release/peat \
		--arch arm64 --out target/image/peat-arm64 $(if $(PUSH),--push $(PUSH)) $(if $(INSECURE),--insecure)
else
	@echo "make image: ARCH=amd64 or ARCH=arm64" >&2; exit 2
endif

## image-multiarch: linux/amd64 and linux/arm64 in one OCI image layout with an index (target/image/peat-multiarch); PUSH=host:port/peat:tag pushes both and the index (INSECURE=1 for plain HTTP)
image-multiarch:
	$(MAKE) --no-print-directory image ARCH=amd64
	$(MAKE) --no-print-directory image ARCH=arm64
	$(CARGO) run --quiet -p peat-testenv -- image-index --out target/image/peat-multiarch target/image/peat target/image/peat-arm64 \
		$(if $(PUSH),--push $(PUSH)) $(if $(INSECURE),--insecure)

# Builds (once per machine, cached in ~/.cache/peat-testenv) etcd, kube-apiserver,
# kube-controller-manager, kubectl, kube-scheduler, kubelet, kube-proxy, helm, oras and the pause
# binary; installs docker-registry, containerd, runc, the CNI plugins, iptables, conntrack and
# busybox-static with apt when missing.
testenv-bins:
	@bash scripts/testenv-build.sh all >/dev/null

# rustfmt and clippy come with rustup's default profile; add them when a minimal one lacks them.
toolchain:
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

# No etcd, kube-apiserver, controller-manager or registry of a test run may outlive it.
check-orphans:
	@bash scripts/check-orphans.sh "$(CURDIR)/target/testenv/"

## demo: the main job end to end on a private local environment: push, three nodes, roll out, upgrade by delta, roll back, summary
demo: testenv-bins
	$(CARGO) build --quiet --workspace --bins
	target/debug/peat-testenv demo

## bench: the benchmarks, each printing its figures as ratios against a baseline measured in the same run
bench: testenv-bins bench-tools
	$(CARGO) bench --bench controller_scale
	$(CARGO) bench --bench pull
	$(CARGO) bench --bench delta

## bench-tools: skopeo (Debian), the pull benchmark's second baseline (oras comes with testenv-bins)
bench-tools:
	@command -v skopeo >/dev/null || { apt-get update -qq && apt-get install -y -qq skopeo; }
