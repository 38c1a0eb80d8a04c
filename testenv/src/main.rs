//! `peat-testenv up|down|status|demo`: the local environment behind `make env` / `make env-down`,
//! and `make demo` on a private one.
//! (A development tool, not part of the product: the `peat` binary has no test code in its CLI.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use peat_testenv::{Binaries, Lifetime, Options, TestEnv};

#[derive(Parser)]
#[command(
    name = "peat-testenv",
    about = "Start or stop the local etcd + kube-apiserver + kube-controller-manager + registry"
)]
struct Cli {
    /// State directory (certificates, data, logs, kubeconfig, env.sh).
    #[arg(long, global = true, default_value = "target/peat-env")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the environment in the background (or report the running one).
    Up {
        /// Also a real node (containerd, kubelet, kube-proxy, kube-scheduler, every default
        /// controller), everything in a network namespace of its own: the chart's pods run.
        #[arg(long)]
        node: bool,
        /// With --node: push this OCI image layout (make image) to the node's registry as peat:<version>.
        #[arg(long)]
        peat_image: Option<PathBuf>,
    },
    /// Stop it and remove its state.
    Down,
    /// Say whether it runs.
    Status,
    /// The peat image as an OCI image layout, without a container engine (`make image`).
    Image {
        /// The peat binary to put in it (a release build).
        #[arg(long, default_value = "target/release/peat")]
        binary: PathBuf,
        /// The OCI image layout directory to write (replaced).
        #[arg(long, default_value = "target/image/peat")]
        out: PathBuf,
        /// Its architecture (GOARCH-style), the binary's.
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// Its version (the layout's ref name).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        version: String,
        /// Also push it to this reference (`host:port/repository:tag`).
        #[arg(long)]
        push: Option<String>,
        /// Push over plain HTTP (a local registry without TLS).
        #[arg(long)]
        insecure: bool,
    },
    /// One multi-platform image layout from single-platform ones (`make image-multiarch`).
    ImageIndex {
        /// The OCI image layout directory to write (replaced).
        #[arg(long, default_value = "target/image/peat-multiarch")]
        out: PathBuf,
        /// The single-platform layouts (`make image`, `make image ARCH=arm64`).
        #[arg(required = true)]
        layouts: Vec<PathBuf>,
        /// Also push it to this reference (`host:port/repository:tag`): each platform's image by
        /// digest, the index under the tag.
        #[arg(long)]
        push: Option<String>,
        /// Push over plain HTTP (a local registry without TLS).
        #[arg(long)]
        insecure: bool,
    },
    /// The end-to-end demo (`make demo`) on a private environment it starts and tears down.
    Demo {
        /// Work directory (replaced at start; its logs/ stays afterwards).
        #[arg(long, default_value = "target/peat-demo")]
        demo_dir: PathBuf,
    },
}

