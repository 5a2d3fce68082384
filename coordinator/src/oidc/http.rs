//! A small, bounded HTTPS/1.1 client for the provider's endpoints (discovery, JWKS, device
//! authorization, token, userinfo) and a small HTTP/1.1 responder for the push endpoints
//! (back-channel logout, SCIM).
//!
//! Why not a general HTTP stack: the relying party needs a handful of one-shot requests with
//! JSON or form bodies, over the rustls (ring) stack the control channel already uses; this
//! keeps the dependency tree (and its compile time) as it was. Every read is bounded in size
//! and time; one request per connection (`Connection: close`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest response accepted from the provider.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest request head or body the push endpoints accept.
pub const MAX_PUSH: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// An `https://host[:port]/path` URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    /// The `Host` header: the port only when it is not 443 (providers build their endpoint
    /// URLs from it).
    pub fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            443 => h,
            p => format!("{h}:{p}"),
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("{s:?} is not an https:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        anyhow::ensure!(
            !authority.is_empty() && !authority.contains('@'),
            "{s:?} has no usable host"
        );
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| anyhow!("bad IPv6 host in {s:?}"))?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (authority.to_string(), ""),
            }
        };
        let port = if port.is_empty() {
            443
        } else {
            port.parse().with_context(|| format!("bad port in {s:?}"))?
        };
        Ok(Url {
            host,
            port,
            path: path.to_string(),
        })
    }
}

/// The TLS roots: the system bundle (when present) plus `--oidc-ca-file`.
pub fn client_tls(extra_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for path in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if let Ok(pem) = std::fs::read(path) {
            for c in CertificateDer::pem_slice_iter(&pem).flatten() {
                let _ = roots.add(c);
            }
            break;
        }
    }
    if let Some(pem) = extra_ca_pem {
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(c.context("reading the OIDC CA file")?)
                .context("adding the OIDC CA")?;
            n += 1;
        }
        anyhow::ensure!(n > 0, "the OIDC CA file holds no certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// How a request authenticates (the values are secrets: never logged).
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Bearer(&'a str),
    /// HTTP Basic with the client id and secret (`client_secret_basic`, RFC 6749 2.3.1).
    Basic(&'a str, &'a str),
}

/// One request: `GET` without a body, `POST` with a form body.
pub async fn request(
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    url: &str,
    form: Option<&[(&str, &str)]>,
    auth: Auth<'_>,
) -> Result<Response> {
    tokio::time::timeout(TIMEOUT * 2, request_inner(tls, method, url, form, auth))
        .await
        .map_err(|_| anyhow!("{url}: no answer within {}s", (TIMEOUT * 2).as_secs()))?
}

async fn request_inner(
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    url: &str,
    form: Option<&[(&str, &str)]>,
    auth: Auth<'_>,
) -> Result<Response> {
    let u = Url::parse(url)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((u.host.as_str(), u.port))
        .await
        .with_context(|| format!("resolving {}", u.host))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| anyhow!("{} resolves to nothing", u.host))?;
    let tcp = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let name = ServerName::try_from(u.host.clone()).context("provider host name")?;
    let mut s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {}", u.host))?;
    let body = form.map(encode_form).unwrap_or_default();
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: ward-coordinator\r\n",
        u.path,
        u.host_header()
    );
    match auth {
        Auth::None => {}
        Auth::Bearer(b) => head.push_str(&format!("Authorization: Bearer {b}\r\n")),
        Auth::Basic(id, secret) => {
            use base64::Engine;
            let cred = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                pct(id),
                pct(secret)
            ));
            head.push_str(&format!("Authorization: Basic {cred}\r\n"));
        }
    }
    if form.is_some() {
        head.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await?;
    read_response(&mut s).await
}

/// `application/x-www-form-urlencoded`.
pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn pct(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Decodes a form body (`a=b&c=d`, `+` as space, `%XX`).
pub fn decode_form(body: &[u8]) -> Vec<(String, String)> {
    let dec = |s: &str| -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match u8::from_str_radix(
                        std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("x"),
                        16,
                    ) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

/// Head of an HTTP message: the first line and the headers (names lowercased).
struct Head {
    first: String,
    headers: Vec<(String, String)>,
    body_start: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("HTTP head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Head {
        first,
        headers,
        body_start: end + 4,
    }))
}

