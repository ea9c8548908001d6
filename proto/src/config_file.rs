//! `--config PATH`: a TOML file for the binaries that run for long (`controller`, `dataplane`). Its
//! top-level keys are the binary's long flags without the dashes (`json-listen = "0.0.0.0:8080"`,
//! `print-state = true`, `allowed-ports = "80,443"`); its tables are sections the binary reads itself (the
//! controller's `[[service]]`). What decides a setting, first to last: the command line, the environment,
//! the file, the default. So a unit file can keep the file and still override one flag.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    path::{Path, PathBuf},
};

use clap::{ArgAction, CommandFactory, FromArgMatches};
use serde::de::DeserializeOwned;

/// The environment variable that names the file when `--config` is not given.
pub const ENV: &str = "SWITCHBOARD_CONFIG";

/// Largest configuration file read: a file that is not a configuration is refused before it is parsed.
const FILE_MAX: u64 = 4 << 20;

/// What is wrong with a configuration file. Each message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigFileError {
    /// It cannot be read.
    #[error("cannot read {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        why: String,
    },
    /// It is not TOML, or a value does not fit its setting.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What and where.
        message: String,
    },
}

/// Why the flags and the file together are no configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A flag on the command line (or in the environment) is wrong: clap prints it and exits 2.
    #[error(transparent)]
    Flags(#[from] clap::Error),
    /// The file is wrong.
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// A configuration file as read.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    table: toml::Table,
}

// === impl ConfigFile ===

