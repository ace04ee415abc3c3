//! TLS for the connections of a cluster with a key: the data crosses the network encrypted.
//!
//! Identity is the cluster key, not a certificate: every node makes a self-signed certificate
//! when it first needs one, and clients accept any certificate. The key proofs of the
//! handshake (see `rpc`) cover keying material exported from the TLS session, so a proof made
//! on one TLS session is worthless on another: a man in the middle, who must run two sessions,
//! cannot pass them on. Only TLS 1.3 is spoken (rustls with *ring*).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;

/// The first byte of a TLS handshake record: how a server tells TLS from a plain `Hello`.
const HANDSHAKE_RECORD: u8 = 0x16;
/// The label of the keying material the key proofs cover (RFC 5705 / 8446 exporter).
const LABEL: &[u8] = b"EXPORTER-brickfs-key-proof";
/// The name clients ask for (nothing checks it: identity is the key).
const SERVER_NAME: &str = "brickfs";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate, still checking that the peer holds its key (the handshake's
/// signatures); who the peer is, the cluster key proof says.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured: a TLS 1.2 signature never comes.
        Err(rustls::Error::General("TLS 1.2 is not spoken here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let p = provider();
            let config = ClientConfig::builder_with_provider(p.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

fn server_config() -> Result<Arc<ServerConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ServerConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
                .map_err(|e| format!("make a certificate: {e}"))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.key_pair.serialize_der()));
            let config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(vec![made.cert.der().clone()], key)
                .map_err(|e| e.to_string())?;
            tracing::debug!("TLS certificate made for this process");
            Ok(Arc::new(config))
        })
        .clone()
}

pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Whether a connection opens with a TLS handshake (rather than a frame or an HTTP request):
/// looks at its first byte without taking it.
pub async fn opens_with_tls(conn: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let n = conn.peek(&mut first).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(first[0] == HANDSHAKE_RECORD)
}

/// Runs the client side of the TLS handshake; returns the stream and its channel binding.
pub async fn connect(tcp: TcpStream) -> Result<(ClientStream, Vec<u8>), String> {
    let name = ServerName::try_from(SERVER_NAME)
        .map_err(|e| e.to_string())?
        .to_owned();
    let tls = tokio_rustls::TlsConnector::from(client_config()?)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let binding = binding(tls.get_ref().1)?;
    Ok((tls, binding))
}

/// The keying material the key proofs cover (see the module's comment).
fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Vec<u8>, String> {
    conn.export_keying_material(vec![0u8; 32], LABEL, None)
        .map_err(|e| e.to_string())
}

/// Runs the server side of the TLS handshake; returns the stream and its channel binding.
pub async fn accept(tcp: TcpStream) -> Result<(ServerStream, Vec<u8>), String> {
    let tls = tokio_rustls::TlsAcceptor::from(server_config()?)
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let binding = binding(tls.get_ref().1)?;
    Ok((tls, binding))
}
