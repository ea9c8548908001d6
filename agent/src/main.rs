//! `agent`: parse flags, start logging, register, print the READY line, keep the registration alive until
//! SIGINT or SIGTERM, deregister, exit 0.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use agent::{AgentConfig, Cli};
use clap::Parser;
use tokio::sync::{oneshot, watch};
use tracing_subscriber::EnvFilter;

/// Exit code of a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match AgentConfig::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("agent: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received: deregistering");
        let _ = shutdown_tx.send(true);
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Ok(line) = ready_rx.await {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
        }
    });
    match agent::run(config, ready_tx, shutdown_rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agent: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
