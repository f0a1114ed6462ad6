//! Every module on its floor: no import circle among the modules of `src/`.
//!
//! Reads every `src/**/*.rs` file (one module per file; `mod.rs` is its folder's module), finds
//! the modules it names — in `use` trees and in inline paths (`crate::a::b`, `super::x`,
//! `self::x`, a child module's name) — and fails on any cycle, printing it with the lines'
//! edges. Rules (docs/architecture.md, "Floors"):
//! - a path names the deepest module it reaches; a name re-exported by a `pub use` is followed
//!   to the module that defines it, and a `pub use` itself is a module's facade, not a use;
//! - `#[cfg(test)]` modules are left out: a test may drive its module with the ones above it.
//!
//! `cargo test --release --test floors -- --nocapture` also prints the floors, lowest first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() { "lib".into() } else { m.join("::") }
}

/// The modules of `src/` (by file), without `main` and test modules.
fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = vec![];
    walk(root, &mut files);
    let mut out = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(root).unwrap().with_extension("");
        let mut m: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        if m.last().is_some_and(|s| s == "mod") {
            m.pop();
        }
        if m == ["lib"] {
            m.clear();
        }
        if m == ["main"] || m.last().is_some_and(|s| s == "tests") {
            continue;
        }
        out.insert(m, path);
    }
    out
}

/// The source without comments, string and char literals (replaced by blanks of the same
/// kind), so only code is searched for paths.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            while i < b.len() {
                if src[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if src[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"..." / r#"..."# / br#"..."#
            let open = rest.find('"').unwrap() + 1;
            let close = format!("\"{}", "#".repeat(hashes));
            let end = rest[open..].find(&close).map(|e| open + e + close.len()).unwrap_or(rest.len());
            out.push_str("\"\"");
            i += end;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if rest.starts_with("'\\''") {
            out.push_str("' '");
            i += 4;
        } else if b[i] == b'\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            let lit = rest[1..].find('\'').filter(|&e| {
                let inner = &rest[1..1 + e];
                inner.chars().count() == 1 || inner.starts_with('\\')
            });
            match lit {
                Some(e) => {
                    out.push_str("' '");
                    i += e + 2;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn raw_string_start(s: &str) -> Option<usize> {
    let s = s.strip_prefix('b').unwrap_or(s);
    let s = s.strip_prefix('r')?;
    let hashes = s.len() - s.trim_start_matches('#').len();
    s[hashes..].starts_with('"').then_some(hashes)
}

/// `src` without its `#[cfg(test)] mod x { ... }` blocks.
fn without_test_modules(mut src: String) -> String {
    while let Some(at) = src.find("#[cfg(test)]") {
        let after = &src[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ") || trimmed.starts_with("pub mod ");
        let Some(open) = after.find('{').filter(|&o| is_mod && !after[..o].contains(';')) else {
            // an attribute on something else (or `mod tests;`): drop the attribute only
            src.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        };
        let start = at + "#[cfg(test)]".len() + open;
        let mut depth = 0;
        let mut end = start;
        for (k, c) in src[start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        src.replace_range(at..end, "");
    }
    src
}

/// The paths of a `use` tree (`a::{b, c::{d as e}}` → `a::b`, `a::c::d`).
fn use_paths(tree: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<&str> {
        let (mut depth, mut from, mut out) = (0, 0, vec![]);
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[from..i]);
                    from = i + 1;
                }
                _ => {}
            }
        }
        out.push(&s[from..]);
        out
    }
    fn expand(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
        for item in split_top(s) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            if let Some(brace) = item.find('{') {
                let mut p = prefix.to_vec();
                p.extend(segments(item[..brace].trim_end_matches(':')));
                expand(&p, &item[brace + 1..item.rfind('}').unwrap()], out);
            } else {
                let item = item.split(" as ").next().unwrap();
                let mut p = prefix.to_vec();
                p.extend(segments(item));
                out.push(p);
            }
        }
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.replace(" :: ", "::").replace(":: ", "::").replace(" ::", "::");
    let mut out = vec![];
    expand(&[], &tree, &mut out);
    out
}

fn segments(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from)
}

