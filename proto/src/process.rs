//! What every Switchboard binary does the same way: logs on stderr, one READY line on stdout, a shutdown
//! watch channel set by SIGINT or SIGTERM, supervised tasks, and its exit codes.

use std::{fmt::Display, future::Future, process::ExitCode};

use tokio::{sync::watch, task::JoinSet};

/// Exit code of a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// A flag value that makes no sense. The binary prints it on one line and exits 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{flag}: {why}")]
pub struct FlagError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong with it.
    pub why: String,
}

// === impl FlagError ===

impl FlagError {
    /// `flag` is wrong because `why`.
    pub fn new(flag: &'static str, why: impl Into<String>) -> Self {
        FlagError { flag, why: why.into() }
    }

    /// Every duration of `flags` is more than zero, or the first that is not is the error.
    pub fn require_positive(flags: &[(&'static str, std::time::Duration)]) -> Result<(), FlagError> {
        match flags.iter().find(|(_, d)| d.is_zero()) {
            Some((flag, _)) => Err(FlagError::new(flag, "must be more than zero")),
            None => Ok(()),
        }
    }
}

/// How a binary logs: `--log-format` and `--log`, the same on every binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines as `pretty` text or as `json`, one object per line (level, target, fields, spans).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Which log lines to print, in `RUST_LOG`'s syntax (e.g. `info,dataplane=debug`). Default: `RUST_LOG`,
    /// else `info`.
    #[arg(long = "log", env = "SWITCHBOARD_LOG")]
    pub log: Option<String>,
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text, coloured on a terminal.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr as `args` say, with colours only on a terminal; stdout is kept for the READY line. An
/// invalid `--log` filter is a [`FlagError`].
pub fn init_logging(args: &LogArgs) -> Result<(), FlagError> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log {
        Some(filter) => {
            EnvFilter::try_new(filter).map_err(|error| FlagError::new("log", format!("{filter:?}: {error}")))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Pretty => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
    Ok(())
}

/// The file-descriptor limits a process found and left at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The soft limit it started with.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit in force now.
    pub now: u64,
}

/// Raises the soft limit on open file descriptors to the hard limit (a load balancer holds two per TCP
/// client). Done before anything sizes itself on the limit, and logged once logging is up.
pub fn raise_fd_limit() -> nix::Result<FdLimits> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // An unlimited hard limit is not a number the kernel takes for RLIMIT_NOFILE: stay at a large one.
    let target = hard.min(1 << 20);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    Ok(FdLimits { soft, hard, now: target.max(soft) })
}

/// The soft limit on open file descriptors in force.
pub fn fd_limit() -> usize {
    let soft =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft).unwrap_or(usize::MAX)
}

/// File descriptors open now.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Prints the one READY line on stdout (flushed at once: scripts wait for it) and logs it.
pub fn print_ready(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    tracing::info!("{line}");
    Ok(())
}

/// The shutdown channel of a process: it turns true on the first SIGINT or SIGTERM, after logging `what`
/// (what the process does next).
pub fn shutdown_on_signal(what: &'static str) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        tracing::info!("signal received: {what}");
        let _ = tx.send(true);
    });
    rx
}

/// Resolves on the first SIGINT or SIGTERM.
async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone), holding no borrow of the channel across
/// the caller's awaits.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for every task: the first error ends the wait and is returned (the remaining tasks are aborted
/// when the set drops), and a task's panic is the caller's panic.
pub async fn supervise<E: 'static>(mut tasks: JoinSet<Result<(), E>>) -> Result<(), E> {
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => {}
        }
    }
    Ok(())
}

/// The `main` of every binary: the file-descriptor limit is raised, then `config` is read (a
/// configuration error is one line and exit 64), logging starts as `log` says, `run` runs, and its error,
/// if any, is one line and exit 1.
pub async fn main<C, F, E, G>(
    binary: &str,
    log: &LogArgs,
    config: impl FnOnce() -> Result<C, G>,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    G: Display,
{
    let limits = raise_fd_limit();
    let config = match config() {
        Ok(config) => config,
        Err(error) => return config_error(binary, &error),
    };
    if let Err(error) = init_logging(log) {
        return config_error(binary, &error);
    }
    match limits {
        Ok(FdLimits { soft, hard, now }) => tracing::info!(soft, hard, now, "file-descriptor limits"),
        Err(error) => tracing::warn!(%error, "cannot raise the file-descriptor soft limit"),
    }
    exit(binary, run(config).await)
}

/// A configuration error: one line on stderr, exit 64.
pub fn config_error(binary: &str, error: &dyn Display) -> ExitCode {
    eprintln!("{binary}: {error}");
    ExitCode::from(EXIT_CONFIG)
}

/// The exit of a run: 0, or one line on stderr and 1.
pub fn exit<E: Into<Box<dyn std::error::Error + Send + Sync>>>(binary: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: {}", one_line(&*error.into()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: most errors here already print their cause
/// (`cannot listen on ...: Address already in use`), so a cause is added only when the line does not
/// say it yet (a bare context such as `writing the READY line`).
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = error.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_zero_duration_is_named() {
        use std::time::Duration;
        let ok = FlagError::require_positive(&[("a", Duration::from_secs(1))]);
        assert_eq!(ok, Ok(()));
        let err = FlagError::require_positive(&[("a", Duration::from_secs(1)), ("b", Duration::ZERO)]).unwrap_err();
        assert_eq!(err.to_string(), "invalid --b: must be more than zero");
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot listen on 127.0.0.1:8080: {0}; is another controller running?")]
        struct Bind(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("writing the READY line")]
        struct Context(#[source] std::io::Error);
        let in_use = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let line = one_line(&Bind(in_use()));
        assert_eq!(line.matches(&in_use().to_string()).count(), 1, "{line}");
        assert_eq!(one_line(&Context(in_use())), format!("writing the READY line: {}", in_use()));
    }

    #[tokio::test]
    async fn supervise_returns_the_first_error_and_waits_for_the_rest_otherwise() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async { Ok(()) });
        tasks.spawn(async { Err("broken") });
        tasks.spawn(std::future::pending());
        assert_eq!(supervise(tasks).await, Err("broken"));
        let mut tasks: JoinSet<Result<(), &str>> = JoinSet::new();
        tasks.spawn(async { Ok(()) });
        assert_eq!(supervise(tasks).await, Ok(()));
    }

    #[tokio::test]
    async fn stopped_resolves_on_true_or_when_the_sender_is_gone() {
        let (tx, mut rx) = watch::channel(false);
        tx.send_replace(true);
        stopped(&mut rx).await;
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        stopped(&mut rx).await;
    }
}
