//! `dataplane`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM,
//! then drain and exit 0.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use dataplane::{Cli, Dataplane, DataplaneConfig};
use tokio::sync::watch;

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
    dataplane::init_logging();
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
    dataplane::print_ready(&dataplane.ready_line()).context("writing the READY line")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        dataplane::shutdown_signal().await;
        tracing::info!("signal received: closing frontends and draining connections");
        let _ = shutdown_tx.send(true);
    });
    dataplane.run(shutdown_rx).await?;
    Ok(())
}
