//! One rustls client configuration for every database connection tailgate makes (PostgreSQL and
//! MySQL/MariaDB, our own replication clients and the SQL drivers alike).
//!
//! Contract:
//! - [`TlsSettings`] holds what a source URL says (a [`TlsMode`], a root CA file, a client certificate
//!   and key) and the names the engine gives those settings, so that every error names the setting
//!   the user wrote (`sslrootcert` on PostgreSQL, `ssl-ca` on MySQL) and says how to fix it.
//! - [`TlsSettings::client_config`] builds the `rustls::ClientConfig`, always with the ring provider
//!   passed explicitly: the build also holds other rustls users, and rustls panics when it must pick
//!   a process-wide provider between two.
//! - What is verified follows libpq: `require` encrypts without checking the certificate, unless a
//!   root CA file is given, then it checks the chain like `verify-ca`; `verify-ca` checks the chain but
//!   not the host name; `verify-full` checks both. Without a root CA file the system's roots are used.
//! - [`connect`] runs the handshake and turns rustls's certificate errors into [`TlsError`]s that
//!   name the setting and the fix. [`tls_server_end_point`] is the channel-binding data of RFC 5929
//!   (SCRAM-SHA-256-PLUS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;

pub use rustls::ClientConfig as RustlsClientConfig;
pub use tokio_rustls::client::TlsStream;

/// How much TLS a connection wants, in libpq's terms (MySQL's `ssl-mode` maps onto the same set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Never TLS.
    Disable,
    /// Plaintext first; TLS only when the server refuses the plaintext login. Not verified.
    Allow,
    /// TLS when the server offers it, else plaintext. Not verified.
    Prefer,
    /// TLS or fail. Not verified, unless a root CA file is given (then as [`TlsMode::VerifyCa`]).
    Require,
    /// TLS, the certificate chain checked against the roots, the host name not.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl TlsMode {
    /// libpq's `sslmode` values.
    pub fn from_libpq(value: &str) -> Option<TlsMode> {
        Some(match value {
            "disable" => TlsMode::Disable,
            "allow" => TlsMode::Allow,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    /// MySQL's `ssl-mode` values (case-insensitive).
    pub fn from_mysql(value: &str) -> Option<TlsMode> {
        Some(match value.to_ascii_uppercase().as_str() {
            "DISABLED" => TlsMode::Disable,
            "PREFERRED" => TlsMode::Prefer,
            "REQUIRED" => TlsMode::Require,
            "VERIFY_CA" => TlsMode::VerifyCa,
            "VERIFY_IDENTITY" => TlsMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a connection in this mode may end up in plaintext.
    pub fn allows_plaintext(self) -> bool {
        matches!(self, TlsMode::Disable | TlsMode::Allow | TlsMode::Prefer)
    }
}

/// The names an engine gives the TLS settings, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingNames {
    pub mode: &'static str,
    pub root_cert: &'static str,
    pub client_cert: &'static str,
    pub client_key: &'static str,
    /// How the modes are spelled: (verify-ca, verify-full).
    pub verify_ca: &'static str,
    pub verify_full: &'static str,
}

pub const LIBPQ_NAMES: SettingNames = SettingNames {
    mode: "sslmode",
    root_cert: "sslrootcert",
    client_cert: "sslcert",
    client_key: "sslkey",
    verify_ca: "verify-ca",
    verify_full: "verify-full",
};

pub const MYSQL_NAMES: SettingNames = SettingNames {
    mode: "ssl-mode",
    root_cert: "ssl-ca",
    client_cert: "ssl-cert",
    client_key: "ssl-key",
    verify_ca: "VERIFY_CA",
    verify_full: "VERIFY_IDENTITY",
};

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Encrypt only: any certificate is accepted (the handshake signatures are still checked).
    None,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// The TLS settings of one source URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// The mode as the user wrote it (for messages).
    pub mode_text: String,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub names: SettingNames,
}

/// Cloneable (strings only), so that a driver holding it as an error source can hand a copy back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}={path}: cannot read: {detail}. Fix: give a readable PEM file")]
    Read { setting: &'static str, path: String, detail: String },

    #[error("{setting}={path}: {detail}. Fix: give a PEM file ({what})")]
    Pem { setting: &'static str, path: String, what: &'static str, detail: String },

    #[error("{given} is set without {missing}. Fix: give both the client certificate and its key")]
    HalfIdentity { given: &'static str, missing: &'static str },

    #[error(
        "no system root certificates found to verify the server ({mode}={mode_text}). Fix: set {root}=<CA file> \
         (the CA that signed the server's certificate)"
    )]
    NoSystemRoots { mode: &'static str, mode_text: String, root: &'static str },

    #[error("cannot build the TLS configuration: {0}")]
    Config(String),

    #[error("{host:?} is not a valid TLS server name. Fix: connect by a DNS name or an IP address")]
    ServerName { host: String },

    #[error(
        "the server certificate does not match host '{host}' ({mode}={mode_text}): {detail}. Fix: connect by a name \
         in the certificate or use {mode}={verify_ca}"
    )]
    HostMismatch { host: String, mode: &'static str, mode_text: String, verify_ca: &'static str, detail: String },

    #[error(
        "the server certificate is not signed by a trusted CA ({root}={roots}): {detail}. Fix: set {root} to the CA \
         that signed the server's certificate"
    )]
    UntrustedCa { root: &'static str, roots: String, detail: String },

    #[error("the server certificate is invalid ({mode}={mode_text}): {detail}. Fix: renew the server's certificate")]
    BadCertificate { mode: &'static str, mode_text: String, detail: String },

    #[error(
        "the server refused our client certificate ({cert}): {detail}. Fix: give a certificate signed by a CA the \
         server trusts, for the user you log in as"
    )]
    ClientCertRefused { cert: String, detail: String },

    #[error("TLS handshake with {host} failed: {detail}")]
    Handshake { host: String, detail: String },
}