impl ConfigFile {
    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigFileError> {
        let read = |e: std::io::Error| ConfigFileError::Read { path: path.to_owned(), why: e.to_string() };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > FILE_MAX {
            return Err(ConfigFileError::Invalid {
                path: path.to_owned(),
                message: format!("{size} bytes; a configuration file has at most {FILE_MAX}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(path, &text)
    }

    /// Parses `text` as the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigFileError> {
        let table = text.parse::<toml::Table>().map_err(|e| ConfigFileError::Invalid {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        // An empty file is far more likely a write caught halfway or a wrong path than a wish to remove
        // every static service: refused like any other bad file.
        if table.is_empty() {
            return Err(ConfigFileError::Invalid {
                path: path.to_owned(),
                message: "the file holds no setting and no section (an empty file is refused, not applied)".into(),
            });
        }
        Ok(ConfigFile { path: path.to_owned(), table })
    }

    /// The section `name` (a table or an array of tables), deserialised; `None` when the file has none.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ConfigFileError> {
        let Some(value) = self.table.get(name) else { return Ok(None) };
        value
            .clone()
            .try_into()
            .map(Some)
            .map_err(|e: toml::de::Error| self.invalid(format!("[{name}]: {}", e.message())))
    }

    /// The flags the file's settings stand for, as arguments of `command` to put before the command line
    /// `given`. A setting whose flag is on that command line, or whose environment variable is set, is left
    /// out (they win). Keys in `sections` are not flags; any other key must be one of `command`'s long flags.
    pub fn flag_args(
        &self,
        command: &clap::Command,
        sections: &[&str],
        given: &[OsString],
    ) -> Result<Vec<OsString>, ConfigFileError> {
        let mut args = Vec::new();
        for (key, value) in self.settings(sections) {
            let flag = key.replace('_', "-");
            let arg = command
                .get_arguments()
                .find(|a| {
                    a.get_long() == Some(flag.as_str()) && !matches!(flag.as_str(), "config" | "help" | "version")
                })
                .ok_or_else(|| self.unknown(key, command, sections))?;
            let on_command_line = given.iter().filter_map(|g| g.to_str()).any(|g| {
                g.strip_prefix("--")
                    .and_then(|g| g.strip_prefix(flag.as_str()))
                    .is_some_and(|r| r.is_empty() || r.starts_with('='))
            });
            if on_command_line || arg.get_env().is_some_and(|env| std::env::var_os(env).is_some()) {
                continue;
            }
            let bad = |what: &str| self.invalid(format!("{key}: {what}"));
            match (arg.get_action(), value) {
                (ArgAction::SetTrue, toml::Value::Boolean(true)) => args.push(OsString::from(format!("--{flag}"))),
                (ArgAction::SetTrue, toml::Value::Boolean(false)) => {}
                (ArgAction::SetTrue, _) => return Err(bad("is a switch: true or false")),
                (ArgAction::Append, toml::Value::Array(items)) => {
                    for item in items {
                        args.push(OsString::from(format!(
                            "--{flag}={}",
                            scalar(item).ok_or_else(|| bad("a list of values"))?
                        )));
                    }
                }
                (_, toml::Value::Array(items)) => {
                    let items: Option<Vec<String>> = items.iter().map(scalar).collect();
                    let items = items.ok_or_else(|| bad("a list of plain values"))?;
                    args.push(OsString::from(format!("--{flag}={}", items.join(","))));
                }
                (_, value) => args.push(OsString::from(format!(
                    "--{flag}={}",
                    scalar(value).ok_or_else(|| bad("not a plain value"))?
                ))),
            }
        }
        Ok(args)
    }

    /// The flag settings (not sections) that differ between this file and `newer`: what a reload cannot
    /// apply to a running process.
    pub fn changed_settings(&self, newer: &ConfigFile, sections: &[&str]) -> Vec<String> {
        let old: Vec<_> = self.settings(sections).collect();
        let new: Vec<_> = newer.settings(sections).collect();
        let mut keys: Vec<String> = old
            .iter()
            .filter(|(k, v)| !new.contains(&(*k, *v)))
            .chain(new.iter().filter(|(k, v)| !old.contains(&(*k, *v))))
            .map(|(k, _)| (*k).to_owned())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn settings<'a>(&'a self, sections: &'a [&str]) -> impl Iterator<Item = (&'a str, &'a toml::Value)> + 'a {
        self.table.iter().filter(|(k, _)| !sections.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v))
    }

    fn unknown(&self, key: &str, command: &clap::Command, sections: &[&str]) -> ConfigFileError {
        let near = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .chain(sections.iter().copied())
            .min_by_key(|long| distance(long, key))
            .filter(|long| distance(long, key) <= 3);
        let hint = match near {
            Some(near) => format!("; did you mean {near:?}?"),
            None => String::new(),
        };
        self.invalid(format!(
            "unknown setting {key:?}{hint} Settings are the long flags of `{} --help` without the dashes{}",
            command.get_name(),
            if sections.is_empty() { String::new() } else { format!(", and the sections {sections:?}") }
        ))
    }

    /// An error about this file.
    pub fn invalid(&self, message: impl fmt::Display) -> ConfigFileError {
        ConfigFileError::Invalid { path: self.path.clone(), message: message.to_string() }
    }
}

/// Parses `C` from `args` (the program name first), with the settings of the `--config` file (or the file
/// [`ENV`] names) beneath them. Returns the file too, so it can be read again on SIGHUP.
pub fn parse<C: CommandFactory + FromArgMatches>(
    args: &[OsString],
    sections: &[&str],
) -> Result<(C, Option<ConfigFile>), ParseError> {
    let command = C::command();
    let Some(path) = path_in(args) else {
        let matches = command.try_get_matches_from(args)?;
        return Ok((C::from_arg_matches(&matches)?, None));
    };
    let file = ConfigFile::read(&path)?;
    let (program, given) = args.split_first().map_or((OsStr::new("switchboard"), &[][..]), |(p, r)| (p.as_os_str(), r));
    let from_file = file.flag_args(&command, sections, given)?;
    let all = std::iter::once(program.to_owned()).chain(from_file.iter().cloned()).chain(given.iter().cloned());
    match command.try_get_matches_from(all).and_then(|m| C::from_arg_matches(&m)) {
        Ok(parsed) => Ok((parsed, Some(file))),
        Err(error) => {
            // Say so when the value at fault is the file's: the command line alone parses.
            let flags_alone = C::command().try_get_matches_from(args).is_ok();
            if flags_alone {
                let why = error.render().to_string();
                let why = why.lines().next().unwrap_or_default().trim_start_matches("error: ");
                return Err(file.invalid(why).into());
            }
            Err(error.into())
        }
    }
}

/// The file `--config PATH` (or `--config=PATH`) names in `args`, else the one [`ENV`] names.
pub fn path_in(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter().skip(1);
    let mut found = None;
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            found = args.next().map(PathBuf::from);
        } else if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(PathBuf::from(path));
        }
    }
    found.or_else(|| std::env::var_os(ENV).filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// A TOML value as a flag value: strings as they are, numbers and booleans as written.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "demo", args_override_self = true)]
    struct Demo {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 3)]
        failures: u32,
        #[arg(long)]
        print_state: bool,
        #[arg(long, default_value = "1-65535")]
        ports: String,
    }

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("demo.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    mod tempdir {
        /// A directory removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("switchboard-config-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("demo").chain(list.iter().copied()).map(OsString::from).collect()
    }

