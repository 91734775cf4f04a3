//! The crate's shape: every module is named in the crate map at the top of `lib.rs`, and the
//! `use crate::` lines of the modules form no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`operation::split`; the crate root is "") to its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>, root: &Path) {
        for e in std::fs::read_dir(dir).expect("src dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out, root);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                    parts.pop();
                }
                let src = std::fs::read_to_string(&p).expect("source");
                out.insert(parts.join("::"), src);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &mut out, &root);
    out
}

/// The paths a `use crate::...;` tree names (`a::{b, c::{d, e}}` gives `a::b`, `a::c::d`, ...).
fn expand(tree: &str) -> Vec<String> {
    // `x as y` names x: mark the alias before white space goes.
    let tree: String = tree
        .replace(" as ", "@")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split('@').next().unwrap_or("").to_string()];
    };
    let (prefix, inner) = (&tree[..open], &tree[open + 1..tree.len() - 1]);
    let (mut parts, mut depth, mut cur) = (vec![], 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p))
        .map(|p| {
            if p == "self" {
                prefix.trim_end_matches("::").to_string()
            } else {
                format!("{prefix}{p}")
            }
        })
        .collect()
}

/// The modules each module imports with `use crate::` (test code left out).
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    // Re-exports at the root resolve to the module that defines them.
    let reexports: BTreeMap<&str, &str> = [
        ("Config", "config"),
        ("Error", "errors"),
        ("Result", "errors"),
        ("RaftStore", "fsm::store"),
        ("StoreDeps", "fsm::store"),
        ("RaftRouter", "router"),
        ("Transport", "transport"),
        ("RegionSnapshot", "msg"),
        ("WriteResponse", "msg"),
        ("PeerId", "ids"),
        ("RegionId", "ids"),
        ("StoreId", "ids"),
    ]
    .into_iter()
    .collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|i| parts[..i].join("::"))
            .find(|m| mods.contains_key(m))
            .or_else(|| reexports.get(parts[0]).map(|m| m.to_string()))
    };
    let mut out = BTreeMap::new();
    for (m, src) in mods {
        let code = src.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let mut deps = BTreeSet::new();
        for piece in code.split("use crate::").skip(1) {
            let tree = piece.split(';').next().unwrap_or("");
            for path in expand(tree) {
                if let Some(d) = resolve(&path).filter(|d| d != m) {
                    deps.insert(d);
                }
            }
        }
        out.insert(m.clone(), deps);
    }
    out
}

fn is_test_module(m: &str) -> bool {
    m == "test_support" || m == "tests" || m.starts_with("tests::")
}

#[test]
fn the_use_crate_lines_form_no_circle() {
    let mods = modules();
    let graph = imports(&mods);
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in &graph[m] {
            match state.get(d.as_str()) {
                Some(1) => panic!("import circle: {} -> {d}", path.join(" -> ")),
                Some(_) => {}
                None => visit(d, graph, state, path),
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m) {
            visit(m, &graph, &mut state, &mut vec![]);
        }
    }
    assert!(graph["fsm::context"]
        .iter()
        .all(|d| !d.starts_with("operation")));
}

#[test]
fn the_crate_map_names_every_module() {
    let mods = modules();
    let lib = &mods[""];
    let map: String = lib
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let parents: BTreeSet<&str> = mods
        .keys()
        .filter_map(|m| m.rsplit_once("::").map(|(p, _)| p))
        .collect();
    for m in mods.keys() {
        if m.is_empty() || parents.contains(m.as_str()) || is_test_module(m) {
            continue;
        }
        assert!(
            map.contains(&format!("[`{m}`]")),
            "the crate map does not name {m}"
        );
    }
    assert!(map.contains("`test_support`") && map.contains("`tests`"));
}

#[test]
fn no_file_is_over_800_lines() {
    for (m, src) in modules() {
        assert!(
            src.lines().count() <= 800,
            "{m} has {} lines",
            src.lines().count()
        );
    }
}
