//! A lease's keep-alive stream: renewals go up, answers come down.

use tokio::sync::mpsc;
use tonic::Streaming;

use crate::{
    Error,
    etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse},
};

/// Renews one lease on its keep-alive stream. Dropping it ends the stream.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    /// The request sent to open the stream is the first renewal: the first call sends nothing.
    opened: bool,
}

/// The answers to a [`LeaseKeeper`]'s renewals, one per renewal, in order.
#[derive(Debug)]
pub struct LeaseKeepAliveStream {
    answers: Streaming<LeaseKeepAliveResponse>,
}

// === impl LeaseKeeper ===

impl LeaseKeeper {
    pub(crate) fn new(id: i64, requests: mpsc::Sender<LeaseKeepAliveRequest>) -> Self {
        LeaseKeeper { id, requests, opened: true }
    }

    /// The lease it renews.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Renews the lease once; its answer comes on the [`LeaseKeepAliveStream`].
    pub async fn keep_alive(&mut self) -> Result<(), Error> {
        if std::mem::take(&mut self.opened) {
            return Ok(());
        }
        let request = LeaseKeepAliveRequest { id: self.id };
        self.requests.send(request).await.map_err(|_| Error::StreamClosed("lease keep-alive"))
    }
}

// === impl LeaseKeepAliveStream ===

impl LeaseKeepAliveStream {
    pub(crate) fn new(answers: Streaming<LeaseKeepAliveResponse>) -> Self {
        LeaseKeepAliveStream { answers }
    }

    /// The next answer; `None` when etcd ended the stream.
    pub async fn message(&mut self) -> Result<Option<LeaseKeepAliveResponse>, Error> {
        Ok(self.answers.message().await?)
    }
}
