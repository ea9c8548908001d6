//! `loadgen`: Switchboard's load driver and demo backends, for tests, benchmarks and demos.
//!
//! Workloads are TCP echo (new connection per request or keep-alive), HTTP/1.1 GET (keep-alive or
//! `Connection: close`), UDP request/response and bulk streams. A run is open loop (`--rate`: each request
//! timed from its intended start, so queueing in a slow target is measured, not hidden) or closed loop
//! (`--connections` back to back), over one or several targets with shares (`--split`), for a bounded
//! `--duration`. Results: a summary, JSON, CSV and SVG.
//!
//! # Layout
//! - [`cli`]: subcommands and flags.
//! - [`target`]: which addresses load may go to, and splitting between targets.
//! - [`workload`]: what one request is; lanes (one connection each).
//! - [`driver`]: open loop, closed loop, bulk; recording.
//! - [`report`]: summary, JSON, CSV.
//! - [`chart`]: the SVG chart of a report (`Report::svg`): the layout in `chart/mod.rs`, axes and ticks
//!   in `chart/scale.rs`, the SVG writer in `chart/svg.rs`.
//! - [`serve`]: demo backends.
//! - [`control_plane`]: the controller at scale, timed: the run in `control_plane/mod.rs`, what it
//!   registers in `plan.rs`, simulated nodes in `node.rs`, `Register` streams held as an agent holds them
//!   in `agent.rs`, its figures in `report.rs`.
//! - [`error`]: every error of the crate (a leaf: it names no other module).
//!
//! Modules depend downward only (no import circle, checked by the tests crate's `module_graph` test):
//! `control_plane` → `cli`, `target` → `error`; `chart` → `report` → `driver` → `workload`, `target` →
//! `error`.

#![forbid(unsafe_code)]

pub mod chart;
pub mod cli;
pub mod control_plane;
pub mod driver;
pub mod error;
pub mod report;
pub mod serve;
pub mod target;
pub mod workload;

use std::{
    io::IsTerminal,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use cli::{RunArgs, ServeArgs, ServeCommand};
use driver::{Mode, Progress, RunConfig};
use error::LoadError;
use report::Report;
use tokio::net::{TcpListener, UdpSocket};
use workload::Workload;

/// The workloads `run` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `loadgen tcp`.
    Tcp,
    /// `loadgen http`.
    Http,
    /// `loadgen udp`.
    Udp,
    /// `loadgen bulk`.
    Bulk,
}

/// Runs one load and writes its outputs; returns the report.
pub async fn run(kind: Kind, args: RunArgs) -> Result<Report, LoadError> {
    target::check_targets(&args.targets, args.allow_any_target)?;
    let shares = target::parse_split(args.split.as_deref(), args.targets.len())?;
    if args.duration.is_zero() || args.duration > Duration::from_secs(24 * 3600) {
        return Err(LoadError::Config("--duration must be more than 0 and at most 24h".into()));
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(LoadError::Config("--rate must be a positive number".into()));
    }
    if !(0.0..=100.0).contains(&args.max_errors) {
        return Err(LoadError::Config("--max-errors is a percentage, 0 to 100".into()));
    }
    if args.connections == 0 {
        return Err(LoadError::Config("--connections must be at least 1".into()));
    }
    if kind == Kind::Udp && args.size < 8 {
        return Err(LoadError::Config("--size must be at least 8 for UDP (the sequence number)".into()));
    }
    let progress = Arc::new(Progress::default());
    let bar =
        (!args.quiet && std::io::stderr().is_terminal()).then(|| progress_bar(Arc::clone(&progress), args.duration));
    let (name, outcome) = match kind {
        Kind::Bulk => {
            let outcome = driver::run_bulk(&args.targets, args.connections, args.duration, Arc::clone(&progress)).await;
            ("bulk", outcome)
        }
        _ => {
            let (name, workload) = match kind {
                Kind::Tcp if args.keepalive => ("tcp-keepalive", Workload::Tcp { keepalive: true, size: args.size }),
                Kind::Tcp => ("tcp", Workload::Tcp { keepalive: false, size: args.size }),
                Kind::Http if args.close => {
                    ("http-close", Workload::Http { keepalive: false, path: args.path.clone() })
                }
                Kind::Http => ("http", Workload::Http { keepalive: true, path: args.path.clone() }),
                _ => ("udp", Workload::Udp { size: args.size }),
            };
            let mode = args.rate.map_or(Mode::Closed, |rate| Mode::Open { rate });
            let config = RunConfig {
                workload,
                targets: args.targets.clone(),
                shares,
                mode,
                connections: args.connections,
                duration: args.duration,
                timeout: args.timeout,
            };
            (name, driver::run(&config, Arc::clone(&progress)).await)
        }
    };
    if let Some(bar) = bar {
        bar.abort();
    }
    let report = Report::new(name, args.rate, args.connections, &args.targets, &outcome);
    let write = |path: &std::path::Path, text: String| -> Result<(), LoadError> {
        if path.as_os_str() == "-" {
            println!("{text}");
            return Ok(());
        }
        std::fs::write(path, text).map_err(|source| LoadError::Output { path: path.display().to_string(), source })
    };
    if let Some(path) = &args.json {
        write(path, serde_json::to_string_pretty(&report).unwrap_or_default())?;
    }
    if let Some(path) = &args.csv {
        write(path, report.csv())?;
    }
    if let Some(path) = &args.svg {
        write(path, report.svg())?;
    }
    Ok(report)
}

