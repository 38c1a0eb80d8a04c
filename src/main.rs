//! `peat`: thin subcommands over the peat library.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "peat", version, about = "Roll ML models out to fleets of heterogeneous edge nodes")]
// As `kubectl-peat` (a symlink), `kubectl peat status NAME` runs `peat status NAME`.
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions generated from the Rust types (the source of crds/).
    Crds,
    /// Run the controller: reconcile ModelRollouts into per-node ModelDeployments.
    Controller(peat::controller::Options),
    /// Run the node agent: pull, verify and activate this node's models; report and heartbeat.
    Agent(peat::agent::Options),
    /// Publish a model directory as a variant of a model version in an OCI registry.
    Push(peat::cli::push::PushArgs),
    /// Show a rollout: versions, per-node progress, blockers, ETA (`--watch` until it converges, or exits 1 when it ends short).
    Status(peat::cli::plugin::StatusArgs),
    /// Roll a rollout back to the previous converged version (or `--to VERSION`).
    Rollback(peat::cli::plugin::RollbackArgs),
    /// Pause a rollout: transfers halt and resume later where they stopped.
    Pause(peat::cli::plugin::NameArgs),
    /// Resume a paused rollout.
    Resume(peat::cli::plugin::NameArgs),
    /// List the nodes with an agent: capabilities, free storage, models, heartbeat.
    Nodes,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Controller(opts) => runtime().and_then(|rt| rt.block_on(peat::controller::run(opts))),
        Command::Agent(opts) => runtime().and_then(|rt| rt.block_on(peat::agent::run(opts))),
        Command::Push(args) => runtime().and_then(|rt| rt.block_on(peat::cli::push::run(args))),
        Command::Status(args) => plugin(peat::cli::plugin::status(args)),
        Command::Rollback(args) => plugin(peat::cli::plugin::rollback(args)),
        Command::Pause(args) => plugin(peat::cli::plugin::pause(args)),
        Command::Resume(args) => plugin(peat::cli::plugin::resume(args)),
        Command::Nodes => plugin(peat::cli::plugin::nodes()),
        Command::Crds => peat::api::crds_yaml()
            .map_err(anyhow::Error::from)
            .and_then(|yaml| std::io::stdout().write_all(yaml.as_bytes()).map_err(Into::into)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plugin(f: impl std::future::Future<Output = Result<(), peat::cli::plugin::PluginError>>) -> anyhow::Result<()> {
    runtime()?.block_on(f).map_err(Into::into)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
