//! Requests of the HW1 JSON control channel, validated out of a parsed JSON value, and the replies.
//!
//! Every failure is a sentence for the `msg` of a `{"ack":"failed"}` reply.

use contract::model::{Protocol, ProxyProtocol, ServiceAsk, ServiceKey, Weight};
use serde_json::{Map, Value, json};

/// One request of a registered (or registering) server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `{"cmd":"register","protocol":P,"port":N}`, optionally `backend_port` and `weight`.
    Register {
        /// The service to join.
        service: ServiceKey,
        /// Where the backend listens (default: the service port).
        backend_port: u16,
        /// Relative weight (default 1).
        weight: Weight,
        /// Balancing algorithm and PROXY protocol asked for (the first registration of a service sets them).
        ask: ServiceAsk,
        /// The `"token"` field: the registration token (or the admin token), when the controller has one.
        token: Option<Presented>,
    },
    /// `{"cmd":"unregister","protocol":P,"port":N}`, optionally `backend_port`.
    Unregister {
        /// The service to leave.
        service: ServiceKey,
        /// Where the backend listens (default: the service port).
        backend_port: u16,
        /// The `"token"` field.
        token: Option<Presented>,
    },
    /// `{"cmd":"hello"}` from the server: it asks whether the controller is alive.
    Hello,
    /// `{"ack":"hello"}`: the answer to a probe, or an unsolicited heartbeat.
    HelloAck,
}

/// A token as a message presented it: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented(String);

// === impl Presented ===

impl Presented {
    /// The value of an `authorization` header carrying it, for the doors' token check.
    pub fn as_bearer(&self) -> Vec<u8> {
        format!("Bearer {}", self.0).into_bytes()
    }
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presented(..)")
    }
}

// === impl Request ===

impl Request {
    /// Validates one JSON value.
    pub fn parse(value: &Value) -> Result<Self, String> {
        let Value::Object(fields) = value else {
            return Err(format!("expected a JSON object, got {}", kind(value)));
        };
        if let Some(ack) = fields.get("ack") {
            return match ack.as_str() {
                Some(a) if a.eq_ignore_ascii_case("hello") => Ok(Request::HelloAck),
                _ => Err(format!("unexpected ack {ack}: only \"hello\" is answered by servers")),
            };
        }
        let cmd = string_field(fields, "cmd")?;
        if cmd.eq_ignore_ascii_case("hello") {
            return Ok(Request::Hello);
        }
        let register = cmd.eq_ignore_ascii_case("register");
        if !register && !cmd.eq_ignore_ascii_case("unregister") {
            return Err(format!("unknown cmd {cmd:?} (expected register, unregister or hello)"));
        }
        let protocol = string_field(fields, "protocol")?;
        let protocol: Protocol = protocol.parse().map_err(|e: contract::model::UnknownName| e.to_string())?;
        let port = port_field(fields, "port")?.ok_or("missing field \"port\"")?;
        let service = ServiceKey { protocol, port };
        let backend_port = port_field(fields, "backend_port")?.unwrap_or(port);
        let token = match fields.get("token") {
            None | Some(Value::Null) => None,
            Some(Value::String(token)) => Some(Presented(token.clone())),
            Some(other) => return Err(format!("\"token\" must be a string, got {}", kind(other))),
        };
        if !register {
            return Ok(Request::Unregister { service, backend_port, token });
        }
        let weight = match fields.get("weight") {
            None | Some(Value::Null) => Weight::default(),
            Some(w) => w.as_u64().and_then(|w| Weight::new(w).ok()).ok_or_else(|| {
                format!("\"weight\" must be an integer in {}..={}, got {w}", Weight::MIN, Weight::MAX)
            })?,
        };
        let algorithm = match fields.get("algorithm") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(name.parse().map_err(|e: contract::model::UnknownName| e.to_string())?),
            Some(other) => return Err(format!("\"algorithm\" must be a string, got {}", kind(other))),
        };
        let send_v2 = match fields.get("proxy_protocol") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => {
                Some(ProxyProtocol::parse_send(name).map_err(|e: contract::model::UnknownName| e.to_string())?)
            }
            Some(other) => return Err(format!("\"proxy_protocol\" must be a string, got {}", kind(other))),
        };
        let accept = match fields.get("accept_proxy") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(accept)) => Some(*accept),
            Some(other) => return Err(format!("\"accept_proxy\" must be true or false, got {}", kind(other))),
        };
        let proxy = (send_v2.is_some() || accept.is_some())
            .then(|| ProxyProtocol { send_v2: send_v2.unwrap_or(false), accept: accept.unwrap_or(false) });
        if let Some(proxy) = proxy {
            proxy.check(protocol)?;
        }
        Ok(Request::Register { service, backend_port, weight, ask: ServiceAsk { algorithm, proxy }, token })
    }
}

fn string_field<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match fields.get(name) {
        None => Err(format!("missing field {name:?}")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("{name:?} must be a string, got {}", kind(other))),
    }
}

fn port_field(fields: &Map<String, Value>, name: &str) -> Result<Option<u16>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .map(Some)
            .ok_or_else(|| format!("{name:?} must be an integer in 1..=65535, got {v}")),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `{"ack":"successful"}`, with an optional note.
pub fn successful(note: Option<&str>) -> Value {
    match note {
        Some(msg) => json!({"ack": "successful", "msg": msg}),
        None => json!({"ack": "successful"}),
    }
}

/// `{"ack":"failed","msg":why}`.
pub fn failed(why: &str) -> Value {
    json!({"ack": "failed", "msg": why})
}

