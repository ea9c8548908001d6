//! No import circle between the modules of a crate.
//!
//! For every crate of the workspace (the `members` of the root `Cargo.toml`), each crate root in its
//! `src/` (`lib.rs`, and `main.rs` when it declares modules of its own) gives a graph: one node per
//! top-level module (a folder module is one node, whatever its children do among themselves), one for the
//! root file itself, and an edge from A to B when a file of A names B: `use crate::b::…`, a path
//! `crate::b::X` anywhere, `super::b` resolved from where it stands, and in the root file a plain `b::…`.
//! Comments, strings and `$crate` do not count; `#[cfg(test)]` modules do (they compile too). A path to
//! an item of the root file goes to the module that item is re-exported from, if it is one.
//!
//! A strongly connected part of more than one node is a circle: it is printed with the files and lines
//! of every edge on one cycle through it, and a circle in any crate fails the test.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// The name of a crate root's node.
const ROOT: &str = "(crate root)";

/// What a name of the root brought from outside the crate maps to: no node.
const EXTERN: &str = "";

// ---------------------------------------------------------------------------------------------------------
// Tokens

/// One token of Rust source with its line: identifiers, `::`, and single punctuation characters.
/// Comments, string, char and number literals are dropped.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(&chars, i) {
            // r"…", r#"…"#, br#"…"#: up to a quote followed by as many hashes.
            i = chars[i..].iter().position(|&c| c == '"').map_or(chars.len(), |p| i + p + 1);
            while i < chars.len() && !(chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
            i += 1 + hashes;
        } else if c == '"' || (c == 'b' && at(i + 1) == '"') {
            i += if c == 'b' { 2 } else { 1 };
            while i < chars.len() && chars[i] != '"' {
                let escaped = chars[i] == '\\';
                line += usize::from(chars[i] == '\n' || (escaped && at(i + 1) == '\n'));
                i += if escaped { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            let start = if c == 'b' { i + 1 } else { i };
            if at(start + 1) == '\\' {
                // An escaped char: up to the closing quote.
                i = start + 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(start + 2) == '\'' {
                i = start + 3;
            } else {
                // A lifetime or a label: its name follows as an identifier.
                i = start + 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = if c == 'r' && at(i + 1) == '#' { i + 2 } else { i };
            i = start;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token { text: chars[start..i].iter().collect(), line });
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token { text: "::".into(), line });
            i += 2;
        } else {
            out.push(Token { text: c.to_string(), line });
            i += 1;
        }
    }
    out
}

/// The number of hashes of a raw string starting at `i`, if one does.
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    let after_prefix = match (chars.get(i), chars.get(i + 1)) {
        (Some('r'), _) => i + 1,
        (Some('b'), Some('r')) => i + 2,
        _ => return None,
    };
    if i > 0 && chars.get(i - 1).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
        return None;
    }
    let hashes = chars[after_prefix..].iter().take_while(|&&c| c == '#').count();
    (chars.get(after_prefix + hashes) == Some(&'"')).then_some(hashes)
}

// ---------------------------------------------------------------------------------------------------------
// References

/// A reference from a file to a top-level module (or to the root), with where it stands.
#[derive(Debug, Clone, PartialEq)]
struct Reference {
    to: String,
    line: usize,
}

/// What a crate root declares: its top-level modules, and which module each re-exported name comes from.
#[derive(Debug, Default)]
struct Root {
    modules: BTreeSet<String>,
    reexports: BTreeMap<String, String>,
}