fn progress_bar(progress: Arc<Progress>, duration: Duration) -> tokio::task::JoinHandle<()> {
    let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            bar.set_position(start.elapsed().as_millis() as u64);
            let ok = progress.ok.load(Ordering::Relaxed);
            let errors = progress.errors.load(Ordering::Relaxed);
            let rate = ok as f64 / start.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("ok {ok} errors {errors} ({rate:.0}/s)"));
        }
    })
}

/// Runs a demo backend until the process is stopped. Calls `ready` with the READY line once bound.
pub async fn serve(command: ServeCommand, ready: impl FnOnce(String)) -> Result<(), LoadError> {
    let (protocol, args): (&str, &ServeArgs) = match &command {
        ServeCommand::TcpEcho(a) | ServeCommand::Http(a) => ("tcp", a),
        ServeCommand::UdpEcho(a) => ("udp", a),
    };
    let stats = Arc::new(serve::Stats::default());
    let bind_err =
        |what: &str, e: std::io::Error| LoadError::Serve(format!("cannot listen for {what} on {}: {e}", args.listen));
    let mut tasks = tokio::task::JoinSet::new();
    let listen = match &command {
        ServeCommand::TcpEcho(_) => {
            let listener = serve::listen(args.listen).map_err(|e| bind_err("tcp-echo", e))?;
            let addr = listener.local_addr().map_err(|e| bind_err("tcp-echo", e))?;
            tasks.spawn(serve::tcp_echo(listener, Arc::clone(&stats)));
            addr
        }
        ServeCommand::UdpEcho(_) => {
            let socket = UdpSocket::bind(args.listen).await.map_err(|e| bind_err("udp-echo", e))?;
            let addr = socket.local_addr().map_err(|e| bind_err("udp-echo", e))?;
            tasks.spawn(serve::udp_echo(socket, Arc::clone(&stats)));
            addr
        }
        ServeCommand::Http(a) => {
            let listener = serve::listen(args.listen).map_err(|e| bind_err("http", e))?;
            let addr = listener.local_addr().map_err(|e| bind_err("http", e))?;
            let behaviour = serve::HttpBehaviour { work_us: a.work_us, sleep_ms: a.sleep_ms };
            tasks.spawn(serve::http(listener, behaviour, Arc::clone(&stats), addr.to_string()));
            addr
        }
    };
    let mut line = format!("READY listen={listen}");
    if let Some(stats_addr) = args.stats_listen {
        let listener = TcpListener::bind(stats_addr).await.map_err(|e| bind_err("stats", e))?;
        let addr = listener.local_addr().map_err(|e| bind_err("stats", e))?;
        line.push_str(&format!(" stats={addr}"));
        tasks.spawn(serve::stats_http(listener, Arc::clone(&stats)));
    }
    if let Some(controller) = args.register {
        let port = args.public_port.unwrap_or(listen.port());
        let (registered_tx, registered_rx) = tokio::sync::oneshot::channel();
        let registration = tokio::spawn(serve::register(controller, protocol, port, listen, registered_tx));
        // The first registration must succeed before READY, so a refused port is an error, not a hang.
        // A refused registration drops the sender too: only `Ok` means registered.
        if registered_rx.await.is_err() {
            return match registration.await {
                Ok(Err(error)) => Err(error),
                _ => Err(LoadError::Serve("the registration task ended".into())),
            };
        }
        tasks.spawn(async move {
            let _ = registration.await;
        });
    }
    ready(line);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
