//! The docs cannot drift: their links lead somewhere and their commands say what the binaries say.
//!
//! The documents are `README.md`, `ARCHITECTURE.md` and every chapter of the book, `docs/src/*.md`.
//!
//! - **Links.** Every relative link (outside code) names a file that exists, and an anchor `#...` names a
//!   heading of its target as mdBook and GitHub spell it: lowercase, letters, digits, `-` and `_` kept,
//!   spaces become `-`, everything else dropped, a repeated heading gets `-1`, `-2`, ... Every chapter in
//!   `docs/src/` is linked from `docs/src/SUMMARY.md`, so none is left out of the book.
//! - **Commands.** A ```` ```console ```` block is executed: each line that starts with `$ ` is a command
//!   of one of the workspace's binaries ([`BINARIES`], optionally after `NAME=value` settings), run from
//!   the repository root with no `SWITCHBOARD_*` or `RUST_LOG` variable of the caller, and the lines up to
//!   the next command are its output, stderr and stdout as a terminal shows them. A line that is just
//!   `...` stands for any number of lines; `...` inside a line stands for any text there. `$ echo $?`
//!   right after a command shows its exit status; without it the command must exit 0. The commands are
//!   ones that end by themselves (`--check`, `--help`, `--version`, a refused flag): one still running
//!   after [`COMMAND_TIMEOUT`] fails the test.

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The binaries a console block may run.
const BINARIES: &[&str] = &["controller", "dataplane", "agent", "loadgen"];

/// The longest a documented command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents, as paths relative to the root.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![PathBuf::from("README.md"), PathBuf::from("ARCHITECTURE.md")];
    docs.extend(chapters());
    docs
}

/// The book's chapters, `docs/src/*.md`, as paths relative to the root.
fn chapters() -> Vec<PathBuf> {
    let dir = root().join("docs/src");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| Path::new("docs/src").join(p.file_name().expect("file name")))
        .collect();
    found.sort();
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------------
// Markdown, as much of it as links and anchors need

/// Each line with whether it is inside a fenced code block (the fence lines count as inside).
fn lines_outside_code(text: &str) -> Vec<(usize, &str, bool)> {
    let mut fenced = false;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let fence = line.trim_start().starts_with("```");
            let inside = fenced || fence;
            if fence {
                fenced = !fenced;
            }
            (i + 1, line, inside)
        })
        .collect()
}

/// The anchor mdBook and GitHub give a heading's text.
fn slug(heading: &str) -> String {
    let mut out = String::new();
    for c in strip_markup(heading).trim().chars() {
        if c.is_alphanumeric() || c == '-' || c == '_' {
            out.extend(c.to_lowercase());
        } else if c == ' ' {
            out.push('-');
        }
    }
    out
}

