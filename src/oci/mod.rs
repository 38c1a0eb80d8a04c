//! OCI registry access and the artifact format: the layout contract (DESIGN §6), chunk indexes,
//! digests, clients with auth, resolving an index to variants, pushing.

pub mod chunk_index;
pub mod client;
pub mod digest;
pub mod layout;
pub mod patch;
pub mod push;

pub use client::{OciError, RegistryAccess, Resolved, resolve};
