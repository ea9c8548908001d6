//! Frontend sockets: binding them the way a load balancer needs (large backlog, address reuse for TCP,
//! never for UDP).

use std::net::SocketAddr;

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use crate::error::FrontendError;

/// Listen backlog of TCP frontends: a small one drops SYNs under new-connection floods.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP frontend. `SO_REUSEADDR` lets a restarted node bind while old connections sit in
/// TIME_WAIT; it does not let two live listeners share the port, so conflicts still fail here.
pub fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, FrontendError> {
    let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProtocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    bind(addr).map_err(|source| FrontendError::Bind { addr, source })
}

/// Binds a UDP frontend. No `SO_REUSEADDR`: on UDP it would let two sockets share the port silently.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, FrontendError> {
    let bind = |addr: SocketAddr| -> std::io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProtocol::UDP))?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        UdpSocket::from_std(socket.into())
    };
    bind(addr).map_err(|source| FrontendError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_reported_with_the_os_error() {
        let first = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind_tcp(addr).unwrap_err().to_string();
        assert!(err.starts_with(&format!("bind {addr}: ")), "{err}");
        assert!(err.contains("in use"), "{err}");

        let udp = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(bind_udp(udp.local_addr().unwrap()).is_err());
    }
}
