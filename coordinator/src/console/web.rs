//! The console's HTTP driver (axum): routes, sign-in, cookies, CSRF and Origin checks, security
//! headers, bounded requests. Pages come from [`super::views`]; data and changes come from the
//! admin requests ([`AdminRequest`]) run by the coordinator exactly as for the CLI.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use rand::RngCore;
use serde::Deserialize;
use tracing::{info, warn};

use super::auth::{self, Auth, SessionInfo, SECRET_LEN};
use super::html::{bare_page, esc, CSS};
use super::views::{self, DeviceRow, PolicyDiff};
use crate::admin::api::{AdminReply, ConsoleLinkView};
use crate::admin::flows::FlowFilter;
use crate::admin::AdminRequest;
use crate::audit::Action;

/// The cookie that carries the session id.
pub const COOKIE: &str = "ward_console";
/// Largest request body accepted (forms are a few fields).
pub const MAX_BODY: usize = 16 * 1024;
/// Devices whose posture the devices page fetches one by one (the rest show a link).
const POSTURE_ROWS: usize = 200;

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the console needs from the running coordinator.
pub struct ConsoleHooks {
    /// Runs one admin request (the admin socket's path: same rules, same audit rows).
    pub admin: Box<dyn Fn(AdminRequest) -> BoxFut<Result<AdminReply, String>> + Send + Sync>,
    /// Appends an audit row (`action`, `target`, `detail`) for sign-in events.
    pub audit: Box<dyn Fn(Action, String, serde_json::Value) -> BoxFut<()> + Send + Sync>,
    /// Milliseconds since the epoch.
    pub now_ms: fn() -> i64,
}

/// The console: its sign-in state and the hooks into the coordinator.
pub struct Console {
    auth: Mutex<Auth>,
    hooks: ConsoleHooks,
    /// Sign-in with the identity provider, when `--oidc-issuer` is set.
    oidc: Option<super::oidc::ConsoleOidc>,
    /// `http://HOST:PORT` as the login URL names it.
    base_url: String,
}

impl Console {
    pub fn new(
        listen: SocketAddr,
        hooks: ConsoleHooks,
        oidc: Option<super::oidc::ConsoleOidc>,
    ) -> Arc<Self> {
        Arc::new(Self {
            auth: Mutex::new(Auth::new()),
            hooks,
            oidc,
            base_url: format!("http://{listen}"),
        })
    }

    /// `console-link`: a fresh one-time login URL (the secret is kept only as its hash).
    pub fn issue_link(&self, now_ms: i64) -> ConsoleLinkView {
        let secret: [u8; SECRET_LEN] = random();
        let expires_ms = self.auth().add_link(&secret, now_ms);
        ConsoleLinkView {
            url: format!("{}/login?secret={}", self.base_url, hex::encode(secret)),
            expires_ms,
        }
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn admin(&self, req: AdminRequest) -> Result<AdminReply, String> {
        (self.hooks.admin)(req).await
    }

    pub(super) fn oidc(&self) -> Option<&super::oidc::ConsoleOidc> {
        self.oidc.as_ref()
    }

    pub(super) fn now(&self) -> i64 {
        (self.hooks.now_ms)()
    }

    /// `http://HOST:PORT`, as the listener is bound.
    pub(super) fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(super) async fn audit(&self, action: Action, target: String, detail: serde_json::Value) {
        (self.hooks.audit)(action, target, detail).await
    }

    pub(super) fn open_session(
        &self,
        method: auth::Method,
        sid: &[u8; SECRET_LEN],
        csrf: &[u8; SECRET_LEN],
        now_ms: i64,
    ) -> SessionInfo {
        self.auth().open_session(method, sid, csrf, now_ms)
    }

    /// The sign-in choices under a refusal: the link command, and the provider's button when
    /// one is configured.
    fn sign_in_page(&self, status: StatusCode, msg: &str) -> Response {
        let button = match &self.oidc {
            Some(o) => format!(
                "<p><a id=\"oidc-login\" class=\"button\" href=\"/oidc/start\">Sign in with {}</a></p>",
                esc(&o.label())
            ),
            None => String::new(),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            bare_page(
                "Sign in",
                &format!("<p id=\"error\">{}</p>{button}", esc(msg)),
            ),
        )
            .into_response()
    }
}

/// Serves the console on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, console: Arc<Console>) {
    if let Err(e) = axum::serve(listener, router(console)).await {
        warn!(error = %e, "web console stopped");
    }
}

