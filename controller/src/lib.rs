//! The Switchboard controller: the registry of services and their backends. Servers register over the
//! HW1 JSON control channel or the gRPC `Registry` service; the [`Store`] versions every change into an
//! immutable routing snapshot that data-plane nodes follow; by default one node runs embedded in this
//! process, so a single command gives a working load balancer.
//!
//! # Layout
//! - [`cli`] and [`config`]: flags, and the validated configuration built from them. `config` builds the
//!   value types of the modules that use them (the store's port ranges and bounds, the JSON door's address
//!   blocks, gRPC's TLS) and owns none.
//! - [`store`]: the single source of truth, in rooms: registry and commit, nodes and cluster load, events,
//!   read model.
//! - [`probe`]: the hello health check shared by both registration channels.
//! - [`statics`]: the static services of the `--config` file and the controller's checks of their backends.
//! - [`api`]: JSON channel, gRPC, admin HTTP (with `/metrics` and the dashboard), and the doors' tokens
//!   and connection caps.
//! - [`metrics`]: the controller's Prometheus series; a leaf, reading the store and the doors through the
//!   traits it defines.
//! - [`etcd`]: the link to etcd of controllers run as replicas: a mirror of the prefix,
//!   followed through compactions and outages, and the keys a controller owns under its lease; [`replica`]:
//!   the store's port on etcd (the store publishes through [`store::Replication`], alone or replicated,
//!   with no branch on which), the key schema and its codecs, what a controller derives from the mirror,
//!   and the loop that publishes there and imports from the others.
//! - [`error`]: one error enum per boundary; a leaf too.
//!
//! No module imports one that imports it back (`tests/tests/module_graph.rs` fails on a circle): `config`
//! above `api`, `statics` and `store`; `api` above `store`; `store` above `metrics` and `error`.
//!
//! The domain types and their wire conversions are the contract crate's; the `dataplane` crate is used only
//! to embed a node.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod etcd;
pub mod metrics;
pub mod probe;
pub mod replica;
pub mod statics;
pub mod store;

use std::{net::SocketAddr, os::fd::AsFd, sync::Arc, time::Duration};

use api::{
    door::{Door, DoorCaps},
    listener::CappedListener,
};
use contract::process::{self, stopped};
use dataplane::{EmbeddedNode, Inherited};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{error, info, warn};

pub use cli::Cli;
pub use config::Config;
pub use error::{ConfigError, ControllerError, StoreError};
pub use store::Store;

/// A controller whose listeners are bound, ready to [`run`](Controller::run).
#[derive(Debug)]
pub struct Controller {
    config: Config,
    json: TcpListener,
    grpc: TcpListener,
    admin: TcpListener,
    store: Arc<Store>,
    /// The store's port with replicas (`--store etcd://`).
    replica: Option<Arc<replica::Etcd>>,
    embedded: Option<store::NodeLink>,
    statics: statics::Statics,
    hangups: Signal,
    /// What the controller that ran before at `--takeover` handed over.
    inherited: Option<Inherited>,
}

/// The addresses a controller listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    /// HW1 JSON control channel.
    pub json: SocketAddr,
    /// gRPC.
    pub grpc: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
}

// === impl Controller ===

