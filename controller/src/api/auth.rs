//! The controller's doors and their tokens: each gRPC service and the admin HTTP listener checks the
//! caller's bearer token before anything else runs, and tells the handler who the caller is.
//!
//! A door with no token configured is open, as before tokens existed (the controller warns at start).
//! The admin token also opens the registration door, as an operator: only an operator may register a
//! backend at another address than its own.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use contract::auth::{AUTHORIZATION, Token};
use tonic::{Status, service::Interceptor};

use crate::store::Credential;

/// Who a call comes from, as its token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No token, at a door that needs none.
    Anyone,
    /// The registration token (`--auth-token`).
    Registrant,
    /// The node token (`--node-token`).
    Node,
    /// The admin token (`--admin-token`).
    Operator,
}

/// The tokens of a controller; each one unset leaves its door open.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    /// Guards `Registry`.
    pub auth: Option<Token>,
    /// Guards `Dataplane.Sync`.
    pub node: Option<Token>,
    /// Guards `Admin` and admin HTTP.
    pub admin: Option<Token>,
}

/// The check at one door.
#[derive(Clone, Debug)]
pub struct Guard {
    /// The flag whose token opens it, for the refusal.
    flag: &'static str,
    /// A call without a known token is refused.
    required: bool,
    known: Arc<[(Token, Caller)]>,
}

// === impl Tokens ===

impl Tokens {
    /// The door of `Registry`: the registration token, or the admin token as an operator.
    pub fn registry(&self) -> Guard {
        let known = [(&self.auth, Caller::Registrant), (&self.admin, Caller::Operator)];
        Guard::new("auth-token", self.auth.is_some(), &known)
    }

    /// The door of `Dataplane.Sync`.
    pub fn dataplane(&self) -> Guard {
        Guard::new("node-token", self.node.is_some(), &[(&self.node, Caller::Node)])
    }

    /// The door of `Admin` and admin HTTP.
    pub fn admin(&self) -> Guard {
        Guard::new("admin-token", self.admin.is_some(), &[(&self.admin, Caller::Operator)])
    }

    /// One line per open door, for the start-up warning.
    pub fn open_doors(&self) -> Vec<&'static str> {
        let doors = [
            (&self.auth, "no --auth-token: anyone who reaches the gRPC port can register and deregister backends"),
            (
                &self.auth,
                "no --auth-token: anyone who reaches the JSON port can register and unregister backends (with the \
                 token set, JSON messages carry it in \"token\", or come from --json-allow)",
            ),
            (&self.node, "no --node-token: anyone who reaches the gRPC port can follow snapshots as a node"),
            (&self.admin, "no --admin-token: anyone who reaches the gRPC or admin port can drain, reweigh and read"),
        ];
        doors.into_iter().filter(|(token, _)| token.is_none()).map(|(_, why)| why).collect()
    }
}

