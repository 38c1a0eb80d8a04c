# The one peat image: `peat controller` (Deployment), `peat agent` (DaemonSet), and the CLI.
# Built from this repository: docker build -t peat-operator:0.1.0 .
# Without a container engine, `make image` assembles the same files (the binary, the libraries it
# links, the CSI registrar, the CA bundle, user 65532) as an OCI layout; that image runs the chart's pods on a real
# kubelet in `make test` (tests/real_node.rs).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml build.rs ./
# The CSI spec's protos, compiled by build.rs (protox: no protoc in the image).
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# A workspace member (the dev-only test environment): cargo needs its manifest to read the workspace.
COPY testenv ./testenv
RUN cargo build --release --locked --bin peat

# The CSI driver's registrar (registrar/, Go): registers the agent's CSI socket with the kubelet.
FROM golang:1.26-bookworm AS registrar
WORKDIR /src
COPY registrar ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /peat-csi-registrar .

FROM debian:bookworm-slim
# CA certificates for HTTPS registries; nothing else: the agent needs no shell.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/peat /usr/local/bin/peat
RUN ln -s peat /usr/local/bin/kubectl-peat
COPY --from=registrar /peat-csi-registrar /usr/local/bin/peat-csi-registrar
# Non-root by default; the agent's chart sets the user that owns its hostPath store.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/peat"]
CMD ["--help"]