/// The routes, with the body limit and the security headers on every response.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(|| async { redirect("/devices") }))
        .route("/static/console.css", get(css))
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/oidc/start", get(super::oidc::start))
        .route(super::oidc::CALLBACK_PATH, get(super::oidc::callback))
        .route("/devices", get(devices))
        .route("/devices/{name}", get(device))
        .route("/graph", get(graph))
        .route("/policy", get(policy))
        .route("/grants", get(grants))
        .route("/quarantine", get(quarantine_page).post(quarantine))
        .route("/release", post(release))
        .route("/audit", get(audit))
        .route("/maturity", get(maturity))
        .fallback(|| async { bare(StatusCode::NOT_FOUND, "Not found", "No such page.") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

type St = State<Arc<Console>>;

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    secret: String,
}

async fn login(
    State(c): St,
    headers: HeaderMap,
    q: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        warn!("console sign-in without a link secret");
        return c.sign_in_page(
            StatusCode::BAD_REQUEST,
            "This address needs the secret from `ward-coordinator console-link`.",
        );
    };
    let now = (c.hooks.now_ms)();
    let (sid, csrf): ([u8; SECRET_LEN], [u8; SECRET_LEN]) = (random(), random());
    let res = c.auth().redeem_link(&q.secret, &sid, &csrf, now);
    let from = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .chars()
        .take(120)
        .collect::<String>();
    match res {
        Ok(s) => {
            info!(session = %s.tag, method = s.method.as_str(), "console sign-in");
            (c.hooks.audit)(
                Action::ConsoleLogin,
                format!("session:{}", s.tag),
                serde_json::json!({ "method": s.method.as_str(), "user_agent": from }),
            )
            .await;
            let cookie = format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                hex::encode(sid),
                auth::SESSION_MAX_MS / 1000
            );
            let mut r = redirect("/devices");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            warn!(error = %e, "console sign-in refused");
            (c.hooks.audit)(
                Action::ConsoleLoginRefused,
                "console".into(),
                serde_json::json!({ "why": e.to_string(), "user_agent": from }),
            )
            .await;
            bare(StatusCode::FORBIDDEN, "Sign-in refused", &e.to_string())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    csrf: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn logout(
    State(c): St,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let s = match post_session(&c, &headers, form) {
        Ok((s, _)) => s,
        Err(r) => return r,
    };
    if let Some(cookie) = cookie(&headers) {
        c.auth().close(&cookie);
    }
    info!(session = %s.tag, "console sign-out");
    let mut r = bare(StatusCode::OK, "Signed out", "Signed out.");
    let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn devices(State(c): St, headers: HeaderMap) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match c.admin(AdminRequest::DeviceLs).await {
        Ok(AdminReply::Devices(v)) => v,
        other => return failed(&s, other),
    };
    let mut rows = Vec::with_capacity(list.len());
    for (i, d) in list.into_iter().enumerate() {
        let posture = if i < POSTURE_ROWS && d.state != crate::model::DeviceState::Revoked {
            match c
                .admin(AdminRequest::DeviceShow {
                    name: d.hostname.to_string(),
                })
                .await
            {
                Ok(AdminReply::DeviceDetail(x)) => Some(x.posture),
                _ => None,
            }
        } else {
            None
        };
        rows.push(DeviceRow { device: d, posture });
    }
    ok(views::devices(&s.csrf, (c.hooks.now_ms)(), &rows))
}

async fn device(State(c): St, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match c.admin(AdminRequest::DeviceShow { name }).await {
        Ok(AdminReply::DeviceDetail(d)) => ok(views::device(&s.csrf, (c.hooks.now_ms)(), &d)),
        other => failed(&s, other),
    }
}

#[derive(Debug, Deserialize)]
struct GraphQuery {
    #[serde(default)]
    since: Option<String>,
}

async fn graph(
    State(c): St,
    headers: HeaderMap,
    q: Result<Query<GraphQuery>, QueryRejection>,
) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let since = match q {
        Ok(Query(q)) => q.since.unwrap_or_else(|| "1d".into()),
        Err(e) => return bad_request(&s, &format!("bad query: {e}")),
    };
    let secs = match crate::admin::parse_duration(&since) {
        Ok(d) if d.as_secs() >= 1 && d.as_secs() <= 90 * 86400 => d.as_secs(),
        _ => {
            return bad_request(
                &s,
                &format!("bad window {since:?}: use a duration from 1s to 90d, like 1h or 7d"),
            )
        }
    };
    let req = AdminRequest::FlowsTop {
        filter: FlowFilter {
            from: None,
            to: None,
            denied: false,
            one_sided: false,
            rule: None,
            shadow: None,
            since_secs: secs,
            limit: 500,
        },
        by: crate::flows::TopBy::Flows,
    };
    match c.admin(req).await {
        Ok(AdminReply::FlowsTop(top)) => ok(views::graph(&s.csrf, &since, &top)),
        other => failed(&s, other),
    }
}

#[derive(Debug, Deserialize)]
struct PolicyQuery {
    #[serde(default)]
    from: Option<i64>,
    #[serde(default)]
    to: Option<i64>,
}

async fn policy(
    State(c): St,
    headers: HeaderMap,
    q: Result<Query<PolicyQuery>, QueryRejection>,
) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return bad_request(&s, &format!("bad query: {e}")),
    };
    let current = match c.admin(AdminRequest::PolicyShow).await {
        Ok(AdminReply::PolicyShow(v)) => v,
        other => return failed(&s, other),
    };
    let history = match c.admin(AdminRequest::PolicyHistory).await {
        Ok(AdminReply::PolicyHistory(v)) => v,
        other => return failed(&s, other),
    };
    let diff = match (q.from, q.to) {
        (Some(from), Some(to)) => {
            let mut texts = Vec::new();
            for version in [from, to] {
                match c.admin(AdminRequest::PolicyVersion { version }).await {
                    Ok(AdminReply::PolicyShow(v)) => texts.push(v.text.unwrap_or_default()),
                    other => return failed(&s, other),
                }
            }
            let new = texts.pop().unwrap_or_default();
            let old = texts.pop().unwrap_or_default();
            Some(PolicyDiff { from, to, old, new })
        }
        (None, None) => None,
        _ => return bad_request(&s, "a diff needs both from= and to="),
    };
    ok(views::policy(&s.csrf, &current, &history, diff.as_ref()))
}

