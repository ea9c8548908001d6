//! `Registry`: the `register` message of a `Register` stream, its ack, and `Deregister`.

use std::time::Duration;

use super::{ConvertError, algorithm, optional_ip, optional_port, socket_addr, weight};
use crate::{
    model::{
        BackendTarget, Deregistration, HelloAnswer, ProbeOverrides, ProxyProtocol, RegisterReply, RegistrationRequest,
        ServiceAsk, ServiceKey, Weight,
    },
    v1,
};

impl TryFrom<&v1::Registration> for RegistrationRequest {
    type Error = ConvertError;

    fn try_from(msg: &v1::Registration) -> Result<Self, Self::Error> {
        let positive = |v: u32| (v > 0).then_some(v);
        let probe = msg.health.map_or_else(ProbeOverrides::default, |h| ProbeOverrides {
            interval: positive(h.interval_ms).map(|ms| Duration::from_millis(ms.into())),
            timeout: positive(h.timeout_ms).map(|ms| Duration::from_millis(ms.into())),
            failures: positive(h.failures),
        });
        Ok(RegistrationRequest {
            service: ServiceKey::try_from(msg.service.as_ref())?,
            backend: backend_target(&msg.backend_address, msg.backend_port)?,
            // proto3 sends an unset weight as 0: the default.
            weight: if msg.weight == 0 { Weight::default() } else { weight(msg.weight)? },
            ask: ServiceAsk {
                algorithm: if msg.algorithm.is_empty() { None } else { Some(algorithm(&msg.algorithm)?) },
                proxy: proxy(&msg.proxy_protocol, msg.accept_proxy)?,
            },
            probe,
            healthy: msg.healthy,
        })
    }
}

impl From<&RegistrationRequest> for v1::Registration {
    fn from(request: &RegistrationRequest) -> Self {
        let millis = |d: Option<Duration>| d.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
        let ProbeOverrides { interval, timeout, failures } = request.probe;
        let health = (request.probe != ProbeOverrides::default()).then(|| v1::HealthOptions {
            interval_ms: millis(interval),
            timeout_ms: millis(timeout),
            failures: failures.unwrap_or(0),
        });
        let (backend_address, backend_port) = backend_fields(request.backend);
        v1::Registration {
            service: Some(request.service.into()),
            backend_address,
            backend_port,
            weight: request.weight.get(),
            health,
            healthy: request.healthy,
            algorithm: request.ask.algorithm.map(|a| a.to_string()).unwrap_or_default(),
            proxy_protocol: match request.ask.proxy {
                Some(p) if p.send_v2 => "v2".to_owned(),
                Some(_) => "none".to_owned(),
                None => String::new(),
            },
            accept_proxy: request.ask.proxy.map(|p| p.accept),
        }
    }
}

/// The PROXY protocol asked for: none when neither field is set; a field left unset is off.
fn proxy(send: &str, accept: Option<bool>) -> Result<Option<ProxyProtocol>, ConvertError> {
    if send.is_empty() && accept.is_none() {
        return Ok(None);
    }
    let send_v2 = if send.is_empty() {
        false
    } else {
        ProxyProtocol::parse_send(send).map_err(|e| super::invalid("proxy_protocol", e.to_string()))?
    };
    Ok(Some(ProxyProtocol { send_v2, accept: accept.unwrap_or(false) }))
}

impl TryFrom<&v1::DeregisterRequest> for Deregistration {
    type Error = ConvertError;

    fn try_from(msg: &v1::DeregisterRequest) -> Result<Self, Self::Error> {
        Ok(Deregistration {
            service: ServiceKey::try_from(msg.service.as_ref())?,
            backend: backend_target(&msg.backend_address, msg.backend_port)?,
        })
    }
}

impl From<&Deregistration> for v1::DeregisterRequest {
    fn from(request: &Deregistration) -> Self {
        let (backend_address, backend_port) = backend_fields(request.backend);
        v1::DeregisterRequest { service: Some(request.service.into()), backend_address, backend_port }
    }
}

impl From<&RegisterReply> for v1::RegisterAck {
    fn from(reply: &RegisterReply) -> Self {
        v1::RegisterAck {
            success: reply.success,
            message: reply.message.clone().unwrap_or_default(),
            backend: reply.backend.map(|b| b.to_string()).unwrap_or_default(),
        }
    }
}

impl TryFrom<&v1::RegisterAck> for RegisterReply {
    type Error = ConvertError;