impl Root {
    fn of(source: &str) -> Root {
        let toks = tokens(source);
        let mut root = Root::default();
        let mut depth = 0usize;
        for (i, t) in toks.iter().enumerate() {
            match t.text.as_str() {
                "{" => depth += 1,
                "}" => depth = depth.saturating_sub(1),
                "mod" if depth == 0 => {
                    if let Some(name) = toks.get(i + 1) {
                        root.modules.insert(name.text.clone());
                    }
                }
                _ => {}
            }
        }
        // `use m::{A, B as C}` and `pub use self::m::A`: each name to its module.
        for (i, t) in toks.iter().enumerate() {
            if t.text != "use" {
                continue;
            }
            let mut j = i + 1;
            if toks.get(j).is_some_and(|t| t.text == "self" || t.text == "crate") {
                j += 2;
            }
            // A name brought from outside the crate (`pub use contract::check`) is no module of it.
            let module = toks.get(j).map(|t| t.text.clone()).filter(|m| root.modules.contains(m));
            let module = module.unwrap_or_else(|| EXTERN.to_owned());
            for k in j + 1..toks.len() {
                match toks[k].text.as_str() {
                    ";" => break,
                    "as" => {
                        if let Some(alias) = toks.get(k + 1) {
                            root.reexports.insert(alias.text.clone(), module.clone());
                        }
                    }
                    name if is_ident(name) && !matches!(name, "self" | "super" | "crate") => {
                        let next = toks.get(k + 1).map_or("", |t| t.text.as_str());
                        if next != "::" && next != "as" {
                            root.reexports.insert(name.to_owned(), module.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        root
    }

    /// The node of the root-level name `name`; none for a name brought from outside the crate.
    fn node_of(&self, name: &str) -> Option<String> {
        if self.modules.contains(name) {
            return Some(name.to_owned());
        }
        match self.reexports.get(name) {
            Some(module) if module == EXTERN => None,
            Some(module) => Some(module.clone()),
            None => Some(ROOT.to_owned()),
        }
    }
}

fn is_ident(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// The references of one file at module path `module` (`[]` for the root file, `["a", "b"]` for
/// `src/a/b.rs`), each resolved to a top-level node.
fn references(source: &str, module: &[String], root: &Root) -> Vec<Reference> {
    let toks = tokens(source);
    let text = |i: usize| toks.get(i).map_or("", |t| t.text.as_str());
    // Inline modules (`mod tests { … }`) open at a brace depth; `super` inside them is relative to them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = text(i);
        let follows_path = i > 0 && matches!(text(i - 1), "::" | "$");
        match t {
            "{" => {
                if text(i.wrapping_sub(2)) == "mod" && i >= 2 {
                    inline.push((text(i - 1).to_owned(), depth));
                }
                depth += 1;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
            }
            "crate" | "super" | "self" if !follows_path && text(i + 1) == "::" => {
                let mut base: Vec<String> = match t {
                    "crate" => Vec::new(),
                    _ => module.iter().cloned().chain(inline.iter().map(|(m, _)| m.clone())).collect(),
                };
                if t == "super" {
                    base.pop();
                }
                let mut j = i + 2;
                while text(j) == "super" && text(j + 1) == "::" {
                    base.pop();
                    j += 2;
                }
                if let Some(first) = base.first() {
                    out.push(Reference { to: first.clone(), line: toks[i].line });
                } else {
                    for (name, line) in first_segments(&toks, j) {
                        if let Some(to) = root.node_of(&name) {
                            out.push(Reference { to, line });
                        }
                    }
                }
                i = j;
                continue;
            }
            name if module.is_empty() && !follows_path && root.modules.contains(name) && text(i + 1) == "::" => {
                out.push(Reference { to: name.to_owned(), line: toks[i].line });
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The first segment of each path at `j`, with its line: one name, or each entry of a `{ … }` group
/// (`*` and `self` name the root).
fn first_segments(toks: &[Token], j: usize) -> Vec<(String, usize)> {
    let text = |i: usize| toks.get(i).map_or("", |t| t.text.as_str());
    let line = |i: usize| toks.get(i).or(toks.last()).map_or(0, |t| t.line);
    if text(j) != "{" {
        let name = if is_ident(text(j)) { text(j) } else { "self" };
        return vec![(name.to_owned(), line(j))];
    }
    let mut names = Vec::new();
    let mut depth = 0;
    let mut expect = true;
    for k in j..toks.len() {
        match text(k) {
            "{" => {
                depth += 1;
                expect = depth == 1;
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => expect = true,
            name if expect && depth == 1 => {
                names.push((if is_ident(name) { name } else { "self" }.to_owned(), line(k)));
                expect = false;
            }
            _ => {}
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------------------
// The graph

/// The edges of one crate root: (from, to) → the first (file, line) that makes it.
type Edges = BTreeMap<(String, String), (String, usize)>;

/// Reads the crate root `root_file` and the files of its modules under `src`; its edges.
fn crate_edges(files: &BTreeMap<PathBuf, String>, root_file: &Path) -> Edges {
    let root = Root::of(&files[root_file]);
    let mut edges = Edges::new();
    for (path, source) in files {
        let module: Vec<String> = if path == root_file {
            Vec::new()
        } else {
            let mut parts: Vec<String> = path.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if let Some(last) = parts.last_mut() {
                *last = last.trim_end_matches(".rs").to_owned();
            }
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts.first().is_none_or(|m| !root.modules.contains(m)) {
                continue;
            }
            parts
        };
        let from = module.first().cloned().unwrap_or_else(|| ROOT.to_owned());
        for reference in references(source, &module, &root) {
            if reference.to != from {
                let key = (from.clone(), reference.to);
                edges.entry(key).or_insert_with(|| (path.display().to_string(), reference.line));
            }
        }
    }
    edges
}

/// The circles of `edges`: each strongly connected part of more than one node, as a shortest cycle from
/// its first node, then (when there are more) every edge among its nodes, each with its file and line.
fn circles<'a>(edges: &'a Edges) -> Vec<String> {
    let mut next: BTreeMap<&'a str, Vec<&'a str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
        next.entry(to).or_default();
    }
    let reach = |start: &'a str| {
        let mut seen = BTreeSet::from([start]);
        let mut todo = vec![start];
        while let Some(n) = todo.pop() {
            for &m in &next[n] {
                if seen.insert(m) {
                    todo.push(m);
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&str, BTreeSet<&str>> = next.keys().map(|&n| (n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for &n in next.keys() {
        if done.contains(n) {
            continue;
        }
        let part: Vec<&str> = reachable[n].iter().copied().filter(|m| reachable[m].contains(n)).collect();
        done.extend(part.iter().copied());
        if part.len() < 2 {
            continue;
        }
        // A shortest way back to `n`, breadth first.
        let mut from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([n]);
        'search: while let Some(a) = queue.pop_front() {
            for &b in &next[a] {
                if b == n {
                    from.insert(n, a);
                    break 'search;
                }
                if !from.contains_key(b) && part.contains(&b) {
                    from.insert(b, a);
                    queue.push_back(b);
                }
            }
        }
        let mut cycle = vec![n];
        let mut at = from[n];
        while at != n {
            cycle.push(at);
            at = from[at];
        }
        cycle.reverse();
        cycle.rotate_right(1);
        let mut text = format!("circle among {}:", part.join(", "));
        for (k, &a) in cycle.iter().enumerate() {
            let b = cycle[(k + 1) % cycle.len()];
            let (file, line) = &edges[&(a.to_owned(), b.to_owned())];
            let _ = write!(text, "\n    {a} -> {b} ({file}:{line})");
        }
        let inside: Vec<_> =
            edges.iter().filter(|((a, b), _)| part.contains(&a.as_str()) && part.contains(&b.as_str())).collect();
        if inside.len() > cycle.len() {
            text.push_str("\n  every edge among them:");
            for ((a, b), (file, line)) in inside {
                let _ = write!(text, "\n    {a} -> {b} ({file}:{line})");
            }
        }
        out.push(text);
    }
    out
}

/// The circles of the crate in folder `member` of `workspace` (its `src/`), each root's in turn.
fn crate_circles(workspace: &Path, member: &str) -> Vec<String> {
    let src = workspace.join(member).join("src");
    let mut files = BTreeMap::new();
    read_rs(&src, &src, &mut files);
    let mut out = Vec::new();
    for root in ["lib.rs", "main.rs"].map(PathBuf::from) {
        if !files.contains_key(&root) {
            continue;
        }
        for circle in circles(&crate_edges(&files, &root)) {
            out.push(format!("{member}/src/{}: {circle}", root.display()));
        }
    }
    out
}

fn read_rs(dir: &Path, src: &Path, files: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            read_rs(&path, src, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            files.insert(path.strip_prefix(src).unwrap_or(&path).to_path_buf(), text);
        }
    }
}

/// The workspace's member folders, from the `members = [...]` of its `Cargo.toml`.
fn members(workspace: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace.join("Cargo.toml")).expect("the workspace's Cargo.toml");
    let line = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("a members line");
    line.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn no_import_circle_between_the_modules_of_a_crate() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf();
    let members = members(&workspace);
    assert!(members.iter().any(|m| m == "controller"), "the members line was not read: {members:?}");
    let failures: Vec<String> = members.iter().flat_map(|member| crate_circles(&workspace, member)).collect();
    assert!(failures.is_empty(), "import circles:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------------------
// The checker on small crates

fn edges_of(files: &[(&str, &str)]) -> Vec<(String, String)> {
    let files: BTreeMap<PathBuf, String> = files.iter().map(|&(p, s)| (PathBuf::from(p), s.to_owned())).collect();
    crate_edges(&files, Path::new("lib.rs")).into_keys().collect()
}

fn edge(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

#[test]
fn paths_of_every_form_are_edges_and_comments_strings_and_macros_are_not() {
    let lib = "pub mod a; pub mod b; pub mod c; pub mod d; mod e;\nuse a::X;\npub use c::{Thing, Other as Renamed};\n\
               pub use other_crate::check;";
    let a = r##"
        use crate::{b::One, c};
        // crate::d::Nothing in a comment
        /* crate::d::Nothing /* nested */ crate::d::Nothing */
        const S: &str = "crate::d::Nothing";
        const R: &str = r#"crate::d::"Nothing"#;
        const C: char = '"'; fn f<'a>(x: &'a str) -> crate::e::T { super::Renamed::new() }
        macro_rules! m { () => { $crate::d::X } }
        mod tests { use super::*; use super::super::Thing; }
        use crate::check::Check;
    "##;
    let edges = edges_of(&[
        ("lib.rs", lib),
        ("a.rs", a),
        ("b/mod.rs", "mod x; use self::x::Y;"),
        ("b/x.rs", "use super::super::d::Y;"),
    ]);
    assert_eq!(
        edges,
        [edge(ROOT, "a"), edge(ROOT, "c"), edge("a", "b"), edge("a", "c"), edge("a", "e"), edge("b", "d")],
        "a child naming its parent (b/x.rs -> b) is no edge; re-exports of the root lead to their module"
    );
}

#[test]
fn a_circle_is_found_with_its_files_and_a_child_naming_its_parent_is_none() {
    let files = [
        ("lib.rs", "mod a; mod b; mod c; mod d;"),
        ("a.rs", "use crate::b::B;"),
        ("b/mod.rs", "mod inner; pub struct B;"),
        ("b/inner.rs", "fn f() -> crate::c::C { todo!() }\nuse super::B;"),
        ("c.rs", "pub struct C; fn g(_: crate::a::A) {}"),
        ("d.rs", "use crate::a::A;"),
    ];
    let files: BTreeMap<PathBuf, String> = files.iter().map(|&(p, s)| (PathBuf::from(p), s.to_owned())).collect();
    let found = circles(&crate_edges(&files, Path::new("lib.rs")));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("circle among a, b, c:"), "{}", found[0]);
    for step in ["a -> b (a.rs:1)", "b -> c (b/inner.rs:1)", "c -> a (c.rs:1)"] {
        assert!(found[0].contains(step), "{step} in {}", found[0]);
    }

    let leaf =
        [("lib.rs", "mod a; mod b;"), ("a/mod.rs", "mod x;"), ("a/x.rs", "use super::super::b::B;"), ("b.rs", "")];
    let files: BTreeMap<PathBuf, String> = leaf.iter().map(|&(p, s)| (PathBuf::from(p), s.to_owned())).collect();
    assert!(circles(&crate_edges(&files, Path::new("lib.rs"))).is_empty());
}

#[test]
fn a_module_that_uses_an_item_of_the_root_that_uses_it_is_a_circle() {
    let files = [("lib.rs", "mod a;\npub struct Config;\nfn run() { a::go() }"), ("a.rs", "use crate::Config;")];
    let files: BTreeMap<PathBuf, String> = files.iter().map(|&(p, s)| (PathBuf::from(p), s.to_owned())).collect();
    let found = circles(&crate_edges(&files, Path::new("lib.rs")));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("a -> (crate root) (a.rs:1)"), "{}", found[0]);
}
