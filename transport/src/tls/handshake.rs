//! The TLS 1.3 handshake with rustls over a blocking socket (the caller sets its timeouts),
//! ending with the traffic keys handed to pagewire's record layer.
//!
//! After the handshake the server sends one record holding [`READY`] and the client waits
//! for it before it sends anything. The keys are taken out of rustls at that point, so no
//! record may sit unread in rustls' buffers: the client's first record could otherwise
//! arrive in the same read as its Finished message. The ready record also carries the
//! server's alert to the client when the server refuses the client's certificate (TLS 1.3
//! clients finish their side of the handshake before the server has checked them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

use super::{RecordReader, Sealer, TlsError, TlsStream, READ_BUFFER};
use crate::tls::record::Direction;

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
    record_size: usize,
) -> Result<TlsStream, TlsError> {
    let conn = ClientConnection::new(cfg, name).map_err(TlsError::Handshake)?;
    let mut stream = finish(tcp, Connection::Client(conn), record_size)?;
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
    record_size: usize,
) -> Result<TlsStream, TlsError> {
    let conn = ServerConnection::new(cfg).map_err(TlsError::Handshake)?;
    let mut stream = finish(tcp, Connection::Server(conn), record_size)?;
    stream.write_all(&[READY])?;
    Ok(stream)
}

/// Put back our own error types from inside an `io::Error`.
pub fn unwrap_io(e: std::io::Error) -> TlsError {
    if e.get_ref().is_some_and(|i| i.is::<TlsError>()) {
        match e.into_inner().map(|i| i.downcast::<TlsError>()) {
            Some(Ok(t)) => *t,
            _ => TlsError::Setup("unreadable error".into()),
        }
    } else {
        TlsError::Io(e)
    }
}

fn finish(
    mut tcp: TcpStream,
    mut conn: Connection,
    record_size: usize,
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
    let tx = Direction::new(secrets.tx.0, secrets.tx.1)?;
    let rx = Direction::new(secrets.rx.0, secrets.rx.1)?;
    Ok(TlsStream::new(
        tcp,
        Sealer::new(tx, record_size),
        RecordReader::new(rx, READ_BUFFER),
    ))
}
