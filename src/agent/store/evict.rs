//! Disk pressure: which kept, non-active versions go first, and what that frees.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;

use super::{Store, VersionRecord};

/// (model, version) pairs a ModelDeployment on this node asks for: never evicted (a rollback
/// about to switch to a kept version must find it).
pub type Versions = HashSet<(String, String)>;

impl Store {
    /// Kept versions that are neither active nor wanted, least recently active first, each with the bytes evicting
    /// it (after those before it) frees: its blobs no remaining version and nothing in `protect` uses.
    fn eviction_order(&self, protect: &HashSet<String>, wanted: &Versions) -> Vec<(String, VersionRecord, u64)> {
        let distinct = |v: &VersionRecord| -> BTreeMap<String, u64> {
            v.files.iter().map(|f| (f.digest.clone(), f.size)).collect()
        };
        let mut users: HashMap<String, usize> = HashMap::new();
        let mut candidates = Vec::new();
        for (model, (state, current)) in self.inventory() {
            for v in state.versions {
                for d in distinct(&v).into_keys() {
                    *users.entry(d).or_default() += 1;
                }
                let wanted_now = wanted.contains(&(model.clone(), v.version.clone()));
                if current.as_deref() != Some(v.version.as_str()) && !wanted_now {
                    candidates.push((model.clone(), v));
                }
            }
        }
        candidates.sort_by(|a, b| (a.1.activated_at, &a.0, &a.1.version).cmp(&(b.1.activated_at, &b.0, &b.1.version)));
        let mut out = Vec::new();
        for (model, v) in candidates {
            let mut freed = 0;
            for (d, size) in distinct(&v) {
                let n = users.get_mut(&d).expect("counted above");
                *n -= 1;
                if *n == 0 && !protect.contains(&d) {
                    freed += size;
                }
            }
            out.push((model, v, freed));
        }
        out
    }

    /// Bytes that evicting every kept, non-active version would free (reported in the ModelNode,
    /// so the controller counts them as available).
    pub fn reclaimable(&self, wanted: &Versions) -> u64 {
        self.eviction_order(&HashSet::new(), wanted).iter().map(|e| e.2).sum()
    }

    /// Evicts the fewest kept, non-active versions (least recently active first) that bring `free`
    /// to `needed`, with the blobs only they used (not those in `protect`). Evicts nothing when
    /// even all of them would not make room. Returns the evicted `model version`s.
    pub fn evict_for(
        &self,
        needed: u64,
        free: u64,
        protect: &HashSet<String>,
        wanted: &Versions,
    ) -> io::Result<Vec<String>> {
        let order = self.eviction_order(protect, wanted);
        let mut gained = 0;
        let Some(last) = order.iter().position(|(_, _, freed)| {
            gained += freed;
            free + gained >= needed
        }) else {
            return Ok(Vec::new());
        };
        let mut evicted = Vec::new();
        for (model, v, _) in &order[..=last] {
            let dir = self.version_dir(model, &v.version);
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            let mut state = self.state(model);
            state.versions.retain(|k| k.version != v.version);
            self.save_state(model, &state)?;
            evicted.push(format!("{model} {}", v.version));
        }
        let mut still = self.referenced_blobs();
        still.extend(protect.iter().cloned());
        for f in order[..=last].iter().flat_map(|(_, v, _)| &v.files) {
            if !still.contains(&f.digest) {
                for path in [self.blob_path(&f.digest)?, self.chunk_index_path(&f.digest)?] {
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
        }
        Ok(evicted)
    }
}