/// Reads more into `buf`; `false` at the end of the stream (a peer that closes without a TLS
/// close_notify counts as the end: the framing below decides whether the body is whole).
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, max: usize) -> Result<bool> {
    if buf.len() > max {
        bail!("HTTP message larger than {max} bytes");
    }
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk).await {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Result<Response> {
    let mut buf = Vec::new();
    let head = loop {
        if let Some(h) = parse_head(&buf)? {
            break h;
        }
        if !fill(s, &mut buf, MAX_PUSH).await? {
            bail!("the provider closed the connection before a complete answer");
        }
    };
    let status: u16 = head
        .first
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line"))?;
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let len: Option<usize> = head.header("content-length").and_then(|v| v.parse().ok());
    let body = if chunked {
        loop {
            if let Some(b) = dechunk(&buf[head.body_start..])? {
                break b;
            }
            if !fill(s, &mut buf, MAX_BODY).await? {
                bail!("the provider's chunked answer ended early");
            }
        }
    } else if let Some(len) = len {
        if len > MAX_BODY {
            bail!("the provider's answer is larger than {MAX_BODY} bytes");
        }
        while buf.len() < head.body_start + len {
            if !fill(s, &mut buf, MAX_BODY + MAX_PUSH).await? {
                bail!("the provider's answer ended early");
            }
        }
        buf[head.body_start..head.body_start + len].to_vec()
    } else {
        while fill(s, &mut buf, MAX_BODY).await? {}
        buf[head.body_start..].to_vec()
    };
    Ok(Response { status, body })
}

/// The body of a complete chunked message, or `None` when more bytes are needed.
fn dechunk(mut b: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_txt = std::str::from_utf8(&b[..eol]).context("chunk size")?;
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).context("chunk size")?;
        if size > MAX_BODY {
            bail!("chunk larger than {MAX_BODY} bytes");
        }
        if size == 0 {
            return Ok(Some(out));
        }
        let start = eol + 2;
        if b.len() < start + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
}

/// One request the push endpoints received.
#[derive(Debug)]
pub struct PushRequest {
    pub method: String,
    pub path: String,
    pub bearer: Option<String>,
    pub body: Vec<u8>,
}

/// Reads one request (bounded, Content-Length framing only).
pub async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<PushRequest> {
    let mut buf = Vec::new();
    let head = loop {
        if let Some(h) = parse_head(&buf)? {
            break h;
        }
        if !fill(s, &mut buf, MAX_PUSH).await? {
            bail!("connection closed before a complete request");
        }
    };
    let mut first = head.first.split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let len: usize = head
        .header("content-length")
        .map(|v| v.parse())
        .transpose()
        .context("bad Content-Length")?
        .unwrap_or(0);
    if len > MAX_PUSH {
        bail!("request body larger than {MAX_PUSH} bytes");
    }
    while buf.len() < head.body_start + len {
        if !fill(s, &mut buf, 2 * MAX_PUSH).await? {
            bail!("request body ended early");
        }
    }
    let bearer = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
        .map(|v| v.trim().to_string());
    Ok(PushRequest {
        method,
        path,
        bearer,
        body: buf[head.body_start..head.body_start + len].to_vec(),
    })
}

/// Writes a response with a JSON (or empty) body.
pub async fn write_response<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    body: &str,
) -> Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes()).await?;
    s.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_only() {
        assert_eq!(
            Url::parse("https://idp.test:8443/oidc/token").unwrap(),
            Url {
                host: "idp.test".into(),
                port: 8443,
                path: "/oidc/token".into()
            }
        );
        assert_eq!(Url::parse("https://idp.test").unwrap().port, 443);
        assert_eq!(Url::parse("https://[::1]:9/x").unwrap().host, "::1");
        assert_eq!(
            Url::parse("https://[::1]:9/x").unwrap().host_header(),
            "[::1]:9"
        );
        assert_eq!(
            Url::parse("https://idp.test:8443/x").unwrap().host_header(),
            "idp.test:8443"
        );
        assert_eq!(
            Url::parse("https://idp.test/x").unwrap().host_header(),
            "idp.test"
        );
        assert!(Url::parse("http://idp.test/").is_err());
        assert!(Url::parse("https://user@idp.test/").is_err());
        assert!(Url::parse("https://idp.test:99999/").is_err());
    }

    #[test]
    fn forms_round_trip() {
        let f = encode_form(&[("grant_type", "urn:x:y"), ("scope", "openid email")]);
        assert_eq!(f, "grant_type=urn%3Ax%3Ay&scope=openid%20email");
        let d = decode_form(b"logout_token=a.b.c&x=a+b%2Fc&bad=%zz&y");
        assert_eq!(d[0], ("logout_token".into(), "a.b.c".into()));
        assert_eq!(d[1], ("x".into(), "a b/c".into()));
        assert_eq!(d[2].1, "%zz");
        assert_eq!(d[3], ("y".into(), String::new()));
        assert!(decode_form(b"%").len() == 1);
    }

    #[tokio::test]
    async fn responses_with_length_chunked_and_eof_framing_are_read() {
        let r = read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra"[..])
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = read_response(
            &mut &b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"[..],
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (400, &b"abcde"[..]));
        let r = read_response(&mut &b"HTTP/1.0 200 OK\r\n\r\nall"[..])
            .await
            .unwrap();
        assert_eq!(r.body, b"all");
        assert!(
            read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"[..])
                .await
                .is_err()
        );
        assert!(read_response(&mut &b"garbage\r\n\r\n"[..]).await.is_err());
        assert!(
            read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"[..])
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn push_requests_are_bounded() {
        let r = read_request(
            &mut &b"PATCH /scim/v2/Users/u1 HTTP/1.1\r\nAuthorization: Bearer s3\r\nContent-Length: 2\r\n\r\n{}"[..],
        )
        .await
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PATCH", "/scim/v2/Users/u1")
        );
        assert_eq!(r.bearer.as_deref(), Some("s3"));
        assert_eq!(r.body, b"{}");
        assert!(
            read_request(&mut &b"POST / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"[..])
                .await
                .is_err()
        );
    }
}
