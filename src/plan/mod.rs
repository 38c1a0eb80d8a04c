//! Pure planning logic: no client, no clock reads. resolve → target → select → plan → status.

pub mod abort;
pub mod convergence;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod rivals;
pub mod scope;
pub mod status;
pub mod strategy;
pub mod variant;
