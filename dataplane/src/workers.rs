//! Worker threads: the data path runs on one single-threaded runtime per core, the way HAProxy's threads
//! and nginx's workers do. Every frontend has one socket per worker (`SO_REUSEPORT`), so the kernel spreads
//! new connections and UDP flows over the workers, and a connection lives on the worker that accepted it:
//! no task migrates, no wake-up crosses threads. The control plane (sync, admin, snapshot apply) stays on
//! the process's main runtime.

use std::{future::Future, io, sync::mpsc, thread};

use tokio::{
    runtime::{Builder, Handle},
    sync::watch,
    task::JoinHandle,
};

/// The node's worker runtimes; they stop when this is dropped (their remaining tasks with them).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    _stop: watch::Sender<()>,
}

impl Workers {
    /// Starts `count` workers (at least one), named `worker-N`.
    pub fn start(count: usize) -> io::Result<Self> {
        // Dropping the sender (with `Workers`) ends every worker's wait.
        let (stop, stopped) = watch::channel(());
        let mut handles = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let (ready, handle) = mpsc::channel();
            let mut stopped = stopped.clone();
            thread::Builder::new().name(format!("worker-{index}")).spawn(move || {
                let runtime = match Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let _ = ready.send(Ok(runtime.handle().clone()));
                runtime.block_on(async move {
                    let _ = stopped.changed().await;
                });
            })?;
            handles.push(handle.recv().map_err(io::Error::other)??);
        }
        Ok(Workers { handles, _stop: stop })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Runs `serve(socket)` for each of `sockets` (one per worker, in worker order) on its worker.
    pub fn spawn_each<S, F>(&self, sockets: Vec<S>, serve: impl Fn(S) -> F) -> Vec<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let workers = self.handles.iter().cycle();
        sockets.into_iter().zip(workers).map(|(socket, worker)| worker.spawn(serve(socket))).collect()
    }
}
