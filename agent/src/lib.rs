//! The Switchboard agent: a sidecar beside an existing server that speaks no Switchboard protocol (nginx, a
//! database, anything). It registers the server over the gRPC `Register` stream, runs a local check
//! (`tcp`, `udp:PAYLOAD`, `http:/PATH`, `exec:COMMAND`) with rise/fall, and answers the controller's hellos
//! with the verdict, so a dead server leaves rotation while the agent lives, the way a Consul agent works.
//!
//! # Layout
//! - [`cli`]: flags and the validated [`AgentConfig`].
//! - [`check`]: the local checks and the rise/fall rule.
//! - [`register`]: one service's registration loop (retry, re-register, deregister on shutdown).
//! - [`error`]: run-time errors (flag errors are the contract's `FlagError`).

#![forbid(unsafe_code)]

/// The local checks and the rise/fall rule, shared with the controller's static backends.
pub use contract::check;
pub mod cli;
pub mod error;
pub mod load;
pub mod register;

use std::sync::Arc;

use contract::process;
use tokio::{
    sync::{oneshot, watch},
    task::JoinSet,
};

pub use cli::{AgentConfig, Cli};
pub use error::AgentError;

/// Runs one [`register::ServiceAgent`] per service. `ready` gets the READY line once every service was
/// registered the first time. Returns when all of them stopped (after `shutdown` and deregistration), or
/// with the first error that makes going on pointless.
pub async fn run(
    config: AgentConfig,
    ready: oneshot::Sender<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let mut tasks = JoinSet::new();
    // One sampler for the server, whatever the number of services: every answer carries its latest figure.
    let (load_tx, load) = watch::channel(None);
    if let Some(source) = config.load_source.clone() {
        let sampler = load::LoadSampler::new(source, config.check_timeout);
        let interval = config.check_interval;
        tokio::spawn(load::sample_every(sampler, interval, load_tx));
    }
    let mut registered = Vec::new();
    for service in config.services.clone() {
        let (tx, rx) = oneshot::channel();
        registered.push(rx);
        let agent = register::ServiceAgent::new(Arc::clone(&config), service, load.clone());
        tasks.spawn(agent.run(tx, shutdown.clone()));
    }
    tasks.spawn(async move {
        let mut services = Vec::new();
        for rx in registered {
            match rx.await {
                Ok(service) => services.push(service),
                Err(_) => return Ok(()),
            }
        }
        let _ = ready.send(format!("READY services={}", services.join(",")));
        Ok(())
    });
    process::supervise(tasks).await
}
