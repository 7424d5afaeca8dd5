//! TLS credentials in QEMU's `tls-creds-x509` directory layout, and a generator of such a
//! directory for trying pagewire out.
//!
//! | file | used by |
//! |---|---|
//! | `ca-cert.pem` | both: the CA that issued the peer's certificate |
//! | `server-cert.pem`, `server-key.pem` | receiver (TLS server) |
//! | `client-cert.pem`, `client-key.pem` | sender (TLS client) |
//!
//! The receiver accepts only senders whose client certificate the CA issued; the sender
//! accepts only a receiver whose server certificate the CA issued for the name it connects
//! to (`TlsConfig::server_name`, else the address it connects to).
//!
//! TLS needs the crate's `tls` feature (rustls, aws-lc); `generate` needs `gen-certs`
//! (rcgen). Without `tls`, [`TlsConfig`] is a type without values, so
//! [`SenderConfig::tls`](crate::SenderConfig::tls) can only be `None` and every connection is clear text;
//! a peer that starts a TLS handshake is refused with an error saying this build has no TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
#[cfg(feature = "tls")]
use std::sync::Arc;

use pagewire_transport::tls::{self, TlsError};
#[cfg(feature = "tls")]
use rustls::pki_types::pem::PemObject;
#[cfg(feature = "tls")]
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
#[cfg(feature = "tls")]
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// What errors say when this build has no TLS.
pub const NOT_BUILT: &str = "pagewire was built without the `tls` feature";

/// The files of a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Errors of loading or generating credentials; each names the file.
#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("TLS credentials: reading {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("TLS credentials: {path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS credentials in {dir}: {source}")]
    Invalid { dir: PathBuf, source: TlsError },
    #[error("TLS: '{0}' is not a valid server name (DNS name or IP address)")]
    Name(String),
    #[error("generating certificates: {0}")]
    Generate(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `generate` found credentials in the directory and was not asked to replace them.
    #[error("{dir} already holds {}; refusing to replace them", files.join(", "))]
    Exists { dir: PathBuf, files: Vec<String> },
}

/// TLS settings of a session: where the credentials are and which name the receiver's
/// certificate must carry.
#[cfg(feature = "tls")]
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Directory in QEMU's `tls-creds-x509` layout.
    pub dir: PathBuf,
    /// Sender: the name the receiver's certificate must be valid for (`None`: the IP address
    /// connected to).
    pub server_name: Option<String>,
    /// Plaintext bytes per TLS record (at most 16384).
    pub record_size: usize,
    /// Records one key may protect; each side updates its sending key (TLS 1.3 KeyUpdate) at
    /// half of it. Tests lower it from AES-GCM's limit to see many updates in a short session.
    #[doc(hidden)]
    pub records_per_key: u64,
}

/// TLS settings of a session. This build has no TLS (pagewire's `tls` feature is off): the
/// type has no values, so [`SenderConfig::tls`](crate::SenderConfig::tls) is always `None`.
#[cfg(not(feature = "tls"))]
#[derive(Clone, Debug)]
pub enum TlsConfig {}

#[cfg(feature = "tls")]
impl TlsConfig {
    /// Credentials from `dir` (read when a session starts).
    pub fn from_dir(dir: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            dir: dir.into(),
            server_name: None,
            record_size: tls::DEFAULT_RECORD_SIZE,
            records_per_key: tls::record::MAX_RECORDS,
        }
    }

    fn roots(&self) -> Result<RootCertStore, CredentialsError> {
        let path = self.dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in read_certs(&path)? {
            roots.add(c).map_err(|e| CredentialsError::Read {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(roots)
    }

    /// The sender's TLS configuration (CA, client certificate and key).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, CredentialsError> {
        let chain = read_certs(&self.dir.join(CLIENT_CERT))?;
        let key = read_key(&self.dir.join(CLIENT_KEY))?;
        tls::handshake::client_config(self.roots()?, chain, key).map_err(|source| {
            CredentialsError::Invalid {
                dir: self.dir.clone(),
                source,
            }
        })
    }

    /// The receiver's TLS configuration (CA, server certificate and key).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CredentialsError> {
        let chain = read_certs(&self.dir.join(SERVER_CERT))?;
        let key = read_key(&self.dir.join(SERVER_KEY))?;
        tls::handshake::server_config(self.roots()?, chain, key).map_err(|source| {
            CredentialsError::Invalid {
                dir: self.dir.clone(),
                source,
            }
        })
    }

    fn records(&self) -> tls::RecordConfig {
        tls::RecordConfig {
            record_size: self.record_size,
            records_per_key: self.records_per_key,
        }
    }

    /// The name the sender checks the receiver's certificate against.
    pub fn name_for(&self, addr: &SocketAddr) -> Result<ServerName<'static>, CredentialsError> {
        match &self.server_name {
            Some(n) => {
                ServerName::try_from(n.clone()).map_err(|_| CredentialsError::Name(n.clone()))
            }
            None => Ok(ServerName::IpAddress(addr.ip().into())),
        }
    }
}

