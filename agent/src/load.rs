//! `--report-load`: the load of the server the agent stands beside, sent with each hello answer for the
//! controller's `least_load` balancing. One number in thousandths, 1000 meaning fully loaded (it may pass
//! 1000 when a server is overloaded; it is capped at 10,000):
//!
//! - `--load-command CMD`: the number `sh -c CMD` prints (1.0 = fully loaded), for servers that know better;
//! - `--cgroup PATH`: the larger of the cgroup's CPU use (of its `cpu.max` quota, else of every core) and its
//!   memory use (of `memory.max`, else of the host's memory), from cgroup v2's files;
//! - otherwise the host's: the larger of CPU utilisation (`/proc/stat`) and memory in use
//!   (`/proc/meminfo`: total less available).
//!
//! CPU use is a rate, so it needs two readings: the first sample gives memory alone.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{process::Command, time::timeout};

/// The most a report may say, in thousandths.
const LOAD_MAX: u32 = 10_000;

/// Where the load comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadSource {
    /// The host's CPU and memory.
    Host,
    /// A cgroup v2 directory's CPU and memory.
    Cgroup(PathBuf),
    /// The number a command prints.
    Command(String),
}

/// Takes load samples from a source, remembering the last CPU reading.
#[derive(Debug)]
pub struct LoadSampler {
    source: LoadSource,
    /// Time one command may take.
    limit: Duration,
    /// The last CPU reading: (busy, available) in one unit (host: jiffies; cgroup: microseconds).
    last_cpu: Option<(u64, u64)>,
    /// Where a cgroup's available CPU time counts from.
    started: Instant,
}

// === impl LoadSampler ===

impl LoadSampler {
    /// A sampler of `source`; a `--load-command` gets `limit` to answer.
    pub fn new(source: LoadSource, limit: Duration) -> Self {
        LoadSampler { source, limit, last_cpu: None, started: Instant::now() }
    }

    /// The load now, in thousandths, or why there is none.
    pub async fn sample(&mut self) -> Result<u32, String> {
        let (cpu, memory) = match &self.source {
            LoadSource::Command(command) => return self.command(command).await.map(permille),
            LoadSource::Host => {
                let cpu = host_cpu(&read("/proc/stat")?).ok_or("/proc/stat: no cpu line")?;
                let memory = host_memory(&read("/proc/meminfo")?).ok_or("/proc/meminfo: no MemTotal/MemAvailable")?;
                (cpu, memory)
            }
            LoadSource::Cgroup(dir) => {
                let usage = cgroup_usage_usec(&read(dir.join("cpu.stat"))?).ok_or("cpu.stat: no usage_usec")?;
                let cpus = cgroup_cpus(&read(dir.join("cpu.max")).unwrap_or_default())
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64));
                let current: f64 = read(dir.join("memory.current"))?.trim().parse().map_err(|_| "memory.current")?;
                let limit = match read(dir.join("memory.max")).unwrap_or_default().trim() {
                    "max" | "" => host_memory_total(&read("/proc/meminfo")?).ok_or("/proc/meminfo: no MemTotal")?,
                    bytes => bytes.parse().map_err(|_| "memory.max")?,
                };
                // CPU time the cgroup may have used since the sampler started: its CPUs times the wall time.
                let available = (self.started.elapsed().as_secs_f64() * 1e6 * cpus) as u64;
                ((usage, available), current / limit.max(1.0))
            }
        };
        Ok(permille(self.cpu_rate(cpu).map_or(memory, |cpu| cpu.max(memory))))
    }

    async fn command(&self, command: &str) -> Result<f64, String> {
        let run = Command::new("sh").args(["-c", command]).kill_on_drop(true).output();
        let output = timeout(self.limit, run)
            .await
            .map_err(|_| format!("load command {command:?}: no answer within {:?}", self.limit))?
            .map_err(|e| format!("load command {command:?}: {e}"))?;
        if !output.status.success() {
            return Err(format!("load command {command:?}: {}", output.status));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let value: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("load command {command:?} printed {:?}, not a number", text.trim()))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("load command {command:?} printed {value}, not a load"));
        }
        Ok(value)
    }

    /// The share of busy time since the last reading: busy over available, both counted since then.
    fn cpu_rate(&mut self, (busy, total): (u64, u64)) -> Option<f64> {
        let rate = self.last_cpu.and_then(|(last_busy, last_total)| {
            let elapsed = total.checked_sub(last_total).filter(|&t| t > 0)?;
            Some(busy.saturating_sub(last_busy) as f64 / elapsed as f64)
        });
        self.last_cpu = Some((busy, total));
        rate
    }
}

