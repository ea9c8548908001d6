//! The client: one balanced gRPC channel to every member, and the KV and lease calls over it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{
    Error,
    etcdserverpb::{
        CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest,
        LeaseGrantResponse, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
        RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse, compare, kv_client::KvClient,
        lease_client::LeaseClient, request_op, watch_client::WatchClient,
    },
    lease::{LeaseKeepAliveStream, LeaseKeeper},
};

/// How the channel to the members behaves. Nothing set: tonic's defaults (no timeouts, no keep-alive).
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    keep_alive: Option<(Duration, Duration)>,
    keep_alive_while_idle: bool,
}

/// Options of [`Client::get`].
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    prefix: bool,
}

/// Options of [`Client::put`].
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    lease: i64,
}

/// Options of [`Client::compact`].
#[derive(Debug, Clone, Default)]
pub struct CompactionOptions {
    physical: bool,
}

/// A client of an etcd cluster. Clones share the channel, so each task can hold its own.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) kv: KvClient<Channel>,
    pub(crate) watch: WatchClient<Channel>,
    pub(crate) lease: LeaseClient<Channel>,
}

// === impl ConnectOptions ===

impl ConnectOptions {
    /// Default options.
    pub fn new() -> Self {
        ConnectOptions::default()
    }

    /// Gives up a connection attempt to a member after `timeout`.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Gives up a call that has no answer after `timeout` (for a stream: until it opens).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends an HTTP/2 ping every `interval` and drops the connection when one gets no answer in `timeout`:
    /// a member that vanished without closing is noticed, and a watch on it ends instead of hanging.
    pub fn with_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = Some((interval, timeout));
        self
    }

    /// Pings on idle connections too (a watch that nothing happens to is idle).
    pub fn with_keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.keep_alive_while_idle = enabled;
        self
    }

    fn endpoint(&self, member: &str) -> Result<Endpoint, Error> {
        let url = if member.starts_with("http://") { member.to_owned() } else { format!("http://{member}") };
        let bad = |reason: String| Error::Endpoint { endpoint: member.to_owned(), reason };
        let mut endpoint = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
        if endpoint.uri().host().is_none_or(str::is_empty) || endpoint.uri().port_u16().is_none() {
            return Err(bad("give HOST:PORT".to_owned()));
        }
        if let Some(timeout) = self.connect_timeout {
            endpoint = endpoint.connect_timeout(timeout);
        }
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some((interval, timeout)) = self.keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(self.keep_alive_while_idle);
        }
        Ok(endpoint)
    }
}

// === impl GetOptions ===

impl GetOptions {
    /// Default options: the key alone.
    pub fn new() -> Self {
        GetOptions::default()
    }

    /// Every key that starts with the key given.
    pub fn with_prefix(mut self) -> Self {
        self.prefix = true;
        self
    }
}

// === impl PutOptions ===

impl PutOptions {
    /// Default options: no lease.
    pub fn new() -> Self {
        PutOptions::default()
    }

    /// Puts the key under `lease`: it vanishes with the lease.
    pub fn with_lease(mut self, lease: i64) -> Self {
        self.lease = lease;
        self
    }
}

// === impl CompactionOptions ===

impl CompactionOptions {
    /// Default options: answer once the compaction is decided.
    pub fn new() -> Self {
        CompactionOptions::default()
    }

    /// Answers only once the compaction is applied to the members' databases.
    pub fn with_physical(mut self) -> Self {
        self.physical = true;
        self
    }
}

// === impl Client ===

