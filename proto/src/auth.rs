//! Bearer-token authentication and TLS for both gRPC services.
//!
//! The coordinator holds two secrets: the *client* token (job API: submit, status, cancel ...)
//! and the *worker* token (task leasing). Each call carries `authorization: Bearer <token>`;
//! the server compares SHA-256 digests of the presented and expected tokens in constant time,
//! so neither the content nor the length of a token leaks through timing. A service without a
//! configured token accepts every call (the local default).
//!
//! TLS is the transport's: the coordinator serves it with `--tls-cert`/`--tls-key` (PEM), and
//! clients and workers use it for `https://` coordinator URLs, trusting `--tls-ca` (PEM) or, by
//! default, the system's roots.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

/// Longest token accepted (bytes).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Shortest token accepted: shorter secrets are guessable.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Why a token, certificate or endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A token that cannot be used.
    #[error("{what}: {problem}")]
    BadToken {
        /// Where it came from (flag, variable or file).
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A file that cannot be read.
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The endpoint URL or its TLS settings.
    #[error("coordinator URL {url:?}: {problem}")]
    Endpoint {
        /// The URL as given.
        url: String,
        /// What is wrong.
        problem: String,
    },
}

/// A bearer token. Its `Debug` and `Display` forms never show the secret.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes, redacted>)", self.0.len())
    }
}

impl Token {
    /// Checks `text` (surrounding whitespace, such as a file's trailing newline, is dropped):
    /// 16 to 4096 visible ASCII characters.
    pub fn new(text: &str, what: &str) -> Result<Token, AuthError> {
        let t = text.trim();
        let bad = |problem: String| AuthError::BadToken {
            what: what.to_string(),
            problem,
        };
        if t.len() < MIN_TOKEN_BYTES {
            return Err(bad(format!(
                "a token must be at least {MIN_TOKEN_BYTES} characters, got {}",
                t.len()
            )));
        }
        if t.len() > MAX_TOKEN_BYTES {
            return Err(bad(format!(
                "a token may be at most {MAX_TOKEN_BYTES} characters, got {}",
                t.len()
            )));
        }
        if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(bad(format!(
                "a token may hold only visible ASCII characters, found {c:?}"
            )));
        }
        Ok(Token(t.into()))
    }

    /// The token given directly or, failing that, read from `file`; `None` when neither is
    /// set. Giving both is an error, so a stale variable cannot silently win.
    pub fn load(
        value: Option<&str>,
        file: Option<&Path>,
        what: &str,
    ) -> Result<Option<Token>, AuthError> {
        match (value, file) {
            (Some(_), Some(f)) => Err(AuthError::BadToken {
                what: what.to_string(),
                problem: format!(
                    "given both directly and as the file {}; give one",
                    f.display()
                ),
            }),
            (Some(v), None) => Token::new(v, what).map(Some),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|source| AuthError::Read {
                    what: "the token file",
                    path: f.to_path_buf(),
                    source,
                })?;
                Token::new(&text, &format!("{what} (file {})", f.display())).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    fn digest(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let a = Self::digest(self.0.as_bytes());
        let b = Self::digest(presented);
        a.ct_eq(&b).into()
    }

    /// Whether two tokens are the same secret.
    pub fn same_as(&self, other: &Token) -> bool {
        self.matches(other.0.as_bytes())
    }

    fn header(&self) -> Result<MetadataValue<Ascii>, Status> {
        // Checked at construction: visible ASCII always makes a valid header value.
        MetadataValue::try_from(format!("Bearer {}", self.0))
            .map_err(|_| Status::internal("the bearer token is not a valid header value"))
    }
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<Token>);

impl Bearer {
    /// Sends `token` with every call.
    pub fn new(token: Option<Token>) -> Bearer {
        Bearer(token)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.header()?);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Refuses calls without the expected token with `Unauthenticated` (accepts all without one).
#[derive(Debug, Clone)]
pub struct RequireToken {
    expected: Option<Token>,
    role: &'static str,
}

impl RequireToken {
    /// Checks calls of `role` ("client" or "worker") against `expected`.
    pub fn new(expected: Option<Token>, role: &'static str) -> RequireToken {
        RequireToken { expected, role }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer ".as_slice()));
        match presented {
            Some(p) if expected.matches(p) => Ok(request),
            Some(_) => Err(Status::unauthenticated(format!(
                "the {} token presented is not valid for this coordinator",
                self.role
            ))),
            None => Err(Status::unauthenticated(format!(
                "this coordinator requires a {} token (authorization: Bearer ...)",
                self.role
            ))),
        }
    }
}

/// Makes ring the process's TLS crypto provider unless one is installed already. The
/// dependency tree links two providers, so rustls cannot pick one by itself.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread installing one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// TLS settings of a coordinator client or worker.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM file of the certificate authority to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
}