/// The probe the controller sends: `{"cmd":"hello"}`.
pub fn hello() -> Value {
    json!({"cmd": "hello"})
}

/// The answer to a server's own hello: `{"ack":"hello"}`.
pub fn hello_ack() -> Value {
    json!({"ack": "hello"})
}

#[cfg(test)]
mod tests {
    use contract::model::Algorithm;

    use super::*;

    fn parse(text: &str) -> Result<Request, String> {
        Request::parse(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn hw1_requests_with_any_case() {
        assert_eq!(
            parse(r#"{"cmd":"REGISTER","protocol":"Tcp","port":80}"#),
            Ok(Request::Register {
                service: ServiceKey::tcp(80),
                backend_port: 80,
                weight: Weight::MIN,
                ask: ServiceAsk::default(),
                token: None
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"unregister","protocol":"udp","port":53,"backend_port":5353}"#),
            Ok(Request::Unregister { service: ServiceKey::udp(53), backend_port: 5353, token: None })
        );
        assert_eq!(
            parse(r#"{"cmd":"register","protocol":"udp","port":53,"backend_port":5353,"weight":3}"#),
            Ok(Request::Register {
                service: ServiceKey::udp(53),
                backend_port: 5353,
                weight: Weight::new(3).unwrap(),
                ask: ServiceAsk::default(),
                token: None
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"register","protocol":"tcp","port":80,"algorithm":"Least_Connections"}"#),
            Ok(Request::Register {
                service: ServiceKey::tcp(80),
                backend_port: 80,
                weight: Weight::MIN,
                ask: ServiceAsk::algorithm(Algorithm::LeastConnections),
                token: None
            })
        );
        assert_eq!(
            parse(r#"{"cmd":"register","protocol":"tcp","port":80,"proxy_protocol":"V2","accept_proxy":true}"#),
            Ok(Request::Register {
                service: ServiceKey::tcp(80),
                backend_port: 80,
                weight: Weight::MIN,
                ask: ServiceAsk { algorithm: None, proxy: Some(ProxyProtocol { send_v2: true, accept: true }) },
                token: None
            })
        );
        let with_token = parse(r#"{"cmd":"unregister","protocol":"tcp","port":80,"token":"registration-token-1"}"#);
        let Ok(Request::Unregister { token: Some(token), .. }) = with_token else { panic!("{with_token:?}") };
        assert_eq!(token.as_bearer(), b"Bearer registration-token-1");
        assert_eq!(format!("{token:?}"), "Presented(..)", "a token is never printed");
        assert_eq!(parse(r#"{"ack":"HELLO"}"#), Ok(Request::HelloAck));
        assert_eq!(parse(r#"{"cmd":"hello"}"#), Ok(Request::Hello));
    }

    #[test]
    fn every_bad_input_has_a_reason() {
        let cases = [
            (r#"[1]"#, "expected a JSON object, got an array"),
            (r#"{"protocol":"tcp","port":80}"#, "missing field \"cmd\""),
            (r#"{"cmd":7}"#, "\"cmd\" must be a string, got a number"),
            (r#"{"cmd":"jump"}"#, "unknown cmd \"jump\""),
            (r#"{"cmd":"register","port":80}"#, "missing field \"protocol\""),
            (r#"{"cmd":"register","protocol":"sctp","port":80}"#, "unknown protocol \"sctp\""),
            (r#"{"cmd":"register","protocol":"tcp"}"#, "missing field \"port\""),
            (r#"{"cmd":"register","protocol":"tcp","port":"80"}"#, "\"port\" must be an integer in 1..=65535"),
            (r#"{"cmd":"register","protocol":"tcp","port":0}"#, "\"port\" must be an integer in 1..=65535"),
            (r#"{"cmd":"register","protocol":"tcp","port":65536}"#, "\"port\" must be an integer in 1..=65535"),
            (r#"{"cmd":"register","protocol":"tcp","port":-1}"#, "\"port\" must be an integer in 1..=65535"),
            (r#"{"cmd":"register","protocol":"tcp","port":8.5}"#, "\"port\" must be an integer in 1..=65535"),
            (r#"{"cmd":"register","protocol":"tcp","port":80,"weight":0}"#, "\"weight\" must be an integer"),
            (r#"{"ack":"successful"}"#, "unexpected ack"),
            (r#"{"cmd":"register","protocol":"tcp","port":80,"token":7}"#, "\"token\" must be a string"),
            (r#"{"cmd":"register","protocol":"tcp","port":80,"algorithm":"fastest"}"#, "unknown algorithm \"fastest\""),
            (r#"{"cmd":"register","protocol":"tcp","port":80,"algorithm":3}"#, "\"algorithm\" must be a string"),
            (r#"{"cmd":"register","protocol":"tcp","port":80,"proxy_protocol":"v1"}"#, "unknown proxy protocol \"v1\""),
            (
                r#"{"cmd":"register","protocol":"tcp","port":80,"proxy_protocol":2}"#,
                "\"proxy_protocol\" must be a string",
            ),
            (
                r#"{"cmd":"register","protocol":"tcp","port":80,"accept_proxy":"yes"}"#,
                "\"accept_proxy\" must be true or false",
            ),
            (
                r#"{"cmd":"register","protocol":"udp","port":80,"accept_proxy":true}"#,
                "accepting the PROXY protocol is for TCP",
            ),
        ];
        for (input, reason) in cases {
            let err = parse(input).unwrap_err();
            assert!(err.starts_with(reason), "{input}: {err}");
        }
    }
}
