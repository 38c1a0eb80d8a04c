//! target: which nodes a rollout's scope selects.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use crate::api::quantity::parse_bytes;
use crate::api::shared::LABEL_FORMATION;
use crate::api::{CapableScope, LabelRequirement, ModelNodeStatus, NodeSelector, ScopeSpec, SelectorOperator};

/// What planning knows of one node: its Node labels and what its agent reported. The controller
/// borrows them from its caches (a reconcile reads every node, and copied every node's labels and
/// status twice, as often as five times a second while reports stream in); tests own them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts<'a> {
    /// Node name (also the ModelNode's name).
    pub name: Cow<'a, str>,
    /// Labels of the Node object (empty when there is no Node object).
    pub labels: Cow<'a, BTreeMap<String, String>>,
    /// The ModelNode status, when the node's agent has published one.
    pub capabilities: Option<Cow<'a, ModelNodeStatus>>,
}

impl NodeFacts<'_> {
    /// Whether a peat agent has reported from this node.
    pub fn has_agent(&self) -> bool {
        self.capabilities.is_some()
    }
}

/// A scope that cannot be evaluated (the API server's validation should have refused it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    /// Not exactly one scope kind is set.
    #[error("scope must set exactly one of all, formation, nodeSelector, nodes, capable")]
    NotExactlyOne,
    /// A capable quantity does not parse.
    #[error("scope.capable.{field}: {source}")]
    BadQuantity {
        /// Which field.
        field: &'static str,
        /// Why.
        source: crate::api::quantity::QuantityError,
    },
}

/// The canonical GOARCH-style name of a CPU architecture (`x86_64` → `amd64`, `aarch64` → `arm64`).
pub fn normalize_arch(arch: &str) -> String {
    match arch.trim().to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "x64" | "amd64" => "amd64".into(),
        "aarch64" | "arm64" | "arm64/v8" => "arm64".into(),
        "armhf" | "armv7l" | "armv7" | "arm" => "arm".into(),
        "i386" | "i686" | "x86" | "386" => "386".into(),
        other => other.into(),
    }
}

