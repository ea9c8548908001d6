//! Frontend sockets: binding them the way a load balancer needs (one socket per worker, large backlog,
//! address reuse for TCP, never for UDP).

use std::net::SocketAddr;

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::error::FrontendError;

/// Listen backlog of TCP frontends: a small one drops SYNs under new-connection floods.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP frontend as `count` listening sockets on one address, one per worker, sharing the port
/// through `SO_REUSEPORT` so the kernel spreads new connections over them.
///
/// `SO_REUSEPORT` would also let another process of the same user join the group silently, so the port is
/// first bound alone, without it: a port that anyone holds fails here with the OS error, as it did with a
/// single socket. `SO_REUSEADDR` lets a restarted node bind while old connections sit in TIME_WAIT.
pub fn bind_tcp(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, FrontendError> {
    let group = || join_tcp(free_port(tcp_socket(addr, false)?)?, count.max(1));
    group().map_err(|source| FrontendError::Bind { addr, source })
}

/// `count` more listening sockets in the `SO_REUSEPORT` group already bound on `addr` (a node that took
/// over a frontend from one with fewer workers).
pub fn join_tcp(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..count)
        .map(|_| {
            let socket = tcp_socket(addr, true)?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket.into())
        })
        .collect()
}

fn tcp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProtocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Binds a UDP frontend as `count` sockets on one address, one per worker (`SO_REUSEPORT`: the kernel
/// hashes each client's address and port to one socket, so a client's datagrams always reach the same
/// worker and its session). Checked free first, as for TCP; no `SO_REUSEADDR`, which on UDP would let two
/// sockets share the port silently.
pub fn bind_udp(addr: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>, FrontendError> {
    let group = || join_udp(free_port(udp_socket(addr, false)?)?, count.max(1));
    group().map_err(|source| FrontendError::Bind { addr, source })
}

/// `count` more sockets in the `SO_REUSEPORT` group already bound on `addr`.
pub fn join_udp(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    (0..count).map(|_| Ok(udp_socket(addr, true)?.into())).collect()
}

fn udp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProtocol::UDP))?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The address `probe` got (the port chosen when port 0 was asked), with the probe closed again.
fn free_port(probe: Socket) -> std::io::Result<SocketAddr> {
    probe.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_reported_with_the_os_error() {
        let first = bind_tcp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert_eq!(first.len(), 2);
        let addr = first[0].local_addr().unwrap();
        assert_eq!(first[1].local_addr().unwrap(), addr);
        // Another group on the same port is refused, even though both ask for SO_REUSEPORT.
        let err = bind_tcp(addr, 2).unwrap_err().to_string();
        assert!(err.starts_with(&format!("bind {addr}: ")), "{err}");
        assert!(err.contains("in use"), "{err}");

        let udp = bind_udp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert!(bind_udp(udp[0].local_addr().unwrap(), 1).is_err());
    }
}