impl TlsError {
    /// Whether a retry could help (the network), not a setting.
    pub fn is_transient(&self) -> bool {
        matches!(self, TlsError::Handshake { .. })
    }
}

/// The crypto provider of every configuration built here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide provider when none is installed yet, for libraries that build
/// their own `ClientConfig` with `ClientConfig::builder()` (mysql_async). Harmless when one is.
pub fn install_process_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsSettings {
    /// What this mode checks, given whether a root CA file is set.
    pub fn verification(&self) -> Verification {
        match self.mode {
            TlsMode::VerifyFull => Verification::Full,
            TlsMode::VerifyCa => Verification::Chain,
            TlsMode::Require if self.root_cert.is_some() => Verification::Chain,
            _ => Verification::None,
        }
    }

    /// Checks the settings that need no I/O: a client certificate comes with its key.
    pub fn validate(&self) -> Result<(), TlsError> {
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => {
                Err(TlsError::HalfIdentity { given: self.names.client_cert, missing: self.names.client_key })
            }
            (None, Some(_)) => {
                Err(TlsError::HalfIdentity { given: self.names.client_key, missing: self.names.client_cert })
            }
            _ => Ok(()),
        }
    }

    /// The root certificates: the PEM file, else the system's.
    pub fn roots(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        match &self.root_cert {
            Some(path) => read_certs(self.names.root_cert, path),
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err(TlsError::NoSystemRoots {
                        mode: self.names.mode,
                        mode_text: self.mode_text.clone(),
                        root: self.names.root_cert,
                    });
                }
                Ok(found.certs)
            }
        }
    }

    /// The rustls configuration for these settings (also for `disable`: callers decide whether to use it).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.validate()?;
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match self.verification() {
            Verification::None => Arc::new(AcceptAnyCertificate { algorithms }),
            verification => {
                let mut store = RootCertStore::empty();
                let roots = self.roots()?;
                let root_setting = self.names.root_cert;
                let explicit = self.root_cert.is_some();
                for cert in roots {
                    // System stores hold the odd certificate rustls cannot parse: skip those, but
                    // a file the user named must load whole.
                    if let Err(e) = store.add(cert)
                        && explicit
                    {
                        return Err(TlsError::Pem {
                            setting: root_setting,
                            path: self.root_path(),
                            what: "CA certificates",
                            detail: e.to_string(),
                        });
                    }
                }
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                Arc::new(ChainVerifier { inner: webpki, check_name: verification == Verification::Full })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(self.names.client_cert, cert)?;
                let key = read_key(self.names.client_key, key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::Pem {
                    setting: self.names.client_key,
                    path: self.client_key.as_deref().map(display).unwrap_or_default(),
                    what: "the private key of the client certificate",
                    detail: e.to_string(),
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    fn root_path(&self) -> String {
        self.root_cert.as_deref().map(display).unwrap_or_else(|| "<system roots>".to_owned())
    }

    /// Turns a handshake failure into an error naming the setting and the fix.
    pub fn handshake_error(&self, host: &str, error: &(dyn std::error::Error + 'static)) -> TlsError {
        let Some(rustls_error) = find_rustls_error(error) else {
            return TlsError::Handshake { host: host.to_owned(), detail: error.to_string() };
        };
        match rustls_error {
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => TlsError::HostMismatch {
                host: host.to_owned(),
                mode: self.names.mode,
                mode_text: self.mode_text.clone(),
                verify_ca: self.names.verify_ca,
                detail: rustls_error.to_string(),
            },
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
                TlsError::UntrustedCa {
                    root: self.names.root_cert,
                    roots: self.root_path(),
                    detail: rustls_error.to_string(),
                }
            }
            rustls::Error::InvalidCertificate(_) => TlsError::BadCertificate {
                mode: self.names.mode,
                mode_text: self.mode_text.clone(),
                detail: rustls_error.to_string(),
            },
            rustls::Error::AlertReceived(
                alert @ (rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::AccessDenied),
            ) => TlsError::ClientCertRefused {
                cert: match &self.client_cert {
                    Some(p) => format!("{}={}", self.names.client_cert, display(p)),
                    None => format!("no {} given", self.names.client_cert),
                },
                detail: format!("alert {alert:?}"),
            },
            other => TlsError::Handshake { host: host.to_owned(), detail: other.to_string() },
        }
    }
}

/// Runs the TLS handshake on `stream` for `host` (a DNS name or an IP address).
pub async fn connect<S>(
    settings: &TlsSettings,
    config: Arc<ClientConfig>,
    host: &str,
    stream: S,
) -> Result<TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName { host: host.to_owned() })?;
    tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| settings.handshake_error(host, &e))
}

