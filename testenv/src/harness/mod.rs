//! The harness of the integration tests and benchmarks (`support::…` in each test binary): one
//! etcd + kube-apiserver + kube-controller-manager + registry per test binary ([`env`]), a fresh
//! namespace per test ([`ctx`]); `peat controller` and `peat agent` processes; simulated nodes
//! and agents; pushes; a byte-counting proxy; models for MLServer; an edge link for benchmarks
//! (an agent in a network namespace behind a shaped veth).

mod agents;
mod artifacts;
mod controller;
mod edge_link;
mod env;
mod fleet;
mod mlserver;
mod proxy;

pub use crate::pseudo_random;
pub use agents::*;
pub use artifacts::*;
pub use controller::*;
pub use edge_link::*;
pub use env::*;
pub use fleet::*;
pub use mlserver::*;
pub use proxy::*;
