//! `controller`: parse flags (and the `--config` file), start logging, bind, print the READY line, serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use contract::{config_file::ParseError, process};
use controller::{Config, ConfigError, Controller};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let (cli, file) = match Config::load(args.clone()) {
        Ok(parsed) => parsed,
        Err(ParseError::Flags(error)) => error.exit(),
        Err(ParseError::File(error)) => return process::config_error("controller", &ConfigError::File(error)),
    };
    let log = cli.log.clone();
    process::main("controller", &log, || Config::with_file(cli, file, args), run).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.check {
        match &config.source {
            Some(source) => println!(
                "configuration ok: {} with {} static services",
                source.file.path.display(),
                config.static_services.len()
            ),
            None => println!("configuration ok"),
        }
        return Ok(());
    }
    let controller = Controller::bind(config).await?;
    Ok(controller.run(process::shutdown_on_signal("shutting down"), process::print_ready).await?)
}
