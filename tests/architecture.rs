//! The structure docs/architecture.md promises, checked on the sources: no module imports one
//! that imports it (directly or around a loop), and no file under `src/agent/` or
//! `src/controller/` grows past 500 lines. A module is a file; `use`/path references through
//! `crate::` and `super::` and to child modules are its imports; test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module path of a file: `src/agent/transfer/mod.rs` → `agent::transfer`.
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The source without comments, test modules, and visibility modifiers (`pub(super)` is no import).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let lines: Vec<&str> = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect();
    lines.join("\n").replace("pub(super)", "pub_super").replace("pub(crate)", "pub_crate")
}

/// Every path the code names that starts with `crate::`, `super::` or a child module, with
/// `a::{b, c::d}` groups expanded.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !ident(chars[i]) || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        // Read `a::b::c` and an optional `::{…}` group.
        let mut path = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < chars.len() && ident(chars[j]) {
                j += 1;
            }
            path.push(chars[start..j].iter().collect::<String>());
            if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                j += 2;
                if chars.get(j) == Some(&'{') {
                    let end = (j..chars.len()).find(|&k| chars[k] == '}').unwrap_or(chars.len());
                    let group: String = chars[j + 1..end].iter().collect();
                    for item in group.split(',').map(str::trim).filter(|s| !s.is_empty() && !s.contains('{')) {
                        let mut p = path.clone();
                        p.extend(item.split(" as ").next().unwrap().split("::").map(str::to_string));
                        out.push(p);
                    }
                    j = end;
                    path.clear();
                    break;
                }
                if chars.get(j).is_some_and(|c| ident(*c)) {
                    continue;
                }
            }
            break;
        }
        if path.len() > 1 {
            out.push(path);
        }
        i = j.max(i + 1);
    }
    out
}

fn import_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    // main.rs is the binary: a crate of its own over the library, which it reaches as `peat::`.
    files.retain(|f| f != &root.join("main.rs"));
    let modules: BTreeMap<Vec<String>, PathBuf> = files.iter().map(|f| (module_of(root, f), f.clone())).collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        if module.iter().any(|p| p == "tests") {
            continue;
        }
        let is_dir = matches!(file.file_name().and_then(|n| n.to_str()), Some("mod.rs" | "lib.rs" | "main.rs"));
        let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
        let mut imports = BTreeSet::new();
        for path in paths_in(&code_of(&std::fs::read_to_string(file).unwrap())) {
            let full: Vec<String> = match path[0].as_str() {
                "crate" => path[1..].to_vec(),
                "super" => parent.iter().cloned().chain(path[1..].iter().cloned()).collect(),
                // A child module named without a prefix (`act::run` in agent/mod.rs).
                _ if is_dir => module.iter().cloned().chain(path.iter().cloned()).collect(),
                _ => continue,
            };
            // The longest module the path names; the crate root for its own items (`crate::Error`).
            let target = (0..=full.len()).rev().map(|k| full[..k].to_vec()).find(|m| modules.contains_key(m));
            if let Some(t) = target.filter(|t| t != module && !t.iter().any(|p| p == "tests")) {
                imports.insert(t.join("::"));
            }
        }
        graph.insert(module.join("::"), imports);
    }
    graph
}

/// The modules on a loop of imports, if any (Tarjan's strongly connected components).
fn loops(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                t.low.insert(v, t.low[v].min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                t.low.insert(v, t.low[v].min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t =
        T { g: graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_module_imports_one_that_imports_it() {
    for src in [root().join("src"), root().join("testenv/src")] {
        let graph = import_graph(&src);
        assert!(graph.len() > 3, "read the modules of {}: {graph:?}", src.display());
        let found = loops(&graph);
        assert!(found.is_empty(), "import loops in {}: {found:?}", src.display());
    }
    // The checker sees a loop when there is one (a guard against a parser that finds nothing).
    let g: BTreeMap<String, BTreeSet<String>> =
        [("a".to_string(), BTreeSet::from(["b".to_string()])), ("b".to_string(), BTreeSet::from(["a".to_string()]))]
            .into();
    assert_eq!(loops(&g), [["a", "b"]]);
    let graph = import_graph(&root().join("src"));
    assert!(graph["agent::act"].contains("agent::decide"), "{:?}", graph["agent::act"]);
    assert!(graph["agent::transfer::blob"].contains("agent::transfer::writer"));
    assert!(graph["agent"].contains("agent::act"), "a child named without a prefix counts");
    assert!(!graph["plan::strategy"].iter().any(|m| m.starts_with("controller")), "plan is pure");
}

#[test]
fn the_pure_layers_import_no_io_layer() {
    let graph = import_graph(&root().join("src"));
    for (module, imports) in &graph {
        let layer = module.split("::").next().unwrap();
        let allowed: &[&str] = match layer {
            "api" | "units" | "telemetry" => &["api", "units"],
            "plan" => &["api", "plan", "oci::layout", "units"],
            "oci" => &["api", "oci", "units"],
            _ => continue,
        };
        for i in imports {
            assert!(
                allowed.iter().any(|a| i == a || i.starts_with(&format!("{a}::"))),
                "{module} imports {i}; {layer} may import only {allowed:?} (docs/architecture.md)"
            );
        }
    }
}

#[test]
fn agent_and_controller_files_stay_readable() {
    for dir in ["src/agent", "src/controller"] {
        let mut files = Vec::new();
        rust_files(&root().join(dir), &mut files);
        assert!(!files.is_empty());
        for f in files {
            let lines = std::fs::read_to_string(&f).unwrap().lines().count();
            assert!(lines <= 500, "{} has {lines} lines (at most 500: split it by concern)", f.display());
        }
    }
}