/// A heading's text without link targets: `[text](target)` becomes `text`.
fn strip_markup(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("](") {
        let Some(close) = rest[open..].find(')') else { break };
        out.push_str(&rest[..open]);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// The anchors of a document's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line, code) in lines_outside_code(text) {
        if code {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// A line without its inline code spans.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        }
    }
    out
}

/// The link targets of a document, with their lines: `[text](target)` outside code.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line, code) in lines_outside_code(text) {
        if code {
            continue;
        }
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(open) = rest.find("](") {
            let after = &rest[open + 2..];
            let Some(close) = after.find(')') else { break };
            let target = after[..close].split_whitespace().next().unwrap_or("");
            found.push((number, target.trim_matches(['<', '>']).to_owned()));
            rest = &after[close..];
        }
    }
    found
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_of_the_docs_leads_somewhere() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            checked += 1;
            let (file, anchor) = target.split_once('#').map_or((target.as_str(), None), |(f, a)| (f, Some(a)));
            let path = if file.is_empty() {
                doc.clone()
            } else {
                normalize(&doc.parent().unwrap_or(Path::new("")).join(file))
            };
            let full = root().join(&path);
            if !full.exists() {
                broken.push(format!("{}:{line}: {target}: no file {}", doc.display(), path.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if path.extension().is_none_or(|e| e != "md") {
                broken.push(format!("{}:{line}: {target}: an anchor into a file that is not Markdown", doc.display()));
            } else if !anchors(&read(&path)).contains(anchor) {
                broken.push(format!(
                    "{}:{line}: {target}: no heading of {} makes #{anchor}",
                    doc.display(),
                    path.display()
                ));
            }
        }
    }
    assert!(checked > 50, "only {checked} relative links found: is the link parser broken?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_chapter_is_in_the_summary() {
    let summary = Path::new("docs/src/SUMMARY.md");
    let listed: BTreeSet<PathBuf> = links(&read(summary))
        .into_iter()
        .map(|(_, target)| normalize(&Path::new("docs/src").join(target.split('#').next().unwrap_or(""))))
        .collect();
    let missing: Vec<String> = chapters()
        .into_iter()
        .filter(|c| c != summary && !listed.contains(c))
        .map(|c| c.display().to_string())
        .collect();
    assert!(missing.is_empty(), "chapters missing from {}: {}", summary.display(), missing.join(", "));
}

/// The README and the introduction open with two commands; the second is the test command, a script that
/// runs `cargo test --workspace` after the set-up and counts the skips.
#[test]
fn the_second_command_shown_first_is_the_test_command() {
    for doc in ["README.md", "docs/src/introduction.md"] {
        let text = read(Path::new(doc));
        let block: Vec<&str> = text.split("```sh\n").nth(1).expect("a sh block").lines().take(2).collect();
        assert_eq!(block, ["cargo run --release --bin controller", "scripts/test.sh"], "{doc}");
    }
    let script = read(Path::new("scripts/test.sh"));
    for step in ["bash scripts/setup-test-deps.sh\n", "cargo test --workspace \"$@\"", "echo \"skipped: $skips\""] {
        assert!(script.contains(step), "scripts/test.sh does not run {step}");
    }
}

#[test]
fn the_slug_rules_are_mdbooks_and_githubs() {
    assert_eq!(slug(" The JSON channel"), "the-json-channel");
    assert_eq!(slug(" Flags of `agent`"), "flags-of-agent");
    assert_eq!(slug(" Metrics, dashboard and access logs"), "metrics-dashboard-and-access-logs");
    assert_eq!(slug(" Walkthrough: one machine"), "walkthrough-one-machine");
    let twice = anchors("# A\n## B\n```\n# not a heading\n```\n## B\n");
    assert_eq!(twice, ["a", "b", "b-1"].into_iter().map(String::from).collect());
}

// ---------------------------------------------------------------------------------------------------------
// Console blocks

/// One documented command: where it is, what it runs, and what it shows.
#[derive(Debug)]
struct Example {
    place: String,
    command: String,
    output: Vec<String>,
    status: i32,
}

/// The commands of a document's console blocks.
fn examples(doc: &Path, text: &str) -> Vec<Example> {
    let mut found: Vec<Example> = Vec::new();
    let mut in_console = false;
    let mut current: Option<Example> = None;
    let mut after_command = false;
    let mut indent = 0;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if !in_console {
            in_console = trimmed.starts_with("```console");
            indent = line.len() - trimmed.len();
            continue;
        }
        // A block inside a list item is indented like its fence.
        let line = line.get(indent..).filter(|_| line.starts_with(&" ".repeat(indent))).unwrap_or(trimmed);
        if trimmed.starts_with("```") {
            in_console = false;
            found.extend(current.take());
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            if command.trim() == "echo $?" {
                let example =
                    current.as_mut().unwrap_or_else(|| panic!("{}:{}: echo $? after no command", doc.display(), i + 1));
                assert!(example.status == 0 && after_command, "{}:{}: one echo $? per command", doc.display(), i + 1);
                after_command = false;
                continue;
            }
            found.extend(current.take());
            current = Some(Example {
                place: format!("{}:{}", doc.display(), i + 1),
                command: command.to_owned(),
                output: Vec::new(),
                status: 0,
            });
            after_command = true;
        } else if let Some(example) = current.as_mut() {
            if after_command {
                example.output.push(line.trim_end().to_owned());
            } else {
                let status = line
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}:{}: echo $? shows a number", doc.display(), i + 1));
                example.status = status;
            }
        } else {
            panic!("{}:{}: a console block starts with a `$ ` command", doc.display(), i + 1);
        }
    }
    found
}

