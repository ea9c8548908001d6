//! `controller`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use contract::process;
use controller::{Cli, Config, Controller};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cli.log.clone();
    process::main("controller", &log, || Config::try_from(cli), run).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.check {
        println!("configuration ok");
        return Ok(());
    }
    let controller = Controller::bind(config).await?;
    process::print_ready(&controller.ready_line()).context("writing the READY line")?;
    Ok(controller.run(process::shutdown_on_signal("shutting down")).await?)
}
