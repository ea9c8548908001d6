//! Listeners of the control plane with a bound on open connections, in all, per source address and per
//! prefix (`door.rs`). A connection that makes no request in time is closed, and a full door makes room
//! for a newcomer by evicting its connection idle the longest, so connections that do nothing cannot
//! hold it; accept errors (out of descriptors) back off and are logged once in a while, not every time.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use contract::limit::AcceptErrors;
use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::door::{Activity, Door, Slot};

/// A listener whose connections are held within its [`Door`].
#[derive(Debug)]
pub struct CappedListener {
    listener: TcpListener,
    door: Arc<Door>,
    errors: AcceptErrors,
}

/// An accepted connection, counted in its door until dropped. Its reads fail (and the server then closes
/// it) once it is evicted, or when it has made no request for its door's timeouts.
#[derive(Debug)]
pub struct CappedStream {
    inner: TcpStream,
    slot: Slot,
    /// Armed at the connection's deadline while no request is in flight.
    timer: Pin<Box<Sleep>>,
}

// === impl CappedListener ===

impl CappedListener {
    /// `listener`, holding its connections within `door`.
    pub fn new(listener: TcpListener, door: Arc<Door>) -> Self {
        let errors = AcceptErrors::new(door.name());
        CappedListener { listener, door, errors }
    }

    /// Its door.
    pub fn door(&self) -> &Arc<Door> {
        &self.door
    }

    /// The next connection within the door; those it has no room for are closed on arrival.
    pub async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((inner, peer)) => match self.door.admit(peer) {
                    Ok(slot) => {
                        // gRPC and HTTP write small frames and wait for answers: Nagle's wait for the
                        // peer's delayed ACK would add up to 40 ms to each.
                        let _ = inner.set_nodelay(true);
                        let timer = Box::pin(tokio::time::sleep_until(slot.activity().accepted()));
                        return (CappedStream { inner, slot, timer }, peer);
                    }
                    Err(_) => drop(inner),
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

// === impl CappedStream ===

impl Connected for CappedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl CappedStream {
    /// What the connection is doing.
    pub fn activity(&self) -> &Arc<Activity> {
        self.slot.activity()
    }

    /// Why the connection is to be closed now, if it is.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let activity = self.slot.activity();
        // Woken when a request ends (the idle timer starts) or a newcomer takes the place.
        activity.register_reader(cx.waker());
        if activity.is_evicted() {
            return Some(io::Error::new(io::ErrorKind::ConnectionAborted, "evicted: the door is full"));
        }
        let deadline = activity.deadline(&self.slot.door().timeouts())?;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.slot.door().timed_out();
        let why = match activity.first_seen() {
            false => "no request within --first-request-timeout",
            true => "no request within --idle-connection-timeout",
        };
        tracing::debug!(door = self.slot.door().name(), peer = ?self.inner.peer_addr().ok(), why, "closing");
        Some(io::Error::new(io::ErrorKind::TimedOut, why))
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.poll_closing(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
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
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::api::door::{DoorCaps, DoorTimeouts};

    fn door(max: usize, first_request: Duration) -> Arc<Door> {
        let caps = DoorCaps { max, per_source: max, per_prefix: max };
        Door::new("test", "test connections", caps, DoorTimeouts { first_request, idle: Duration::from_secs(60) })
    }

    #[tokio::test]
    async fn a_busy_door_refuses_an_idle_one_makes_room_and_room_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = CappedListener::new(listener, door(1, Duration::from_secs(60)));
        let mut first_client = TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = capped.accept().await;
        let busy = first.activity().enter();
        // The second is accepted and closed at once; accept goes on waiting for one within the cap.
        let mut second_client = TcpStream::connect(addr).await.unwrap();
        let third = tokio::spawn(async move {
            let (mut third, _) = capped.accept().await;
            // Idle: the next newcomer takes its place, and its reads fail.
            let _fourth = capped.accept().await;
            third.read(&mut [0u8; 1]).await
        });
        let mut byte = [0u8; 1];
        assert_eq!(second_client.read(&mut byte).await.unwrap(), 0, "closed past the cap");
        first_client.write_all(b"x").await.unwrap();
        first.read_exact(&mut byte).await.unwrap();
        drop(busy);
        drop(first);
        let _third_client = TcpStream::connect(addr).await.unwrap();
        let _fourth_client = TcpStream::connect(addr).await.unwrap();
        let evicted = tokio::time::timeout(Duration::from_secs(5), third).await.unwrap().unwrap();
        assert_eq!(evicted.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn a_connection_without_a_request_fails_its_reads_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = CappedListener::new(listener, door(4, Duration::from_millis(100)));
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut silent, _) = capped.accept().await;
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 1])).await.unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(silent.slot.door().timeouts_fired(), 1);
    }
}
