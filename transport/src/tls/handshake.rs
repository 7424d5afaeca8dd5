//! The TLS 1.3 handshake with rustls over a blocking socket (the caller sets its timeouts),
//! ending with the traffic keys handed to pagewire's record layer.
//!
//! After the handshake the server sends one record holding [`READY`] and the client waits
//! for it before it sends anything. The keys are taken out of rustls at that point, so no
//! record may sit unread in rustls' buffers: the client's first record could otherwise
//! arrive in the same read as its Finished message. The ready record also carries the
//! server's alert to the client when the server refuses the client's certificate (TLS 1.3
//! clients finish their side of the handshake before the server has checked them).
//!
//! The record layer needs the application traffic secrets themselves, not only the key and
//! IV `dangerous_extract_secrets` returns: a key update derives the next generation from the
//! secret (RFC 8446 §7.2). rustls hands them to a connection's [`KeyLog`] as
//! `CLIENT_TRAFFIC_SECRET_0` and `SERVER_TRAFFIC_SECRET_0`, so each connection runs with a
//! copy of the configuration whose key log keeps those two, and the key and IV derived from
//! them are checked against the ones rustls extracted before any record is sealed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, KeyLog, RootCertStore, ServerConfig,
    ServerConnection,
};

use super::{RecordConfig, RecordReader, Sealer, TlsError, TlsStream, READ_BUFFER};
use crate::tls::record::{Direction, Suite};

/// The plaintext of the server's first record.
pub const READY: u8 = 0x5a;

const CT_HANDSHAKE: u8 = 22;
const CT_ALERT: u8 = 21;

/// The crypto provider pagewire uses (aws-lc-rs: its AES-GCM is faster than ring's here,
/// docs/benchmarks.md#tls), with AES-128-GCM preferred: the fastest suite on CPUs with AES-NI
/// and CLMUL.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A sender's (client's) configuration: trusts `roots`, presents `chain`/`key`.
pub fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(format!("CA certificates: {e}")))?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Handshake)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("client certificate and key: {e}")))?;
    cfg.enable_secret_extraction = true;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A receiver's (server's) configuration: requires a client certificate issued by `roots`,
/// presents `chain`/`key`.
pub fn server_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(format!("CA certificates: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Handshake)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("server certificate and key: {e}")))?;
    cfg.enable_secret_extraction = true;
    // No session tickets: nothing may follow the handshake but pagewire's own records.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Run the client side on `tcp`, verifying the server's certificate for `name`.
pub fn client(
    tcp: TcpStream,
    cfg: Arc<ClientConfig>,
    name: ServerName<'static>,
    records: RecordConfig,
) -> Result<TlsStream, TlsError> {
    let secrets = Arc::new(TrafficSecrets::default());
    let mut cfg = (*cfg).clone();
    cfg.key_log = secrets.clone();
    let conn = ClientConnection::new(Arc::new(cfg), name).map_err(TlsError::Handshake)?;
    let mut stream = finish(tcp, Connection::Client(conn), &secrets, records)?;
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(1) if b[0] == READY => Ok(stream),
        Ok(0) => Err(TlsError::Setup(
            "the receiver closed the connection after the handshake".into(),
        )),
        Ok(_) => Err(TlsError::Setup(
            "the receiver's first record is not 'ready'".into(),
        )),
        Err(e) => Err(unwrap_io(e)),
    }
}

/// Run the server side on `tcp`, requiring a client certificate.
pub fn server(
    tcp: TcpStream,
    cfg: Arc<ServerConfig>,
    records: RecordConfig,
) -> Result<TlsStream, TlsError> {
    let secrets = Arc::new(TrafficSecrets::default());
    let mut cfg = (*cfg).clone();
    cfg.key_log = secrets.clone();
    let conn = ServerConnection::new(Arc::new(cfg)).map_err(TlsError::Handshake)?;
    let mut stream = finish(tcp, Connection::Server(conn), &secrets, records)?;
    stream.write_all(&[READY])?;
    Ok(stream)
}

pub use super::unwrap_io;

/// One connection's application traffic secrets, as rustls logs them during its handshake.
#[derive(Default)]
struct TrafficSecrets {
    /// The client's application_traffic_secret_0.
    client: Mutex<Option<Vec<u8>>>,
    /// The server's.
    server: Mutex<Option<Vec<u8>>>,
}

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl std::fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrafficSecrets")
    }
}

