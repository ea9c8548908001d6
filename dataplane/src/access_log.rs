//! Access logs: one JSON line per finished TCP connection and per ended UDP session (`--access-log`).
//!
//! The data path only hands a small [`AccessRecord`] to a bounded queue, without waiting; one thread of
//! its own formats and writes the lines, so a slow disk or a blocked pipe never stalls relaying. When
//! the writer falls that far behind, records are dropped and counted
//! (`switchboard_access_log_dropped_records_total`), never queued without bound.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::{Duration, SystemTime},
};

use contract::model::ServiceKey;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Records queued at most before new ones are dropped.
pub const QUEUE: usize = 16 * 1024;

/// Where access lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// The data path's end of the access log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    queue: SyncSender<AccessRecord>,
    dropped: Counter,
}

/// One finished connection or session.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When it ended.
    pub ended: SystemTime,
    /// Its service (protocol and port).
    pub service: ServiceKey,
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client reached.
    pub frontend: Option<SocketAddr>,
    /// The backend it was relayed to, if any.
    pub backend: Option<SocketAddr>,
    /// Bytes from the client to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend to the client.
    pub bytes_out: u64,
    /// UDP only: datagrams each way.
    pub datagrams: Option<(u64, u64)>,
    /// From accept (or first datagram) to the end.
    pub duration: Duration,
    /// How it ended: `closed`, `error`, `drained`, `idle`, `no_backend`, ...
    pub end: &'static str,
}

/// The JSON line of a record.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    protocol: &'a str,
    service: String,
    client: SocketAddr,
    frontend: Option<SocketAddr>,
    backend: Option<SocketAddr>,
    bytes_in: u64,
    bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    datagrams_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datagrams_out: Option<u64>,
    duration_ms: f64,
    end: &'a str,
}

// === impl AccessLogTarget ===

impl std::str::FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;

    /// `-` is standard output, anything else a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "-" { AccessLogTarget::Stdout } else { AccessLogTarget::File(PathBuf::from(s)) })
    }
}

impl std::fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLogTarget::Stdout => f.write_str("standard output"),
            AccessLogTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

// === impl AccessLog ===

impl AccessLog {
    /// Opens `target` and starts its writer thread; `dropped` counts records the queue had no room for.
    pub fn open(target: &AccessLogTarget, dropped: Counter) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(io::stdout()),
            AccessLogTarget::File(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (queue, records) = sync_channel(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || write_lines(records, out))?;
        Ok(AccessLog { queue, dropped })
    }

    /// Queues `record` without waiting; dropped (and counted) when the writer is that far behind.
    pub fn record(&self, record: AccessRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(record) {
            self.dropped.inc();
        }
    }
}

/// The writer thread: one line per record, flushed whenever the queue is empty. Ends when every sender
/// is gone (the node stopped), or when writing fails.
fn write_lines(records: Receiver<AccessRecord>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    while let Ok(record) = records.recv() {
        let mut next = Some(record);
        while let Some(record) = next {
            if write_line(&mut out, &record).is_err() {
                return;
            }
            next = records.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn write_line(out: &mut impl Write, record: &AccessRecord) -> io::Result<()> {
    let line = Line {
        time: humantime::format_rfc3339_millis(record.ended).to_string(),
        protocol: record.service.protocol.as_str(),
        service: record.service.to_string(),
        client: record.client,
        frontend: record.frontend,
        backend: record.backend,
        bytes_in: record.bytes_in,
        bytes_out: record.bytes_out,
        datagrams_in: record.datagrams.map(|(d, _)| d),
        datagrams_out: record.datagrams.map(|(_, d)| d),
        duration_ms: (record.duration.as_secs_f64() * 1e6).round() / 1e3,
        end: record.end,
    };
    serde_json::to_writer(&mut *out, &line).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line() {
        let record = AccessRecord {
            ended: SystemTime::UNIX_EPOCH,
            service: ServiceKey::udp(53),
            client: "127.0.0.1:4000".parse().unwrap(),
            frontend: Some("127.0.0.1:53".parse().unwrap()),
            backend: Some("127.0.0.2:53".parse().unwrap()),
            bytes_in: 10,
            bytes_out: 20,
            datagrams: Some((1, 2)),
            duration: Duration::from_micros(1500),
            end: "idle",
        };
        let mut out = Vec::new();
        write_line(&mut out, &record).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["protocol"], "udp");
        assert_eq!(json["service"], "udp:53");
        assert_eq!(json["client"], "127.0.0.1:4000");
        assert_eq!(json["bytes_out"], 20);
        assert_eq!(json["datagrams_out"], 2);
        assert_eq!(json["duration_ms"], 1.5);
        assert_eq!(json["end"], "idle");
    }
}
