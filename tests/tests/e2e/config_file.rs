//! `--config`: static services from a TOML file, the controller's own checks of their backends, and SIGHUP
//! reloads applied as one version (or refused as a whole).

use std::{net::SocketAddr, path::PathBuf};

use serde_json::Value;
use switchboard_tests::harness::{
    Controller, Host, Net, Process, TcpEcho, TempDir, free_port, run_to_exit, tcp_roundtrip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A configuration file, in a directory removed when the test ends.
struct ConfigFile {
    dir: TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(net: &Net, text: &str) -> ConfigFile {
        let dir = TempDir::new(net, "config");
        let path = dir.write("controller.toml", text);
        ConfigFile { dir, path }
    }

    /// Replaces the file whole, as a reload expects.
    fn rewrite(&self, text: &str) {
        self.dir.write("controller.toml", text);
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// One `[[service]]` with quick checks.
fn service(port: u16, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[service]]\nport = {port}\ncheck = \"tcp\"\ncheck-interval = \"100ms\"\ncheck-timeout = \"500ms\"\nrise = 1\nfall = 2\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

fn addresses(state: &Value, port: u16) -> Vec<(String, bool)> {
    Controller::backends(state, "tcp", port)
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b["healthy"] == true))
        .collect()
}

#[tokio::test]
async fn a_static_service_serves_and_its_dead_backend_leaves_rotation_and_comes_back() {
    let net = Net::new();
    let a = TcpEcho::start(net.host(2), 0).await;
    let mut b = TcpEcho::start(net.host(3), 0).await;
    let port = free_port(net.frontend());
    // A flag from the file too: the routing table printed after each change.
    let file = ConfigFile::new(&net, &format!("print-state = true\n\n{}", service(port, &[a.addr, b.addr])));
    let ctl = Controller::spawn(net, &["--config", file.arg()]).await;
    let both = |s: &Value| addresses(s, port).iter().filter(|(_, up)| *up).count() == 2;
    let state = ctl.wait_state("both static backends in rotation", both).await;
    let registration = Controller::backends(&state, "tcp", port)[0]["registration"].as_str().unwrap().to_owned();
    assert!(registration.starts_with("config "), "static backends are the file's: {registration}");
    assert!(ctl.process.stderr_text().contains("tcp:"), "print-state from the file took effect");

    for i in 0..6u8 {
        assert_eq!(tcp_roundtrip(ctl.frontend(port), &[i; 3]).await.unwrap(), vec![i; 3]);
    }
    assert!(a.accepted() >= 3 && b.accepted() >= 3, "round robin over both: {} {}", a.accepted(), b.accepted());

    // b dies: the controller's checks take it out, with nothing registered to notice.
    let b_addr = b.addr;
    drop(b);
    let down = |s: &Value| addresses(s, port).contains(&(b_addr.to_string(), false));
    ctl.wait_state("the dead static backend out of rotation", down).await;
    let before = a.accepted();
    for i in 0..6u8 {
        assert_eq!(
            tcp_roundtrip(ctl.frontend(port), &[i; 2]).await.unwrap(),
            vec![i; 2],
            "no connection to the dead one"
        );
    }
    assert_eq!(a.accepted(), before + 6);

    // It comes back on the same address: back in rotation after `rise` good checks.
    b = TcpEcho::start(net.host(3), b_addr.port()).await;
    ctl.wait_state("the static backend back in rotation", both).await;
    for i in 0..6u8 {
        tcp_roundtrip(ctl.frontend(port), &[i]).await.unwrap();
    }
    assert!(b.accepted() >= 3, "traffic reaches it again: {}", b.accepted());
}

#[tokio::test]
async fn sighup_applies_the_changed_file_as_one_version_and_keeps_open_connections() {
    let net = Net::new();
    let kept = TcpEcho::start(net.host(2), 0).await;
    let old = TcpEcho::start(net.host(3), 0).await;
    let new = TcpEcho::start(net.host(4), 0).await;
    let added = TcpEcho::start(net.host(5), 0).await;
    let (unchanged, changing, appearing, vanishing) =
        (free_port(net.frontend()), free_port(net.frontend()), free_port(net.frontend()), free_port(net.frontend()));
    let file = ConfigFile::new(
        &net,
        &[service(unchanged, &[kept.addr]), service(changing, &[old.addr]), service(vanishing, &[old.addr])].concat(),
    );
    let ctl = Controller::spawn(net, &["--config", file.arg()]).await;
    let state = ctl
        .wait_state("the first load", |s| {
            addresses(s, unchanged).len() == 1
                && addresses(s, changing).len() == 1
                && addresses(s, vanishing).len() == 1
        })
        .await;
    let version = state["version"].as_u64().unwrap();

    // A connection through the unchanged service stays open across the reload.
    let mut open = TcpStream::connect(ctl.frontend(unchanged)).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    file.rewrite(
        &[
            service(unchanged, &[kept.addr]),
            service(changing, &[new.addr, added.addr]),
            service(appearing, &[added.addr]),
        ]
        .concat(),
    );
    ctl.process.hangup();
    ctl.process.wait_stderr("configuration reloaded", 1).await;
    let state = ctl
        .wait_state("the reload", |s| {
            addresses(s, changing).len() == 2
                && addresses(s, appearing).len() == 1
                && addresses(s, vanishing).is_empty()
        })
        .await;
    assert_eq!(state["version"].as_u64().unwrap(), version + 1, "the whole diff is one version");
    let changed: Vec<String> = addresses(&state, changing).into_iter().map(|(a, _)| a).collect();
    assert_eq!(changed, vec![new.addr.to_string(), added.addr.to_string()]);
    assert!(TcpStream::connect(ctl.frontend(vanishing)).await.is_err(), "a removed service's port is closed");
    assert_eq!(tcp_roundtrip(ctl.frontend(appearing), b"hi").await.unwrap(), b"hi");

    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!", "the open connection of the unchanged service lives on");
}

#[tokio::test]
async fn an_invalid_file_on_sighup_is_refused_and_nothing_changes() {
    let net = Net::new();
    let a = TcpEcho::start(net.host(2), 0).await;
    let port = free_port(net.frontend());
    let file = ConfigFile::new(&net, &service(port, &[a.addr]));
    let ctl = Controller::spawn(net, &["--config", file.arg()]).await;
    let before = ctl.wait_state("the static service", |s| addresses(s, port).len() == 1).await;

    // Not TOML; then TOML with a service no registration could make either (the controller's own port).
    let own = ctl.json_addr();
    let refusals = [
        (format!("{}[[service]]\nport = \"eighty\"\n", service(port, &[a.addr])), "eighty"),
        (service(port, &[a.addr, own]), "own listeners"),
        (format!("{}{}", service(port, &[a.addr]), service(own.port(), &[a.addr])), "own port"),
    ];
    for (n, (text, why)) in refusals.iter().enumerate() {
        file.rewrite(text);
        ctl.process.hangup();
        ctl.process.wait_stderr("configuration reload refused", n + 1).await;
        let line = ctl.process.stderr_text().lines().rfind(|l| l.contains("reload refused")).unwrap().to_owned();
        assert!(line.contains(why) && line.contains(file.arg()), "the reason and the file: {line}");
    }
    let after = ctl.state().await;
    assert_eq!(after["version"], before["version"], "nothing changed");
    assert_eq!(after["services"], before["services"]);
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"still").await.unwrap(), b"still");
}

