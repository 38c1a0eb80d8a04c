//! Command-line commands beyond the long-running components: `peat push` (and the kubectl plugin).

pub mod plugin;
pub mod push;