/// A command line split into words as a shell would: spaces separate, quotes group.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut started = false;
    for c in command.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (Some(q), _) if c == q => quote = None,
            (None, ' ') => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            _ => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// Whether `line` matches `pattern`, where `...` stands for any text.
fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether the output lines match the shown ones, where a line `...` stands for any number of lines.
fn output_matches(shown: &[String], actual: &[String]) -> bool {
    match shown.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => (0..=actual.len()).any(|skip| output_matches(rest, &actual[skip..])),
        Some((first, rest)) => {
            actual.split_first().is_some_and(|(line, more)| line_matches(first, line) && output_matches(rest, more))
        }
    }
}

/// Runs a documented command: its output, stderr and stdout interleaved as written, and its exit status.
fn run(example: &Example, scratch: &Path) -> Result<(Vec<String>, i32), String> {
    let mut words = words(&example.command).into_iter().peekable();
    let mut settings = Vec::new();
    while let Some((name, value)) = words
        .peek()
        .and_then(|w| w.split_once('='))
        .filter(|(n, _)| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    {
        settings.push((name.to_owned(), value.to_owned()));
        words.next();
    }
    let program = words.next().ok_or("an empty command")?;
    if !BINARIES.contains(&program.as_str()) {
        return Err(format!("{program} is not one of the binaries a console block runs ({})", BINARIES.join(", ")));
    }
    let out = File::create(scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut command = Command::new(switchboard_tests::harness::bin(&program));
    command.args(words).current_dir(root()).stdin(Stdio::null()).stdout(out).stderr(err);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("SWITCHBOARD_") || key == "RUST_LOG" {
            command.env_remove(&*key);
        }
    }
    command.envs(settings);
    let mut child = command.spawn().map_err(|e| format!("starting {program}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(status) => status.map_err(|e| e.to_string())?,
        Err(_) => {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|e| e.to_string())?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(format!(
                "still running after {COMMAND_TIMEOUT:?}: a console block shows commands that end by themselves"
            ));
        }
    };
    let text = std::fs::read_to_string(scratch).map_err(|e| e.to_string())?;
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_owned()).collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    Ok((lines, status.code().unwrap_or(-1)))
}

#[test]
fn every_console_block_shows_what_its_command_prints() {
    let scratch = std::env::temp_dir().join(format!("switchboard-docs-{}.out", std::process::id()));
    let mut failures = Vec::new();
    let mut ran = 0;
    for doc in documents() {
        for example in examples(&doc, &read(&doc)) {
            ran += 1;
            match run(&example, &scratch) {
                Err(why) => failures.push(format!("{}: $ {}\n  {why}", example.place, example.command)),
                Ok((output, status)) => {
                    let mut shown = example.output.clone();
                    while shown.last().is_some_and(String::is_empty) {
                        shown.pop();
                    }
                    if status != example.status || !output_matches(&shown, &output) {
                        failures.push(format!(
                            "{}: $ {}\n--- shown (exit {}):\n{}\n--- printed (exit {status}):\n{}",
                            example.place,
                            example.command,
                            example.status,
                            shown.join("\n"),
                            output.join("\n")
                        ));
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&scratch);
    assert!(ran > 10, "only {ran} documented commands found: is the console block parser broken?");
    assert!(
        failures.is_empty(),
        "{} documented commands print something else:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn wildcards_stand_for_lines_and_text() {
    let lines = |s: &[&str]| s.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    assert!(output_matches(&lines(&["...", "configuration ok"]), &lines(&["INFO x", "configuration ok"])));
    assert!(output_matches(&lines(&["...", "configuration ok"]), &lines(&["configuration ok"])));
    assert!(!output_matches(&lines(&["configuration ok"]), &lines(&["configuration ok", "more"])));
    assert!(line_matches("agent 0.1.0 (commit ..., debug)", "agent 0.1.0 (commit ab26f19, debug)"));
    assert!(!line_matches("agent 0.1.0 (commit ..., debug)", "agent 0.2.0 (commit ab26f19, debug)"));
    assert_eq!(words(r#"A=b agent --check 'http:/x y' "z""#), ["A=b", "agent", "--check", "http:/x y", "z"]);
}