#[tokio::test]
async fn the_example_configuration_is_valid_and_bad_files_say_where() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/controller.toml");
    let (code, stderr) = run_to_exit("controller", &["--config", example, "--check"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    // The file the package installs is valid too (its static services commented out).
    let installed = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/etc/controller.toml");
    let (code, stderr) = run_to_exit("controller", &["--config", installed, "--check"]).await;
    assert_eq!(code, Some(0), "{stderr}");

    let net = Net::new();
    let file = ConfigFile::new(&net, "json-listn = \"127.0.0.1:0\"\n");
    let (code, stderr) = run_to_exit("controller", &["--config", file.arg(), "--check"]).await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("unknown setting \"json-listn\"; did you mean \"json-listen\"?"), "{stderr}");
    file.rewrite("[[service]]\nport = 80\nbackends = [\"127.0.0.1:80\", \"127.0.0.1:80\"]\n");
    let (code, stderr) = run_to_exit("controller", &["--config", file.arg(), "--check"]).await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("[[service]] #1: backends: 127.0.0.1:80 is given twice"), "{stderr}");
    // The command line wins over the file.
    file.rewrite("json-listen = \"8080\"\n");
    let (code, _) =
        run_to_exit("controller", &["--config", file.arg(), "--json-listen", "127.0.0.1:0", "--check"]).await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_node_takes_its_settings_from_a_file_and_rechecks_it_on_sighup() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let settings = |interval: &str| {
        format!(
            "controller = \"{}\"\nnode-id = \"from-file\"\nfrontend-address = \"{}\"\nadmin-listen = \"{}\"\nload-report-interval = \"{interval}\"\n",
            ctl.grpc_url(),
            net.host(9),
            SocketAddr::new(net.host(9), 0)
        )
    };
    let file = ConfigFile::new(&net, &settings("100ms"));
    let node = Process::spawn(&Host::Root, "dataplane", &["--config".to_owned(), file.arg().to_owned()]).await;
    assert_eq!(node.ready.get("node").map(String::as_str), Some("from-file"));
    ctl.wait_synced(&["from-file"]).await;

    file.rewrite(&settings("200ms"));
    node.hangup();
    node.wait_stderr("changed settings apply at the next restart", 1).await;
    assert!(node.stderr_text().contains("load-report-interval"), "names the setting");
    file.rewrite("node-id = [\n");
    node.hangup();
    node.wait_stderr("configuration refused", 1).await;
    ctl.wait_synced(&["from-file"]).await;
}