/// `use` statements of `src`: (is `pub use`, tree).
fn use_statements(src: &str) -> Vec<(bool, String)> {
    let mut out = vec![];
    let bytes = src.as_bytes();
    let mut from = 0;
    while let Some(at) = src[from..].find("use ").map(|a| a + from) {
        from = at + 4;
        let word_start = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !word_start {
            continue;
        }
        let Some(end) = src[at..].find(';') else { break };
        let before = src[..at].trim_end();
        let public = before.ends_with("pub") || before.ends_with(')') && before.rsplit("pub").next().is_some_and(|p| p.starts_with('('));
        out.push((public, src[at + 4..at + end].to_string()));
    }
    out
}

/// Inline paths that start with `crate`, `super` or `self`, or with one of `children`.
fn inline_paths(src: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut out = vec![];
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut k = 0;
    while k < chars.len() {
        let (at, c) = chars[k];
        let starts_word = is_ident(c) && (k == 0 || !is_ident(chars[k - 1].1) && chars[k - 1].1 != ':');
        if !starts_word {
            k += 1;
            continue;
        }
        let end = src[at..].find(|ch: char| !(is_ident(ch) || ch == ':')).map_or(src.len(), |e| at + e);
        let path = &src[at..end];
        let segs: Vec<String> = segments(path).filter(|s| s.chars().all(is_ident)).collect();
        if path.contains("::")
            && let Some(first) = segs.first()
            && (["crate", "super", "self"].contains(&first.as_str()) || children.contains(first))
        {
            out.push(segs);
        }
        k += src[at..end].chars().count().max(1);
    }
    out
}

struct Crate {
    modules: BTreeMap<Module, PathBuf>,
    /// (module, name) → the full path a `pub use` gives it.
    reexports: HashMap<(Module, String), Vec<String>>,
}

