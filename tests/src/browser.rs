//! A headless Chromium driven over the W3C WebDriver protocol by `chromedriver` (Debian's `chromium` and
//! `chromium-driver`), both started by the test on loopback and killed when it ends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{net::SocketAddr, path::Path, time::Duration};

use base64::Engine;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::Child,
    time::{Instant, timeout},
};

use crate::harness::{DEADLINE, free_port, spawn_quiet};

/// Where Debian installs the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless session with a window of
    /// `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let ip = "127.0.0.1".parse().unwrap();
        let addr = SocketAddr::new(ip, free_port(ip));
        let driver = spawn_quiet("chromedriver", [format!("--port={}", addr.port())]);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok((200, status)) = request(addr, "GET", "/status", None).await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = std::env::temp_dir().join(format!("switchboard-chromium-{}-{}", std::process::id(), addr.port()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-extensions", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-proxy-server",
                         format!("--user-data-dir={}", profile.display()),
                         format!("--window-size={width},{height}")],
            }
        }}});
        let (status, body) = request(addr, "POST", "/session", Some(&capabilities)).await.expect("new session");
        assert_eq!(status, 200, "chromedriver refused the session: {body}");
        let session = body["value"]["sessionId"].as_str().expect("session id").to_owned();
        Browser { driver, addr, session, _profile: TempDir(profile) }
    }

    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, reply) = request(self.addr, method, &path, body).await.expect("webdriver request");
        assert_eq!(status, 200, "{method} {path}: {reply}");
        reply["value"].clone()
    }

    /// Opens `url`.
    pub async fn open(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({"url": url}))).await;
    }

    /// Runs `script` in the page and returns its result.
    pub async fn eval(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", Some(&json!({"script": script, "args": []}))).await
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        self.eval("return document.body.innerText").await.as_str().unwrap_or_default().to_owned()
    }

    /// Polls the page until `pred` holds for its text; fails the test after [`DEADLINE`].
    pub async fn wait_text(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.text().await;
            if pred(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}; it shows:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the element of CSS selector `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.command("POST", &format!("/element/{element}/value"), Some(&json!({"text": text}))).await;
    }

    /// Clicks the element of CSS selector `css`.
    pub async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.command("POST", &format!("/element/{element}/click"), Some(&json!({}))).await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self.command("POST", "/element", Some(&json!({"using": "css selector", "value": css}))).await;
        let id = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str);
        id.unwrap_or_else(|| panic!("no element {css}")).to_owned()
    }

    /// Resizes the window to `width` x `height`.
    pub async fn resize(&self, width: u32, height: u32) {
        self.command("POST", "/window/rect", Some(&json!({"width": width, "height": height}))).await;
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.command("GET", "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, bytes).unwrap();
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = request(self.addr, "DELETE", &path, None).await;
        let _ = self.driver.kill().await;
    }
}

/// One HTTP/1.1 request to chromedriver (which keeps the connection open, so the body is read by its
/// length): the status and the JSON body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut response = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if response.len() >= end + 4 + length {
                    response.truncate(end + 4 + length);
                    return Ok::<_, std::io::Error>(response);
                }
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(response);
            }
            response.extend_from_slice(&chunk[..n]);
        }
    };
    let response = timeout(Duration::from_secs(60), exchange).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("not HTTP"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}