#[cfg(feature = "tls")]
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let err = |detail: String| CredentialsError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(CredentialsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

#[cfg(feature = "tls")]
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredentialsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| CredentialsError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// What [`generate`] writes.
#[cfg(feature = "gen-certs")]
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    /// DNS names and IP addresses the server certificate is valid for.
    pub hosts: Vec<String>,
    /// Validity of every certificate, relative to now (seconds; negative is the past).
    pub valid_from_secs: i64,
    pub valid_until_secs: i64,
    /// Replace credentials already in the directory (default: refuse with
    /// [`CredentialsError::Exists`]). Replacing `ca-cert.pem` means certificates issued by
    /// the old CA are no longer accepted by hosts using the new one.
    pub replace: bool,
}

#[cfg(feature = "gen-certs")]
impl Default for GenerateSpec {
    fn default() -> Self {
        GenerateSpec {
            hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            valid_from_secs: -3600,
            valid_until_secs: 365 * 24 * 3600,
            replace: false,
        }
    }
}

/// The credential files `generate` writes, in QEMU's `tls-creds-x509` layout.
pub const CREDENTIAL_FILES: [&str; 5] = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];

/// Which of [`CREDENTIAL_FILES`] exist in `dir`.
pub fn existing_credentials(dir: &Path) -> Vec<String> {
    CREDENTIAL_FILES
        .iter()
        .filter(|f| dir.join(f).symlink_metadata().is_ok())
        .map(|f| (*f).to_string())
        .collect()
}

/// Write a CA and a server and a client certificate signed by it into `dir` (created if
/// missing), in the `tls-creds-x509` layout. Keys are written with mode 0600. Credentials
/// already there are refused ([`CredentialsError::Exists`]) unless `spec.replace`; each file
/// is written beside its name and renamed over it, so none is ever left half-written.
/// (Feature `gen-certs`.)
#[cfg(feature = "gen-certs")]
pub fn generate(dir: &Path, spec: &GenerateSpec) -> Result<(), CredentialsError> {
    let existing = existing_credentials(dir);
    if !existing.is_empty() && !spec.replace {
        return Err(CredentialsError::Exists {
            dir: dir.to_path_buf(),
            files: existing,
        });
    }
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let g = |e: rcgen::Error| CredentialsError::Generate(e.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| CredentialsError::Generate(e.to_string()))?
        .as_secs() as i64;
    let at = |s: i64| time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(now + s);
    let from = at(spec.valid_from_secs);
    let until = at(spec.valid_until_secs);
    let named = |cn: &str| {
        let mut d = DistinguishedName::new();
        d.push(DnType::CommonName, cn);
        d.push(DnType::OrganizationName, "pagewire");
        d
    };

    let ca_key = KeyPair::generate().map_err(g)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
    ca.distinguished_name = named("pagewire test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).map_err(g)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(g)?;
        let mut p = CertificateParams::new(names).map_err(g)?;
        p.distinguished_name = named(cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.not_before = from;
        p.not_after = until;
        let cert = p.signed_by(&key, &issuer).map_err(g)?;
        Ok::<_, CredentialsError>((cert.pem(), key.serialize_pem()))
    };
    let server_cn = spec
        .hosts
        .first()
        .map_or("pagewire receiver", String::as_str);
    let (server_cert, server_key) = leaf(
        spec.hosts.clone(),
        server_cn,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "pagewire sender",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    std::fs::create_dir_all(dir).map_err(|source| CredentialsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, text, secret) in [
        (CA_CERT, ca_cert.pem(), false),
        (SERVER_CERT, server_cert, false),
        (SERVER_KEY, server_key, true),
        (CLIENT_CERT, client_cert, false),
        (CLIENT_KEY, client_key, true),
    ] {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), secret)
            .map_err(|source| CredentialsError::Write { path, source })?;
    }
    Ok(())
}

#[cfg(feature = "gen-certs")]
fn write_file(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".pagewire-{}.partial", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    o.mode(if secret { 0o600 } else { 0o644 });
    let written = o
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Why a connection is clear text, for the warning about a non-loopback peer.
pub(crate) const CLEAR_BECAUSE: &str = if cfg!(feature = "tls") {
    "no TLS"
} else {
    NOT_BUILT
};

/// Opens the sender's connections: TCP, then (with TLS configured) the client handshake.
#[derive(Clone)]
pub(crate) struct Dialer {
    client: Option<ClientSide>,
}

impl Dialer {
    /// Load the sender's credentials (if `cfg.tls`), and warn once when pages would cross a
    /// non-loopback network in clear text.
    pub fn new(
        cfg: &crate::config::Config,
        addr: &SocketAddr,
    ) -> Result<Dialer, crate::error::SessionError> {
        let client = match &cfg.tls {
            Some(t) => Some(client_side(t, addr)?),
            None => {
                if !pagewire_transport::net::is_loopback(addr) {
                    tracing::warn!(
                        %addr,
                        "{CLEAR_BECAUSE}: guest memory travels to {addr} in clear text{}",
                        if cfg.secret.is_some() {
                            " (the shared secret authenticates the peers but encrypts nothing)"
                        } else {
                            ""
                        }
                    );
                }
                None
            }
        };
        Ok(Dialer { client })
    }

    /// Connect to `addr` and run the TLS handshake if configured, within `timeout` per step.
    pub fn connect(
        &self,
        addr: SocketAddr,
        opts: &pagewire_transport::net::SocketOptions,
        timeout: std::time::Duration,
    ) -> Result<tls::Conn, crate::error::SessionError> {
        let tcp = pagewire_transport::net::connect(addr, opts)?;
        match &self.client {
            None => Ok(tls::Conn::Clear(tcp)),
            Some(client) => client_handshake(client, tcp, addr, timeout),
        }
    }
}

/// Runs the receiver's side of the TLS handshake when TLS is configured.
#[derive(Clone)]
pub(crate) struct Acceptor {
    server: Option<ServerSide>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("tls", &self.server.is_some())
            .finish()
    }
}

