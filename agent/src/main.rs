//! `agent`: parse flags, start logging, register, print the READY line, keep the registration alive until
//! SIGINT or SIGTERM, deregister, exit 0.

use std::process::ExitCode;

use agent::{AgentConfig, AgentError, Cli};
use clap::Parser;
use contract::process;
use tokio::sync::oneshot;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = cli.log.clone();
    process::main("agent", &log, || AgentConfig::try_from(cli), run).await
}

async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let shutdown = process::shutdown_on_signal("deregistering");
    let (ready_tx, ready_rx) = oneshot::channel::<String>();
    tokio::spawn(async move {
        if let Ok(line) = ready_rx.await {
            let _ = process::print_ready(&line);
        }
    });
    agent::run(config, ready_tx, shutdown).await
}
