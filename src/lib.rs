#![warn(missing_docs)]
//! peat-operator: roll ML models out to fleets of heterogeneous edge nodes.
//!
//! The library holds everything; the `peat` binary (`src/main.rs`) is a thin set of subcommands
//! over it. The test environment, harness and demo live in the dev-only `peat-testenv` crate
//! (`testenv/`), never in the product.
//!
//! # Layers
//!
//! Imports point down only; `tests/architecture.rs` fails on any loop and on a pure layer that
//! imports an I/O one. docs/architecture.md follows one ModelRollout through these modules.
//!
//! ```text
//!  peat (main.rs) ── subcommands
//!     │
//!     ├── controller   ModelRollout → ModelDeployments, status        (I/O: API server, registry)
//!     ├── agent        ModelDeployment → files on the node, reports    (I/O: API server, registry, disk)
//!     ├── cli          kubectl peat …, peat push                       (I/O)
//!     │      │
//!     │      ▼
//!     ├── plan         resolve → target → select → plan → status       (pure: no client, no clock)
//!     │      │
//!     │      ▼
//!     ├── oci          registry client, push, the artifact layout, chunk indexes, digests
//!     │      │
//!     │      ▼
//!     └── api          the CRD types (ModelRollout, ModelDeployment, ModelNode)
//!
//!  beside them: admin (/livez, /readyz, /metrics), telemetry (logs, signals), units (parsing)
//! ```
//!
//! Inside the agent the same rule holds: [`agent::decide`] is pure (what to do), `act` carries
//! it out, [`agent::transfer`] moves bytes, [`agent::store`] keeps them. Inside the controller,
//! `reconcile` runs the pipeline observe → resolve → plan → apply → status with the decisions
//! in [`plan`] and every write in one module.

pub mod admin;
pub mod agent;
pub mod api;
pub mod cli;
pub mod controller;
pub mod oci;
pub mod plan;
pub mod telemetry;
pub mod units;