async fn grants(State(c): St, headers: HeaderMap) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match c.admin(AdminRequest::GrantLs).await {
        Ok(AdminReply::Grants(g)) => ok(views::grants(&s.csrf, (c.hooks.now_ms)(), &g)),
        other => failed(&s, other),
    }
}

async fn quarantine_page(State(c): St, headers: HeaderMap) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match c.admin(AdminRequest::DeviceLs).await {
        Ok(AdminReply::Devices(d)) => ok(views::quarantine(&s.csrf, (c.hooks.now_ms)(), &d)),
        other => failed(&s, other),
    }
}

async fn quarantine(
    State(c): St,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let (s, f) = match post_session(&c, &headers, form) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(name) = f.name.filter(|n| !n.is_empty() && n.len() <= 253) else {
        return bad_request(&s, "quarantine needs a device name");
    };
    let reason = f
        .reason
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.chars().take(500).collect::<String>())
        .or_else(|| {
            Some(format!(
                "quarantined from the web console (session {})",
                s.tag
            ))
        });
    info!(session = %s.tag, device = %name, "console: quarantine");
    match c
        .admin(AdminRequest::DeviceQuarantine {
            name: name.clone(),
            reason,
        })
        .await
    {
        Ok(AdminReply::Device(_)) => redirect("/devices"),
        other => failed(&s, other),
    }
}

async fn release(
    State(c): St,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let (s, f) = match post_session(&c, &headers, form) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(name) = f.name.filter(|n| !n.is_empty() && n.len() <= 253) else {
        return bad_request(&s, "release needs a device name");
    };
    info!(session = %s.tag, device = %name, "console: release");
    match c.admin(AdminRequest::DeviceRelease { name }).await {
        Ok(AdminReply::Device(_)) => redirect("/quarantine"),
        other => failed(&s, other),
    }
}

async fn audit(State(c): St, headers: HeaderMap) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let entries = match c.admin(AdminRequest::Audit { limit: 500 }).await {
        Ok(AdminReply::Audit(v)) => v,
        other => return failed(&s, other),
    };
    match c.admin(AdminRequest::AuditVerify).await {
        Ok(AdminReply::AuditVerify(v)) => ok(views::audit(&s.csrf, &entries, &v)),
        other => failed(&s, other),
    }
}

async fn maturity(State(c): St, headers: HeaderMap) -> Response {
    let s = match get_session(&c, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let live = match c.admin(AdminRequest::Maturity { explain: true }).await {
        Ok(AdminReply::Maturity(v)) => v,
        other => return failed(&s, other),
    };
    match c.admin(AdminRequest::MaturityHistory).await {
        Ok(AdminReply::MaturityHistory(h)) => ok(views::maturity(&s.csrf, &live, &h)),
        other => failed(&s, other),
    }
}

/// The session of a GET, or the 401 page.
#[allow(clippy::result_large_err)]
fn get_session(c: &Console, headers: &HeaderMap) -> Result<SessionInfo, Response> {
    let now = (c.hooks.now_ms)();
    c.auth()
        .session(cookie(headers).as_deref(), now)
        .map_err(|e| {
            info!(error = %e, "console request without a valid session");
            c.sign_in_page(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "{e}. Run `ward-coordinator console-link` on the coordinator and open the \
                     address it prints."
                ),
            )
        })
}

