//! A worker's receive batch for UDP frontends: one recvmmsg(2) takes every datagram waiting, up to
//! [`BATCH_SIZE`], into buffers the worker thread keeps, each with its sender.

use std::{
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::fd::RawFd,
};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};

/// Largest UDP payload (and a little more, so a datagram that fills a buffer is never cut short).
pub(crate) const MAX_DATAGRAM: usize = 65_536;

/// Most datagrams one receive call takes, and most replies a session passes per wake-up.
pub const BATCH_SIZE: usize = 32;

/// A worker's receive batch: buffers for [`BATCH_SIZE`] datagrams, filled by one recvmmsg(2).
pub(crate) struct Batch {
    /// One buffer per datagram, each as large as the largest.
    pub(crate) buffers: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Buffer index, length and sender of each datagram received.
    pub(crate) received: Vec<(usize, usize, SocketAddr)>,
}

impl Batch {
    pub(crate) fn new() -> Self {
        Batch {
            buffers: (0..BATCH_SIZE).map(|_| vec![0; MAX_DATAGRAM]).collect(),
            headers: MultiHeaders::preallocate(BATCH_SIZE, None),
            received: Vec::with_capacity(BATCH_SIZE),
        }
    }

    /// Receives what is waiting, without blocking; `WouldBlock` when nothing is. Returns how many
    /// datagrams were too large and left out.
    pub(crate) fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received.clear();
        let mut truncated = 0;
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            self.buffers.iter_mut().map(|buffer| [IoSliceMut::new(buffer)]).collect();
        let messages = recvmmsg(fd, &mut self.headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)?;
        for (index, message) in messages.enumerate() {
            // Buffers hold the largest datagram; a truncated one is never passed on cut short.
            if message.flags.contains(MsgFlags::MSG_TRUNC) {
                truncated += 1;
            } else if let Some(sender) = message.address.as_ref().and_then(socket_addr) {
                self.received.push((index, message.bytes, sender));
            }
        }
        Ok(truncated)
    }
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn one_call_receives_every_waiting_datagram_with_its_sender() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = Batch::new();
        let empty = batch.receive(socket.as_raw_fd()).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        for i in 0..3u8 {
            client.send_to(&[i; 10], socket.local_addr().unwrap()).unwrap();
        }
        assert_eq!(batch.receive(socket.as_raw_fd()).unwrap(), 0);
        let got: Vec<_> =
            batch.received.iter().map(|&(i, len, from)| (batch.buffers[i][..len].to_vec(), from)).collect();
        let sender = client.local_addr().unwrap();
        assert_eq!(got, (0..3u8).map(|i| (vec![i; 10], sender)).collect::<Vec<_>>());
    }
}
