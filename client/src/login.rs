//! `ward up --login` in a browser: the CLI's loopback listener (RFC 8252 7.3).
//!
//! The CLI binds `127.0.0.1:<random port>`, makes the PKCE verifier (it never leaves this
//! process except to the coordinator, over the daemon's root-only socket and the pinned control
//! channel), and serves two paths:
//! - `GET /start`: once only, a redirect to the provider's authorization URL. The browser is
//!   opened on this address, so the URL with `state` never shows in another process's command
//!   line (`xdg-open`'s arguments are world-readable); a second fetch gets 410.
//! - `GET /callback?code=…&state=…`: the provider's redirect. The query is read strictly
//!   ([`ward_shared::oauth::read_callback`]); a wrong `state`, a missing or repeated parameter
//!   or an overlong value ends the sign-in with one clear line (fail closed). A provider
//!   error with the right state (the user declined) is passed on to the coordinator, which
//!   refuses and audits it.
//!
//! Requests are bounded (8 KiB, 5 s each); other paths get 404 and the wait goes on.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ward_shared::oauth::{self, CallbackError};

/// Largest request head read from the browser.
const MAX_REQUEST: usize = 8 * 1024;
/// Time one browser connection gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The redirect path the provider sends the browser to.
pub const CALLBACK_PATH: &str = "/callback";

/// The loopback listener of one browser sign-in.
pub struct Loopback {
    listener: TcpListener,
    pub redirect_uri: String,
    /// `http://127.0.0.1:PORT/start`: what the browser is opened on.
    pub start_uri: String,
}

/// How the redirect ended, once its `state` was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Code(String),
    /// The provider's `error` (e.g. `access_denied`), with the right state.
    Error(String),
}

impl Loopback {
    pub async fn bind() -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the sign-in's loopback listener on 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            listener,
            redirect_uri: format!("http://127.0.0.1:{port}{CALLBACK_PATH}"),
            start_uri: format!("http://127.0.0.1:{port}/start"),
        })
    }

    /// Serves `/start` (once) and waits for the callback carrying `state`, up to `wait`.
    pub async fn wait(&self, authorize_url: &str, state: &str, wait: Duration) -> Result<Outcome> {
        let mut started = false;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let accepted = tokio::time::timeout_at(deadline, self.listener.accept()).await;
            let Ok(accepted) = accepted else {
                bail!(
                    "the sign-in was not completed in time ({} s): no redirect reached {}",
                    wait.as_secs(),
                    self.redirect_uri
                );
            };
            let Ok((mut s, _)) = accepted else { continue };
            let target = match tokio::time::timeout(REQUEST_TIMEOUT, read_target(&mut s)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    let _ = respond(&mut s, 400, "Bad request", &e.to_string(), None).await;
                    continue;
                }
                Err(_) => continue,
            };
            let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
            match path {
                "/start" if !started => {
                    started = true;
                    let _ = respond(&mut s, 302, "Redirecting", "", Some(authorize_url)).await;
                }
                "/start" => {
                    let _ = respond(
                        &mut s,
                        410,
                        "Gone",
                        "This sign-in was already opened once; run `ward up --login` again.",
                        None,
                    )
                    .await;
                }
                CALLBACK_PATH => {
                    let query = query.split('#').next().unwrap_or("");
                    return match oauth::read_callback(query, state) {
                        Ok(code) => {
                            let _ = respond(&mut s, 200, "Signed in", "Ward received the sign-in; you can close this tab and return to the terminal.", None).await;
                            Ok(Outcome::Code(code))
                        }
                        Err(CallbackError::Refused(why)) => {
                            let _ = respond(
                                &mut s,
                                200,
                                "Sign-in refused",
                                &format!("The identity provider refused the sign-in: {why}"),
                                None,
                            )
                            .await;
                            let error = why.split(' ').next().unwrap_or("").to_string();
                            Ok(Outcome::Error(error))
                        }
                        Err(e) => {
                            let _ =
                                respond(&mut s, 400, "Sign-in refused", &e.to_string(), None).await;
                            Err(anyhow!("{e}"))
                        }
                    };
                }
                _ => {
                    let _ = respond(&mut s, 404, "Not found", "", None).await;
                }
            }
        }
    }
}