/// The session and form of a state-changing POST: the session, a same-origin request
/// (Origin, else Referer, must name this host) and the session's CSRF token (constant-time
/// compare). Anything else is refused with 4xx and a log line.
#[allow(clippy::result_large_err)]
fn post_session(
    c: &Console,
    headers: &HeaderMap,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Result<(SessionInfo, ActionForm), Response> {
    let s = get_session(c, headers)?;
    if let Err(why) = same_origin(headers) {
        warn!(session = %s.tag, why, "console POST refused: not same-origin");
        return Err(status_page(
            &s,
            StatusCode::FORBIDDEN,
            &format!("refused: {why}"),
        ));
    }
    let f = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            warn!(session = %s.tag, error = %e, "console POST refused: bad form");
            return Err(status_page(&s, e.status(), &format!("bad form: {e}")));
        }
    };
    if !auth::check_csrf(&s, &f.csrf) {
        warn!(session = %s.tag, "console POST refused: wrong CSRF token");
        return Err(status_page(
            &s,
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is not this session's (reload the page and retry)",
        ));
    }
    Ok((s, f))
}

/// Whether the request's Origin (or, without one, its Referer) is this console's own
/// scheme://host[:port], as the Host header names it.
fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or("no Host header")?;
    let ok = |o: &str| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
            .is_some_and(|rest| rest == host || rest.starts_with(&format!("{host}/")))
    };
    if let Some(o) = headers.get(header::ORIGIN) {
        let o = o.to_str().map_err(|_| "unreadable Origin header")?;
        return if ok(o) {
            Ok(())
        } else {
            Err("cross-origin request (Origin)")
        };
    }
    if let Some(r) = headers.get(header::REFERER) {
        let r = r.to_str().map_err(|_| "unreadable Referer header")?;
        return if ok(r) {
            Ok(())
        } else {
            Err("cross-origin request (Referer)")
        };
    }
    Err("neither Origin nor Referer names this console")
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    cookie_named(headers, COOKIE)
}

/// The value of the cookie `name`, if the request carries it.
pub(super) fn cookie_named(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Security headers on every response; no caching of pages that show the deployment.
async fn security_headers(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    if r.status().is_client_error() && method != HttpMethod::GET {
        info!(%method, %path, status = r.status().as_u16(), "console request refused");
    }
    r
}

fn ok(html: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

pub(super) fn bare(status: StatusCode, title: &str, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        bare_page(title, &format!("<p id=\"error\">{}</p>", esc(msg))),
    )
        .into_response()
}

fn status_page(s: &SessionInfo, status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        views::error(&s.csrf, msg),
    )
        .into_response()
}

fn bad_request(s: &SessionInfo, msg: &str) -> Response {
    warn!(session = %s.tag, error = msg, "console request refused");
    status_page(s, StatusCode::BAD_REQUEST, msg)
}

/// An admin request that failed (its message, 400) or answered with an unexpected shape (500).
fn failed(s: &SessionInfo, r: Result<AdminReply, String>) -> Response {
    match r {
        Err(msg) => bad_request(s, &msg),
        Ok(_) => {
            warn!(session = %s.tag, "console: unexpected admin reply");
            status_page(s, StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply")
        }
    }
}

pub(super) fn random() -> [u8; SECRET_LEN] {
    let mut b = [0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn origin_must_be_this_console() {
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ]))
        .is_ok());
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("referer", "http://127.0.0.1:8080/devices")
        ]))
        .is_ok());
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example")
        ]))
        .is_err());
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080.evil.example")
        ]))
        .is_err());
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("referer", "http://127.0.0.1:80801/x")
        ]))
        .is_err());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080")])).is_err());
        assert!(same_origin(&h(&[("origin", "http://127.0.0.1:8080")])).is_err());
    }

    #[test]
    fn cookie_is_found_among_others() {
        assert_eq!(
            cookie(&h(&[("cookie", "a=1; ward_console=abc; b=2")])).as_deref(),
            Some("abc")
        );
        assert_eq!(cookie(&h(&[("cookie", "ward_consolex=abc")])), None);
        assert_eq!(cookie(&h(&[])), None);
    }
}
