//! peat-operator: roll ML models out to fleets of heterogeneous edge nodes.
//!
//! The library holds everything; the `peat` binary is a thin set of subcommands over it.

pub mod admin;
pub mod agent;
pub mod api;
pub mod cli;
pub mod controller;
pub mod oci;
pub mod plan;
pub mod telemetry;
pub mod testenv;
pub mod units;
