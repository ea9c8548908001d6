//! The JSON control channel as a hostile client drives it: any bytes, split at any points, through the
//! framer and the request parser. Nothing may panic, and the framer must never hold more than its limit
//! plus one read.

#![no_main]

use controller::api::{
    framing::{Frame, Framer},
    request::Request,
};
use libfuzzer_sys::fuzz_target;

/// A small limit, so the over-limit path is reached too.
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, mut rest)) = data.split_first() else { return };
    // The first byte chooses how the stream is chopped into reads: 1 to 256 bytes each.
    let chunk = usize::from(split) + 1;
    let mut framer = Framer::new(LIMIT);
    while !rest.is_empty() {
        let (read, tail) = rest.split_at(chunk.min(rest.len()));
        rest = tail;
        framer.push(read);
        while let Some(frame) = framer.next_frame() {
            if let Frame::Value(value) = frame {
                let _ = Request::parse(&value);
            }
        }
        if framer.is_over_limit() {
            // The connection would be cut here.
            return;
        }
    }
});