impl Controller {
    /// Binds every listener (any may use port 0) and creates the store, whose policy refuses the ports
    /// actually bound.
    pub async fn bind(config: Config) -> Result<Self, ControllerError> {
        let mut inherited = match config.embedded_node.as_ref().and_then(|node| node.takeover.as_deref()) {
            Some(path) => dataplane::take_over(path).await?,
            None => None,
        };
        // A listener of the controller that ran before is taken when it listens where this one would bind.
        let mut bind = async |what: &'static str, flag: &'static str, name: &str, addr: SocketAddr| {
            let listener = match inherited.as_mut().and_then(|inherited| inherited.listener(name, addr)) {
                Some(listener) => TcpListener::from_std(listener),
                None => TcpListener::bind(addr).await,
            };
            let listener = listener.map_err(|source| ControllerError::Bind { what, flag, addr, source })?;
            let bound = listener.local_addr().map_err(|source| ControllerError::Bind { what, flag, addr, source })?;
            Ok::<_, ControllerError>((listener, bound))
        };
        let (json, json_addr) = bind("JSON control channel", "json-listen", "json", config.json_listen).await?;
        let (grpc, grpc_addr) = bind("gRPC", "grpc-listen", "grpc", config.grpc_listen).await?;
        let (admin, admin_addr) = bind("admin HTTP", "admin-listen", "admin", config.admin_listen).await?;
        let own_listeners = vec![json_addr, grpc_addr, admin_addr];
        let policy = store::Policy {
            allowed_ports: config.allowed_ports.clone(),
            own_listeners,
            frontend_ip: config.embedded_node.as_ref().map(|node| node.frontend_address),
            limits: config.registry_limits,
            load_report_max_age: config.load_report_max_age,
            settings_need_authority: config.tokens.auth.is_some(),
            node_forget_after: config.node_forget_after,
        };
        // The store's port: alone, commits are published at once; replicated, through etcd.
        let replica = match config.store {
            config::StoreSettings::Memory => None,
            config::StoreSettings::Etcd { .. } => Some(Arc::new(replica::Etcd::default())),
        };
        let store = match &replica {
            None => Store::new(policy, config.print_state),
            Some(port) => Store::with_replication(policy, config.print_state, Arc::clone(port) as _),
        };
        // Replicated, the state is etcd's from the first list on: nothing to relearn.
        if !config.resync_grace.is_zero() && replica.is_none() {
            store.begin_warm_up()?;
        }
        // The embedded node counts as connected from the start: a registration that arrives right after
        // READY waits for its bind result instead of being told that no node is there.
        let embedded =
            config.embedded_node.as_ref().map(|node| store.connect_node(&node.node_id, None, None)).transpose()?;
        // Static services are in the store before READY; replicated, once etcd is reached (in `run`).
        let mut statics = statics::Statics::new(Arc::clone(&store));
        if replica.is_none() {
            statics.apply(&config.static_services).await.map_err(|source| {
                ControllerError::static_services(config.source.as_ref().map(config::ConfigSource::path), source)
            })?;
        }
        // Taken before READY, so a SIGHUP from then on reloads and never kills.
        let hangups = signal(SignalKind::hangup()).map_err(ControllerError::Signal)?;
        Ok(Controller { config, json, grpc, admin, store, replica, embedded, statics, hangups, inherited })
    }

    /// Where the listeners are bound.
    pub fn local_addrs(&self) -> BoundAddrs {
        let addr = |l: &TcpListener| l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        BoundAddrs { json: addr(&self.json), grpc: addr(&self.grpc), admin: addr(&self.admin) }
    }

    /// The one line printed on stdout once everything is bound.
    pub fn ready_line(&self) -> String {
        let a = self.local_addrs();
        format!("READY json={} grpc={} admin={}", a.json, a.grpc, a.admin)
    }

