//! The harness of the integration tests and benchmarks (`support::…` in each test binary): one
//! etcd + kube-apiserver + kube-controller-manager + registry per test binary ([`env`]), a fresh
//! namespace per test ([`ctx`]); `peat controller` and `peat agent` processes; simulated nodes
//! and agents; pushes; a byte-counting proxy; models for MLServer.

mod agents;
mod artifacts;
mod controller;
mod env;
mod fleet;
mod mlserver;
mod proxy;

pub use crate::pseudo_random;
pub use agents::*;
pub use artifacts::*;
pub use controller::*;
pub use env::*;
pub use fleet::*;
pub use mlserver::*;
pub use proxy::*;
