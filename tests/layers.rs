//! The modules of `src/` form layers: no module imports, directly or through others, a module that imports it.
//!
//! Reads every `.rs` file under `src/`, blanks its comments and string and char literals, drops the items under
//! `#[cfg(test)]` (a module's unit tests may reach anywhere), and collects every path it uses: `crate::` and
//! `super::` paths (in `use` lines, nested `{..}` groups, and inline ones such as `crate::shutdown::Shutdown::new()`),
//! `self::` paths, and paths through a child module (`pub use holder::Token` in `auth/mod.rs`). Each path maps
//! to the longest module it names, so `crate::auth::TokenHolder` is an edge to `auth`, and `auth` has its own
//! edge to `auth::holder` through its re-export. Then it looks for cycles twice:
//!
//! - among files (`auth::renewer` and `metrics` are two nodes);
//! - among the top-level modules, each folder one node (`auth::renewer -> metrics -> auth::client` is the
//!   circle `auth -> metrics -> auth`).
//!
//! `lib.rs` and `main.rs`, the roots that declare and wire everything, are left out, as are `tests.rs` files
//! (a module's unit tests in a file of their own).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Module path (`auth::renewer`) of every source file, from its place under `src/`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    if parts.is_empty() || parts == ["lib"] || parts == ["main"] || parts.last().is_some_and(|l| l == "tests") {
        return None;
    }
    Some(parts.join("::"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` with comments, string literals (plain, byte, raw) and char literals replaced by spaces, so neither a
/// doc link nor a message such as `"see crate::x"` counts as an import, and braces in them do not count either.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|c| *c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            // Block comments nest in Rust.
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"..", r#".."#, br#".."#: ends at a quote followed by as many `#`.
            let open = rest.iter().position(|c| *c == b'"').unwrap_or(0) + 1;
            let mut close = "\"".to_string();
            close.push_str(&"#".repeat(hashes));
            let end = text[i + open..]
                .find(&close)
                .map_or(b.len(), |p| i + open + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"') or a lifetime ('a): a literal closes within a few bytes.
            let len = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|c| *c == b'\'').map(|p| p + 3)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            match len {
                Some(len) => {
                    blank(&mut out, i, i + len);
                    i += len;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

/// `Some(number of #)` when `rest` starts a raw string literal (`r"`, `r#"`, `br"`, ...).
fn raw_string_start(rest: &[u8]) -> Option<usize> {
    let after = rest.strip_prefix(b"br").or_else(|| rest.strip_prefix(b"r"))?;
    let hashes = after.iter().take_while(|c| **c == b'#').count();
    (after.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// `code` without the items marked `#[cfg(test)]`: the attribute and the item after it, up to its `;` or its
/// matching closing brace.
fn without_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(brace)) if semi < brace => semi + 1,
            (Some(semi), None) => semi + 1,
            (_, Some(brace)) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (k, c) in item[brace..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = brace + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Whether `code[..at]` ends in a character that would make `code[at..]` the middle of a longer name or path
/// (`foo_crate::`, `x::super::`, `$crate::`).
fn continues_something(code: &str, at: usize) -> bool {
    let touching = code[..at].chars().last();
    touching.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') || code[..at].trim_end().ends_with("::")
}

/// The identifier at the start of `s` (after white space), and what follows it.
fn ident(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

/// Expands the use tree (or inline path) at the start of `s`, below the absolute path `base`, into `out`:
/// `a::b::{c, d::{e, f}}` gives `base::a::b::c`, `base::a::b::d::e`, `base::a::b::d::f`.
fn expand(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = base;
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        if let Some(group) = trimmed.strip_prefix('{') {
            let mut depth = 1usize;
            let mut start = 0;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        expand(&group[start..k], path.clone(), out);
                        start = k + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        match ident(trimmed) {
            // `self` inside a group (`use crate::auth::{self, holder}`) names the module itself.
            Some(("self", after)) => rest = after,
            Some((name, after)) => {
                path.push(name.to_owned());
                rest = after;
            }
            None => break,
        }
        match rest.trim_start().strip_prefix("::") {
            Some(after) => rest = after,
            None => break,
        }
    }
    out.push(path);
}

/// Every path `code` (of module `me`, whose child modules are `children`) uses, as absolute segment lists.
fn paths_in(code: &str, me: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let me_segs: Vec<String> = me.split("::").map(str::to_owned).collect();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(found) = code[at..].find(|c: char| c.is_alphabetic() || c == '_') {
        let start = at + found;
        let Some((name, after)) = ident(&code[start..]) else {
            break;
        };
        at = start + name.len();
        let Some(tail) = after.trim_start().strip_prefix("::") else {
            continue;
        };
        if continues_something(code, start) {
            continue;
        }
        let base = match name {
            "crate" => Vec::new(),
            "self" => me_segs.clone(),
            "super" => {
                // `super::super::x`: one level up per `super`.
                let mut base = me_segs.clone();
                base.pop();
                let mut tail = tail;
                while let Some(("super", after)) = ident(tail) {
                    let Some(next) = after.trim_start().strip_prefix("::") else {
                        break;
                    };
                    base.pop();
                    tail = next;
                }
                expand(tail, base, &mut out);
                at = code.len() - tail.len();
                continue;
            }
            child if children.contains(child) => {
                let mut base = me_segs.clone();
                base.push(child.to_owned());
                base
            }
            _ => continue,
        };
        expand(tail, base, &mut out);
    }
    out
}

/// The longest known module that `path` starts with.
fn resolve(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// The import graph among the modules whose sources are given as (module, text).
fn graph(sources: &[(String, String)]) -> Graph {
    let modules: BTreeSet<String> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut edges = Graph::new();
    for (me, text) in sources {
        let code = without_test_items(&code_only(text));
        let prefix = format!("{me}::");
        let children: BTreeSet<String> = modules
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix))
            .filter(|c| !c.contains("::"))
            .map(str::to_owned)
            .collect();
        for path in paths_in(&code, me, &children) {
            if let Some(target) = resolve(&path, &modules) {
                if &target != me {
                    edges.entry(me.clone()).or_default().insert(target);
                }
            }
        }
    }
    edges
}

/// The same graph with every module folded into its top-level module; edges inside one folder dropped.
fn top_level(edges: &Graph) -> Graph {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut out = Graph::new();
    for (from, tos) in edges {
        for to in tos {
            if top(from) != top(to) {
                out.entry(top(from)).or_default().insert(top(to));
            }
        }
    }
    out
}

/// One path from `from` to `to` (a cycle when they are the same), by breadth-first search.
fn path(edges: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut came: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from.to_owned()]);
    while let Some(m) = queue.pop_front() {
        for next in edges.get(&m).into_iter().flatten() {
            if next == to {
                let mut path = vec![to.to_owned(), m.clone()];
                let mut at = m.clone();
                while at != from {
                    at = came[&at].clone();
                    path.push(at.clone());
                }
                path.reverse();
                return Some(path);
            }
            if next != from && !came.contains_key(next) {
                came.insert(next.clone(), m.clone());
                queue.push_back(next.clone());
            }
        }
    }
    None
}

/// Every circle in `edges`, one line each: the modules that reach one another, and one cycle through them.
fn cycles(edges: &Graph) -> Vec<String> {
    let nodes: BTreeSet<&String> = edges.keys().chain(edges.values().flatten()).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut found = Vec::new();
    for n in nodes {
        if seen.contains(n.as_str()) {
            continue;
        }
        let Some(cycle) = path(edges, n, n) else {
            continue;
        };
        // The whole strongly connected component: every module on a cycle through `n`.
        let component: Vec<String> = edges
            .keys()
            .chain(edges.values().flatten())
            .filter(|m| path(edges, n, m).is_some() && path(edges, m, n).is_some())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        seen.extend(component.iter().cloned());
        found.push(format!(
            "{} (circle among {})",
            cycle.join(" -> "),
            component.join(", ")
        ));
    }
    found
}

fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    all.iter()
        .filter_map(|f| module_of(&src, f).map(|m| (m, std::fs::read_to_string(f).expect("read source"))))
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let edges = graph(&sources());
    assert!(
        edges.values().map(BTreeSet::len).sum::<usize>() > 20,
        "the scan found too few imports to be right: {edges:#?}"
    );
    let mut problems = cycles(&edges);
    problems.extend(cycles(&top_level(&edges)).into_iter().map(|c| format!("folders: {c}")));
    assert!(problems.is_empty(), "import circles:\n{}", problems.join("\n"));
}

/// The scanner itself, on sources written to hold every form it must see (and some it must not).
#[test]
fn the_scan_sees_every_form_of_path_and_finds_circles() {
    let src = |m: &str, t: &str| (m.to_owned(), t.to_owned());
    let sources = [
        src(
            "server",
            "use crate::{a::{b::X, c}, d};\nfn f() { crate::e::run(); }\n// crate::x::f\n\
             const S: &str = \"crate::y::z\"; const R: &str = r#\"crate::y\"#; const C: char = '{';\n\
             #[cfg(test)]\nmod tests { use crate::z::W; }\nfn after() { super::g::h(); }",
        ),
        src("a::b", "use super::super::k::K;\n"),
        src("a", "pub use b::X;\nuse self::c::Y;"),
        src("a::c", ""),
        src("d", ""),
        src("e", ""),
        src("g", ""),
        src("k", "fn f<'a>(x: &'a str) { let _ = '}'; }"),
        src("x", ""),
        src("y", ""),
        src("z", ""),
    ];
    let edges = graph(&sources);
    let of = |m: &str| edges.get(m).cloned().unwrap_or_default();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(of("server"), set(&["a::b", "a::c", "d", "e", "g"]), "{edges:#?}");
    assert_eq!(of("a::b"), set(&["k"]));
    assert_eq!(of("a"), set(&["a::b", "a::c"]));
    assert!(cycles(&edges).is_empty(), "{:?}", cycles(&edges));

    // `k` importing `server` closes server -> a::b -> k -> server.
    let mut with_cycle = sources.to_vec();
    with_cycle[7] = src("k", "fn f() { crate::server::serve(); }");
    let found = cycles(&graph(&with_cycle));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("a::b -> k -> server -> a::b"), "{found:?}");
    assert!(found[0].ends_with("(circle among a::b, k, server)"), "{found:?}");

    // A circle only between folders: a::c -> d and d -> a::b.
    let mut folders = sources.to_vec();
    folders[3] = src("a::c", "use crate::d::D;");
    folders[4] = src("d", "use crate::a::b::X;");
    let edges = graph(&folders);
    assert!(cycles(&edges).is_empty(), "{:?}", cycles(&edges));
    let found = cycles(&top_level(&edges));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("a -> d -> a"), "{found:?}");
}
