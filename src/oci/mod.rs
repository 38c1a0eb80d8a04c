//! OCI registry access: the layout contract (DESIGN §6), clients with auth, resolving an index to variants, pushing.

pub mod client;
pub mod layout;
pub mod push;

pub use client::{OciError, RegistryAccess, Resolved, resolve};
