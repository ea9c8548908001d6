//! Listeners of the control plane with a bound on open connections. Past it, a new connection is closed at
//! once, so a flood of connections to one door cannot take the descriptors the other doors need; accept
//! errors (out of descriptors) back off and are logged once in a while, not every time.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use contract::limit::{Limit, Permit, Throttle};
use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// A listener that holds at most `limit` connections open.
#[derive(Debug)]
pub struct CappedListener {
    listener: TcpListener,
    limit: Arc<Limit>,
    errors: Throttle,
}

/// An accepted connection, counted against its listener's limit until dropped.
#[derive(Debug)]
pub struct CappedStream {
    inner: TcpStream,
    _permit: Permit,
}

// === impl CappedListener ===

impl CappedListener {
    /// `listener`, holding at most `max` connections of `what` ("gRPC connections").
    pub fn new(listener: TcpListener, what: &'static str, max: usize) -> Self {
        CappedListener { listener, limit: Limit::new(what, max), errors: Throttle::new(Duration::from_secs(10)) }
    }

    /// The next connection within the limit; those past it are closed on arrival.
    pub async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((inner, peer)) => match self.limit.try_take(1) {
                    Some(permit) => return (CappedStream { inner, _permit: permit }, peer),
                    None => self.limit.refused(),
                },
                Err(error) => {
                    if let Some(held_back) = self.errors.admit(Instant::now()) {
                        warn!(%error, repeated = held_back, "accept failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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
        let (_third, _) = tokio::time::timeout(Duration::from_secs(5), third).await.unwrap().unwrap();
    }
}
