//! `controller`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use controller::{Cli, Config, Controller};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

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

async fn run(config: Config) -> anyhow::Result<()> {
    let controller = Controller::bind(config).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", controller.ready_line()).context("writing the READY line")?;
    stdout.flush().context("writing the READY line")?;
    drop(stdout);
    tracing::info!("{}", controller.ready_line());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        dataplane::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    controller.run(shutdown_rx).await?;
    Ok(())
}
