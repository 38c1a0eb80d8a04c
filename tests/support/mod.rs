//! The harness lives in the dev-only `peat-testenv` crate (`testenv/src/harness.rs`); each test
//! binary and benchmark includes this module to reach it as `support::…`.

#[allow(unused_imports)] // each test binary uses its own part of the harness
pub use peat_testenv::harness::*;
