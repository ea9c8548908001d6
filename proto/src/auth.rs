//! Bearer tokens: how a client proves it may call a service (`authorization: Bearer TOKEN` metadata, so
//! `grpcurl -H` works), and how a server checks it, in constant time.
//!
//! Three tokens guard three doors: the registration token guards `Registry`, the node token guards
//! `Dataplane.Sync`, and the admin token guards `Admin` and the admin HTTP listener. A token is read from
//! a flag, its environment variable, or a file (so it stays out of `ps`).

use std::{fmt, path::Path, sync::Arc};

use subtle::ConstantTimeEq;
use tonic::{Request, Status, metadata::AsciiMetadataValue, service::Interceptor};

use crate::process::FlagError;

/// The metadata key (and HTTP header) that carries a token.
pub const AUTHORIZATION: &str = "authorization";

/// A secret a caller presents. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

/// What a client attaches to every call: its token, if it has one.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

// === impl Token ===

impl Token {
    /// The token given by `--FLAG` (or its environment variable) or by `--FLAG-file`; none when neither is.
    /// A file's first line is the token; both at once, an empty token, or one with spaces or control
    /// characters is an error.
    pub fn from_flags(
        flag: &'static str,
        value: Option<String>,
        file: Option<&Path>,
    ) -> Result<Option<Token>, FlagError> {
        let text = match (value, file) {
            (Some(_), Some(_)) => return Err(FlagError::new(flag, "give the token or its file, not both")),
            (Some(value), None) => value,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| FlagError::new(flag, format!("cannot read {}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        Token::new(text.trim()).map(Some).map_err(|why| FlagError::new(flag, why))
    }

    /// `text` as a token: visible ASCII, no spaces, at least 16 characters.
    pub fn new(text: &str) -> Result<Token, &'static str> {
        if text.len() < 16 {
            return Err("a token must have at least 16 characters");
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token must be visible ASCII without spaces");
        }
        Ok(Token(text.into()))
    }

    /// True when `header` is `Bearer <this token>`. The comparison takes the same time wherever the first
    /// difference is.
    pub fn matches(&self, header: &[u8]) -> bool {
        let presented = header.strip_prefix(b"Bearer ").unwrap_or_default();
        let token = self.0.as_bytes();
        // Every byte of the token is compared whatever was presented, so neither the position of the
        // first difference nor a wrong length shows in the time taken.
        let mut same = subtle::Choice::from(u8::from(presented.len() == token.len()));
        for (i, byte) in token.iter().enumerate() {
            same &= presented.get(i).unwrap_or(&0).ct_eq(byte);
        }
        header.starts_with(b"Bearer ") && bool::from(same)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

// === impl Bearer ===

impl Bearer {
    /// Presents `token`, or nothing.
    pub fn new(token: Option<&Token>) -> Self {
        // A token is visible ASCII by construction, so the header value is always valid.
        Bearer(token.and_then(|t| format!("Bearer {}", t.0).parse().ok()))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves_behind_bearer() {
        let token = Token::new("0123456789abcdef").unwrap();
        assert!(token.matches(b"Bearer 0123456789abcdef"));
        for wrong in
            [&b"0123456789abcdef"[..], b"Bearer 0123456789abcdeg", b"Bearer 0123456789abcdef0", b"Bearer ", b""]
        {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{token:?}"), "Token(..)");
    }

    #[test]
    fn weak_or_odd_tokens_are_flag_errors() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in the middle").is_err());
        assert_eq!(Token::from_flags("auth-token", None, None), Ok(None));
        let both = Token::from_flags("auth-token", Some("0123456789abcdef".into()), Some(Path::new("/x")));
        assert_eq!(both.unwrap_err().to_string(), "invalid --auth-token: give the token or its file, not both");
        let missing = Token::from_flags("auth-token", None, Some(Path::new("/nonexistent/token")));
        assert!(missing.unwrap_err().why.starts_with("cannot read /nonexistent/token"));
    }

    #[test]
    fn a_client_presents_its_token() {
        let token = Token::new("0123456789abcdef").unwrap();
        let request = Bearer::new(Some(&token)).call(Request::new(())).unwrap();
        let header = request.metadata().get(AUTHORIZATION).unwrap();
        assert!(token.matches(header.as_bytes()));
        assert!(Bearer::new(None).call(Request::new(())).unwrap().metadata().get(AUTHORIZATION).is_none());
    }
}
