//! Processes: the workspace's binaries built once and spawned with their READY line read and stderr
//! kept, outside programs, per-test loopback networks, free ports and temporary directories.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// Binaries and processes

/// Path of a workspace binary, built first if needed.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/e2e-HASH -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target directory").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "--workspace", "--bins"]).current_dir(workspace);
        // Cargo gives this test its package's CARGO_* variables; build scripts that watch them (ring's) would
        // otherwise see a changed environment and rebuild on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_") && !matches!(&*key, "CARGO_HOME" | "CARGO_TARGET_DIR") {
                build.env_remove(&*key);
            }
        }
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        dir
    });
    dir.join(name)
}

/// A running binary, killed when dropped. Its stderr is kept and printed if the test fails.
pub struct Process {
    name: String,
    child: Child,
    /// `key=value` pairs of its READY line.
    pub ready: HashMap<String, String>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Collects stderr until the process closes it.
    stderr_reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Starts `name` with `args` on `host` and waits for its `READY` line on stdout.
    pub async fn spawn(host: &Host, name: &str, args: &[String]) -> Process {
        Process::spawn_command(host.command(&bin(name)), name, args).await
    }

    /// Starts `name` under a file-descriptor limit of `nofile` (soft and hard), with `prlimit`, as a
    /// machine with the common limit of 1,024 would.
    pub async fn spawn_with_fd_limit(name: &str, args: &[String], nofile: u32) -> Process {
        assert!(
            std::process::Command::new("prlimit").arg("--version").output().is_ok(),
            "prlimit (util-linux) is needed to run a binary under a descriptor limit"
        );
        let mut command = tokio::process::Command::new("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).arg("--").arg(bin(name));
        Process::spawn_command(command, name, args).await
    }

    async fn spawn_command(mut command: tokio::process::Command, name: &str, args: &[String]) -> Process {
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info,dataplane=debug,controller=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = Arc::clone(&stderr);
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let mut out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut process =
            Process { name: name.to_owned(), child, ready: HashMap::new(), stderr, stderr_reader: Some(stderr_reader) };
        let ready = timeout(DEADLINE, async {
            loop {
                match out_lines.next_line().await {
                    Ok(Some(line)) if line.starts_with("READY ") => return Some(line),
                    Ok(Some(_)) => {}
                    _ => return None,
                }
            }
        })
        .await;
        let Ok(Some(line)) = ready else {
            panic!("{name} printed no READY line\n{}", process.stderr_text());
        };
        tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });
        process.ready = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        process
    }

    /// An address of the READY line.
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.ready.get(key).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("READY has no {key}="))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it (SIGKILL: a crash, no clean-up) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("process still running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        let pid = self.child.id().expect("process still running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// Polls stderr until a line contains `text` (at least `count` such lines), or fails the test after
    /// [`DEADLINE`].
    pub async fn wait_stderr(&self, text: &str, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.stderr_text().lines().filter(|l| l.contains(text)).count() < count {
            assert!(Instant::now() < deadline, "{} never logged {text:?}:\n{}", self.name, self.stderr_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to `limit`) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = timeout(limit, self.child.wait()).await.expect("process did not exit in time").unwrap();
        // Everything it wrote before exiting is then in `stderr_text`.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = timeout(limit, reader).await;
        }
        status.code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- stderr of {} -----\n{}\n----- end of {} -----", self.name, self.stderr_text(), self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Per-test networks

/// A loopback /24 of its own for one test: `.1` for frontends, other hosts for backends. Nothing else
/// binds these addresses, so a port picked by one backend is free on every other host of the block.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    a: u8,
    b: u8,
}

impl Net {
    /// A block no other test of this run uses (and, by the process id, unlikely any other run).
    pub fn new() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 64;
        // 127.0.0.0/16 is left to everything else.
        let a = u8::try_from(n / 256 % 254).unwrap() + 1;
        let b = u8::try_from(n % 256).unwrap();
        Net { a, b }
    }

    /// Host `n` of the block.
    pub fn host(&self, n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.a, self.b, n))
    }

    /// Where frontends listen.
    pub fn frontend(&self) -> IpAddr {
        self.host(1)
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Agents and other programs

/// Starts `agent` with `args` against `ctl` and waits for its READY line (it prints it once registered).
pub async fn spawn_agent(ctl: &Controller, args: &[&str]) -> Process {
    let mut all = vec!["--controller".to_owned(), ctl.grpc_url(), "--backoff-max".to_owned(), "300ms".to_owned()];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    Process::spawn(&Host::Root, "agent", &all).await
}

/// Runs workspace binary `name` with `args` until it exits (at most [`DEADLINE`]); returns its exit code
/// and stderr.
pub async fn run_to_exit(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = timeout(
        DEADLINE,
        tokio::process::Command::new(bin(name)).args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .expect("the program did not exit in time")
    .expect("the program could not start");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A directory of one test's own (named after its network block), readable by unprivileged helpers such as
/// nginx workers, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory for the test that owns `net`; `what` says what it holds.
    pub fn new(net: &Net, what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("switchboard-{what}-{}-{}", std::process::id(), net.host(0)));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name`, aside first and then renamed into place, as editors and
    /// configuration managers do: a reader never sees half a file. Returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let (path, aside) = (self.0.join(name), self.0.join(format!(".{name}.new")));
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on `ip` (bound and released: on a test's own loopback block nothing else takes it).
pub fn free_port(ip: IpAddr) -> u16 {
    loop {
        let port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
        if !is_controller_port(port) {
            return port;
        }
    }
}

/// Ports the controllers of this test binary listen on. The controller refuses them as service ports
/// (whatever the address), so test backends stay off them.
static CONTROLLER_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

pub(super) fn note_controller_ports(process: &Process) {
    let ports = ["json", "grpc", "admin"].map(|key| process.addr(key).port());
    CONTROLLER_PORTS.lock().unwrap().extend(ports);
}

pub(super) fn is_controller_port(port: u16) -> bool {
    CONTROLLER_PORTS.lock().unwrap().contains(&port)
}

/// Starts an outside program with `args`, its input and output discarded, killed when dropped.
pub fn spawn_quiet<S: AsRef<std::ffi::OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Child {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}
