//! Pure planning logic: no client, no clock reads. resolve → target → select → plan → status.

pub mod convergence;
pub mod scope;
pub mod status;
pub mod strategy;
pub mod variant;
