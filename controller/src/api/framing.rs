//! Framing of the HW1 JSON control channel: a streaming splitter that finds where each JSON value ends in
//! a byte stream, whatever the reads look like: newline-delimited, glued together (`{..}{..}`), or one
//! object split over several reads.
//!
//! The scanner keeps its position between reads, so every byte is scanned once however the input is
//! chopped (re-parsing the whole buffer on each read would be quadratic). Only a complete frame is handed
//! to serde_json. Garbage is cut at the next newline (or the next `{`), so one bad line does not poison the
//! connection.

use serde_json::Value;

/// Splits a byte stream into JSON frames. See the module documentation.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    limit: usize,
    scan: Scan,
}

/// One frame out of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete JSON value.
    Value(Value),
    /// Bytes that are not JSON, with the parser's reason.
    Invalid(String),
}

/// Where the scanner is inside the first frame of the buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    /// Bytes of the buffer already scanned.
    pos: usize,
    /// Nesting depth of `{` / `[` (0 before the frame starts).
    depth: usize,
    in_string: bool,
    escaped: bool,
}

// === impl Framer ===

impl Framer {
    /// A framer that refuses to buffer more than `limit` bytes of one unfinished frame.
    pub fn new(limit: usize) -> Self {
        Framer { buf: Vec::new(), limit, scan: Scan::default() }
    }

    /// Appends bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// True when more than `limit` bytes wait without a complete frame: the peer must be cut off.
    pub fn is_over_limit(&self) -> bool {
        self.buf.len() > self.limit
    }

