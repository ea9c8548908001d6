//! `switchboard-assets DIR`: writes the man pages and the shell completions of `controller`, `dataplane`,
//! `agent` and `loadgen`, made from the same clap definitions the binaries parse their flags with, so they
//! cannot drift from `--help`:
//!
//! - `DIR/man/NAME.1`, plus `loadgen-SUBCOMMAND.1` for each of loadgen's subcommands;
//! - `DIR/completions/bash/NAME`, `DIR/completions/zsh/_NAME`, `DIR/completions/fish/NAME.fish`, named as
//!   bash-completion, zsh and fish look them up.
//!
//! scripts/package.sh runs it before `cargo deb`; it is not installed.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Command, CommandFactory, Parser};
use clap_complete::Shell;

/// Writes man pages and shell completions of the Switchboard binaries.
#[derive(Debug, Parser)]
#[command(name = "switchboard-assets", version = contract::build::VERSION, about)]
struct Args {
    /// Folder to write `man/` and `completions/` into (created if missing).
    dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match write_assets(&args.dir) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("switchboard-assets: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The command of each binary, as its `main` parses it.
fn commands() -> [Command; 4] {
    [controller::Cli::command(), dataplane::Cli::command(), agent::Cli::command(), loadgen::cli::Cli::command()]
}

/// Writes every page and completion under `dir`; returns the files written.
fn write_assets(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    fs::create_dir_all(&man)?;
    let names: Vec<String> = commands().iter().map(|cmd| cmd.get_name().to_owned()).collect();
    for cmd in commands() {
        let see_also: Vec<&str> = names.iter().map(String::as_str).filter(|name| *name != cmd.get_name()).collect();
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        write_man_pages(&cmd, &see_also, &man, &mut written)?;
    }
    for (shell, folder, file_name) in [
        (Shell::Bash, "bash", (|name| name.to_owned()) as fn(&str) -> String),
        (Shell::Zsh, "zsh", |name| format!("_{name}")),
        (Shell::Fish, "fish", |name| format!("{name}.fish")),
    ] {
        let folder = dir.join("completions").join(folder);
        fs::create_dir_all(&folder)?;
        for mut cmd in commands() {
            let name = cmd.get_name().to_owned();
            let path = folder.join(file_name(&name));
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut script);
            fs::write(&path, script)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The page of `cmd` (built, so subcommands carry display names like `loadgen-tcp`), ending with SEE ALSO
/// `see_also`, then one per visible subcommand, which refers to its parent's page.
fn write_man_pages(cmd: &Command, see_also: &[&str], man: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = man.join(page.get_filename());
    let mut out = Vec::new();
    page.render(&mut out)?;
    let refs: Vec<String> = see_also.iter().map(|name| format!("\\fB{name}\\fR(1)")).collect();
    writeln!(out, ".SH \"SEE ALSO\"\n{}", refs.join(", "))?;
    fs::write(&path, out)?;
    written.push(path);

    let own = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_owned();
    for sub in cmd.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_man_pages(sub, &[own.as_str()], man, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definitions_are_consistent() {
        for cmd in commands() {
            cmd.debug_assert();
        }
    }

    #[test]
    fn writes_a_page_and_three_completions_per_binary() {
        let dir = std::env::temp_dir().join(format!("switchboard-assets-{}", std::process::id()));
        let written = write_assets(&dir).unwrap();
        for name in ["controller", "dataplane", "agent", "loadgen"] {
            for file in [
                format!("man/{name}.1"),
                format!("completions/bash/{name}"),
                format!("completions/zsh/_{name}"),
                format!("completions/fish/{name}.fish"),
            ] {
                assert!(written.contains(&dir.join(&file)), "{file} not written");
            }
            let page = fs::read_to_string(dir.join(format!("man/{name}.1"))).unwrap();
            assert!(page.contains(contract::build::PKG_VERSION), "{name}.1 names no version");
            assert!(page.contains(".SH \"SEE ALSO\""), "{name}.1 has no SEE ALSO");
        }
        let controller = fs::read_to_string(dir.join("man/controller.1")).unwrap();
        assert!(controller.contains("SWITCHBOARD_JSON_LISTEN"), "the environment overrides are on the page");
        assert!(written.iter().any(|f| f.ends_with("loadgen-serve.1")), "{written:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