    /// Serves until `shutdown` turns true or a server fails, or until a successor took over (`--takeover`)
    /// and the embedded node has drained. `ready` gets the READY line once the controller serves: after a
    /// takeover, once the embedded node accepts on the old one's sockets and the old controller has
    /// stopped.
    pub async fn run(
        self,
        shutdown: watch::Receiver<bool>,
        ready: impl FnOnce(&str) -> std::io::Result<()>,
    ) -> Result<(), ControllerError> {
        let line = self.ready_line();
        let addrs = self.local_addrs();
        let Controller { config, json, grpc, admin, store, replica, embedded, statics, hangups, inherited } = self;
        let mut tasks = JoinSet::new();
        let mut registry = contract::metrics::registry("controller");
        metrics::register(&mut registry, store.metrics(), Arc::clone(&store) as Arc<dyn metrics::StoreReadout>);
        let mut node = match &config.embedded_node {
            Some(node) => Some(EmbeddedNode::new(node.clone(), &mut registry)?),
            None => None,
        };
        if let (Some(node), Some(inherited)) = (node.as_mut(), inherited) {
            // Its services stay served through the warm-up, while servers register again with this controller.
            node.inherit(inherited).await;
        }
        // The control plane stops on a signal, or when a successor takes over; the embedded node then drains.
        let (control_stop, control) = watch::channel(false);
        let (handed_over, json_handed_over) = watch::channel(false);
        tasks.spawn({
            let (mut shutdown, mut control, control_stop) = (shutdown.clone(), control.clone(), control_stop.clone());
            async move {
                tokio::select! {
                    () = stopped(&mut shutdown) => { control_stop.send_replace(true); }
                    () = stopped(&mut control) => {}
                }
                Ok(())
            }
        });
        let takeover = config.embedded_node.as_ref().and_then(|node| node.takeover.as_deref());
        if let (Some(path), Some(node)) = (takeover, node.as_mut()) {
            let listeners = [("json", &json), ("grpc", &grpc), ("admin", &admin)];
            let handed_over = handed_over.clone();
            let released = move || {
                handed_over.send_replace(true);
                control_stop.send_replace(true);
            };
            tasks.spawn(serve_successor(path, node, listeners, shutdown.clone(), released)?);
        }
        let node_stop = shutdown;
        let shutdown = control;
        let reload = Reload {
            statics,
            pending: replica.is_some().then(|| config.static_services.clone()),
            source: config.source.clone(),
            hangups,
        };
        tasks.spawn(reload.run(shutdown.clone()));
        if !config.resync_grace.is_zero() && replica.is_none() {
            let store = Arc::clone(&store);
            let (grace, mut shutdown) = (config.resync_grace, shutdown.clone());
            tasks.spawn(async move {
                tokio::select! {
                    // A refusal is logged by the store; nodes then stay in warm-up, serving a superset.
                    () = tokio::time::sleep(grace) => { let _ = store.end_warm_up(); }
                    () = stopped(&mut shutdown) => {}
                }
                Ok(())
            });
        }
        let shares = config.fd_shares;
        info!(
            json = shares.json,
            grpc = shares.grpc,
            admin = shares.admin,
            clients = shares.clients,
            "file descriptors: connections each door may hold, and the embedded node's clients"
        );
        let timeouts = config.door_timeouts;
        let json_door = Door::new("json", "JSON control connections", DoorCaps::of(shares.json), timeouts);
        let grpc_door = Door::new("grpc", "gRPC connections", DoorCaps::of(shares.grpc), timeouts);
        let admin_door = Door::new("admin", "admin HTTP connections", DoorCaps::of(shares.admin), timeouts);
        let doors = [&json_door, &grpc_door, &admin_door];
        metrics::register_doors(
            &mut registry,
            doors.map(|door| Arc::clone(door) as Arc<dyn metrics::DoorReadout>).into(),
        );
        let json_ctx = Arc::new(api::json::JsonContext {
            store: Arc::clone(&store),
            probe: config.probe,
            bind_ack_timeout: config.bind_ack_timeout,
            allow: config.json_allow.clone(),
            guard: config.tokens.registry(),
            token_required: config.tokens.auth.is_some(),
            door: json_door,
            idle_timeout: config.json_idle_timeout,
            handed_over: json_handed_over,
        });
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                api::json::serve(json, json_ctx, shutdown).await;
                Ok(())
            }
        });
        for door in config.tokens.open_doors() {
            warn!("{door}");
        }
        let bound = [("json", addrs.json), ("grpc", addrs.grpc), ("admin", addrs.admin)];
        let json_allow = config.json_allow.as_ref().map(ToString::to_string);
        for warning in api::auth::exposure_warnings(&config.tokens, bound, json_allow.as_deref()) {
            warn!("{warning}");
        }
        // Nodes that left are forgotten in time even when no node joins or leaves meanwhile.
        tasks.spawn({
            let (store, mut shutdown) = (Arc::clone(&store), shutdown.clone());
            let every = (config.node_forget_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => store.forget_nodes(),
                        () = stopped(&mut shutdown) => return Ok(()),
                    }
                }
            }
        });
        let settings = api::grpc::GrpcSettings {
            first_message_timeout: config.door_timeouts.first_request,
            probe: config.probe,
            bind_ack_timeout: config.bind_ack_timeout,
            cluster_counts: config.cluster_counts,
            tokens: config.tokens.clone(),
            allow_foreign_backends: config.allow_foreign_backends,
            tls: config.tls.clone(),
        };
        let grpc = CappedListener::new(grpc, grpc_door);
        tasks.spawn(api::grpc::serve(grpc, Arc::clone(&store), settings, shutdown.clone()));
        if let (config::StoreSettings::Etcd { endpoints, prefix, lease_ttl, id }, Some(port)) =
            (config.store.clone(), replica)
        {
            let etcd = etcd::EtcdConfig { endpoints, prefix, lease_ttl };
            let replica = replica::ReplicaConfig { etcd, id };
            let (store, shutdown) = (Arc::clone(&store), shutdown.clone());
            tasks.spawn(async move {
                replica::run(replica, store, port, shutdown).await;
                Ok(())
            });
        }
        if let (Some(node), Some(link)) = (node, embedded) {
            // The node stops on a signal, or drains once released to a successor: not with the control plane.
            let stop = node_stop.clone();
            tasks.spawn(run_embedded_node(node, link, Arc::clone(&store), config.cluster_counts, stop));
        }
        let admin = CappedListener::new(admin, admin_door);
        let admin_state = api::http::AdminState { store: Arc::clone(&store), registry: Arc::new(registry) };
        tasks.spawn(api::http::serve(admin, admin_state, config.tokens.admin(), shutdown));
        ready(&line).map_err(ControllerError::Ready)?;
        let served = process::supervise(tasks).await;
        // Held until here: JSON connections close when it turns true, or when it is gone.
        drop(handed_over);
        served
    }
}

