//! The part of the etcd v3 gRPC API Switchboard uses, compiled in pure Rust, and a small client over it.
//! Controllers run as replicas on etcd (`--store etcd://...`) through this crate: it lists and watches a
//! prefix, writes keys under a lease and keeps the lease alive, creates a key only if it is absent, and
//! (for the tests) compacts and revokes. The `.proto` files under `proto/` are Switchboard's own subset of
//! etcd's API, with etcd's package, service, method and message names and field numbers, so what goes
//! on the wire is etcd's; `build.rs` compiles them with protox, so building needs no `protoc`.
//!
//! # Layout
//! - [`etcdserverpb`], [`mvccpb`]: the generated messages and clients (KV, Watch, Lease).
//! - [`Client`]: one balanced channel to every member; range, put, delete, put-if-absent, compact,
//!   lease grant / revoke / keep-alive.
//! - [`WatchStream`]: one watch's responses: creation, events, progress, cancellation and compaction.
//! - [`LeaseKeeper`], [`LeaseKeepAliveStream`]: a lease's renewals and their answers.
//! - [`Error`]: what a call can end in.

#![forbid(unsafe_code)]

mod client;
mod error;
mod lease;
mod watch;

pub use client::{Client, CompactionOptions, ConnectOptions, GetOptions, PutOptions, prefix_end};
pub use error::Error;
pub use lease::{LeaseKeepAliveStream, LeaseKeeper};
pub use watch::{WatchOptions, WatchStream};

/// Generated code of package `mvccpb` (`proto/mvccpb/kv.proto`): keys and watch events.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// Generated code of package `etcdserverpb` (`proto/etcdserverpb/rpc.proto`): the KV, Watch and Lease
/// clients and their messages.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Every response carries the store's revision in its header; `revision()` reads it (0 without a header).
macro_rules! revision {
    ($($response:ident),+) => {$(
        impl etcdserverpb::$response {
            /// The store's revision when etcd served this (from the header; 0 without one).
            pub fn revision(&self) -> i64 {
                self.header.as_ref().map_or(0, |h| h.revision)
            }
        }
    )+};
}

revision!(
    RangeResponse,
    PutResponse,
    DeleteRangeResponse,
    TxnResponse,
    CompactionResponse,
    WatchResponse,
    LeaseGrantResponse,
    LeaseRevokeResponse,
    LeaseKeepAliveResponse
);

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::{
        client::range,
        etcdserverpb::{PutRequest, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse, watch_request},
        mvccpb::{Event, KeyValue, event::EventType},
        prefix_end,
    };

    #[test]
    fn a_prefix_ends_at_its_last_byte_below_0xff_plus_one() {
        assert_eq!(prefix_end(b"/sb/"), b"/sb0");
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), b"a\xff");
        // Nothing to increment: to the end of the keyspace.
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
        // A key alone has no range end; an empty prefix is every key.
        assert_eq!(range(b"k".to_vec(), false), (b"k".to_vec(), Vec::new()));
        assert_eq!(range(b"/p/".to_vec(), true), (b"/p/".to_vec(), b"/p0".to_vec()));
        assert_eq!(range(Vec::new(), true), (vec![0], vec![0]));
    }

    #[test]
    fn a_put_request_is_encoded_with_etcds_field_numbers() {
        let put = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 7 };
        // key = 1 (bytes), value = 2 (bytes), lease = 3 (varint).
        let wire = [0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 7];
        assert_eq!(put.encode_to_vec(), wire);
        assert_eq!(PutRequest::decode(&wire[..]).unwrap(), put);
    }

    #[test]
    fn a_watch_create_request_round_trips() {
        let create = WatchCreateRequest {
            key: b"/p/".to_vec(),
            range_end: b"/p0".to_vec(),
            start_revision: 42,
            progress_notify: true,
        };
        let request = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
        let wire = request.encode_to_vec();
        // create_request = 1, holding key = 1, range_end = 2, start_revision = 3, progress_notify = 4.
        let inner = [0x0a, 3, b'/', b'p', b'/', 0x12, 3, b'/', b'p', b'0', 0x18, 42, 0x20, 1];
        assert_eq!(wire[..2], [0x0a, inner.len() as u8]);
        assert_eq!(wire[2..], inner);
        assert_eq!(WatchRequest::decode(wire.as_slice()).unwrap(), request);
    }

    #[test]
    fn a_watch_response_from_etcd_decodes_and_skips_fields_it_does_not_declare() {
        // As etcd sends it: header (cluster_id = 1, revision = 3), watch_id = 2 (undeclared), canceled = 4,
        // compact_revision = 5, cancel_reason = 6, and one event (11) whose kv has create_revision = 2 and
        // version = 4 (undeclared) besides key, mod_revision, value and lease.
        let kv = [0x0a, 1, b'k', 0x10, 3, 0x18, 9, 0x20, 2, 0x2a, 1, b'v', 0x30, 5];
        let event = [&[0x08, 1, 0x12, kv.len() as u8][..], &kv].concat();
        let wire = [
            &[0x0a, 4, 0x08, 99, 0x18, 12][..],
            &[0x10, 3, 0x20, 1, 0x28, 8, 0x32, 2, b'n', b'o'],
            &[0x5a, event.len() as u8],
            &event,
        ]
        .concat();
        let response = WatchResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(response.revision(), 12);
        assert!(response.canceled && !response.created);
        assert_eq!((response.compact_revision, response.cancel_reason.as_str()), (8, "no"));
        let kv = KeyValue { key: b"k".to_vec(), mod_revision: 9, value: b"v".to_vec(), lease: 5 };
        assert_eq!(response.events, [Event { r#type: EventType::Delete.into(), kv: Some(kv) }]);
        assert_eq!(response.events[0].r#type(), EventType::Delete);

        // And back: what Switchboard declares survives a round trip.
        let again = WatchResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again, response);
        assert_eq!(again.header, Some(ResponseHeader { revision: 12 }));
    }

    #[test]
    fn bytes_that_are_not_etcds_messages_are_an_error_not_a_panic() {
        // Cut short (events says 127 bytes follow, none do), a field of the wrong wire type (header as a
        // varint), a varint that never ends, an HTTP/1 answer.
        let cases: [&[u8]; 4] = [&[0x5a, 0x7f], &[0x08, 1], &[0x18, 0xff, 0xff, 0xff], b"HTTP/1.1 400 Bad Request\r\n"];
        for wire in cases {
            assert!(WatchResponse::decode(wire).is_err(), "{wire:?}");
        }
    }
}