fn usage_hint(dir: &std::path::Path) -> String {
    let env_sh = dir.join("env.sh");
    format!(
        "  . {0}\n  kubectl get --raw /version\n  kubectl get crd modelrollouts.peat.dev\n  curl -sf http://$PEAT_REGISTRY/v2/\nStop it with: make env-down",
        env_sh.display()
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let dir = std::path::absolute(&cli.dir).unwrap_or(cli.dir.clone());
    match cli.command {
        Cmd::Demo { demo_dir } => demo(&demo_dir).await,
        Cmd::Image { binary, out, arch, version, push, insecure } => {
            let root = peat_testenv::harness::repo_root();
            let registrar = match peat_testenv::image::build_registrar(&root, &root.join("target/registrar"), &arch) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("peat-testenv image: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match peat_testenv::image::build(&binary, &registrar, &out, &arch, &version) {
                Ok(img) if push.is_some() => {
                    let to = push.expect("checked");
                    match peat_testenv::image::push(&img.layout, &to, insecure).await {
                        Ok(digest) => {
                            println!("pushed {to} ({digest}; layer {} bytes compressed)", img.layer_size);
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("peat-testenv image: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Ok(img) => {
                    println!(
                        "wrote {} ({} {}; layer {} bytes compressed, {} bytes of files: {} paths)",
                        img.layout.display(),
                        version,
                        img.manifest_digest,
                        img.layer_size,
                        img.content_size,
                        img.paths.len()
                    );
                    println!(
                        "push it: crane push {} REGISTRY/peat:{version}  (or skopeo copy oci:{}:{version} …)",
                        img.layout.display(),
                        img.layout.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("peat-testenv image: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::ImageIndex { out, layouts, push, insecure } => {
            let merged = match peat_testenv::image::merge(&layouts, &out) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("peat-testenv image-index: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let platforms: Vec<String> =
                merged.iter().map(|d| format!("{}/{}", d["platform"]["os"], d["platform"]["architecture"])).collect();
            println!("wrote {} ({})", out.display(), platforms.join(", ").replace('"', ""));
            if let Some(to) = push {
                match peat_testenv::image::push(&out, &to, insecure).await {
                    Ok(digest) => println!("pushed {to} ({digest}: an index of {} platforms)", merged.len()),
                    Err(e) => {
                        eprintln!("peat-testenv image-index: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Status => {
            let alive = peat_testenv::detached_status(&dir);
            if alive.is_empty() {
                println!("no environment runs in {}", dir.display());
                return ExitCode::from(1);
            }
            for (pid, name) in alive {
                println!("{name}: pid {pid}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Down => {
            let stopped = peat_testenv::node::stop_detached(&dir);
            if stopped.is_empty() {
                println!("no environment was running in {}", dir.display());
            } else {
                println!("stopped {}; removed {}", stopped.join(", "), dir.display());
            }
            ExitCode::SUCCESS
        }
        Cmd::Up { node, peat_image } => {
            let alive = peat_testenv::detached_status(&dir);
            if !alive.is_empty() {
                let names: Vec<_> = alive.iter().map(|(p, n)| format!("{n} (pid {p})")).collect();
                println!(
                    "an environment already runs in {}: {}\nUse it:\n{}",
                    dir.display(),
                    names.join(", "),
                    usage_hint(&dir)
                );
                return ExitCode::SUCCESS;
            }
            // Leftovers of a crashed or half-stopped one.
            peat_testenv::node::stop_detached(&dir);
            let root = peat_testenv::harness::repo_root();
            let binaries = match Binaries::ensure(&root) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("peat-testenv: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if node {
                return up_node(binaries, &dir, peat_image).await;
            }
            eprintln!("starting etcd, kube-apiserver, kube-controller-manager and the registry in {} …", dir.display());
            let opts = Options {
                dir: dir.clone(),
                lifetime: Lifetime::Detached,
                controller_manager: true,
                install_crds: true,
                cluster: None,
            };
            match TestEnv::start(binaries, opts).await {
                Ok(env) => {
                    println!(
                        "environment ready: API server {}, registry {}, CRDs Established.\nUse it:\n{}",
                        env.apiserver_url,
                        env.registry,
                        usage_hint(&dir)
                    );
                    env.detach();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("peat-testenv: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `make env NODE=1`: the environment with a real node, in a network namespace of its own.
async fn up_node(binaries: Binaries, dir: &std::path::Path, peat_image: Option<PathBuf>) -> ExitCode {
    use peat_testenv::node::{ClusterNetwork, RealCluster};
    eprintln!(
        "starting a control plane, a registry and a real node (containerd, kubelet, kube-proxy) in {} …",
        dir.display()
    );
    let started = std::time::Instant::now();
    let run = async {
        let net = ClusterNetwork::create("peat-node")?;
        // This thread (the whole runtime: it is current_thread) goes in; so do its children.
        net.enter()?;
        let cluster = RealCluster::start(binaries, dir, net, Lifetime::Detached).await?;
        let mut pushed = None;
        if let Some(layout) = peat_image {
            let reference = format!("{}/peat:{}", cluster.env.registry, env!("CARGO_PKG_VERSION"));
            peat_testenv::image::push(&layout, &reference, true).await?;
            pushed = Some(reference);
        }
        Ok::<_, peat_testenv::TestEnvError>((cluster, pushed))
    };
    match run.await {
        Ok((cluster, pushed)) => {
            let ns = cluster.net.name().to_string();
            println!(
                "real node {} Ready in {:.0?}: API server {}, registry {} — inside network namespace {ns} only.\n\
                 Use it from a shell in the namespace:\n  ip netns exec {ns} bash\n  . {}/env.sh\n  kubectl get nodes",
                cluster.net.node_name,
                started.elapsed(),
                cluster.env.apiserver_url,
                cluster.env.registry,
                dir.display()
            );
            if let Some(image) = pushed {
                let (repo, tag) = image.rsplit_once(':').expect("a tag");
                println!(
                    "  helm install peat charts/peat-operator -n peat-system --create-namespace \\
    --set image.repository={repo} --set image.tag={tag} \\\n    --set agent.store={0}/store --set agent.kubeletDir={0}/kubelet",
                    dir.display()
                );
            }
            println!("Stop it with: make env-down");
            match cluster.detach() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("peat-testenv: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("peat-testenv: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(dir: &std::path::Path) -> ExitCode {
    let peat = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("peat"))).filter(|p| p.exists());
    let Some(peat) = peat else {
        eprintln!("peat-testenv demo: no `peat` binary next to this one; build both: cargo build --workspace --bins");
        return ExitCode::FAILURE;
    };
    let opts = peat_testenv::demo::DemoOptions {
        repo_root: peat_testenv::harness::repo_root(),
        dir: std::path::absolute(dir).unwrap_or(dir.to_path_buf()),
        peat,
    };
    // Ctrl-C and SIGTERM are handled inside: it stops what it started, then says Interrupted.
    match peat_testenv::demo::run(opts).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(peat_testenv::demo::DemoError::Interrupted(_)) => {
            eprintln!("torn down; the logs stay in {}/logs", dir.display());
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\npeat-testenv demo failed (everything it started is stopped): {e}");
            ExitCode::FAILURE
        }
    }
}
