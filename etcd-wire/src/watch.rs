//! Watches: one create request up a stream, then the watch's responses down it.
//!
//! What comes down, in order: a response with `created` set (the watch exists; no events); responses with
//! events, each at most one revision's; with progress notify, empty ones that only move the header's
//! revision; and at the end, a response with `canceled` set, with `compact_revision` set when the start
//! revision was compacted away (the history to replay is gone: list again, then watch from the list's
//! revision) and `cancel_reason` when etcd says why. A stream that ends, or fails, ends the watch too.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{
    Client, Error,
    client::range,
    etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse, watch_request::RequestUnion},
};

/// Options of [`Client::watch`].
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    prefix: bool,
    start_revision: i64,
    progress_notify: bool,
}

/// One watch's responses. Dropping it cancels the watch (the call ends).
#[derive(Debug)]
pub struct WatchStream {
    /// Held so the request half stays open: etcd ends every watch of a stream whose requests end.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

// === impl WatchOptions ===

impl WatchOptions {
    /// Default options: the key alone, from the next revision, no progress notifications.
    pub fn new() -> Self {
        WatchOptions::default()
    }

    /// Every key that starts with the key given.
    pub fn with_prefix(mut self) -> Self {
        self.prefix = true;
        self
    }

    /// Replays the changes from `revision` on first (if etcd still has them; otherwise the watch is
    /// cancelled with `compact_revision` set).
    pub fn with_start_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Asks for an empty response with the current revision when nothing changes for a while, so the
    /// revision held moves on and a silent connection is noticed.
    pub fn with_progress_notify(mut self) -> Self {
        self.progress_notify = true;
        self
    }
}

// === impl Client ===

impl Client {
    /// Watches `key` (or with [`WatchOptions::with_prefix`] every key under it). Returns once etcd has
    /// opened the stream; the first response is the watch's creation, or its cancellation.
    pub async fn watch(
        &mut self,
        key: impl Into<Vec<u8>>,
        options: Option<WatchOptions>,
    ) -> Result<WatchStream, Error> {
        let options = options.unwrap_or_default();
        let (key, range_end) = range(key.into(), options.prefix);
        let create = WatchCreateRequest {
            key,
            range_end,
            start_revision: options.start_revision,
            progress_notify: options.progress_notify,
        };
        let (requests, rx) = mpsc::channel(1);
        // etcd sends the stream's headers with its answer to the create request, so the request goes first.
        let request = WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
        requests.send(request).await.map_err(|_| Error::StreamClosed("watch"))?;
        let responses = self.watch.watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(WatchStream { _requests: requests, responses })
    }
}

// === impl WatchStream ===

impl WatchStream {
    /// The next response; `None` when etcd ended the stream.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        Ok(self.responses.message().await?)
    }
}
