//! Real etcd members for the tests (Debian's `etcd-server`), started on free loopback ports with data in
//! a directory of their own, killed when dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use tokio::{process::Child, time::Instant};

use crate::{
    harness::{DEADLINE, Host, Net, free_port, http_get, spawn_quiet},
    tools,
};

/// One to three etcd members forming one cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    token: String,
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

impl EtcdCluster {
    /// True when etcd is installed (see [`tools::require`]).
    pub fn available() -> bool {
        tools::require("etcd", &["etcd", "--version"], "apt-get install etcd-server")
    }

    /// Starts a cluster of `size` members and waits until each is healthy. The members listen on an
    /// address of a loopback block of their own, so no other test takes their ports while one is down.
    pub async fn start(size: usize) -> EtcdCluster {
        let ip: IpAddr = Net::new().host(200);
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: SocketAddr::new(ip, free_port(ip)),
                peer: SocketAddr::new(ip, free_port(ip)),
                child: None,
            })
            .collect();
        let token = format!("switchboard-{}-{}", std::process::id(), members[0].client.port());
        let dir = std::env::temp_dir().join(&token);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = EtcdCluster { members, dir, token };
        for i in 0..size {
            cluster.launch(i, "new");
        }
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    fn launch(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        let member = &self.members[i];
        let child = spawn_quiet(
            "etcd",
            [
                "--name",
                &member.name,
                "--data-dir",
                &self.dir.join(&member.name).display().to_string(),
                "--listen-client-urls",
                &format!("http://{}", member.client),
                "--advertise-client-urls",
                &format!("http://{}", member.client),
                "--listen-peer-urls",
                &format!("http://{}", member.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", member.peer),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                state,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ],
        );
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` says it is healthy (it has a leader).
    pub async fn wait_healthy(&self, i: usize) {
        let deadline = Instant::now() + DEADLINE;
        let addr = self.members[i].client;
        loop {
            // Without a leader the member holds the request: ask again, not wait.
            let asked = tokio::time::timeout(Duration::from_secs(2), http_get(&Host::Root, addr, "/health", None));
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && let Ok((200, body)) = asked.await
                && body.contains("\"true\"")
            {
                return;
            }
            assert!(Instant::now() < deadline, "etcd member {i} on {addr} never became healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `HOST:PORT` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.to_string()).collect()
    }

    /// The controller's `--store` value for this cluster.
    pub fn store_flag(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Kills member `i` (SIGKILL), keeping its data.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts member `i` again on its data, and waits until it is healthy (which takes a quorum).
    pub async fn restart(&mut self, i: usize) {
        self.launch(i, "existing");
        self.wait_healthy(i).await;
    }

    /// Starts every stopped member again on its data, and waits until all are healthy.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.launch(i, "existing");
            }
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(child) = member.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