impl KeyLog for TrafficSecrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            CLIENT_SECRET => &self.client,
            SERVER_SECRET => &self.server,
            _ => return,
        };
        if let Ok(mut slot) = slot.lock() {
            *slot = Some(secret.to_vec());
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

impl TrafficSecrets {
    /// The direction the client (`client`) or the server seals with; its key and IV must be
    /// the ones rustls extracted.
    fn direction(
        &self,
        client: bool,
        extracted: &rustls::ConnectionTrafficSecrets,
        records_per_key: u64,
    ) -> Result<Direction, TlsError> {
        let suite = Suite::of(extracted)?;
        let mut slot = if client { &self.client } else { &self.server }
            .lock()
            .map_err(|_| TlsError::Setup("traffic secrets: poisoned lock".into()))?;
        let Some(mut secret) = slot.take() else {
            return Err(TlsError::Setup(
                "rustls did not pass on an application traffic secret".into(),
            ));
        };
        let dir = Direction::new(suite, &secret);
        secret.fill(0);
        std::hint::black_box(&mut secret);
        let dir = dir?;
        if !dir.matches(extracted) {
            return Err(TlsError::Setup(
                "the application traffic secret rustls logged does not give the keys it \
                 extracted"
                    .into(),
            ));
        }
        Ok(dir.with_records_per_key(records_per_key))
    }
}

fn finish(
    mut tcp: TcpStream,
    mut conn: Connection,
    logged: &TrafficSecrets,
    records: RecordConfig,
) -> Result<TlsStream, TlsError> {
    let server = matches!(conn, Connection::Server(_));
    let mut first = true;
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        tcp.flush()?;
        if !conn.is_handshaking() {
            break;
        }
        if first {
            // A peer that answers with something that is not a TLS record is a clear-text
            // pagewire peer (or not pagewire at all): say so instead of "corrupt message".
            let mut b = [0u8; 1];
            let n = match tcp.peek(&mut b) {
                Ok(n) => n,
                Err(e)
                    if server
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    return Err(TlsError::NotTls {
                        detail: "it sent no TLS handshake within the timeout; a clear-text \
                                 pagewire sender waits for the receiver to speak first"
                            .into(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(TlsError::NotTls {
                    detail: "it closed the connection during the handshake".into(),
                });
            }
            if b[0] != CT_HANDSHAKE && b[0] != CT_ALERT {
                // A clear-text pagewire receiver refuses a ClientHello with a control-protocol
                // error frame (it may have no credentials, or no TLS in its build): pass its
                // words on. The read is bounded by the frame limit and the socket's timeout.
                if !server {
                    if let Ok(crate::control::Message::Error { message }) =
                        crate::control::read_message(&mut tcp)
                    {
                        return Err(TlsError::NotTls {
                            detail: format!("the receiver answered in clear text: {message}"),
                        });
                    }
                }
                let who = if server { "sender" } else { "receiver" };
                return Err(TlsError::NotTls {
                    detail: format!(
                        "its first byte is 0x{:02x}, not a TLS record; a clear-text pagewire {who}?",
                        b[0]
                    ),
                });
            }
            first = false;
        }
        let got = conn.read_tls(&mut tcp).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                TlsError::Setup("the peer went silent during the TLS handshake (timeout)".into())
            }
            _ => TlsError::Io(e),
        })?;
        if got == 0 {
            return Err(TlsError::Setup(
                "the peer closed the connection during the TLS handshake".into(),
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert rustls queued), best effort.
            let _ = conn.write_tls(&mut tcp);
            let _ = tcp.flush();
            return Err(match e {
                rustls::Error::AlertReceived(a) => TlsError::Alert(a),
                other => TlsError::Handshake(other),
            });
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut tcp)?;
    }
    tcp.flush()?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(TlsError::Handshake)?;
    if secrets.tx.0 != 0 || secrets.rx.0 != 0 {
        return Err(TlsError::Setup(
            "rustls already sealed or opened application data records".into(),
        ));
    }
    let tx = logged.direction(!server, &secrets.tx.1, records.records_per_key)?;
    let rx = logged.direction(server, &secrets.rx.1, records.records_per_key)?;
    Ok(TlsStream::new(
        tcp,
        Sealer::new(tx, records.record_size),
        RecordReader::new(rx, READ_BUFFER),
    ))
}
