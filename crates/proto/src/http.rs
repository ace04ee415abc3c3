//! The small HTTP/1.1 server side shared by the metrics endpoint and the provisioning API:
//! one request per connection, and — in a cluster with a key — HTTPS with a bearer token.
//!
//! With a cluster key, a connection must open with TLS (the node's certificate from the cluster CA,
//! see `tls`; a plain request gets 426) and carry `Authorization: Bearer TOKEN`, where TOKEN
//! is derived per endpoint from the admin credential's secret (`token`; `brickfs cluster
//! token api|metrics` prints it, given the key or the admin credential); anything else gets
//! 401. A client that wants to know the server holds the key too sends `X-Brickfs-Nonce: N`
//! and checks `X-Brickfs-Proof` = hex HMAC-SHA256(admin secret, "brickfs-http-server" ‖
//! endpoint ‖ N) in the reply. Without a key, plain HTTP and no token.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connection's stream, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// The bearer token of `endpoint` ("api" or "metrics") in a cluster with `key`.
pub fn token(key: &[u8], endpoint: &str) -> String {
    admin_token(&crate::cred::admin_secret(key), endpoint)
}

/// The same token, from the admin credential's secret (an administrator holds no key).
pub fn admin_token(admin_secret: &[u8], endpoint: &str) -> String {
    hex(&mac(
        admin_secret,
        &[b"brickfs-http-token", endpoint.as_bytes()],
    ))
}

/// What a server holding `key` answers to nonce `nonce` for `endpoint` (an administrator
/// checks it with the admin secret: HMAC-SHA256(admin secret, "brickfs-http-server" ‖
/// endpoint ‖ nonce)).
pub fn server_proof(key: &[u8], endpoint: &str, nonce: &str) -> String {
    hex(&mac(
        &crate::cred::admin_secret(key),
        &[
            b"brickfs-http-server",
            endpoint.as_bytes(),
            nonce.as_bytes(),
        ],
    ))
}

/// Equal in constant time (for equal lengths).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accepts a connection: TLS when the process holds a cluster key and the client opens with a
/// TLS handshake. Returns the stream and whether it is TLS.
pub async fn accept(conn: tokio::net::TcpStream) -> std::io::Result<(Box<dyn Stream>, bool)> {
    if crate::rpc::cluster_key().is_none() {
        return Ok((Box::new(conn), false));
    }
    if crate::tls::opens_with_tls(&conn).await? {
        let (tls, _) = crate::tls::accept(conn)
            .await
            .map_err(std::io::Error::other)?;
        return Ok((Box::new(tls), true));
    }
    Ok((Box::new(conn), false))
}

/// Checks a request against the cluster key (see the module's comment): `Ok` with the headers
/// to add to the reply, or the status and reason to refuse it with.
pub fn authorize(
    req: &Request,
    tls: bool,
    endpoint: &str,
) -> Result<Vec<(String, String)>, (u16, String)> {
    let Some(key) = crate::rpc::cluster_key() else {
        return Ok(Vec::new());
    };
    if !tls {
        return Err((
            426,
            "this cluster has a key: use https (check the node's certificate with the cluster CA: brickfs cluster ca)".into(),
        ));
    }
    let want = token(&key, endpoint);
    let given = req
        .header("authorization")
        // The scheme's name is case-insensitive (RFC 7235).
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .map(str::trim);
    match given {
        Some(t) if same(t.as_bytes(), want.as_bytes()) => {}
        Some(_) => {
            return Err((
                401,
                format!("wrong token for the {endpoint} endpoint of this cluster"),
            ));
        }
        None => {
            return Err((
                401,
                format!("Authorization: Bearer TOKEN required (brickfs cluster token {endpoint})"),
            ));
        }
    }
    Ok(match req.header("x-brickfs-nonce") {
        Some(n) if n.len() <= 256 => vec![(
            "X-Brickfs-Proof".to_string(),
            server_proof(&key, endpoint, n),
        )],
        _ => Vec::new(),
    })
}

/// Reads one HTTP/1.1 request (`None` when it is not HTTP, its head is over 16 KiB or its
/// body over `body_max`).
pub async fn read_request<S: AsyncRead + Unpin + ?Sized>(
    conn: &mut S,
    body_max: usize,
) -> std::io::Result<Option<Request>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if raw.len() > 16 << 10 {
            return Ok(None);
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(path)) = (first.next(), first.next()) else {
        return Ok(None);
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > body_max {
        return Ok(None);
    }
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(len);
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        body,
    }))
}

/// The reason phrase of the statuses these servers send.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        507 => "Insufficient Storage",
        _ => "Error",
    }
}

/// Writes a whole reply and closes the connection.
pub async fn reply<S: AsyncWrite + Unpin + ?Sized>(
    conn: &mut S,
    status: u16,
    content_type: &str,
    extra: &[(String, String)],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_by_endpoint_and_key() {
        let (a, b) = (b"key-one".as_slice(), b"key-two".as_slice());
        assert_eq!(token(a, "api"), token(a, "api"));
        assert_ne!(token(a, "api"), token(a, "metrics"));
        assert_ne!(token(a, "api"), token(b, "api"));
        assert_eq!(token(a, "api").len(), 64);
        assert_ne!(server_proof(a, "api", "n1"), server_proof(a, "api", "n2"));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