/// A database connection's socket: plaintext or TLS (our replication clients use it).
pub enum MaybeTls {
    Plain(TcpStream),
    /// Over a read buffer: rustls reads the socket 4 KiB at a time, and a replication stream moves
    /// hundreds of MB; the buffer turns those reads into one syscall per [`READ_BUFFER`] bytes.
    Tls(Box<TlsStream<BufReader<TcpStream>>>),
    /// In between (the plaintext socket taken for the handshake): every I/O fails.
    Closed,
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => poll_read_records(Pin::new(s.as_mut()), cx, buf),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
}

/// Reads from a TLS stream every decrypted byte that is there without waiting, up to `buf`'s room.
///
/// tokio-rustls hands out one TLS record's plaintext per read, and a PostgreSQL walsender writes one
/// record per replication message (about 100 bytes for a small row): read one at a time, each record
/// costs the caller a trip through its read loop, which tripled tailgate's CPU per event over TLS.
/// Reading on while records are buffered gives the caller what plaintext gives it: everything that
/// arrived, in one read.
pub fn poll_read_records<R: AsyncRead + ?Sized>(
    mut stream: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let start = buf.filled().len();
    loop {
        let before = buf.filled().len();
        match stream.as_mut().poll_read(cx, buf) {
            // More may be buffered: read on while each read brings bytes and there is room.
            Poll::Ready(Ok(())) if buf.filled().len() > before && buf.remaining() > 0 => {}
            // Full, or the end of the stream (reported as such on the next call when bytes came first).
            Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
            // What arrived before an error is handed over; the error comes back on the next read
            // (rustls keeps it; a socket then reports the end of the stream).
            Poll::Ready(Err(_)) if buf.filled().len() > start => return Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            // Nothing more without waiting: the waker is registered, so returning bytes now is safe.
            Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl MaybeTls {
    /// `tls-server-end-point` data when on TLS and the certificate's algorithm defines one.
    pub fn channel_binding(&self) -> Option<Vec<u8>> {
        match self {
            MaybeTls::Plain(_) | MaybeTls::Closed => None,
            MaybeTls::Tls(s) => peer_certificate(s).and_then(|c| tls_server_end_point(c)),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is closed")
}

/// Read buffer under TLS (see [`MaybeTls::Tls`]).
pub const READ_BUFFER: usize = 256 * 1024;

/// Runs the TLS handshake on a plaintext socket (after the engine's own TLS request), with a read
/// buffer under TLS.
pub async fn upgrade(
    settings: &TlsSettings,
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<MaybeTls, TlsError> {
    let stream = connect(settings, config, host, BufReader::with_capacity(READ_BUFFER, tcp)).await?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

/// The end-entity certificate the server presented in a finished handshake.
pub fn peer_certificate<S>(stream: &TlsStream<S>) -> Option<&CertificateDer<'static>> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first())
}

/// `tls-server-end-point` channel-binding data (RFC 5929 §4.1): the hash of the server's certificate,
/// with the hash of its signature algorithm, SHA-256 when that is MD5 or SHA-1. `None` for an
/// algorithm without a single hash (Ed25519, RSA-PSS with parameters we do not read): no channel binding.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(cert_der)?;
    Some(match oid {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256, RSASSA-PSS (SHA-256 assumed)
        OID_MD5_RSA | OID_SHA1_RSA | OID_SHA256_RSA | OID_ECDSA_SHA1 | OID_ECDSA_SHA256 | OID_RSA_PSS => {
            sha2::Sha256::digest(cert_der).to_vec()
        }
        OID_SHA384_RSA | OID_ECDSA_SHA384 => sha2::Sha384::digest(cert_der).to_vec(),
        OID_SHA512_RSA | OID_ECDSA_SHA512 => sha2::Sha512::digest(cert_der).to_vec(),
        _ => return None,
    })
}

// DER contents of the signature algorithm OIDs.
const OID_MD5_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04];
const OID_SHA1_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
const OID_RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const OID_SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const OID_SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const OID_SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const OID_ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const OID_ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];

/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, .. }, signature }`:
/// the contents of the signatureAlgorithm's OID.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der_tlv(certificate)?;
    let (tag, algorithm, _) = der_tlv(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_tlv(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER TLV: (tag, contents, the rest after it).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { setting, path: display(path), detail: e.to_string() })
}

fn read_certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
        setting,
        path: display(path),
        what: "certificates",
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            setting,
            path: display(path),
            what: "certificates",
            detail: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
fn read_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(setting, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        setting,
        path: display(path),
        what: "a PKCS#8, RSA or EC private key",
        detail: e.to_string(),
    })
}

/// Finds the rustls error behind an I/O or driver error.
pub fn find_rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        current = e.source();
    }
    None
}

/// `require` without a root CA file: encryption against passive eavesdropping only. The handshake
/// signatures are still checked (against the key of whatever certificate was sent).
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's verifier; for verify-ca a certificate valid for another name is accepted (the chain,
/// validity dates and usage were checked before the name, so only the name is forgiven).
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one chunk per read, as tokio-rustls hands out one record; then what `end` says.
    struct Records {
        chunks: std::collections::VecDeque<&'static [u8]>,
        end: Poll<io::Result<()>>,
    }

    impl AsyncRead for Records {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            match this.chunks.pop_front() {
                Some(chunk) => {
                    buf.put_slice(chunk);
                    Poll::Ready(Ok(()))
                }
                None => match &this.end {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::new(e.kind(), e.to_string()))),
                },
            }
        }
    }

    fn read_once(stream: &mut Records, room: usize) -> (Poll<io::Result<()>>, Vec<u8>) {
        let mut storage = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut storage);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let poll = poll_read_records(Pin::new(stream), &mut cx, &mut buf);
        (poll, buf.filled().to_vec())
    }

    #[test]
    fn a_read_takes_every_buffered_record_then_waits() {
        let mut stream = Records { chunks: [&b"ab"[..], b"cd", b"e"].into(), end: Poll::Pending };
        let (poll, bytes) = read_once(&mut stream, 64);
        assert!(matches!(poll, Poll::Ready(Ok(()))));
        assert_eq!(bytes, b"abcde");
        assert!(read_once(&mut stream, 64).0.is_pending());
    }

    #[test]
    fn a_read_stops_when_the_buffer_is_full() {
        let mut stream = Records { chunks: [&b"ab"[..], b"cd", b"ef"].into(), end: Poll::Pending };
        assert_eq!(read_once(&mut stream, 4).1, b"abcd");
        assert_eq!(read_once(&mut stream, 4).1, b"ef");
    }

    #[test]
    fn the_end_and_errors_come_after_the_bytes_before_them() {
        let mut stream = Records { chunks: [&b"ab"[..]].into(), end: Poll::Ready(Ok(())) };
        assert_eq!(read_once(&mut stream, 8).1, b"ab");
        let (poll, bytes) = read_once(&mut stream, 8);
        assert!(matches!(poll, Poll::Ready(Ok(()))) && bytes.is_empty(), "end of stream");
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        let mut stream = Records { chunks: [&b"ab"[..]].into(), end: Poll::Ready(Err(reset)) };
        assert_eq!(read_once(&mut stream, 8).1, b"ab");
        let (poll, _) = read_once(&mut stream, 8);
        assert!(matches!(poll, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset));
    }

    fn settings(mode: TlsMode, root: Option<&str>) -> TlsSettings {
        TlsSettings {
            mode,
            mode_text: format!("{mode:?}"),
            root_cert: root.map(PathBuf::from),
            client_cert: None,
            client_key: None,
            names: LIBPQ_NAMES,
        }
    }

    #[test]
    fn modes_parse_with_each_engines_names() {
        assert_eq!(TlsMode::from_libpq("verify-full"), Some(TlsMode::VerifyFull));
        assert_eq!(TlsMode::from_libpq("allow"), Some(TlsMode::Allow));
        assert_eq!(TlsMode::from_libpq("REQUIRE"), None, "libpq's names are lower case");
        assert_eq!(TlsMode::from_mysql("verify_identity"), Some(TlsMode::VerifyFull));
        assert_eq!(TlsMode::from_mysql("Preferred"), Some(TlsMode::Prefer));
        assert_eq!(TlsMode::from_mysql("VERIFY_CA"), Some(TlsMode::VerifyCa));
        assert_eq!(TlsMode::from_mysql("verify-full"), None);
        assert!(TlsMode::Prefer.allows_plaintext() && !TlsMode::Require.allows_plaintext());
    }

    #[test]
    fn require_verifies_the_chain_only_with_a_root_file() {
        assert_eq!(settings(TlsMode::Require, None).verification(), Verification::None);
        assert_eq!(settings(TlsMode::Require, Some("/ca.pem")).verification(), Verification::Chain);
        assert_eq!(settings(TlsMode::VerifyCa, None).verification(), Verification::Chain);
        assert_eq!(settings(TlsMode::VerifyFull, Some("/ca.pem")).verification(), Verification::Full);
        assert_eq!(settings(TlsMode::Prefer, Some("/ca.pem")).verification(), Verification::None);
    }

    #[test]
    fn errors_name_the_setting() {
        let e = settings(TlsMode::VerifyFull, Some("/nonexistent/ca.pem")).client_config().unwrap_err().to_string();
        assert!(e.starts_with("sslrootcert=/nonexistent/ca.pem: cannot read: No such file"), "{e}");
        let mut half = settings(TlsMode::Require, None);
        half.names = MYSQL_NAMES;
        half.client_cert = Some("/c.pem".into());
        let e = half.client_config().unwrap_err().to_string();
        assert!(e.contains("ssl-cert is set without ssl-key"), "{e}");
        let mismatch = settings(TlsMode::VerifyFull, None).handshake_error(
            "foo",
            &std::io::Error::other(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)),
        );
        let text = mismatch.to_string();
        assert!(text.contains("does not match host 'foo' (sslmode=VerifyFull)"), "{text}");
        assert!(text.contains("use sslmode=verify-ca"), "{text}");
    }

    #[test]
    fn require_without_roots_builds_without_system_roots() {
        assert!(settings(TlsMode::Require, None).client_config().is_ok());
    }

    /// A certificate skeleton: SEQUENCE { tbs SEQUENCE {}, SEQUENCE { OID }, BIT STRING }.
    fn fake_cert(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut der = vec![0x30, body.len() as u8];
        der.extend_from_slice(&body);
        der
    }

    #[test]
    fn channel_binding_hashes_follow_the_signature_algorithm() {
        for (oid, len) in [
            (OID_SHA256_RSA, 32),
            (OID_SHA1_RSA, 32),
            (OID_MD5_RSA, 32),
            (OID_ECDSA_SHA256, 32),
            (OID_SHA384_RSA, 48),
            (OID_ECDSA_SHA384, 48),
            (OID_SHA512_RSA, 64),
        ] {
            let cert = fake_cert(oid);
            let hash = tls_server_end_point(&cert).unwrap();
            assert_eq!(hash.len(), len, "{oid:x?}");
        }
        let cert = fake_cert(OID_SHA256_RSA);
        assert_eq!(tls_server_end_point(&cert).unwrap(), sha2::Sha256::digest(&cert).to_vec());
        // Ed25519 (1.3.101.112) defines no hash: no channel binding.
        assert_eq!(tls_server_end_point(&fake_cert(&[0x2b, 0x65, 0x70])), None);
        assert_eq!(tls_server_end_point(&[0x30, 0x05, 0x00]), None, "truncated DER");
    }

    #[test]
    fn long_form_der_lengths_parse() {
        let mut der = vec![0x04, 0x82, 0x01, 0x00];
        der.extend(std::iter::repeat_n(7u8, 256));
        let (tag, contents, rest) = der_tlv(&der).unwrap();
        assert_eq!((tag, contents.len(), rest.len()), (0x04, 256, 0));
    }
}