impl Crate {
    fn absolute(&self, m: &Module, path: &[String]) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut base: Vec<String> = match first.as_str() {
            "crate" => vec![],
            "super" => m[..m.len().saturating_sub(1)].to_vec(),
            "self" => m.clone(),
            child if self.modules.contains_key(&[m.clone(), vec![child.to_string()]].concat()) => {
                [m.clone(), vec![child.to_string()]].concat()
            }
            _ => return None, // an external crate or a local name
        };
        let mut rest = rest;
        while let Some(("super", more)) = rest.split_first().map(|(a, b)| (a.as_str(), b)) {
            base.pop();
            rest = more;
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The module `path` names: its deepest module, through re-exports.
    fn resolve(&self, mut path: Vec<String>) -> Option<Module> {
        for _ in 0..8 {
            let depth = (0..=path.len()).rev().find(|&d| self.modules.contains_key(&path[..d]))?;
            let module: Module = path[..depth].to_vec();
            match path.get(depth).and_then(|n| self.reexports.get(&(module.clone(), n.clone()))) {
                Some(target) if *target != path[..=depth] => path = [target.clone(), path[depth + 1..].to_vec()].concat(),
                _ => return Some(module),
            }
        }
        None
    }
}

/// Module → the modules it uses.
fn imports(root: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = modules(root);
    let sources: BTreeMap<Module, String> =
        modules.iter().map(|(m, p)| (m.clone(), without_test_modules(code_only(&std::fs::read_to_string(p).unwrap())))).collect();
    let mut krate = Crate { modules, reexports: HashMap::new() };
    let mut reexports = HashMap::new();
    for (m, src) in &sources {
        for (public, tree) in use_statements(src) {
            if !public {
                continue;
            }
            for path in use_paths(&tree) {
                let Some(last) = path.last().filter(|l| *l != "*" && *l != "self") else { continue };
                let full = krate.absolute(m, &path).unwrap_or_else(|| [m.clone(), path.clone()].concat());
                reexports.insert((m.clone(), last.clone()), full);
            }
        }
    }
    krate.reexports = reexports;
    let mut out = BTreeMap::new();
    for (m, src) in &sources {
        let children: BTreeSet<String> =
            krate.modules.keys().filter(|k| k.len() == m.len() + 1 && k.starts_with(m)).map(|k| k.last().unwrap().clone()).collect();
        let mut paths = vec![];
        let mut code = src.clone();
        for (public, tree) in use_statements(src) {
            if !public {
                paths.extend(use_paths(&tree));
            }
            // a `pub use` is the module's facade; its tree is not searched for inline paths either
            code = code.replacen(&format!("use {tree};"), "", 1);
        }
        paths.extend(inline_paths(&code, &children));
        let used: BTreeSet<Module> = paths
            .iter()
            .filter_map(|p| krate.absolute(m, p))
            .filter_map(|p| krate.resolve(p))
            .filter(|t| t != m && !t.is_empty())
            .collect();
        out.insert(m.clone(), used);
    }
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: HashMap<&'a Module, usize>,
        low: HashMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Module) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = t.g.get_key_value(w).map(|(k, _)| k).unwrap_or(w);
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = vec![];
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                scc.push(w.clone());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.out.push(scc);
            }
        }
    }
    let mut t = T { g: graph, index: HashMap::new(), low: HashMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// `src/` (or `CONVOFLOW_FLOORS_SRC`, to check another tree, e.g. an older checkout's).
fn src_root() -> PathBuf {
    std::env::var_os("CONVOFLOW_FLOORS_SRC").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = imports(&src_root());
    let found = cycles(&graph);
    let mut report = String::new();
    for scc in &found {
        let members: BTreeSet<&Module> = scc.iter().collect();
        report.push_str(&format!("circle: {}\n", scc.iter().map(name).collect::<Vec<_>>().join(", ")));
        for a in scc {
            for b in graph[a].iter().filter(|b| members.contains(b)) {
                report.push_str(&format!("    {} uses {}\n", name(a), name(b)));
            }
        }
    }
    assert!(found.is_empty(), "import circles among src/ modules:\n{report}");
    // the floors, lowest first: each module uses only modules on floors below its own
    let mut floor: BTreeMap<&Module, usize> = BTreeMap::new();
    while floor.len() < graph.len() {
        for (m, used) in &graph {
            if !floor.contains_key(m) && used.iter().all(|u| floor.contains_key(u) || !graph.contains_key(u)) {
                let f = used.iter().filter_map(|u| floor.get(u)).max().map_or(0, |f| f + 1);
                floor.insert(m, f);
            }
        }
    }
    let mut by_floor: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (m, f) in floor {
        by_floor.entry(f).or_default().push(name(m));
    }
    for (f, ms) in by_floor {
        println!("floor {f}: {}", ms.join(", "));
    }
}

/// The check itself finds what it must: a circle through a `use` tree, one through an inline
/// path and a re-export, and none through a `pub use` facade or a test module.
#[test]
fn the_check_finds_circles_through_use_trees_inline_paths_and_re_exports() {
    let dir = std::env::temp_dir().join(format!("convoflow-floors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n");
    write("a.rs", "use crate::{b::{self, Thing as T}, d};\n// use crate::c; (a comment)\nfn f() { let _ = \"crate::c::X\"; }\n");
    write("b.rs", "pub struct Thing;\nfn g() { crate::a::h(); }\n");
    write("c/mod.rs", "pub mod inner;\npub use inner::Deep;\n#[cfg(test)]\nmod tests { use crate::d::Up; }\n");
    write("c/inner.rs", "pub struct Deep;\nuse super::super::d::Up;\n");
    write("d.rs", "pub struct Up;\nfn k() { let _: crate::c::Deep; }\n");
    let graph = imports(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let m = |s: &str| -> Module { s.split("::").map(String::from).collect() };
    assert_eq!(graph[&m("a")], [m("b"), m("d")].into_iter().collect(), "comments and strings name nothing");
    assert_eq!(graph[&m("c")], BTreeSet::new(), "a pub use is a facade; a test module is left out");
    assert_eq!(graph[&m("d")], [m("c::inner")].into_iter().collect(), "a re-exported name is followed to its module");
    let mut found: Vec<Vec<String>> = cycles(&graph).into_iter().map(|c| {
        let mut names: Vec<String> = c.iter().map(name).collect();
        names.sort();
        names
    }).collect();
    found.sort();
    assert_eq!(found, vec![vec!["a".to_string(), "b".into()], vec!["c::inner".into(), "d".into()]]);
}
