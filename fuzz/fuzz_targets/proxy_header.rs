//! Any bytes as the start of a connection to a frontend that accepts the PROXY protocol: the v1 line and
//! the v2 header parsers must refuse or accept, never panic, and an accepted v2 header must survive being
//! written again.

#![no_main]

use dataplane::proxy::{self, Received, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proxy::parse_v1(data);
    if data.len() >= 16 {
        let mut head = [0u8; 16];
        head.copy_from_slice(&data[..16]);
        if let Ok(Received::Proxied { source, destination }) = proxy::parse_v2(&head, &data[16..]) {
            let again = proxy::encode_v2(Transport::Stream, source, destination);
            let mut head = [0u8; 16];
            head.copy_from_slice(&again[..16]);
            assert!(matches!(proxy::parse_v2(&head, &again[16..]), Ok(Received::Proxied { .. })));
        }
    }
});
