//! TLS for every PostgreSQL connection: the libpq URL parameters (`sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`), the stream of our replication connection, and the `MakeTlsConnect` that
//! tokio-postgres connections use. Both take their rustls configuration from
//! [`tailgate_tls::TlsSettings`], so that a source URL means the same on every connection.
//!
//! tokio-postgres parses only `disable`/`prefer`/`require`, so the TLS parameters are taken out of
//! the URL before it sees it; the mode is then applied per connection (see `catalog::connect`).
//! Channel binding: [`PgTlsStream`] reports `tls-server-end-point` so that tokio-postgres can use
//! SCRAM-SHA-256-PLUS; the replication connection does the same by itself.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tailgate_tls::{LIBPQ_NAMES, RustlsClientConfig, TlsError, TlsMode, TlsSettings, TlsStream};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::error::PgError;

/// libpq's default.
const DEFAULT_MODE: &str = "prefer";

/// Splits the TLS settings out of a `postgres://` URL: (the URL without them, the settings).
/// Other parameters stay for tokio-postgres (which refuses the ones it does not know).
pub fn split_url(url: &str) -> Result<(String, TlsSettings), PgError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut mode_text: Option<String> = None;
    let (mut root, mut cert, mut key) = (None, None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || percent_decode(v);
        match k {
            "sslmode" => mode_text = Some(value()?),
            "sslrootcert" => root = Some(PathBuf::from(value()?)),
            "sslcert" => cert = Some(PathBuf::from(value()?)),
            "sslkey" => key = Some(PathBuf::from(value()?)),
            _ => kept.push(pair),
        }
    }
    let mode_text = mode_text.unwrap_or_else(|| DEFAULT_MODE.to_owned());
    let mode = TlsMode::from_libpq(&mode_text).ok_or_else(|| PgError::Url {
        detail: format!(
            "has sslmode={mode_text:?}, which is not one of disable, allow, prefer, require, verify-ca, verify-full"
        ),
    })?;
    let settings =
        TlsSettings { mode, mode_text, root_cert: root, client_cert: cert, client_key: key, names: LIBPQ_NAMES };
    settings.validate()?;
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((rest, settings))
}

fn percent_decode(s: &str) -> Result<String, PgError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let b = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgError::Url { detail: format!("has an invalid %-escape in {s:?}") })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgError::Url { detail: "has %-escapes that are not UTF-8".into() })
}

/// The replication connection's socket: plaintext or TLS.
pub type PgStream = tailgate_tls::MaybeTls;

/// tokio-postgres's TLS hook, on the shared configuration.
#[derive(Clone)]
pub struct PgTls {
    pub settings: Arc<TlsSettings>,
    pub config: Arc<RustlsClientConfig>,
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, TlsError> {
        Ok(PgTlsConnect { tls: self.clone(), host: domain.to_owned() })
    }
}

pub struct PgTlsConnect {
    tls: PgTls,
    host: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let PgTlsConnect { tls, host } = self;
            // A read buffer under TLS, as for the replication connection (snapshots read a lot).
            let stream = BufReader::with_capacity(64 * 1024, stream);
            let stream = tailgate_tls::connect(&tls.settings, tls.config.clone(), &host, stream).await?;
            let end_point = tailgate_tls::peer_certificate(&stream).and_then(|c| tailgate_tls::tls_server_end_point(c));
            Ok(PgTlsStream { inner: Box::new(stream), end_point })
        })
    }
}

pub struct PgTlsStream<S> {
    inner: Box<TlsStream<BufReader<S>>>,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        tailgate_tls::poll_read_records(Pin::new(self.get_mut().inner.as_mut()), cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.end_point {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url_and_the_rest_stays() {
        let (rest, tls) = split_url(
            "postgres://u:p@db.example:5432/app?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db.example:5432/app?connect_timeout=5");
        assert_eq!(tls.mode, TlsMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.client_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.client_key, Some(PathBuf::from("/k.pem")));
    }

    #[test]
    fn the_default_is_prefer_and_bad_modes_are_named() {
        let (rest, tls) = split_url("postgres://u@h/db").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("postgres://u@h/db", TlsMode::Prefer));
        let (_, tls) = split_url("postgres://u@h/db?sslmode=allow").unwrap();
        assert_eq!(tls.mode, TlsMode::Allow);
        let e = split_url("postgres://u@h/db?sslmode=verify_full").err().unwrap().to_string();
        assert!(e.contains("sslmode=\"verify_full\"") && e.contains("verify-full"), "{e}");
        let e = split_url("postgres://u@h/db?sslcert=/c.pem").err().unwrap().to_string();
        assert!(e.contains("sslcert is set without sslkey"), "{e}");
    }
}