    /// The next complete frame, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Option<Frame> {
        // Skip whitespace between frames.
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(self.buf.len());
        if start > 0 {
            self.buf.drain(..start);
            self.scan.pos = self.scan.pos.saturating_sub(start);
        }
        let first = *self.buf.first()?;
        let end = if first == b'{' || first == b'[' { self.scan_container()? } else { self.scan_scalar()? };
        let frame: Vec<u8> = self.buf.drain(..end).collect();
        self.scan = Scan::default();
        Some(match serde_json::from_slice::<Value>(&frame) {
            Ok(value) => Frame::Value(value),
            Err(_) if is_http_request(&frame) => Frame::Invalid(HTTP_HINT.to_owned()),
            Err(error) => Frame::Invalid(error.to_string()),
        })
    }

    /// End of a `{...}` or `[...]` frame: brackets balanced outside strings. A raw newline inside a string
    /// cannot be JSON, so the frame is cut there to resynchronise on the next line.
    fn scan_container(&mut self) -> Option<usize> {
        let s = &mut self.scan;
        while s.pos < self.buf.len() {
            let b = self.buf[s.pos];
            s.pos += 1;
            if s.in_string {
                match b {
                    _ if s.escaped => s.escaped = false,
                    b'\\' => s.escaped = true,
                    b'"' => s.in_string = false,
                    b'\n' => return Some(s.pos),
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => s.in_string = true,
                b'{' | b'[' => s.depth += 1,
                b'}' | b']' => {
                    s.depth = s.depth.saturating_sub(1);
                    if s.depth == 0 {
                        return Some(s.pos);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// End of a frame that does not start with a bracket (a bare scalar or garbage): up to the next
    /// newline or `{`, whichever comes first. At the end of the buffer it may still be growing: wait.
    fn scan_scalar(&mut self) -> Option<usize> {
        let Some(at) = self.buf[self.scan.pos..].iter().position(|&b| b == b'\n' || b == b'{') else {
            self.scan.pos = self.buf.len();
            return None;
        };
        let end = self.scan.pos + at;
        // `end` may be 0 only for '{', which never gets here; a newline is consumed with the frame.
        Some(if self.buf[end] == b'\n' { end + 1 } else { end })
    }
}

/// What an HTTP request on this port is told.
pub const HTTP_HINT: &str = "this port speaks JSON, one object per line (the HW1 control channel), not HTTP: \
send {\"cmd\":\"register\",\"protocol\":\"tcp\",\"port\":80}; the admin HTTP server is on --admin-listen";

/// True when `frame` is an HTTP request line (`GET / HTTP/1.1` and the like).
fn is_http_request(frame: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];
    METHODS.iter().any(|m| frame.starts_with(m)) && frame.windows(5).any(|w| w == b"HTTP/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(framer: &mut Framer) -> Vec<Frame> {
        std::iter::from_fn(|| framer.next_frame()).collect()
    }

    #[test]
    fn newline_delimited_and_glued_objects() {
        let mut f = Framer::new(1024);
        f.push(b"{\"cmd\":\"hello\"}\n{\"a\":1}{\"ack\":\"hello\"}  \r\n");
        assert_eq!(
            frames(&mut f),
            vec![
                Frame::Value(json!({"cmd":"hello"})),
                Frame::Value(json!({"a":1})),
                Frame::Value(json!({"ack":"hello"}))
            ]
        );
        assert!(frames(&mut f).is_empty());
    }

    #[test]
    fn an_object_split_anywhere_is_reassembled() {
        let text = br#"{"cmd":"register","protocol":"tcp","port":80,"note":"a } in a \" string {"}"#;
        for split in 0..text.len() {
            let mut f = Framer::new(1024);
            f.push(&text[..split]);
            let early = frames(&mut f);
            assert!(early.is_empty(), "split at {split}: {early:?}");
            f.push(&text[split..]);
            assert_eq!(frames(&mut f), vec![Frame::Value(serde_json::from_slice(text).unwrap())], "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_input_is_scanned_once() {
        let mut f = Framer::new(1 << 20);
        let mut text = b"{\"k\":\"".to_vec();
        text.extend(std::iter::repeat_n(b'x', 100_000));
        text.extend(b"\"}");
        for b in &text {
            f.push(std::slice::from_ref(b));
            if f.next_frame().is_some() {
                assert_eq!(f.buf.len(), 0);
            }
        }
        // If each push re-scanned from the start this test would take minutes.
        assert_eq!(f.scan.pos, 0);
    }

    #[test]
    fn garbage_is_reported_and_the_stream_resynchronises() {
        let mut f = Framer::new(1024);
        f.push(b"hello world\n{\"cmd\": register}\n[1,2]\n42\n{\"bad\":\"line\n{\"ok\":true}");
        let got = frames(&mut f);
        assert!(matches!(&got[0], Frame::Invalid(_)), "{got:?}");
        assert!(matches!(&got[1], Frame::Invalid(_)), "{got:?}");
        assert_eq!(got[2], Frame::Value(json!([1, 2])));
        assert_eq!(got[3], Frame::Value(json!(42)));
        assert!(matches!(&got[4], Frame::Invalid(_)), "{got:?}");
        assert_eq!(got[5], Frame::Value(json!({"ok":true})));
        assert_eq!(got.len(), 6);

        // Garbage glued to an object.
        let mut f = Framer::new(1024);
        f.push(b"xx{\"ok\":1}");
        let got = frames(&mut f);
        assert!(matches!(&got[0], Frame::Invalid(_)));
        assert_eq!(got[1], Frame::Value(json!({"ok":1})));
    }

    #[test]
    fn stray_closing_brackets_and_deep_nesting_do_not_panic() {
        let mut f = Framer::new(1 << 20);
        f.push(b"}}]]\n");
        assert!(matches!(f.next_frame(), Some(Frame::Invalid(_))));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        f.push(deep.as_bytes());
        // serde_json's recursion limit turns this into an error, not a stack overflow.
        assert!(matches!(f.next_frame(), Some(Frame::Invalid(_))));
    }

    #[test]
    fn an_http_request_line_is_told_this_port_speaks_json() {
        let mut f = Framer::new(1024);
        f.push(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(f.next_frame(), Some(Frame::Invalid(HTTP_HINT.to_owned())));
        assert!(matches!(f.next_frame(), Some(Frame::Invalid(why)) if why != HTTP_HINT));
    }

    #[test]
    fn an_unfinished_frame_over_the_limit_is_flagged() {
        let mut f = Framer::new(16);
        f.push(b"{\"cmd\":\"register\",");
        assert!(f.next_frame().is_none());
        assert!(f.is_over_limit());
    }
}
