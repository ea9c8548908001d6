//! `controller`: parse flags, start logging, bind, print the READY line, serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use contract::process;
use controller::{Cli, Config, Controller};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(error) => return process::config_error("controller", &error),
    };
    if config.check {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    process::init_logging();
    process::exit("controller", run(config).await)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let controller = Controller::bind(config).await?;
    process::print_ready(&controller.ready_line()).context("writing the READY line")?;
    controller.run(process::shutdown_on_signal("shutting down")).await?;
    Ok(())
}
