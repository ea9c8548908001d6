//! Listeners of the control plane with a bound on open connections, in all and per source address. Past
//! either, a new connection is closed at once, so a flood of connections to one door cannot take the
//! descriptors the other doors need, and one host cannot take a whole door; accept errors (out of
//! descriptors) back off and are logged once in a while, not every time.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use contract::limit::{AcceptErrors, Limit, Permit};
use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A listener that holds at most `limit` connections open, and a quarter of them (at least 4) from one
/// source address.
#[derive(Debug)]
pub struct CappedListener {
    listener: TcpListener,
    limit: Arc<Limit>,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_source: usize,
    errors: AcceptErrors,
}

/// An accepted connection, counted against its listener's limits until dropped.
#[derive(Debug)]
pub struct CappedStream {
    inner: TcpStream,
    _permit: Permit,
    _source: SourceSlot,
}

/// One connection of one source address, counted out on drop.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

// === impl CappedListener ===

impl CappedListener {
    /// `listener`, holding at most `max` connections of `what` ("gRPC connections").
    pub fn new(listener: TcpListener, what: &'static str, max: usize) -> Self {
        CappedListener {
            listener,
            limit: Limit::new(what, max),
            sources: Arc::default(),
            per_source: (max / 4).max(4),
            errors: AcceptErrors::new(what),
        }
    }

    /// A slot for one more connection from `ip`, if it holds fewer than its share.
    fn source_slot(&self, ip: IpAddr) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let held = sources.entry(ip).or_default();
        if *held >= self.per_source {
            return None;
        }
        *held += 1;
        Some(SourceSlot { sources: Arc::clone(&self.sources), ip })
    }

    /// The next connection within the limit; those past it are closed on arrival.
    pub async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((inner, peer)) => match (self.source_slot(peer.ip()), self.limit.try_take(1)) {
                    (Some(source), Some(permit)) => {
                        // gRPC and HTTP write small frames and wait for answers: Nagle's wait for the
                        // peer's delayed ACK would add up to 40 ms to each.
                        let _ = inner.set_nodelay(true);
                        return (CappedStream { inner, _permit: permit, _source: source }, peer);
                    }
                    _ => self.limit.refused(),
                },
                Err(error) => self.errors.back_off(&error).await,
            }
        }
    }

    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn incoming(self) -> impl Stream<Item = io::Result<CappedStream>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (stream, _) = listener.accept().await;
            Some((Ok(stream), listener))
        })
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        CappedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

// === impl SourceSlot ===

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = sources.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

// === impl CappedStream ===

impl Connected for CappedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_room_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = CappedListener::new(listener, "test connections", 1);
        let mut first_client = TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = capped.accept().await;
        // The second is accepted and closed at once; accept goes on waiting for one within the cap.
        let mut second_client = TcpStream::connect(addr).await.unwrap();
        let third = tokio::spawn(async move { capped.accept().await });
        let mut byte = [0u8; 1];
        assert_eq!(second_client.read(&mut byte).await.unwrap(), 0, "closed past the cap");
        first_client.write_all(b"x").await.unwrap();
        first.read_exact(&mut byte).await.unwrap();
        drop(first);
        let _third_client = TcpStream::connect(addr).await.unwrap();
        let (_third, _) = tokio::time::timeout(std::time::Duration::from_secs(5), third).await.unwrap().unwrap();
    }
}