/// Samples every `interval` and publishes the latest load on `load` (none while sampling fails, so the
/// controller ages the last report out), logging a failure when it starts and when it ends.
pub async fn sample_every(mut sampler: LoadSampler, interval: Duration, load: tokio::sync::watch::Sender<Option<u32>>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    while !load.is_closed() {
        ticks.tick().await;
        match sampler.sample().await {
            Ok(value) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(load = value, "load reports again");
                }
                load.send_replace(Some(value));
            }
            Err(why) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%why, "no load to report; the controller ages the last one out");
                }
                load.send_replace(None);
            }
        }
    }
}

fn read(path: impl AsRef<Path>) -> Result<String, String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A fraction as thousandths, capped.
fn permille(fraction: f64) -> u32 {
    let value = (fraction * 1000.0).round();
    if value.is_nan() || value <= 0.0 { 0 } else { (value as u64).min(u64::from(LOAD_MAX)) as u32 }
}

/// (busy, total) jiffies of the `cpu` line of `/proc/stat`; idle and iowait are not busy.
fn host_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    if fields.len() < 4 {
        return None;
    }
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Memory in use on the host, as a fraction: 1 − MemAvailable / MemTotal.
fn host_memory(meminfo: &str) -> Option<f64> {
    let available = meminfo_kib(meminfo, "MemAvailable:")?;
    let total = host_memory_total(meminfo)?;
    Some(1.0 - available * 1024.0 / total.max(1.0))
}

/// MemTotal in bytes.
fn host_memory_total(meminfo: &str) -> Option<f64> {
    meminfo_kib(meminfo, "MemTotal:").map(|kib| kib * 1024.0)
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<f64> {
    meminfo.lines().find_map(|l| l.strip_prefix(key)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// `usage_usec` of a cgroup's `cpu.stat`.
fn cgroup_usage_usec(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok())
}

/// The CPUs a cgroup's `cpu.max` (`QUOTA PERIOD`, or `max PERIOD`) allows; `None`: no quota.
fn cgroup_cpus(max: &str) -> Option<f64> {
    let mut fields = max.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next()?.parse().ok()?;
    (period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_and_cgroup_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(host_cpu(stat), Some((150, 1000)));
        let meminfo = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(host_memory(meminfo), Some(0.75));
        assert_eq!(cgroup_usage_usec("usage_usec 12345\nuser_usec 1\n"), Some(12345));
        assert_eq!(cgroup_cpus("150000 100000\n"), Some(1.5));
        assert_eq!(cgroup_cpus("max 100000\n"), None);
        assert_eq!((permille(0.25), permille(-1.0), permille(99.0), permille(f64::NAN)), (250, 0, LOAD_MAX, 0));
    }

    #[test]
    fn cpu_is_a_rate_between_two_readings() {
        let mut sampler = LoadSampler::new(LoadSource::Host, Duration::from_secs(1));
        assert_eq!(sampler.cpu_rate((100, 1000)), None, "one reading is no rate");
        assert_eq!(sampler.cpu_rate((400, 1500)), Some(0.6));
    }

    #[tokio::test]
    async fn a_command_says_the_load_or_why_not() {
        let sampler = |c: &str| LoadSampler::new(LoadSource::Command(c.into()), Duration::from_secs(2));
        assert_eq!(sampler("echo 0.9").sample().await, Ok(900));
        assert_eq!(sampler("echo ' 0.05 '").sample().await, Ok(50));
        assert!(sampler("echo busy").sample().await.unwrap_err().contains("not a number"));
        assert!(sampler("exit 3").sample().await.unwrap_err().contains("exit status: 3"));
        assert!(sampler("echo -1").sample().await.unwrap_err().contains("not a load"));
        // The host's own figures are there on Linux.
        let mut host = LoadSampler::new(LoadSource::Host, Duration::from_secs(1));
        assert!(host.sample().await.is_ok());
        assert!(host.sample().await.is_ok());
    }
}