    fn try_from(ack: &v1::RegisterAck) -> Result<Self, Self::Error> {
        let backend = if ack.backend.is_empty() { None } else { Some(socket_addr("backend", &ack.backend)?) };
        let message = if ack.message.is_empty() { None } else { Some(ack.message.clone()) };
        Ok(RegisterReply { success: ack.success, message, backend })
    }
}

impl From<&v1::HelloAck> for HelloAnswer {
    /// An unset verdict means healthy (a client that reports no verdict is judged by its hellos alone).
    fn from(ack: &v1::HelloAck) -> Self {
        HelloAnswer { seq: ack.seq, healthy: ack.healthy.unwrap_or(true), load: ack.load_permille }
    }
}

impl From<HelloAnswer> for v1::RegisterRequest {
    fn from(answer: HelloAnswer) -> Self {
        let ack = v1::HelloAck { seq: answer.seq, healthy: Some(answer.healthy), load_permille: answer.load };
        v1::RegisterRequest { msg: Some(v1::register_request::Msg::HelloAck(ack)) }
    }
}

fn backend_target(address: &str, port: u32) -> Result<BackendTarget, ConvertError> {
    Ok(BackendTarget { ip: optional_ip("backend_address", address)?, port: optional_port("backend_port", port)? })
}

fn backend_fields(target: BackendTarget) -> (String, u32) {
    (target.ip.map(|ip| ip.to_string()).unwrap_or_default(), target.port.map_or(0, u32::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Algorithm;

    fn base_of(request: &RegistrationRequest) -> v1::Registration {
        v1::Registration::from(request)
    }

    #[test]
    fn registrations_survive_the_wire_and_unset_fields_stay_unset() {
        let request = RegistrationRequest {
            service: ServiceKey::tcp(80),
            backend: BackendTarget { ip: None, port: Some(8080) },
            weight: Weight::new(5).unwrap(),
            ask: ServiceAsk {
                algorithm: Some(Algorithm::LeastConnections),
                proxy: Some(ProxyProtocol { send_v2: true, accept: false }),
            },
            probe: ProbeOverrides { interval: Some(Duration::from_millis(300)), timeout: None, failures: Some(2) },
            healthy: Some(false),
        };
        let wire = v1::Registration::from(&request);
        assert_eq!(wire.backend_address, "");
        assert_eq!(RegistrationRequest::try_from(&wire), Ok(request));
        let bare = v1::Registration { service: Some(ServiceKey::udp(53).into()), ..Default::default() };
        let bare = RegistrationRequest::try_from(&bare).unwrap();
        assert_eq!(
            (bare.weight, bare.ask, bare.probe),
            (Weight::MIN, ServiceAsk::default(), ProbeOverrides::default())
        );
        let only_accept = v1::Registration { accept_proxy: Some(true), ..base_of(&bare) };
        let only_accept = RegistrationRequest::try_from(&only_accept).unwrap();
        assert_eq!(only_accept.ask.proxy, Some(ProxyProtocol { send_v2: false, accept: true }));
        let bad = v1::Registration { proxy_protocol: "v3".into(), ..base_of(&bare) };
        assert!(RegistrationRequest::try_from(&bad).unwrap_err().to_string().contains("proxy_protocol"));
        assert_eq!(bare.backend.resolve("127.0.0.2".parse().unwrap(), bare.service), "127.0.0.2:53".parse().unwrap());

        let gone = Deregistration {
            service: ServiceKey::tcp(80),
            backend: BackendTarget::exact("127.0.0.2:81".parse().unwrap()),
        };
        assert_eq!(Deregistration::try_from(&v1::DeregisterRequest::from(&gone)), Ok(gone));
        let reply = RegisterReply { success: true, message: None, backend: Some("127.0.0.2:81".parse().unwrap()) };
        assert_eq!(RegisterReply::try_from(&v1::RegisterAck::from(&reply)), Ok(reply));
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let base = || v1::Registration { service: Some(ServiceKey::tcp(80).into()), ..Default::default() };
        let cases = [
            (v1::Registration { weight: 10_001, ..base() }, "weight"),
            (v1::Registration { backend_address: "nowhere".into(), ..base() }, "backend_address"),
            (v1::Registration { backend_port: 70_000, ..base() }, "backend_port"),
            (v1::Registration { algorithm: "fastest".into(), ..base() }, "algorithm"),
            (v1::Registration { service: None, ..base() }, "service"),
        ];
        for (msg, what) in cases {
            assert_eq!(RegistrationRequest::try_from(&msg).unwrap_err().what, what);
        }
    }
}