/// An endpoint for `url` with TLS set up for `https://` URLs. A CA file for a plain `http://`
/// URL is an error rather than silently unused.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, AuthError> {
    let bad = |problem: String| AuthError::Endpoint {
        url: url.to_string(),
        problem,
    };
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
    let scheme = endpoint.uri().scheme_str().unwrap_or("");
    match scheme {
        "https" => {
            install_crypto_provider();
            let mut config = ClientTlsConfig::new();
            config = match &tls.ca {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|source| AuthError::Read {
                        what: "the TLS CA certificate",
                        path: path.clone(),
                        source,
                    })?;
                    config.ca_certificate(Certificate::from_pem(pem))
                }
                None => config.with_native_roots(),
            };
            endpoint.tls_config(config).map_err(|e| bad(e.to_string()))
        }
        "http" => {
            if let Some(ca) = &tls.ca {
                return Err(bad(format!(
                    "a TLS CA ({}) was given but the URL is not https://",
                    ca.display()
                )));
            }
            Ok(endpoint)
        }
        other => Err(bad(format!(
            "the scheme must be http:// or https://, got {other:?}"
        ))),
    }
    .map(|e| e.connect_timeout(Duration::from_secs(10)))
}

/// The coordinator's TLS identity from PEM certificate chain and key files.
pub fn server_tls(cert: &Path, key: &Path) -> Result<ServerTlsConfig, AuthError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| AuthError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    install_crypto_provider();
    let cert = read("the TLS certificate", cert)?;
    let key = read("the TLS key", key)?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-secret";

    fn with_header(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", value.parse().expect("header"));
        r
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let t = Token::new(&format!("  {SECRET}\n"), "--token").expect("token");
        assert!(t.matches(SECRET.as_bytes()));
        assert!(!t.matches(b"0123456789abcdef-secreT"));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("secret"));
        let short = Token::new("short", "--token").expect_err("short");
        assert!(short.to_string().contains("at least 16"), "{short}");
        let spaced = Token::new("0123456789 abcdef", "--token").expect_err("space");
        assert!(spaced.to_string().contains("visible ASCII"), "{spaced}");
        assert!(Token::new(&"x".repeat(MAX_TOKEN_BYTES + 1), "t").is_err());
    }

    #[test]
    fn loading_from_a_file_or_a_value_but_not_both() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{SECRET}\n")).expect("write");
        let t = Token::load(None, Some(&file), "worker token")
            .expect("load")
            .expect("some");
        assert!(t.matches(SECRET.as_bytes()));
        assert!(Token::load(None, None, "t").expect("none").is_none());
        let both = Token::load(Some(SECRET), Some(&file), "worker token").expect_err("both");
        assert!(both.to_string().contains("give one"), "{both}");
        let missing = Token::load(None, Some(&dir.path().join("nope")), "t").expect_err("gone");
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn the_server_check_accepts_only_the_right_bearer() {
        let token = Token::new(SECRET, "t").expect("token");
        let mut check = RequireToken::new(Some(token.clone()), "worker");
        assert!(check.call(with_header(&format!("Bearer {SECRET}"))).is_ok());
        let wrong = check
            .call(with_header("Bearer 0123456789abcdef-other"))
            .expect_err("wrong");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("worker token"), "{wrong:?}");
        assert!(!wrong.message().contains(SECRET));
        let missing = check.call(Request::new(())).expect_err("missing");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let basic = check
            .call(with_header(&format!("Basic {SECRET}")))
            .expect_err("basic");
        assert_eq!(basic.code(), tonic::Code::Unauthenticated);
        // The client side adds exactly what the server expects.
        let sent = Bearer::new(Some(token))
            .call(Request::new(()))
            .expect("bearer");
        assert!(check.call(sent).is_ok());
        // Without a configured token everything passes.
        let mut open = RequireToken::new(None, "client");
        assert!(open.call(Request::new(())).is_ok());
    }

    #[test]
    fn endpoints_check_scheme_and_ca() {
        let plain = ClientTls::default();
        assert!(endpoint("http://127.0.0.1:1", &plain).is_ok());
        assert!(endpoint("https://127.0.0.1:1", &plain).is_ok());
        let ftp = endpoint("ftp://127.0.0.1:1", &plain).expect_err("ftp");
        assert!(ftp.to_string().contains("http:// or https://"), "{ftp}");
        let with_ca = ClientTls {
            ca: Some("/nonexistent/ca.pem".into()),
        };
        let e = endpoint("http://127.0.0.1:1", &with_ca).expect_err("ca on http");
        assert!(e.to_string().contains("not https://"), "{e}");
        let e = endpoint("https://127.0.0.1:1", &with_ca).expect_err("missing ca");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
