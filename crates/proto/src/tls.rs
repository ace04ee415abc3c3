//! TLS for the connections of a cluster with a key: the data crosses the network encrypted,
//! to a server whose certificate the cluster's CA signed.
//!
//! **The cluster CA** is derived from the cluster key: its Ed25519 key is seeded with
//! HMAC-SHA256(key, "brickfs-cluster-ca") and its certificate (subject `brickfs cluster CA`,
//! serial 1, rcgen's fixed validity) is the same bytes wherever it is made, so every node holds
//! the same CA without anything being copied, and `brickfs cluster ca` prints it for clients,
//! `curl --cacert` and Prometheus' `tls_config.ca_file`. Each node makes its own P-256 key and
//! a certificate the CA signs, for its addresses and host name (`set_server_names`), when it
//! first needs one, and presents it with the CA's.
//!
//! **Clients verify** the server's certificate against the CA and the address they dialled
//! when they know the CA: from the cluster key, or from a CA file (`set_ca_pem`, the
//! `--ca-file` flags). A client that knows neither (a mount given only its client credential)
//! still cannot be fooled: the key proofs of the handshake (see `rpc`) cover keying material
//! exported from the TLS session, so a proof made on one TLS session is worthless on another,
//! and a man in the middle, who must run two sessions, cannot pass them on. Only TLS 1.3 is
//! spoken (rustls with *ring*).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;

/// The first byte of a TLS handshake record: how a server tells TLS from a plain `Hello`.
const HANDSHAKE_RECORD: u8 = 0x16;
/// The label of the keying material the key proofs cover (RFC 5705 / 8446 exporter).
const LABEL: &[u8] = b"EXPORTER-brickfs-key-proof";
/// The name clients ask for when they dial no address they know (and a name every node's
/// certificate holds).
const SERVER_NAME: &str = "brickfs";

/// The names and addresses this process's server certificate is for (see `set_server_names`).
static SERVER_NAMES: OnceLock<Vec<String>> = OnceLock::new();
/// A CA certificate given to this process (`set_ca_pem`), in DER.
static CA_FILE: OnceLock<CertificateDer<'static>> = OnceLock::new();

/// The names and addresses (besides `brickfs`, `localhost`, the loopback addresses, the host
/// name and every interface address, which are always in) this process's server certificate
/// is for: a node's advertised address. Before the first TLS connection; once per process.
pub fn set_server_names(names: Vec<String>) -> bool {
    SERVER_NAMES.set(names).is_ok()
}

/// Makes the CA in `pem` (`brickfs cluster ca` prints it) the one server certificates are
/// checked against, for a process that does not hold the cluster key.
pub fn set_ca_pem(pem: &str) -> Result<(), String> {
    let der = pem_decode(pem).ok_or("not a PEM certificate (as `brickfs cluster ca` prints it)")?;
    let _ = CA_FILE.set(CertificateDer::from(der));
    Ok(())
}

/// Reads a CA file (see `set_ca_pem`); the error names the file.
pub fn use_ca_file(path: Option<&std::path::Path>) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    set_ca_pem(&text).map_err(|e| format!("CA file {}: {e}", path.display()))
}

/// The cluster CA of the cluster with `key`: its key pair and certificate.
fn cluster_ca(key: &[u8]) -> Result<(rcgen::KeyPair, rcgen::Certificate), String> {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    m.update(b"brickfs-cluster-ca");
    let seed = m.finalize().into_bytes();
    // PKCS#8 v1 of an Ed25519 private key: a fixed prefix, then the 32-byte seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| format!("make the cluster CA key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "brickfs cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.serial_number = Some(rcgen::SerialNumber::from(1u64));
    let cert = params
        .self_signed(&pair)
        .map_err(|e| format!("make the cluster CA certificate: {e}"))?;
    Ok((pair, cert))
}

/// The cluster CA's certificate, PEM-encoded, of the cluster with `key`.
pub fn ca_pem(key: &[u8]) -> Result<String, String> {
    Ok(pem_encode(cluster_ca(key)?.1.der()))
}

