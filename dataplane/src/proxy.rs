//! The PROXY protocol (haproxy.org's `proxy-protocol.txt`): the v2 header a node sends a backend so it
//! learns the client's address (TCP: once, before the connection's bytes; UDP: before each datagram, as v2
//! defines for `DGRAM`), and the v1 or v2 header a balancer in front sends the node, read before anything
//! else of the connection. Parsing is a pure function of the bytes, so it is tested (and fuzzable) without
//! sockets; reading takes exactly the header's bytes from the stream and leaves the client's data unread.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str,
    time::Duration,
};

use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

/// The twelve bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 header, `\r\n` included.
const V1_MAX: usize = 107;

/// Longest v2 address block and TLVs taken from a client; the protocol allows 65535, a balancer in front
/// sends a few hundred at most.
const V2_BODY_MAX: usize = 2048;

/// Which transport a v2 header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `STREAM`: a TCP connection.
    Stream,
    /// `DGRAM`: a UDP datagram.
    Dgram,
}

/// A header read from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The connection is on behalf of `source`, which reached the front balancer at `destination`.
    Proxied {
        /// The original client.
        source: SocketAddr,
        /// Where it connected to.
        destination: SocketAddr,
    },
    /// The front balancer speaks for itself (v2 `LOCAL`, v1 `UNKNOWN`, or a family other than IP): the
    /// connection's own addresses stand.
    Local,
}

/// What is wrong with a header from a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes are not a PROXY header, or break its rules.
    #[error("bad PROXY header: {0}")]
    Invalid(&'static str),
    /// The client closed or failed before the header was whole.
    #[error("connection ended inside the PROXY header")]
    Truncated,
    /// The header did not arrive in time.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
}

/// The v2 header for a connection (or datagram) from `source` to `destination`. Addresses of two
/// families are both written as IPv6 (an IPv4 one mapped), since a header has one family.
pub fn encode_v2(transport: Transport, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = (canonical(source), canonical(destination));
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&V2_SIGNATURE);
    // Version 2, command PROXY.
    header.push(0x21);
    let transport_bits = match transport {
        Transport::Stream => 0x01,
        Transport::Dgram => 0x02,
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.push(0x10 | transport_bits);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        (s, d) => {
            header.push(0x20 | transport_bits);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&v6(s).octets());
            header.extend_from_slice(&v6(d).octets());
        }
    }
    header.extend_from_slice(&src.port().to_be_bytes());
    header.extend_from_slice(&dst.port().to_be_bytes());
    header
}

/// Reads one v1 or v2 header from the start of `stream` within `limit`, taking exactly its bytes.
pub async fn read(stream: &mut TcpStream, limit: Duration) -> Result<Received, ProxyError> {
    timeout(limit, read_header(stream)).await.map_err(|_| ProxyError::Timeout(limit))?
}

async fn read_header(stream: &mut TcpStream) -> Result<Received, ProxyError> {
    let mut head = [0u8; 16];
    // Both versions' shortest headers are at least 15 bytes; the first 6 tell which one this is.
    read_exact(stream, &mut head[..6]).await?;
    if &head[..6] == b"PROXY " {
        let mut line = head[..6].to_vec();
        // Byte by byte: what follows the line is the client's, not ours to read.
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyError::Invalid("v1 line longer than 107 bytes"));
            }
            let mut byte = [0u8; 1];
            read_exact(stream, &mut byte).await?;
            line.push(byte[0]);
        }
        return parse_v1(&line);
    }
    if head[..6] != V2_SIGNATURE[..6] {
        return Err(ProxyError::Invalid("neither v1 (PROXY ...) nor the v2 signature"));
    }
    read_exact(stream, &mut head[6..]).await?;
    let length = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if length > V2_BODY_MAX {
        return Err(ProxyError::Invalid("v2 address block and TLVs longer than 2048 bytes"));
    }
    let mut body = vec![0u8; length];
    read_exact(stream, &mut body).await?;
    parse_v2(&head, &body)
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyError> {
    stream.read_exact(buf).await.map(drop).map_err(|_| ProxyError::Truncated)
}

