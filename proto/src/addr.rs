//! Address flags: one parser per kind of address, shared by every binary, whose error shows the form it
//! expects with an example built from what was typed (`--json-listen 8080` is told to write
//! `0.0.0.0:8080`). Use them as clap value parsers: `#[arg(long, value_parser = contract::addr::socket_addr)]`.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

/// An `IP:PORT` flag value (an IPv6 address in brackets), e.g. `0.0.0.0:8080` or `[::1]:8080`. Host names
/// are not looked up: a listener or a target is an address.
pub fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("invalid address {value:?}: expected IP:PORT, {}", socket_hint(value.trim())))
}

/// An IP address flag value, without a port, e.g. `0.0.0.0`, `127.0.0.2` or `::1`.
pub fn ip_addr(value: &str) -> Result<IpAddr, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("invalid IP address {value:?}: expected an IP address, {}", ip_hint(value.trim())))
}

/// An IPv4 address flag value, e.g. `127.0.0.101`.
pub fn ipv4_addr(value: &str) -> Result<Ipv4Addr, String> {
    value.trim().parse().map_err(|_| {
        let hint = match value.trim().parse::<std::net::Ipv6Addr>() {
            Ok(_) => "not IPv6, e.g. 127.0.0.1".to_owned(),
            Err(_) => ip_hint(value.trim()),
        };
        format!("invalid IPv4 address {value:?}: expected an IPv4 address, {hint}")
    })
}

/// What an operator can do about a listener of `binary` that `--flag` put on `addr` and the OS refused
/// with `error`: a sentence to follow the OS error (starting with `; `), or nothing when there is no advice.
pub fn bind_hint(error: &io::Error, addr: &SocketAddr, binary: &str, flag: &str) -> String {
    match error.kind() {
        io::ErrorKind::AddrInUse => format!("; is another {binary} running? Use --{flag} to pick another address."),
        io::ErrorKind::AddrNotAvailable => {
            format!("; {} is not an address of this host. Use --{flag} to pick another address.", addr.ip())
        }
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            format!("; ports below 1024 need root. Use --{flag} to pick another port.")
        }
        _ => String::new(),
    }
}

/// How to write `value` as `IP:PORT`: the example, after any note on what went wrong.
fn socket_hint(value: &str) -> String {
    // A URL: its address, if it has one.
    if let Some((_, rest)) = value.split_once("://") {
        let authority = rest.split('/').next().unwrap_or_default();
        return match authority.parse::<SocketAddr>() {
            Ok(addr) => format!("not a URL, e.g. {addr}"),
            Err(_) => format!("not a URL, {}", socket_hint(authority)),
        };
    }
    // A bare port, or `:PORT`: the address that port on every interface would be.
    if let Ok(port) = value.strip_prefix(':').unwrap_or(value).parse::<u16>() {
        return format!("e.g. 0.0.0.0:{port} or [::1]:{port}");
    }
    // An address without its port.
    match value.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip @ IpAddr::V4(_)) => return format!("the port is missing, e.g. {}", SocketAddr::new(ip, 8080)),
        Ok(ip @ IpAddr::V6(_)) => {
            return format!(
                "the port is missing (an IPv6 address goes in brackets), e.g. {}",
                SocketAddr::new(ip, 8080)
            );
        }
        Err(_) => {}
    }
    if let Some((host, port)) = value.rsplit_once(':') {
        match port.parse::<u32>() {
            Ok(port) if port > u32::from(u16::MAX) => {
                return format!("the port {port} is not in 0..=65535, e.g. 0.0.0.0:8080 or [::1]:8080");
            }
            Ok(port) if !host.is_empty() && host.parse::<IpAddr>().is_err() && !host.starts_with('[') => {
                return format!("host names are not looked up, e.g. 127.0.0.1:{port} or [::1]:{port}");
            }
            _ => {}
        }
    }
    "e.g. 0.0.0.0:8080 or [::1]:8080".to_owned()
}