impl Client {
    /// A client of the members at `endpoints` (`HOST:PORT` each). Connections are made when a call needs
    /// one, and calls are balanced over the members that are up, so one member down goes unnoticed.
    pub async fn connect<E: AsRef<str>>(
        endpoints: impl IntoIterator<Item = E>,
        options: Option<ConnectOptions>,
    ) -> Result<Client, Error> {
        let options = options.unwrap_or_default();
        let endpoints = endpoints.into_iter().map(|e| options.endpoint(e.as_ref())).collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Client {
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        })
    }

    /// The key, or with [`GetOptions::with_prefix`] every key under it.
    pub async fn get(&mut self, key: impl Into<Vec<u8>>, options: Option<GetOptions>) -> Result<RangeResponse, Error> {
        let (key, range_end) = range(key.into(), options.is_some_and(|o| o.prefix));
        Ok(self.kv.range(RangeRequest { key, range_end }).await?.into_inner())
    }

    /// Writes `value` at `key`.
    pub async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, Error> {
        let request = PutRequest { key: key.into(), value: value.into(), lease: options.map_or(0, |o| o.lease) };
        Ok(self.kv.put(request).await?.into_inner())
    }

    /// Deletes `key`.
    pub async fn delete(&mut self, key: impl Into<Vec<u8>>) -> Result<DeleteRangeResponse, Error> {
        Ok(self.kv.delete_range(DeleteRangeRequest { key: key.into() }).await?.into_inner())
    }

    /// Writes `value` at `key` only if the key does not exist, in one transaction (its create revision is
    /// 0). [`TxnResponse::succeeded`] says whether it was written.
    pub async fn put_if_absent(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<TxnResponse, Error> {
        let key = key.into();
        let absent = Compare {
            result: compare::CompareResult::Equal.into(),
            target: compare::CompareTarget::Create.into(),
            key: key.clone(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        };
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest { key, value: value.into(), lease: 0 })),
        };
        Ok(self.kv.txn(TxnRequest { compare: vec![absent], success: vec![put] }).await?.into_inner())
    }

    /// Forgets the history before `revision`: a watch that starts earlier is cancelled as compacted.
    pub async fn compact(
        &mut self,
        revision: i64,
        options: Option<CompactionOptions>,
    ) -> Result<CompactionResponse, Error> {
        let request = CompactionRequest { revision, physical: options.is_some_and(|o| o.physical) };
        Ok(self.kv.compact(request).await?.into_inner())
    }

    /// A new lease of `ttl` seconds.
    pub async fn lease_grant(&mut self, ttl: i64) -> Result<LeaseGrantResponse, Error> {
        Ok(self.lease.lease_grant(LeaseGrantRequest { ttl }).await?.into_inner())
    }

    /// Ends lease `id` and deletes its keys.
    pub async fn lease_revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        Ok(self.lease.lease_revoke(LeaseRevokeRequest { id }).await?.into_inner())
    }

    /// Opens a keep-alive stream for lease `id`: each [`LeaseKeeper::keep_alive`] renews it once and
    /// [`LeaseKeepAliveStream::message`] reads the answer (a TTL of 0 or less: the lease is gone).
    pub async fn lease_keep_alive(&mut self, id: i64) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Error> {
        let (requests, rx) = mpsc::channel(4);
        // etcd answers the stream's headers with the first response, so a request must be on its way
        // before the call can open: this one is the keeper's first keep-alive.
        requests.send(LeaseKeepAliveRequest { id }).await.map_err(|_| Error::StreamClosed("lease keep-alive"))?;
        let answers = self.lease.lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
        Ok((LeaseKeeper::new(id, requests), LeaseKeepAliveStream::new(answers)))
    }
}

/// The range a request names: `key` alone, or every key under it (see [`prefix_end`]).
pub(crate) fn range(key: Vec<u8>, prefix: bool) -> (Vec<u8>, Vec<u8>) {
    match (prefix, key.is_empty()) {
        (false, _) => (key, Vec::new()),
        // etcd refuses an empty key; "\0" to "\0" is its spelling of every key.
        (true, true) => (vec![0], vec![0]),
        (true, false) => {
            let end = prefix_end(&key);
            (key, end)
        }
    }
}

/// The end (exclusive) of the range of keys that start with `prefix`: the prefix with its last byte
/// below 0xff incremented and what follows it dropped; `"\0"` (to the end of the keyspace) when every byte
/// is 0xff or there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
