//! The import rule (docs/ARCHITECTURE.md), checked on the source itself:
//! every top-level module has a layer, imports point only to lower layers,
//! and there is no cycle. A new module, or an import that points up, fails
//! here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, lowest first. A module may import only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["model"],
    &["secret", "metrics"],
    &["config"],
    &["classify", "providers"],
    &["media"],
    &["fetch"],
    &["check", "db", "storage"],
    &["gc", "sinks"],
    &["pipeline"],
    &["demo", "progress", "push", "report", "schedule", "serve"],
    &["app"],
    &["cli"],
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules `lib.rs` declares.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            ["pub mod ", "pub(crate) mod ", "mod "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
        })
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            rust_files(&entry.path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs")
        // A module's unit tests in a file of their own (`mod tests;` under `#[cfg(test)]`).
        && path.file_name().is_some_and(|n| n != "tests.rs")
    {
        out.push(path.to_path_buf());
    }
}

/// The code of a file without its `#[cfg(test)]` items (tests may reach
/// anywhere): each guarded item is skipped, one line or a whole block; the
/// code after it still counts.
fn without_tests(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            let mut depth = 0i64;
            for item in lines.by_ref() {
                depth += item.matches('{').count() as i64 - item.matches('}').count() as i64;
                let end = item.trim_end();
                if depth <= 0 && (end.ends_with(';') || end.ends_with('}')) {
                    break;
                }
            }
            continue;
        }
        // Doc and line comments may name paths freely.
        if !trimmed.starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// Which top-level modules a piece of code refers to: `crate::x…` paths and
/// `use crate::{x, y::z}` groups.
fn references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let mut graph = BTreeMap::new();
    for m in &modules {
        let mut files = Vec::new();
        let dir = src().join(m);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src().join(format!("{m}.rs")));
        }
        let mut refs = BTreeSet::new();
        for f in files {
            refs.extend(references(&without_tests(
                &std::fs::read_to_string(&f).unwrap(),
            )));
        }
        refs.retain(|r| r != m && modules.contains(r));
        graph.insert(m.clone(), refs);
    }
    graph
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<String> = modules()
        .into_iter()
        .filter(|m| layer(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in tests/it/architecture.rs (and docs/ARCHITECTURE.md): {unplaced:?}"
    );
}

#[test]
fn imports_point_down_only() {
    let mut upward = Vec::new();
    for (from, to) in imports() {
        for target in to {
            if let (Some(a), Some(b)) = (layer(&from), layer(&target))
                && b >= a
            {
                upward.push(format!("{from} (layer {a}) imports {target} (layer {b})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

#[test]
fn there_is_no_import_cycle() {
    let graph = imports();
    // Depth-first search with the path on a stack: a back edge is a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    // The test of the test: it must find what is plainly there.
    let refs = references("use crate::{config::Settings, model};\nlet x = crate::db::quote(y);");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["config", "db", "model"]
    );
    let code = without_tests(
        "use crate::model;\n#[cfg(test)]\nuse crate::cli::X;\n#[cfg(test)]\nmod tests {\n    use crate::app;\n}\nfn f() { crate::db::g() }\n",
    );
    assert_eq!(
        references(&code).into_iter().collect::<Vec<_>>(),
        ["db", "model"],
        "test items skipped, the code after them kept: {code}"
    );
    let graph = imports();
    assert!(graph["pipeline"].contains("check"), "{graph:?}");
    assert!(graph["cli"].len() > 5, "{graph:?}");
    // Every module lib.rs declares, whatever its visibility.
    for m in ["check", "fetch", "model", "cli", "app"] {
        assert!(graph.contains_key(m), "{m} missing: {graph:?}");
    }
}
