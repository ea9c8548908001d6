//! `controller`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use controller::{Cli, Config, Controller};
use tokio::sync::watch;

/// Exit code of a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("controller: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.check {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    dataplane::init_logging();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let controller = Controller::bind(config).await?;
    dataplane::print_ready(&controller.ready_line()).context("writing the READY line")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        dataplane::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    controller.run(shutdown_rx).await?;
    Ok(())
}