/// A whole v1 line, `\r\n` included.
pub fn parse_v1(line: &[u8]) -> Result<Received, ProxyError> {
    let text = str::from_utf8(line).map_err(|_| ProxyError::Invalid("v1 line is not ASCII"))?;
    let text = text.strip_suffix("\r\n").ok_or(ProxyError::Invalid("v1 line does not end with CRLF"))?;
    let mut fields = text.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ProxyError::Invalid("v1 line does not start with PROXY"));
    }
    let family = fields.next().ok_or(ProxyError::Invalid("v1 line has no family"))?;
    if family == "UNKNOWN" {
        return Ok(Received::Local);
    }
    let rest: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = rest[..] else {
        return Err(ProxyError::Invalid("v1 line needs source, destination and two ports"));
    };
    let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| ProxyError::Invalid("v1 address is not an IP"));
    let port = |s: &str| {
        // Decimal without leading zeros, as the specification says.
        if s.len() > 1 && s.starts_with('0') {
            return Err(ProxyError::Invalid("v1 port has a leading zero"));
        }
        s.parse::<u16>().map_err(|_| ProxyError::Invalid("v1 port is not 0..=65535"))
    };
    let (src, dst) = (ip(src)?, ip(dst)?);
    let family_matches = match family {
        "TCP4" => src.is_ipv4() && dst.is_ipv4(),
        "TCP6" => src.is_ipv6() && dst.is_ipv6(),
        _ => return Err(ProxyError::Invalid("v1 family is not TCP4, TCP6 or UNKNOWN")),
    };
    if !family_matches {
        return Err(ProxyError::Invalid("v1 addresses are not of the family named"));
    }
    Ok(Received::Proxied {
        source: SocketAddr::new(src, port(sport)?),
        destination: SocketAddr::new(dst, port(dport)?),
    })
}

