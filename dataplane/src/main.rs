//! `dataplane`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM,
//! then drain and exit 0.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use contract::process;
use dataplane::{Cli, Dataplane, DataplaneConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cli.log.clone();
    process::main("dataplane", &log, || DataplaneConfig::try_from(cli), run).await
}

async fn run(config: DataplaneConfig) -> anyhow::Result<()> {
    let dataplane = Dataplane::bind(config).await?;
    process::print_ready(&dataplane.ready_line()).context("writing the READY line")?;
    Ok(dataplane.run(process::shutdown_on_signal("closing frontends and draining connections")).await?)
}