/// How to write `value` as an IP address.
fn ip_hint(value: &str) -> String {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return format!("without a port, e.g. {}", addr.ip());
    }
    if !value.is_empty() && value.chars().any(|c| c.is_ascii_alphabetic()) && !value.contains(':') {
        return "host names are not looked up, e.g. 127.0.0.1 or ::1".to_owned();
    }
    "e.g. 0.0.0.0, 127.0.0.2 or ::1".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_parse_and_a_bad_one_gets_an_example() {
        assert_eq!(socket_addr("0.0.0.0:8080"), Ok(SocketAddr::from(([0, 0, 0, 0], 8080))));
        assert_eq!(socket_addr(" [::1]:9901 "), Ok("[::1]:9901".parse().unwrap()));
        let cases = [
            ("8080", r#"invalid address "8080": expected IP:PORT, e.g. 0.0.0.0:8080 or [::1]:8080"#),
            (":9901", r#"invalid address ":9901": expected IP:PORT, e.g. 0.0.0.0:9901 or [::1]:9901"#),
            ("127.0.0.1", r#"invalid address "127.0.0.1": expected IP:PORT, the port is missing, e.g. 127.0.0.1:8080"#),
            (
                "::1",
                r#"invalid address "::1": expected IP:PORT, the port is missing (an IPv6 address goes in brackets), e.g. [::1]:8080"#,
            ),
            (
                "localhost:50051",
                r#"invalid address "localhost:50051": expected IP:PORT, host names are not looked up, e.g. 127.0.0.1:50051 or [::1]:50051"#,
            ),
            (
                "0.0.0.0:70000",
                r#"invalid address "0.0.0.0:70000": expected IP:PORT, the port 70000 is not in 0..=65535, e.g. 0.0.0.0:8080 or [::1]:8080"#,
            ),
            ("", r#"invalid address "": expected IP:PORT, e.g. 0.0.0.0:8080 or [::1]:8080"#),
            (
                "http://127.0.0.1:8080/",
                r#"invalid address "http://127.0.0.1:8080/": expected IP:PORT, not a URL, e.g. 127.0.0.1:8080"#,
            ),
            (
                "http://localhost:80",
                r#"invalid address "http://localhost:80": expected IP:PORT, not a URL, host names are not looked up, e.g. 127.0.0.1:80 or [::1]:80"#,
            ),
        ];
        for (value, message) in cases {
            assert_eq!(socket_addr(value).unwrap_err(), message, "{value}");
        }
    }

    #[test]
    fn ip_addresses_parse_and_a_bad_one_gets_an_example() {
        assert_eq!(ip_addr("127.0.0.2"), Ok(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(ip_addr("::1"), Ok("::1".parse().unwrap()));
        assert_eq!(
            ip_addr("0.0.0.0:80").unwrap_err(),
            r#"invalid IP address "0.0.0.0:80": expected an IP address, without a port, e.g. 0.0.0.0"#
        );
        assert_eq!(
            ip_addr("localhost").unwrap_err(),
            r#"invalid IP address "localhost": expected an IP address, host names are not looked up, e.g. 127.0.0.1 or ::1"#
        );
        assert_eq!(
            ip_addr("127.0.0").unwrap_err(),
            r#"invalid IP address "127.0.0": expected an IP address, e.g. 0.0.0.0, 127.0.0.2 or ::1"#
        );
        assert_eq!(ipv4_addr("127.0.0.101"), Ok(Ipv4Addr::new(127, 0, 0, 101)));
        assert_eq!(
            ipv4_addr("::1").unwrap_err(),
            r#"invalid IPv4 address "::1": expected an IPv4 address, not IPv6, e.g. 127.0.0.1"#
        );
    }

    #[test]
    fn a_refused_bind_gets_advice_when_there_is_some() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        assert_eq!(
            bind_hint(&in_use, &addr, "controller", "json-listen"),
            "; is another controller running? Use --json-listen to pick another address."
        );
        let elsewhere: SocketAddr = "192.0.2.1:9902".parse().unwrap();
        let foreign = io::Error::from(io::ErrorKind::AddrNotAvailable);
        assert_eq!(
            bind_hint(&foreign, &elsewhere, "dataplane", "admin-listen"),
            "; 192.0.2.1 is not an address of this host. Use --admin-listen to pick another address."
        );
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(bind_hint(&denied, &"0.0.0.0:80".parse().unwrap(), "controller", "json-listen").contains("root"));
        assert_eq!(bind_hint(&denied, &addr, "controller", "json-listen"), "");
    }

    #[test]
    fn clap_shows_the_parsers_message() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Flags {
            #[arg(long, value_parser = socket_addr)]
            listen: SocketAddr,
        }
        let error = Flags::try_parse_from(["x", "--listen", "8080"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let text = error.to_string();
        assert!(
            text.contains(r#"invalid address "8080": expected IP:PORT, e.g. 0.0.0.0:8080 or [::1]:8080"#),
            "{text}"
        );
    }
}
