//! `dataplane`: parse flags (and the `--config` file), start logging, bind, print the READY line, serve until
//! SIGINT or SIGTERM, then drain and exit 0. SIGHUP checks the `--config` file again.

use std::{ffi::OsString, process::ExitCode};

use anyhow::Context;
use contract::{
    config_file::{self, ConfigFile, ParseError},
    process,
};
use dataplane::{Cli, Dataplane, DataplaneConfig};
use tokio::signal::unix::{Signal, SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let (cli, file) = match config_file::parse::<Cli>(&args, &[]) {
        Ok(parsed) => parsed,
        Err(ParseError::Flags(error)) => error.exit(),
        Err(ParseError::File(error)) => {
            return process::config_error("dataplane", &format!("invalid --config {error}"));
        }
    };
    let log = cli.log.clone();
    process::main("dataplane", &log, || DataplaneConfig::try_from(cli), |config| run(config, args, file)).await
}

async fn run(config: DataplaneConfig, args: Vec<OsString>, file: Option<ConfigFile>) -> anyhow::Result<()> {
    // Taken before READY, so a SIGHUP from then on never kills the node.
    let hangups = signal(SignalKind::hangup()).context("watching SIGHUP")?;
    let dataplane = Dataplane::bind(config).await?;
    tokio::spawn(recheck_on_hangup(hangups, args, file));
    let shutdown = process::shutdown_on_signal("closing frontends and draining connections");
    Ok(dataplane.run(shutdown, process::print_ready).await?)
}

/// On each SIGHUP: reads the `--config` file again, checks it as at start, and says which settings differ
/// from the ones in force. A node's settings (listeners, limits, its controller) apply at the next restart;
/// its routing comes from the controller, so there is nothing else to reload.
async fn recheck_on_hangup(mut hangups: Signal, args: Vec<OsString>, file: Option<ConfigFile>) {
    while hangups.recv().await.is_some() {
        let Some(running) = &file else {
            tracing::warn!("SIGHUP: there is no --config file to check");
            continue;
        };
        let path = running.path.display().to_string();
        let checked = config_file::parse::<Cli>(&args, &[])
            .map_err(|e| e.to_string())
            .and_then(|(cli, new)| DataplaneConfig::try_from(cli).map(|_| new).map_err(|e| e.to_string()));
        match checked {
            Err(error) => tracing::error!(%path, %error, "configuration refused: the running node keeps its settings"),
            Ok(Some(new)) => match running.changed_settings(&new, &[]) {
                changed if changed.is_empty() => tracing::info!(%path, "configuration checked: nothing changed"),
                changed => {
                    tracing::warn!(%path, settings = %changed.join(", "), "configuration checked: changed settings apply at the next restart")
                }
            },
            Ok(None) => {}
        }
    }
}
