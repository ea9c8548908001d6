//! `loadgen`: parse flags, build the runtime (`--threads`), run a load or serve a demo backend.

use std::{io::Write, process::ExitCode};

use clap::Parser;
use loadgen::{
    Kind,
    cli::{Cli, Command},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(command) => {
                loadgen::serve(command, |line| {
                    let mut stdout = std::io::stdout().lock();
                    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
                })
                .await
            }
            Command::Tcp(args) => summary(loadgen::run(Kind::Tcp, args).await),
            Command::Http(args) => summary(loadgen::run(Kind::Http, args).await),
            Command::Udp(args) => summary(loadgen::run(Kind::Udp, args).await),
            Command::Bulk(args) => summary(loadgen::run(Kind::Bulk, args).await),
        }
    });
    // Lanes still blocked on a dead target must not hold the process past its duration.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error}");
            ExitCode::from(if matches!(error, loadgen::error::LoadError::Config(_)) { 64 } else { 1 })
        }
    }
}

fn summary(
    report: Result<loadgen::report::Report, loadgen::error::LoadError>,
) -> Result<(), loadgen::error::LoadError> {
    let report = report?;
    eprint!("{}", report.summary());
    Ok(())
}