/// Listens on `--takeover` for a successor, to hand it the embedded node's sockets and the control
/// listeners; once the successor accepts on them, `released` runs (the control plane stops, so servers
/// register again with the successor) and the node drains. The returned task ends then, or at `shutdown`.
fn serve_successor<R: FnOnce() + Send + 'static>(
    path: &std::path::Path,
    node: &mut EmbeddedNode,
    listeners: [(&'static str, &TcpListener); 3],
    mut shutdown: watch::Receiver<bool>,
    released: R,
) -> Result<impl Future<Output = Result<(), ControllerError>> + use<R>, ControllerError> {
    let successor = node.listen_for_successor(path)?;
    let copies = listeners
        .into_iter()
        .filter_map(|(name, listener)| Some((name, listener.as_fd().try_clone_to_owned().ok()?)))
        .collect();
    Ok(async move {
        tokio::select! {
            () = successor.serve(copies, |_| released()) => {}
            () = stopped(&mut shutdown) => {}
        }
        Ok(())
    })
}

/// What SIGHUP reloads: the static services of the `--config` file.
struct Reload {
    statics: statics::Statics,
    /// Static services not applied yet (replicated: until etcd is reached).
    pending: Option<Vec<statics::StaticService>>,
    source: Option<config::ConfigSource>,
    hangups: Signal,
}

/// Time between two tries of static services the shared store cannot take yet.
const STATIC_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Reload {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ControllerError> {
        while let Some(services) = self.pending.take() {
            match self.statics.apply(&services).await {
                Ok(diff) => info!(version = diff.version, backends = diff.added.len(), "static services applied"),
                Err(StoreError::Unavailable(_)) => {
                    self.pending = Some(services);
                    tokio::select! {
                        () = tokio::time::sleep(STATIC_RETRY) => {}
                        () = stopped(&mut shutdown) => return Ok(()),
                    }
                }
                Err(source) => {
                    return Err(ControllerError::static_services(
                        self.source.as_ref().map(config::ConfigSource::path),
                        source,
                    ));
                }
            }
        }
        loop {
            tokio::select! {
                _ = self.hangups.recv() => {}
                () = stopped(&mut shutdown) => return Ok(()),
            }
            self.reload().await;
        }
    }

    /// Reads the file again and applies its static services as one version; refused as a whole (logged
    /// with the reason) when the file or its services are wrong, and the running state is kept.
    async fn reload(&mut self) {
        let Some(source) = &self.source else {
            warn!("SIGHUP: there is no --config file to reload");
            return;
        };
        let path = source.file.path.display().to_string();
        let config = match Config::reload(source) {
            Ok(config) => config,
            Err(error) => {
                error!(%path, %error, "configuration reload refused: keeping the running configuration");
                return;
            }
        };
        let Some(new) = config.source else { return };
        // The settings in force stay those of the file read at start; each reload is compared with it.
        match self.statics.apply(&config.static_services).await {
            Ok(diff) => {
                let changed = source.file.changed_settings(&new.file, statics::SECTIONS);
                if !changed.is_empty() {
                    warn!(%path, settings = %changed.join(", "), "changed settings apply at the next restart; static services are reloaded");
                }
                info!(
                    %path,
                    version = diff.version,
                    added = diff.added.len(),
                    removed = diff.removed.len(),
                    changed = diff.changed.len(),
                    "configuration reloaded"
                );
            }
            Err(error) => error!(%path, %error, "configuration reload refused: keeping the running configuration"),
        }
    }
}

/// Runs a node inside the controller (already marked connected by [`Controller::bind`]): it follows the
/// store's snapshots directly and its reports go straight into the store, exactly as a remote node's would
/// after crossing the network.
async fn run_embedded_node(
    node: EmbeddedNode,
    link: store::NodeLink,
    store: Arc<Store>,
    cluster_counts: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    // The other nodes' counts, as a remote node gets them on its sync stream.
    let cluster = cluster_counts.then(|| {
        let (remote, mut feed) = (node.remote_load(), link.cluster_load());
        tokio::spawn(async move {
            loop {
                remote.set(&feed.changed().await);
            }
        })
    });
    let node = tokio::spawn(node.run(store.subscribe(), reports_tx, shutdown));
    while let Some(report) = reports.recv().await {
        link.report(report);
    }
    drop(link);
    if let Some(cluster) = cluster {
        cluster.abort();
    }
    if let Err(join) = node.await
        && join.is_panic()
    {
        std::panic::resume_unwind(join.into_panic());
    }
    Ok(())
}