    #[test]
    fn the_command_line_beats_the_file_which_beats_the_defaults() {
        let (_dir, path) =
            write("listen = \"127.0.0.1:9\"\nfailures = 5\nprint-state = true\nports = [\"80\", \"8000-8999\"]\n");
        let path = path.to_str().unwrap();
        let (demo, file) = parse::<Demo>(&args(&["--config", path]), &[]).unwrap();
        assert_eq!((demo.listen.to_string().as_str(), demo.failures, demo.print_state), ("127.0.0.1:9", 5, true));
        assert_eq!(demo.ports, "80,8000-8999");
        assert!(file.is_some());
        let (demo, _) = parse::<Demo>(&args(&[&format!("--config={path}"), "--failures", "7"]), &[]).unwrap();
        assert_eq!((demo.failures, demo.listen.port()), (7, 9));
        // A value the command line replaces is not even parsed.
        let (_dir, bad) = write("listen = \"8080\"\n");
        let (demo, _) =
            parse::<Demo>(&args(&["--config", bad.to_str().unwrap(), "--listen=127.0.0.1:1"]), &[]).unwrap();
        assert_eq!(demo.listen.port(), 1);
        let (demo, file) = parse::<Demo>(&args(&["--failures", "7"]), &[]).unwrap();
        assert_eq!((demo.failures, demo.listen.port(), file), (7, 8080, None));
    }

    #[test]
    fn bad_files_are_refused_with_the_file_and_the_reason() {
        let cases = [
            ("listn = \"127.0.0.1:9\"\n", "unknown setting \"listen\""),
            ("listen = \n", "demo.toml"),
            ("listen = \"8080\"\n", "8080"),
            ("print-state = \"yes\"\n", "print-state: is a switch"),
            ("failures = { a = 1 }\n", "failures: not a plain value"),
            ("config = \"other.toml\"\n", "unknown setting \"config\""),
            ("", "holds no setting"),
            (" \n\t\n", "holds no setting"),
            ("# only a comment\n", "holds no setting"),
        ];
        for (text, expected) in cases {
            let (_dir, path) = write(text);
            let error = parse::<Demo>(&args(&["--config", path.to_str().unwrap()]), &[]).unwrap_err();
            let message = error.to_string();
            let expected =
                expected.replace("unknown setting \"listen\"", "unknown setting \"listn\"; did you mean \"listen\"?");
            assert!(matches!(error, ParseError::File(_)), "{text}: {message}");
            assert!(message.contains(&expected) && message.contains("demo.toml"), "{text}: {message}");
        }
        let missing = parse::<Demo>(&args(&["--config", "/nonexistent/demo.toml"]), &[]).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read /nonexistent/demo.toml"), "{missing}");
        // A wrong flag on the command line stays clap's error.
        let (_dir, path) = write("failures = 5\n");
        let flags = parse::<Demo>(&args(&["--config", path.to_str().unwrap(), "--failures", "x"]), &[]).unwrap_err();
        assert!(matches!(flags, ParseError::Flags(_)));
    }

    #[test]
    fn sections_are_not_flags_and_changes_are_named() {
        let path = Path::new("demo.toml");
        let old = ConfigFile::parse(path, "failures = 5\n[[service]]\nport = 1\n").unwrap();
        let new = ConfigFile::parse(path, "failures = 6\nprint-state = true\n[[service]]\nport = 2\n").unwrap();
        assert_eq!(old.flag_args(&Demo::command(), &["service"], &[]).unwrap(), vec![OsString::from("--failures=5")]);
        assert!(old.flag_args(&Demo::command(), &[], &[]).is_err(), "service is a section only when named");
        assert_eq!(old.changed_settings(&new, &["service"]), vec!["failures".to_owned(), "print-state".to_owned()]);
        assert_eq!(old.changed_settings(&old.clone(), &["service"]), Vec::<String>::new());
        #[derive(serde::Deserialize)]
        struct Service {
            port: u16,
        }
        let services: Vec<Service> = new.section("service").unwrap().unwrap();
        assert_eq!(services[0].port, 2);
        assert!(new.section::<Vec<Service>>("nothing").unwrap().is_none());
    }

    #[test]
    fn config_path_comes_from_the_flag() {
        assert_eq!(path_in(&args(&["--config", "a.toml"])), Some(PathBuf::from("a.toml")));
        assert_eq!(path_in(&args(&["--config=b.toml", "--x"])), Some(PathBuf::from("b.toml")));
        assert_eq!(path_in(&args(&["--", "--config", "c.toml"])), std::env::var_os(ENV).map(PathBuf::from));
    }
}