/// A v2 header: its first 16 bytes, then the `length` bytes they announce.
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Received, ProxyError> {
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyError::Invalid("not the v2 signature"));
    }
    if head[12] >> 4 != 2 {
        return Err(ProxyError::Invalid("v2 version is not 2"));
    }
    match head[12] & 0x0f {
        0 => return Ok(Received::Local),
        1 => {}
        _ => return Err(ProxyError::Invalid("v2 command is neither LOCAL nor PROXY")),
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    if transport > 2 {
        return Err(ProxyError::Invalid("v2 transport is not STREAM or DGRAM"));
    }
    let need = |n: usize| if body.len() < n { Err(ProxyError::Invalid("v2 address block too short")) } else { Ok(()) };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match family {
        1 => {
            need(12)?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
            Ok(Received::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        2 => {
            need(36)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Ok(Received::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // UNSPEC and UNIX: no IP address to take; the connection's own stand.
        0 | 3 => Ok(Received::Local),
        _ => Err(ProxyError::Invalid("v2 family is not UNSPEC, INET, INET6 or UNIX")),
    }
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(header: &[u8]) -> ([u8; 16], &[u8]) {
        let mut head = [0u8; 16];
        head.copy_from_slice(&header[..16]);
        (head, &header[16..])
    }

    #[test]
    fn v2_headers_round_trip_for_both_families_and_transports() {
        let cases = [
            ("192.0.2.7:40000", "127.0.0.1:443", 0x11, 12),
            ("[2001:db8::7]:40000", "[::1]:443", 0x21, 36),
            // Mixed families are both written as IPv6.
            ("192.0.2.7:40000", "[::1]:443", 0x21, 36),
        ];
        for (src, dst, family, length) in cases {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let header = encode_v2(Transport::Stream, src, dst);
            assert_eq!(&header[..12], &V2_SIGNATURE);
            assert_eq!((header[12], header[13], usize::from(header[15])), (0x21, family, length));
            let (head, body) = split(&header);
            let Received::Proxied { source, destination } = parse_v2(&head, body).unwrap() else { panic!() };
            assert_eq!((canonical(source), canonical(destination)), (src, canonical(dst)));
        }
        let udp = encode_v2(Transport::Dgram, "10.0.0.1:5000".parse().unwrap(), "10.0.0.2:53".parse().unwrap());
        assert_eq!(udp[13], 0x12);
        // A v4-mapped client is written as IPv4.
        let mapped =
            encode_v2(Transport::Stream, "[::ffff:10.0.0.1]:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        assert_eq!(mapped[13], 0x11);
    }

    #[test]
    fn v1_lines_parse_or_say_why() {
        let ok = parse_v1(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n").unwrap();
        assert_eq!(
            ok,
            Received::Proxied {
                source: "192.0.2.7:40000".parse().unwrap(),
                destination: "127.0.0.1:443".parse().unwrap()
            }
        );
        assert!(matches!(parse_v1(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"), Ok(Received::Proxied { .. })));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(Received::Local));
        assert_eq!(parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), Ok(Received::Local));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\n"[..],
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n",
            b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"HELLO\r\n",
            b"PROXY TCP4 1.2.3.4 \xff 1 2\r\n",
        ] {
            assert!(matches!(parse_v1(bad), Err(ProxyError::Invalid(_))), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v2_headers_that_break_the_rules_are_refused() {
        let good = encode_v2(Transport::Stream, "192.0.2.7:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let (head, body) = split(&good);
        let mut local = head;
        local[12] = 0x20;
        assert_eq!(parse_v2(&local, &[]), Ok(Received::Local));
        for (at, value, why) in [
            (0usize, b'X', "not the v2 signature"),
            (12, 0x11, "v2 version is not 2"),
            (12, 0x22, "v2 command"),
            (13, 0x51, "v2 family"),
            (13, 0x13, "v2 transport"),
        ] {
            let mut bad = head;
            bad[at] = value;
            let error = parse_v2(&bad, body).unwrap_err().to_string();
            assert!(error.contains(why), "{at}: {error}");
        }
        assert!(parse_v2(&head, &body[..8]).unwrap_err().to_string().contains("too short"));
        let mut unix = head;
        unix[13] = 0x31;
        assert_eq!(parse_v2(&unix, &[0; 216]), Ok(Received::Local));
    }

    #[tokio::test]
    async fn reading_takes_exactly_the_header_and_leaves_the_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let v2 = encode_v2(Transport::Stream, "192.0.2.7:40000".parse().unwrap(), addr);
        let inputs: Vec<(Vec<u8>, Result<Received, ProxyError>)> = vec![
            (
                [b"PROXY TCP4 192.0.2.9 127.0.0.1 1234 80\r\n".as_slice(), b"GET /"].concat(),
                Ok(Received::Proxied {
                    source: "192.0.2.9:1234".parse().unwrap(),
                    destination: "127.0.0.1:80".parse().unwrap(),
                }),
            ),
            (
                [v2.as_slice(), b"GET /"].concat(),
                Ok(Received::Proxied { source: "192.0.2.7:40000".parse().unwrap(), destination: addr }),
            ),
            (b"GET / HTTP/1.1\r\n".to_vec(), Err(ProxyError::Invalid("neither v1 (PROXY ...) nor the v2 signature"))),
            (b"PROXY TCP4".to_vec(), Err(ProxyError::Truncated)),
            ([b"PROXY ".as_slice(), &[b'x'; 120]].concat(), Err(ProxyError::Invalid("v1 line longer than 107 bytes"))),
        ];
        for (input, expected) in inputs {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut client, &input).await.unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut client).await.unwrap();
            let got = read(&mut server, Duration::from_secs(2)).await;
            assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(&input));
            if got.is_ok() {
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest, b"GET /", "the client's data is left for the backend");
            }
        }
        // A client that says nothing is timed out.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let limit = Duration::from_millis(50);
        assert_eq!(read(&mut server, limit).await, Err(ProxyError::Timeout(limit)));
    }
}