/// The request target of one `GET`, read up to the end of the head.
async fn read_target(s: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection closed before the request ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            bail!("the request is longer than {MAX_REQUEST} bytes");
        }
    }
    parse_request_line(&buf)
}

/// `GET <target> HTTP/1.x` → target. Anything else is refused.
pub fn parse_request_line(head: &[u8]) -> Result<String> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or_else(|| anyhow!("no request line"))?;
    let line =
        std::str::from_utf8(&head[..line_end]).map_err(|_| anyhow!("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line");
    };
    if method != "GET" {
        bail!("only GET is served here");
    }
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        bail!("malformed request line");
    }
    Ok(target.to_string())
}

async fn respond(
    s: &mut TcpStream,
    status: u16,
    title: &str,
    msg: &str,
    location: Option<&str>,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Gone",
    };
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title></head><body><h1>{}</h1><p id=\"message\">{}</p></body></html>",
        esc(title),
        esc(title),
        esc(msg)
    );
    let loc = location
        .map(|l| format!("Location: {l}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\n{loc}Content-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Whether a desktop session is there to open a browser in.
pub fn has_desktop(display: Option<&str>, wayland: Option<&str>) -> bool {
    display.is_some_and(|d| !d.is_empty()) || wayland.is_some_and(|w| !w.is_empty())
}

/// Opens `url` with `xdg-open` without waiting for the browser; false when it could not start.
pub fn open_browser(url: &str) -> bool {
    std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_read_strictly() {
        assert_eq!(
            parse_request_line(b"GET /callback?code=a&state=b HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap(),
            "/callback?code=a&state=b"
        );
        for bad in [
            &b"POST /callback HTTP/1.1\r\n\r\n"[..],
            b"GET /callback\r\n\r\n",
            b"GET  /callback HTTP/1.1\r\n\r\n",
            b"GET http://evil/ HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/2\r\n\r\n",
            b"no line end",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_desktop_is_display_or_wayland() {
        assert!(has_desktop(Some(":0"), None));
        assert!(has_desktop(None, Some("wayland-0")));
        assert!(!has_desktop(Some(""), None));
        assert!(!has_desktop(None, None));
    }

    async fn get(port: u16, target: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn port(l: &Loopback) -> u16 {
        l.listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn start_redirects_once_and_the_callback_gives_the_code() {
        let l = Loopback::bind().await.unwrap();
        assert!(oauth::check_loopback_redirect(&l.redirect_uri).is_ok());
        let p = port(&l);
        let client = tokio::spawn(async move {
            let first = get(p, "/start").await;
            let second = get(p, "/start").await;
            let other = get(p, "/favicon.ico").await;
            let cb = get(p, "/callback?code=the-code&state=st").await;
            (first, second, other, cb)
        });
        let out = l
            .wait("https://idp/auth?x=1", "st", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out, Outcome::Code("the-code".into()));
        let (first, second, other, cb) = client.await.unwrap();
        assert!(first.starts_with("HTTP/1.1 302"), "{first}");
        assert!(first.contains("Location: https://idp/auth?x=1\r\n"));
        assert!(second.starts_with("HTTP/1.1 410"), "{second}");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert!(cb.starts_with("HTTP/1.1 200"), "{cb}");
    }

    #[tokio::test]
    async fn a_wrong_state_ends_the_sign_in() {
        let l = Loopback::bind().await.unwrap();
        let p = port(&l);
        let client = tokio::spawn(async move { get(p, "/callback?code=c&state=forged").await });
        let err = l
            .wait("https://idp/auth", "st", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("state does not match"), "{err}");
        assert!(client.await.unwrap().starts_with("HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn a_denial_with_the_right_state_is_passed_on() {
        let l = Loopback::bind().await.unwrap();
        let p = port(&l);
        let client = tokio::spawn(async move {
            get(
                p,
                "/callback?error=access_denied&error_description=no&state=st",
            )
            .await
        });
        let out = l
            .wait("https://idp/auth", "st", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out, Outcome::Error("access_denied".into()));
        client.await.unwrap();
    }

    #[tokio::test]
    async fn no_redirect_in_time_is_a_clear_error() {
        let l = Loopback::bind().await.unwrap();
        let err = l
            .wait("https://idp/auth", "st", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not completed in time"), "{err}");
    }
}
