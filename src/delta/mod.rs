//! Delta transfers: content-defined chunk indexes at push, ranged fetch of only the missing bytes at the node.

pub mod chunk_index;
pub mod fetch;
