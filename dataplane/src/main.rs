//! `dataplane`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM,
//! then drain and exit 0.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use contract::process;
use dataplane::{Cli, Dataplane, DataplaneConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match DataplaneConfig::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => return process::config_error("dataplane", &error),
    };
    process::init_logging();
    process::exit("dataplane", run(config).await)
}

async fn run(config: DataplaneConfig) -> anyhow::Result<()> {
    let dataplane = Dataplane::bind(config).await?;
    process::print_ready(&dataplane.ready_line()).context("writing the READY line")?;
    dataplane.run(process::shutdown_on_signal("closing frontends and draining connections")).await?;
    Ok(())
}
