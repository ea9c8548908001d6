//! `dataplane`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM,
//! then drain and exit 0.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use dataplane::{Cli, Dataplane, DataplaneConfig};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Exit code of a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match DataplaneConfig::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("dataplane: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: DataplaneConfig) -> anyhow::Result<()> {
    let dataplane = Dataplane::bind(config).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", dataplane.ready_line()).context("writing the READY line")?;
    stdout.flush().context("writing the READY line")?;
    drop(stdout);
    tracing::info!("{}", dataplane.ready_line());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        dataplane::shutdown_signal().await;
        tracing::info!("signal received: closing frontends and draining connections");
        let _ = shutdown_tx.send(true);
    });
    dataplane.run(shutdown_rx).await?;
    Ok(())
}