impl Acceptor {
    pub fn new(cfg: &crate::config::Config) -> Result<Acceptor, CredentialsError> {
        Ok(Acceptor {
            server: match &cfg.tls {
                Some(t) => Some(server_side(t)?),
                None => None,
            },
        })
    }

    /// Whether connections must be TLS.
    pub fn is_tls(&self) -> bool {
        self.server.is_some()
    }

    /// The server handshake on a freshly accepted socket (whose timeouts are set).
    pub fn accept(&self, tcp: std::net::TcpStream) -> Result<tls::Conn, TlsError> {
        match &self.server {
            None => Ok(tls::Conn::Clear(tcp)),
            Some(server) => server_handshake(server, tcp),
        }
    }
}

/// The sender's TLS settings, loaded: configuration, the name the receiver's certificate must
/// carry, record settings.
#[cfg(feature = "tls")]
type ClientSide = (Arc<ClientConfig>, ServerName<'static>, tls::RecordConfig);
/// The receiver's TLS settings, loaded.
#[cfg(feature = "tls")]
type ServerSide = (Arc<ServerConfig>, tls::RecordConfig);

#[cfg(feature = "tls")]
fn client_side(t: &TlsConfig, addr: &SocketAddr) -> Result<ClientSide, CredentialsError> {
    Ok((t.client_config()?, t.name_for(addr)?, t.records()))
}

#[cfg(feature = "tls")]
fn server_side(t: &TlsConfig) -> Result<ServerSide, CredentialsError> {
    Ok((t.server_config()?, t.records()))
}

#[cfg(feature = "tls")]
fn client_handshake(
    (cfg, name, records): &ClientSide,
    tcp: std::net::TcpStream,
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> Result<tls::Conn, crate::error::SessionError> {
    let io = |e: std::io::Error| TlsError::Io(e);
    tcp.set_read_timeout(Some(timeout)).map_err(io)?;
    tcp.set_write_timeout(Some(timeout)).map_err(io)?;
    let t = tls::client(tcp, cfg.clone(), name.clone(), *records)?;
    tracing::debug!(%addr, suite = t.suite(), "TLS established");
    let conn = tls::Conn::Tls(Box::new(t));
    // As a clear-text connection leaves `connect`: the caller sets what it needs.
    conn.tcp().set_read_timeout(None).map_err(io)?;
    conn.tcp().set_write_timeout(None).map_err(io)?;
    Ok(conn)
}

#[cfg(feature = "tls")]
fn server_handshake(
    (cfg, records): &ServerSide,
    tcp: std::net::TcpStream,
) -> Result<tls::Conn, TlsError> {
    Ok(tls::Conn::Tls(Box::new(tls::server(
        tcp,
        cfg.clone(),
        *records,
    )?)))
}

// Without the `tls` feature there are no TLS settings (TlsConfig has no values), so neither
// side ever holds loaded ones.
#[cfg(not(feature = "tls"))]
type ClientSide = std::convert::Infallible;
#[cfg(not(feature = "tls"))]
type ServerSide = std::convert::Infallible;

#[cfg(not(feature = "tls"))]
fn client_side(t: &TlsConfig, _addr: &SocketAddr) -> Result<ClientSide, CredentialsError> {
    match *t {}
}

#[cfg(not(feature = "tls"))]
fn server_side(t: &TlsConfig) -> Result<ServerSide, CredentialsError> {
    match *t {}
}

#[cfg(not(feature = "tls"))]
fn client_handshake(
    client: &ClientSide,
    _tcp: std::net::TcpStream,
    _addr: SocketAddr,
    _timeout: std::time::Duration,
) -> Result<tls::Conn, crate::error::SessionError> {
    match *client {}
}

#[cfg(not(feature = "tls"))]
fn server_handshake(server: &ServerSide, _tcp: std::net::TcpStream) -> Result<tls::Conn, TlsError> {
    match *server {}
}