/// The CA this process checks servers against, if it knows one.
fn known_ca() -> Option<CertificateDer<'static>> {
    if let Some(der) = CA_FILE.get() {
        return Some(der.clone());
    }
    let key = crate::rpc::cluster_key()?;
    cluster_ca(&key).ok().map(|(_, c)| c.der().clone())
}

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn pem_encode(der: &[u8]) -> String {
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(B64[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("{PEM_BEGIN}\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(PEM_END);
    out.push('\n');
    out
}

fn pem_decode(pem: &str) -> Option<Vec<u8>> {
    let body = pem.split(PEM_BEGIN).nth(1)?.split(PEM_END).next()?;
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in body.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = B64.iter().position(|&b| b == c)? as u32;
        bits = (bits << 6) | v;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Every address of this host's interfaces (Linux: the kernel's local routes and IPv6
/// address list).
fn interface_addrs() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
        let mut last: Option<std::net::IpAddr> = None;
        for line in trie.lines() {
            let t = line.trim();
            if let Some(ip) = t.strip_prefix("|-- ").and_then(|a| a.parse().ok()) {
                last = Some(ip);
            } else if t == "/32 host LOCAL"
                && let Some(ip) = last.take()
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in v6.lines() {
            let Some(hex) = line.split_whitespace().next().filter(|h| h.len() == 32) else {
                continue;
            };
            if let Ok(bits) = u128::from_str_radix(hex, 16) {
                let ip = std::net::IpAddr::V6(bits.into());
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// What this process's server certificate names.
fn certificate_names() -> Vec<String> {
    let mut names = vec![
        SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(host_name());
    names.extend(SERVER_NAMES.get().into_iter().flatten().cloned());
    names.extend(interface_addrs().iter().map(|ip| ip.to_string()));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| {
        !n.is_empty() && rcgen::Ia5String::try_from(n.as_str()).is_ok() && seen.insert(n.clone())
    });
    names
}

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

/// A client's TLS settings: checking servers against `ca` when it is given.
fn make_client_config(ca: Option<CertificateDer<'static>>) -> Result<Arc<ClientConfig>, String> {
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let config = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(ca)
                .map_err(|e| format!("the cluster CA certificate: {e}"))?;
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), p)
                    .build()
                    .map_err(|e| e.to_string())?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The client settings for connections proving `key` (a node's, which knows the CA from it),
/// or this process's otherwise: kept per CA.
fn client_config(key: Option<&[u8]>) -> Result<Arc<ClientConfig>, String> {
    type Configs = std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<ClientConfig>>>;
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    let ca = match key {
        Some(k) => Some(cluster_ca(k)?.1.der().clone()),
        None => known_ca(),
    };
    let id = ca.as_ref().map_or_else(Vec::new, |c| c.to_vec());
    let configs = CONFIGS.get_or_init(Default::default);
    if let Some(c) = configs.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(c.clone());
    }
    let made = make_client_config(ca)?;
    configs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, made.clone());
    Ok(made)
}

fn server_config() -> Result<Arc<ServerConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ServerConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let names = certificate_names();
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| format!("make a TLS key: {e}"))?;
            let mut params = rcgen::CertificateParams::new(names.clone())
                .map_err(|e| format!("make a certificate for {names:?}: {e}"))?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "brickfs node");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            let chain = match crate::rpc::cluster_key() {
                // Signed by the cluster CA, which travels with it.
                Some(key) => {
                    let (ca_pair, ca) = cluster_ca(&key)?;
                    let cert = params
                        .signed_by(&pair, &ca, &ca_pair)
                        .map_err(|e| format!("sign the node's certificate: {e}"))?;
                    vec![cert.der().clone(), ca.der().clone()]
                }
                // No key, no CA (TLS is only spoken in keyed clusters).
                None => vec![
                    params
                        .self_signed(&pair)
                        .map_err(|e| format!("make a certificate: {e}"))?
                        .der()
                        .clone(),
                ],
            };
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
            let config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| e.to_string())?;
            tracing::info!(names = ?names, "TLS certificate made for this node, signed by the cluster CA");
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
/// The server's certificate must name the address dialled, when the CA is known.
pub async fn connect(tcp: TcpStream) -> Result<(ClientStream, Vec<u8>), String> {
    connect_with(tcp, client_config(None)?).await
}

/// As `connect`, for a connection that proves the cluster key `key` (or, `None`, another
/// credential): a key holder checks against the CA derived from it.
pub async fn connect_proving(
    tcp: TcpStream,
    key: Option<&[u8]>,
) -> Result<(ClientStream, Vec<u8>), String> {
    connect_with(tcp, client_config(key)?).await
}

/// As `connect`, checking the server against `ca` (DER) whatever this process knows.
pub async fn connect_checking(
    tcp: TcpStream,
    ca: CertificateDer<'static>,
) -> Result<(ClientStream, Vec<u8>), String> {
    connect_with(tcp, make_client_config(Some(ca))?).await
}

async fn connect_with(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
) -> Result<(ClientStream, Vec<u8>), String> {
    let name = match tcp.peer_addr() {
        Ok(a) => ServerName::IpAddress(a.ip().to_canonical().into()),
        Err(_) => ServerName::try_from(SERVER_NAME)
            .map_err(|e| e.to_string())?
            .to_owned(),
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let binding = binding(tls.get_ref().1)?;
    Ok((tls, binding))
}

/// The PEM text of a certificate in DER (for tests and tools).
pub fn pem_of(der: &[u8]) -> String {
    pem_encode(der)
}

/// The certificate in PEM text, in DER.
pub fn der_of(pem: &str) -> Option<CertificateDer<'static>> {
    pem_decode(pem).map(CertificateDer::from)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_ca_is_the_same_from_the_same_key_and_round_trips_as_pem() {
        let a = ca_pem(b"0123456789abcdef0123456789abcdef").unwrap();
        let b = ca_pem(b"0123456789abcdef0123456789abcdef").unwrap();
        let other = ca_pem(b"another-key-another-key-another!").unwrap();
        assert_eq!(a, b, "every node derives the same CA");
        assert_ne!(a, other);
        assert!(
            a.starts_with(PEM_BEGIN) && a.trim_end().ends_with(PEM_END),
            "{a}"
        );
        let der = pem_decode(&a).unwrap();
        assert_eq!(pem_encode(&der), a);
        // Every length of tail encodes and decodes.
        for n in 0..10u8 {
            let bytes: Vec<u8> = (0..n).collect();
            if n > 0 {
                assert_eq!(pem_decode(&pem_encode(&bytes)).unwrap(), bytes);
            }
        }
        assert!(pem_decode("no certificate here").is_none());
    }
}