/// The nodes a scope selects, by name, sorted.
///
/// `all`, `formation`, `nodeSelector` and `capable` select among nodes whose agent has reported
/// (a ModelNode exists): a node without an agent cannot take a model. `nodes` selects the named
/// nodes whether or not they report, so a missing agent shows up as a blocker instead of silently
/// shrinking the rollout.
pub fn select_targets(scope: &ScopeSpec, nodes: &[NodeFacts<'_>]) -> Result<Vec<String>, ScopeError> {
    let kinds = [
        scope.all.is_some(),
        scope.formation.is_some(),
        scope.node_selector.is_some(),
        scope.nodes.is_some(),
        scope.capable.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(ScopeError::NotExactlyOne);
    }
    if let Some(names) = &scope.nodes {
        return Ok(names.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect());
    }
    let capable = scope.capable.as_ref().map(CapableMinimums::parse).transpose()?;
    let mut selected: Vec<String> = nodes
        .iter()
        .filter(|n| n.has_agent())
        .filter(|n| {
            if scope.all.is_some() {
                true
            } else if let Some(formation) = &scope.formation {
                n.labels.get(LABEL_FORMATION) == Some(formation)
            } else if let Some(selector) = &scope.node_selector {
                selector_matches(selector, &n.labels)
            } else if let Some(capable) = &capable {
                capable.admits(n.capabilities.as_ref().expect("filtered on has_agent"))
            } else {
                false
            }
        })
        .map(|n| n.name.to_string())
        .collect();
    selected.sort();
    selected.dedup();
    Ok(selected)
}

/// A rollout's targets: the nodes its scope selects, plus — when `capable.minStorage` admits
/// nodes — the ones it `holds` (has a deployment on) that now lack only the storage: the model
/// uses that storage, and without this they would flap out and back in with every install.
pub fn rollout_targets(
    scope: &ScopeSpec,
    nodes: &[NodeFacts<'_>],
    holds: &BTreeSet<&str>,
) -> Result<Vec<String>, ScopeError> {
    let targets = select_targets(scope, nodes)?;
    let Some(capable) = scope.capable.as_ref().filter(|c| c.min_storage.is_some()) else { return Ok(targets) };
    let relaxed = ScopeSpec { capable: Some(CapableScope { min_storage: None, ..capable.clone() }), ..scope.clone() };
    let mut all: BTreeSet<String> = targets.into_iter().collect();
    all.extend(select_targets(&relaxed, nodes)?.into_iter().filter(|n| holds.contains(n.as_str())));
    Ok(all.into_iter().collect())
}

/// Whether a label set satisfies a selector (Kubernetes label-selector semantics: every
/// matchLabels entry and every requirement must hold; an empty selector matches everything).
pub fn selector_matches(selector: &NodeSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    labels_ok && selector.match_expressions.iter().flatten().all(|r| requirement_matches(r, labels))
}

fn requirement_matches(req: &LabelRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let in_values = |v: &String| req.values.iter().flatten().any(|x| x == v);
    match req.operator {
        SelectorOperator::In => value.is_some_and(in_values),
        SelectorOperator::NotIn => !value.is_some_and(in_values),
        SelectorOperator::Exists => value.is_some(),
        SelectorOperator::DoesNotExist => value.is_none(),
    }
}

/// `scope.capable` with its quantities parsed.
#[derive(Clone, Debug, PartialEq)]
struct CapableMinimums {
    min_gpu_memory: Option<u64>,
    arch: Option<String>,
    min_storage: Option<u64>,
}

impl CapableMinimums {
    fn parse(c: &CapableScope) -> Result<Self, ScopeError> {
        let q = |field: &'static str, v: &Option<String>| {
            v.as_deref().map(parse_bytes).transpose().map_err(|source| ScopeError::BadQuantity { field, source })
        };
        Ok(CapableMinimums {
            min_gpu_memory: q("minGpuMemory", &c.min_gpu_memory)?,
            arch: c.cpu_arch.as_deref().map(normalize_arch),
            min_storage: q("minStorage", &c.min_storage)?,
        })
    }

    fn admits(&self, caps: &ModelNodeStatus) -> bool {
        let gpu_ok = self.min_gpu_memory.is_none_or(|min| caps.gpu_memory_bytes.max(0) as u64 >= min);
        let arch_ok =
            self.arch.as_ref().is_none_or(|want| caps.arch.as_deref().map(normalize_arch).as_ref() == Some(want));
        let storage_ok = self.min_storage.is_none_or(|min| caps.storage_available_bytes() >= min);
        gpu_ok && arch_ok && storage_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AllNodes;

    const GI: i64 = 1 << 30;

    fn node(name: &str, labels: &[(&str, &str)], caps: Option<(&str, i64, i64)>) -> NodeFacts<'static> {
        NodeFacts {
            name: Cow::Owned(name.into()),
            labels: Cow::Owned(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            capabilities: caps
                .map(|(arch, gpu, free)| ModelNodeStatus {
                    arch: Some(arch.into()),
                    gpus: i32::from(gpu > 0),
                    gpu_memory_bytes: gpu,
                    storage_free_bytes: free,
                    ..Default::default()
                })
                .map(Cow::Owned),
        }
    }

    fn fleet() -> Vec<NodeFacts<'static>> {
        vec![
            node("jetson-1", &[(LABEL_FORMATION, "alpha"), ("tier", "edge")], Some(("arm64", 8 * GI, 20 * GI))),
            node("jetson-2", &[(LABEL_FORMATION, "alpha"), ("tier", "edge")], Some(("aarch64", 4 * GI, GI / 4))),
            node("gateway", &[(LABEL_FORMATION, "beta"), ("tier", "gateway")], Some(("x86_64", 0, 50 * GI))),
            node("gpu-server", &[("tier", "core"), ("gpu", "a100")], Some(("amd64", 80 * GI, 500 * GI))),
            // Labelled like the others but no agent has reported from it.
            node("no-agent", &[(LABEL_FORMATION, "alpha"), ("tier", "edge")], None),
        ]
    }

    fn scope() -> ScopeSpec {
        ScopeSpec::default()
    }

    #[test]
    fn all_selects_every_node_with_an_agent() {
        let s = ScopeSpec { all: Some(AllNodes {}), ..scope() };
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gateway", "gpu-server", "jetson-1", "jetson-2"]);
    }

    #[test]
    fn formation_selects_by_the_formation_label() {
        let s = ScopeSpec { formation: Some("alpha".into()), ..scope() };
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["jetson-1", "jetson-2"]);
        let s = ScopeSpec { formation: Some("nobody".into()), ..scope() };
        assert!(select_targets(&s, &fleet()).unwrap().is_empty());
    }

    #[test]
    fn named_nodes_are_targets_even_without_an_agent() {
        let s = ScopeSpec { nodes: Some(vec!["no-agent".into(), "gateway".into(), "gateway".into()]), ..scope() };
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gateway", "no-agent"]);
    }

    fn selector(labels: &[(&str, &str)], exprs: Vec<LabelRequirement>) -> ScopeSpec {
        ScopeSpec {
            node_selector: Some(NodeSelector {
                match_labels: (!labels.is_empty())
                    .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                match_expressions: (!exprs.is_empty()).then_some(exprs),
            }),
            ..scope()
        }
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            operator,
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selector_match_labels() {
        let s = selector(&[("tier", "edge")], vec![]);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["jetson-1", "jetson-2"]);
    }

    #[test]
    fn selector_in_and_not_in() {
        let s = selector(&[], vec![req("tier", SelectorOperator::In, &["gateway", "core"])]);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gateway", "gpu-server"]);
        // NotIn also matches nodes without the key at all (Kubernetes semantics).
        let s = selector(&[], vec![req("gpu", SelectorOperator::NotIn, &["a100"])]);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gateway", "jetson-1", "jetson-2"]);
    }

    #[test]
    fn selector_exists_and_does_not_exist() {
        let s = selector(&[], vec![req("gpu", SelectorOperator::Exists, &[])]);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gpu-server"]);
        let s = selector(&[], vec![req(LABEL_FORMATION, SelectorOperator::DoesNotExist, &[])]);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gpu-server"]);
    }

    #[test]
    fn selector_requires_every_term() {
        let s = selector(
            &[("tier", "edge")],
            vec![
                req(LABEL_FORMATION, SelectorOperator::In, &["alpha"]),
                req("gpu", SelectorOperator::DoesNotExist, &[]),
            ],
        );
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["jetson-1", "jetson-2"]);
        let s = selector(&[("tier", "edge")], vec![req("gpu", SelectorOperator::Exists, &[])]);
        assert!(select_targets(&s, &fleet()).unwrap().is_empty());
    }

    fn capable(gpu: Option<&str>, arch: Option<&str>, storage: Option<&str>) -> ScopeSpec {
        ScopeSpec {
            capable: Some(CapableScope {
                min_gpu_memory: gpu.map(Into::into),
                cpu_arch: arch.map(Into::into),
                min_storage: storage.map(Into::into),
            }),
            ..scope()
        }
    }

    #[test]
    fn capable_by_gpu_memory() {
        let s = capable(Some("4Gi"), None, None);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gpu-server", "jetson-1", "jetson-2"]);
        let s = capable(Some("8Gi"), None, None);
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gpu-server", "jetson-1"]);
    }

    #[test]
    fn capable_by_arch_with_aliases() {
        // jetson-2 reports aarch64, gateway x86_64: aliases of arm64 and amd64.
        assert_eq!(select_targets(&capable(None, Some("arm64"), None), &fleet()).unwrap(), ["jetson-1", "jetson-2"]);
        assert_eq!(select_targets(&capable(None, Some("aarch64"), None), &fleet()).unwrap(), ["jetson-1", "jetson-2"]);
        assert_eq!(select_targets(&capable(None, Some("x86_64"), None), &fleet()).unwrap(), ["gateway", "gpu-server"]);
        assert_eq!(select_targets(&capable(None, Some("amd64"), None), &fleet()).unwrap(), ["gateway", "gpu-server"]);
    }

    #[test]
    fn capable_by_free_storage() {
        let s = capable(None, None, Some("500Mi"));
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["gateway", "gpu-server", "jetson-1"]);
    }

    #[test]
    fn capable_criteria_combine() {
        // The example of the design: >= 4 GiB GPU memory and arm64.
        let s = capable(Some("4Gi"), Some("arm64"), Some("1Gi"));
        assert_eq!(select_targets(&s, &fleet()).unwrap(), ["jetson-1"]);
    }

    #[test]
    fn a_bad_quantity_or_no_scope_is_an_error_not_an_empty_selection() {
        assert!(matches!(
            select_targets(&capable(Some("lots"), None, None), &fleet()),
            Err(ScopeError::BadQuantity { field: "minGpuMemory", .. })
        ));
        assert_eq!(select_targets(&scope(), &fleet()), Err(ScopeError::NotExactlyOne));
        let two = ScopeSpec { all: Some(AllNodes {}), formation: Some("alpha".into()), ..scope() };
        assert_eq!(select_targets(&two, &fleet()), Err(ScopeError::NotExactlyOne));
    }

    #[test]
    fn a_held_node_short_of_storage_only_stays_a_target() {
        let s = capable(None, None, Some("500Mi"));
        let held = BTreeSet::from(["jetson-2", "gateway"]);
        // jetson-2 lacks the storage now (it holds the model); others lacking it are not added.
        assert_eq!(rollout_targets(&s, &fleet(), &held).unwrap(), ["gateway", "gpu-server", "jetson-1", "jetson-2"]);
        assert_eq!(rollout_targets(&s, &fleet(), &BTreeSet::new()).unwrap(), ["gateway", "gpu-server", "jetson-1"]);
        let arm = capable(None, Some("arm64"), Some("500Mi"));
        assert_eq!(
            rollout_targets(&arm, &fleet(), &held).unwrap(),
            ["jetson-1", "jetson-2"],
            "other criteria still hold"
        );
        let all = ScopeSpec { all: Some(AllNodes {}), ..scope() };
        assert_eq!(rollout_targets(&all, &fleet(), &held).unwrap(), select_targets(&all, &fleet()).unwrap());
    }
}