/// The start-up warnings of doors listening beyond loopback: one per listener that anyone on the network
/// can reach with no token to stop them, and one when `--json-allow` lets sources register without one.
pub fn exposure_warnings(
    tokens: &Tokens,
    listeners: [(&'static str, std::net::SocketAddr); 3],
    json_allow: Option<&str>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (door, addr) in listeners {
        let open = match door {
            "json" => tokens.auth.is_none(),
            "grpc" => tokens.auth.is_none() || tokens.admin.is_none() || tokens.node.is_none(),
            _ => tokens.admin.is_none(),
        };
        if open && !addr.ip().to_canonical().is_loopback() {
            warnings.push(format!(
                "the {door} listener {addr} is reachable beyond loopback and a door on it has no token: anyone \
                 who reaches it steers the balancer (set the tokens, or listen on 127.0.0.1)"
            ));
        }
    }
    if let (Some(_), Some(allow)) = (&tokens.auth, json_allow) {
        warnings.push(format!("--json-allow {allow}: JSON registrations from these sources need no token"));
    }
    warnings
}

// === impl Caller ===

impl Caller {
    /// What the caller's token proves, for the owner rule (a node's token proves nothing at the registry).
    pub fn credential(self) -> Credential {
        match self {
            Caller::Operator => Credential::Operator,
            Caller::Registrant => Credential::Registrant,
            Caller::Anyone | Caller::Node => Credential::Anonymous,
        }
    }
}

// === impl Guard ===

impl Guard {
    fn new(flag: &'static str, required: bool, known: &[(&Option<Token>, Caller)]) -> Self {
        let known = known.iter().filter_map(|(token, caller)| token.as_ref().map(|t| (t.clone(), *caller))).collect();
        Guard { flag, required, known }
    }

    /// Who presents `header` (the `authorization` value), or `None` when the door stays shut.
    pub fn caller(&self, header: Option<&[u8]>) -> Option<Caller> {
        let presented = header.unwrap_or_default();
        // Every known token is compared, so the time taken does not tell which one matched.
        let matched = self.known.iter().fold(None, |found, (token, caller)| {
            let hit = token.matches(presented);
            found.or(hit.then_some(*caller))
        });
        match matched {
            Some(caller) => Some(caller),
            None if self.required => None,
            None => Some(Caller::Anyone),
        }
    }

    fn refusal(&self) -> String {
        format!("missing or wrong bearer token: this service needs `authorization: Bearer <--{}>`", self.flag)
    }
}

impl Interceptor for Guard {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let header = request.metadata().get(AUTHORIZATION).map(|v| v.as_bytes());
        let caller = self.caller(header).ok_or_else(|| Status::unauthenticated(self.refusal()))?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Axum middleware: the admin HTTP listener behind `guard`.
pub async fn http_guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    if guard.caller(header).is_some() {
        return next.run(request).await;
    }
    let body = axum::Json(serde_json::json!({ "error": guard.refusal() }));
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Option<Token> {
        Some(Token::new(text).unwrap())
    }

    #[test]
    fn each_door_opens_for_its_own_token_only() {
        let tokens = Tokens {
            auth: token("registration-token-1"),
            node: token("node-token-123456789"),
            admin: token("admin-token-12345678"),
        };
        let registry = tokens.registry();
        assert_eq!(registry.caller(Some(b"Bearer registration-token-1")), Some(Caller::Registrant));
        assert_eq!(registry.caller(Some(b"Bearer admin-token-12345678")), Some(Caller::Operator));
        assert_eq!(registry.caller(Some(b"Bearer node-token-123456789")), None);
        assert_eq!(registry.caller(None), None);
        let admin = tokens.admin();
        assert_eq!(admin.caller(Some(b"Bearer registration-token-1")), None, "an agent's token cannot steer");
        assert_eq!(admin.caller(Some(b"Bearer admin-token-12345678")), Some(Caller::Operator));
        assert_eq!(tokens.dataplane().caller(Some(b"Bearer node-token-123456789")), Some(Caller::Node));
        assert!(tokens.open_doors().is_empty());
    }

    #[test]
    fn doors_without_a_token_stay_open_but_still_recognise_operators() {
        let tokens = Tokens { admin: token("admin-token-12345678"), ..Tokens::default() };
        assert_eq!(tokens.registry().caller(None), Some(Caller::Anyone));
        assert_eq!(tokens.registry().caller(Some(b"Bearer wrong")), Some(Caller::Anyone));
        assert_eq!(tokens.registry().caller(Some(b"Bearer admin-token-12345678")), Some(Caller::Operator));
        assert_eq!(tokens.open_doors().len(), 3);
    }

    #[test]
    fn doors_beyond_loopback_without_tokens_are_named() {
        let listeners = |ip: &str| {
            let at = |port| std::net::SocketAddr::new(ip.parse().unwrap(), port);
            [("json", at(8080)), ("grpc", at(50051)), ("admin", at(9901))]
        };
        let none = Tokens::default();
        assert!(exposure_warnings(&none, listeners("127.0.0.1"), None).is_empty(), "loopback is private");
        assert_eq!(exposure_warnings(&none, listeners("0.0.0.0"), None).len(), 3);
        let all = Tokens {
            auth: token("registration-token-1"),
            node: token("node-token-123456789"),
            admin: token("admin-token-12345678"),
        };
        assert!(exposure_warnings(&all, listeners("0.0.0.0"), None).is_empty());
        let allowed = exposure_warnings(&all, listeners("0.0.0.0"), Some("10.0.0.0/8"));
        assert_eq!(allowed.len(), 1);
        assert!(allowed[0].contains("need no token"), "{allowed:?}");
    }
}
