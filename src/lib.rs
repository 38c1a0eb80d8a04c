//! peat-operator: roll ML models out to fleets of heterogeneous edge nodes.
//!
//! The library holds everything; the `peat` binary is a thin set of subcommands over it.

pub mod api;
pub mod plan;
pub mod testenv;
