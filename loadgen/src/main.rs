//! `loadgen`: parse flags, build the runtime (`--threads`), run a load or serve a demo backend.

use std::process::ExitCode;

use clap::Parser;
use contract::process;
use loadgen::{
    Kind,
    cli::{Cli, Command},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = process::init_logging(&cli.log) {
        return process::config_error("loadgen", &error);
    }
    // A load driver holds a socket per connection in flight.
    let _ = process::raise_fd_limit();
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
                    let _ = process::print_ready(&line);
                })
                .await
            }
            Command::Tcp(args) => summary(args.max_errors, loadgen::run(Kind::Tcp, args).await),
            Command::Http(args) => summary(args.max_errors, loadgen::run(Kind::Http, args).await),
            Command::Udp(args) => summary(args.max_errors, loadgen::run(Kind::Udp, args).await),
            Command::Bulk(args) => summary(args.max_errors, loadgen::run(Kind::Bulk, args).await),
            // It prints its own summary, before holding the cluster with --hold.
            Command::ControlPlane(args) => loadgen::control_plane::run(args).await.map(|_| ()),
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

/// Prints the summary; the run fails when more requests failed than `max_errors` percent (every output
/// is written first).
fn summary(
    max_errors: f64,
    report: Result<loadgen::report::Report, loadgen::error::LoadError>,
) -> Result<(), loadgen::error::LoadError> {
    let report = report?;
    eprint!("{}", report.summary());
    report.check_errors(max_errors)
}
