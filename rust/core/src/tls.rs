//! TLS on the two listeners (rustls with the ring provider): `tls_cert`/`tls_key` make the
//! WebSocket port wss:// only, `backend_tls_cert`/`backend_tls_key` do the same for backends,
//! and `backend_tls_client_ca` asks backends for a client certificate (mutual TLS).
//!
//! Certificates are reloaded without a restart: on SIGHUP, and when a file's modification time
//! or size changes (checked every [`WATCH_EVERY`]). A reload that fails (a half-written file, a
//! key that does not match) is logged and the previous certificate stays in use. New
//! connections take the new certificate; open ones keep theirs.
//!
//! [`Conn`] is the stream a WebSocket connection is served on, plain or TLS, so the rest of the
//! broker does not care which.

use crate::config::ConfigError;
use crate::shutdown::Signal;
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

/// How often the certificate files are looked at for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Makes ring the process's rustls provider (the Redis client asks for the default one).
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already (by us or by the embedding program).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where one listener's certificate comes from, with the names of the settings (for errors).
#[derive(Debug, Clone)]
pub struct Source {
    pub cert: (&'static str, String),
    pub key: (&'static str, String),
    pub client_ca: Option<(&'static str, String)>,
}

impl Source {
    /// The WebSocket listener's source, if `tls_cert` is set.
    pub fn websocket(cfg: &crate::Config) -> Option<Source> {
        Some(Source {
            cert: ("tls_cert", cfg.tls_cert.clone()?),
            key: ("tls_key", cfg.tls_key.clone()?),
            client_ca: None,
        })
    }

    /// The backend listener's source, if `backend_tls_cert` is set.
    pub fn backend(cfg: &crate::Config) -> Option<Source> {
        Some(Source {
            cert: ("backend_tls_cert", cfg.backend_tls_cert.clone()?),
            key: ("backend_tls_key", cfg.backend_tls_key.clone()?),
            client_ca: cfg.backend_tls_client_ca.clone().map(|p| ("backend_tls_client_ca", p)),
        })
    }

    /// Modification time, length and (Unix) inode of each file, to notice a change, also a file
    /// replaced by another of the same size and time.
    fn stamp(&self) -> Vec<Option<Stamp>> {
        let files = [Some(&self.cert.1), Some(&self.key.1), self.client_ca.as_ref().map(|c| &c.1)];
        files
            .iter()
            .flatten()
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let inode = 0;
                Some((m.modified().ok()?, m.len(), inode))
            })
            .collect()
    }

    /// Reads the files and builds the rustls configuration; `Err` names the setting at fault.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ConfigError> {
        let bad = |(setting, path): &(&'static str, String), why: String| ConfigError {
            setting,
            value: path.clone(),
            reason: why,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert.1)
            .map_err(|e| bad(&self.cert, format!("cannot read the PEM file: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&self.cert, format!("is not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(bad(&self.cert, "holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key.1)
            .map_err(|e| bad(&self.key, format!("holds no usable PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&self.cert, e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(&ca.1)
                    .map_err(|e| bad(ca, format!("cannot read the PEM file: {e}")))?;
                for c in cas {
                    let c = c.map_err(|e| bad(ca, format!("is not a PEM certificate: {e}")))?;
                    roots.add(c).map_err(|e| bad(ca, format!("holds a certificate that is not a CA: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(bad(ca, "holds no certificate".into()));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| bad(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad(&self.key, format!("does not fit the certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

type Stamp = (SystemTime, u64, u64);

/// One listener's TLS: the acceptor in use, replaced on reload.
pub struct Tls {
    source: Source,
    acceptor: RwLock<TlsAcceptor>,
    stamp: Mutex<Vec<Option<Stamp>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("source", &self.source).finish()
    }
}

impl Tls {
    /// Loads the certificate now (so a broken one stops the start with a clear error).
    pub fn load(source: Source) -> Result<Arc<Tls>, ConfigError> {
        let stamp = source.stamp();
        let config = source.server_config()?;
        Ok(Arc::new(Tls { source, acceptor: RwLock::new(TlsAcceptor::from(config)), stamp: Mutex::new(stamp) }))
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }

    /// Reads the files again; `Ok(true)` when the new certificate is in use.
    pub fn reload(&self, only_if_changed: bool) -> Result<bool, ConfigError> {
        let stamp = self.source.stamp();
        if only_if_changed && *self.stamp.lock() == stamp {
            return Ok(false);
        }
        // Remember the stamp even when the files are broken: the next change tries again.
        *self.stamp.lock() = stamp;
        let config = self.source.server_config()?;
        *self.acceptor.write() = TlsAcceptor::from(config);
        Ok(true)
    }
}

/// Reloads the certificates of `listeners` on SIGHUP and when their files change, until `stop`.
pub(crate) async fn watch(listeners: Vec<Arc<Tls>>, counters: Arc<crate::stats::Counters>, mut stop: Signal) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        let only_if_changed = tokio::select! {
            _ = every.tick() => true,
            _ = hangup => false,
            _ = stop.fired() => return,
        };
        for tls in &listeners {
            // File system calls, off the runtime's threads (a slow mount must not stall clients).
            let t = tls.clone();
            let outcome = tokio::task::spawn_blocking(move || t.reload(only_if_changed)).await;
            let Ok(outcome) = outcome else { continue };
            match outcome {
                Ok(true) => {
                    crate::stats::incr(&counters.tls_reloads);
                    tracing::info!(cert = %tls.source.cert.1, "TLS certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    crate::stats::incr(&counters.tls_reload_failures);
                    tracing::error!("TLS certificate not reloaded, the previous one stays in use: {e}")
                }
            }
        }
    }
}

/// A WebSocket connection's stream: plain TCP (`Left`) or TLS over TCP (`Right`).
pub type Conn = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The first byte of a TLS connection (a handshake record); a plain HTTP request starts with a
/// method name instead.
const TLS_HANDSHAKE: u8 = 0x16;

/// Whether the client opened with a TLS handshake (peeks, consumes nothing); `None` if it left.
pub async fn starts_with_tls(stream: &TcpStream) -> Option<bool> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => Some(first[0] == TLS_HANDSHAKE),
        _ => None,
    }
}
