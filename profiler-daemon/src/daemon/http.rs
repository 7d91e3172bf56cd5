//! The daemon's HTTP API, meant for localhost (no authentication, no TLS).
//!
//! | Path | Answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /profile?pid=PID&seconds=N` | gzipped pprof of the last N seconds |
//! | `GET /profile?service=NAME&seconds=N` | same, every process of a service merged |
//! | `GET /flamegraph.svg?...` | SVG flamegraph (same parameters) |
//! | `GET /folded?...` | folded stacks (same parameters) |
//! | `GET /processes[?all=1]` | JSON array of the profiled processes; `all=1` adds the CPython processes refused for their version or build |
//! | `GET /api/top?seconds=N&line=0\|1[&limit=N][&pid=PID...][&service=NAME]` | JSON snapshot for `pyebpf top` |
//! | `GET /healthz` | `ok`: ingest is alive (the ring buffer was drained in the last 10 s), else 503 and why |
//! | `GET /readyz` | `ready`, or 503 and why not |
//!
//! `seconds` defaults to 10 and must be within 1 ..= the retention. Exactly
//! one of `pid` and `service` must be given; unknown or repeated parameters
//! are refused. `/api/top` differs: `seconds` may also be `all` (everything
//! held), `pid` may be repeated (up to [`MAX_TOP_PIDS`]) and combined with
//! `service` (a process must match both), neither is required (then every
//! process), `line` (default 0) chooses line-level rows, and `limit`
//! (default [`DEFAULT_TOP_LIMIT`]) bounds the rows: that many hottest by own
//! samples plus that many by total samples, and that many processes;
//! `functions_total` and `processes_total` say how many there were. Every error is a one-line `text/plain` body: 400 for bad
//! parameters, 404 for an unknown process or path, 405 for methods other than
//! GET and HEAD, 414 for a query string over [`MAX_QUERY_LEN`] bytes, 503 when
//! the daemon is not ready.
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::Semaphore;

use super::access::Token;
use crate::model::api::ApiSource;
use crate::model::query::{QueryError, Selector, STATUS_UNSUPPORTED};
use crate::model::top::TopQuery;
use crate::profile::{folded, pprof, svg, Profile, ProfileKind};

/// Longest query string accepted, in bytes (longer: 414).
pub const MAX_QUERY_LEN: usize = 2048;
/// `/api/top`'s `limit` when the query does not say: rows by own and by
/// total samples (and processes) each, a bound on the answer's size.
pub const DEFAULT_TOP_LIMIT: u32 = 1000;
/// The largest `limit` accepted.
pub const MAX_TOP_LIMIT: u32 = 100_000;

/// `seconds` when the query does not say.
pub const DEFAULT_SECONDS: u32 = 10;
/// Most `pid` parameters one `/api/top` request may give.
pub const MAX_TOP_PIDS: usize = 64;
/// Profiles built at once; further requests wait their turn.
const MAX_CONCURRENT_PROFILES: usize = 4;

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AppState {
    source: Arc<dyn ApiSource>,
    /// Bounds the blocking threads busy building profiles.
    profile_slots: Arc<Semaphore>,
    access: Access,
}

/// What one listener serves, and to whom.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// A bearer token every request but `/healthz` and `/readyz` must
    /// present.
    pub token: Option<Token>,
    /// Only `/metrics`, `/healthz` and `/readyz` (`metrics_listen`).
    pub metrics_only: bool,
}

/// Paths answered without a token: probes must not need secrets.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Serves the API on `listener` until `shutdown` completes, then stops
/// accepting and waits for the requests in flight (graceful shutdown).
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn ApiSource>,
    access: Access,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            token = access.token.is_some(),
            metrics_only = access.metrics_only,
            "HTTP API listening"
        );
    }
    super::http_conn::serve(
        listener,
        router(source, access),
        super::http_conn::Limits::default(),
        shutdown,
    )
    .await
}

/// The API's routes over `source` (what [`serve`] serves).
pub fn router(source: Arc<dyn ApiSource>, access: Access) -> Router {
    let metrics_only = access.metrics_only;
    let state = AppState {
        source,
        profile_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_PROFILES)),
        access,
    };
    let mut r = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if !metrics_only {
        r = r
            .route("/profile", get(profile_pprof))
            .route("/flamegraph.svg", get(profile_svg))
            .route("/folded", get(profile_folded))
            .route("/processes", get(processes))
            .route("/api/top", get(top));
    }
    let r = if metrics_only {
        r.fallback(metrics_only_not_found)
    } else {
        r.fallback(not_found)
    };
    r.method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// A one-line plain-text response.
fn text(status: StatusCode, msg: &str) -> Response {
    let mut body = one_line(msg);
    body.push('\n');
    (status, [(header::CONTENT_TYPE, TEXT_PLAIN)], body).into_response()
}

/// `s` with control characters (newlines included) escaped, so that an error
/// message stays on one line whatever it quotes.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a request's `Host` header names this API: an IP address or
/// `localhost` (with or without a port), or a name `named` allows. A web
/// page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding)
/// sends its own domain, and is refused. No `Host` at all (HTTP/1.0 tools)
/// is allowed: browsers always send one.
pub fn host_allowed(host: Option<&[u8]>, named: impl Fn(&str) -> bool) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty() || valid_port(port.strip_prefix(':')))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if valid_port(Some(port)) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || (!name.is_empty() && named(name))
}

fn valid_port(port: Option<&str>) -> bool {
    port.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses requests for other host names (see [`host_allowed`]) and
/// over-long query strings, and logs every request.
async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let query_len = uri.query().map_or(0, str::len);
    let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|h| h.as_bytes());
    let resp = if !host_allowed(host, |name| st.source.host_allowed(name)) {
        text(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown host name: the API answers to IP addresses, localhost and api.allowed_hosts",
        )
    } else if st
        .access
        .token
        .as_ref()
        .is_some_and(|t| !OPEN_PATHS.contains(&uri.path()) && !t.admits(authorization))
    {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "this API needs a bearer token (Authorization: Bearer TOKEN, from api.token_file)",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    } else if query_len > MAX_QUERY_LEN {
        text(
            StatusCode::URI_TOO_LONG,
            &format!("query string too long: {query_len} bytes (at most {MAX_QUERY_LEN})"),
        )
    } else {
        next.run(req).await
    };
    tracing::debug!(
        %method,
        path = uri.path(),
        query_len,
        status = resp.status().as_u16(),
        elapsed_ms = start.elapsed().as_secs_f64() * 1e3,
        "HTTP request"
    );
    resp
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found: try /profile, /flamegraph.svg, /folded, /processes, /api/top, /metrics, /healthz, /readyz",
    )
}

async fn metrics_only_not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found: this listener (metrics_listen) serves /metrics, /healthz and /readyz only",
    )
}

async fn method_not_allowed() -> Response {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: only GET and HEAD",
    )
}

async fn healthz(State(st): State<AppState>) -> Response {
    match st.source.live() {
        Ok(()) => text(StatusCode::OK, "ok"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("unhealthy: {why}"),
        ),
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    match st.source.ready() {
        Ok(()) => text(StatusCode::OK, "ready"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {why}"),
        ),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let body = st.source.metrics_text();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// Validates the parameters of `/processes`: `all=0|1` (default 0).
fn parse_processes_query(pairs: &[(String, String)]) -> Result<bool, String> {
    let mut all = None;
    for (k, v) in pairs {
        if k != "all" {
            return Err(format!("unknown parameter {}: expected all", quoted(k)));
        }
        if all.is_some() {
            return Err("parameter all given more than once".to_string());
        }
        all = Some(match v.as_str() {
            "0" => false,
            "1" => true,
            _ => return Err(format!("bad all {}: expected 0 or 1", quoted(v))),
        });
    }
    Ok(all.unwrap_or(false))
}

/// `GET /processes`: the profiled (and exited) processes; with `all=1`, also
/// the CPython processes refused for their version or build, with the
/// reason.
async fn processes(
    State(st): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let pairs = match query {
        Ok(Query(pairs)) => pairs,
        Err(_) => return text(StatusCode::BAD_REQUEST, "malformed query string"),
    };
    let all = match parse_processes_query(&pairs) {
        Ok(all) => all,
        Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
    };
    let mut list = st.source.processes();
    if !all {
        list.retain(|p| p.status != STATUS_UNSUPPORTED);
    }
    Json(list).into_response()
}

/// What a profile query asks for.
#[derive(Debug, PartialEq, Eq)]
struct ProfileQuery {
    selector: Selector,
    seconds: u32,
    /// `type=`: cpu (the default), wall or off-cpu.
    kind: ProfileKind,
}

/// `v` for an error message: quoted, escaped, cut to 64 characters.
fn quoted(v: &str) -> String {
    const MAX: usize = 64;
    if v.chars().count() > MAX {
        let cut: String = v.chars().take(MAX).collect();
        format!("{cut:?}...")
    } else {
        format!("{v:?}")
    }
}

/// A decimal number of ASCII digits only (no sign, no spaces).
fn parse_number(v: &str) -> Option<u32> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Validates the parameters of `/profile`, `/flamegraph.svg` and `/folded`.
fn parse_profile_query(pairs: &[(String, String)], retention: u32) -> Result<ProfileQuery, String> {
    let mut pid = None;
    let mut service = None;
    let mut seconds = None;
    let mut kind = None;
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "pid" => &mut pid,
            "service" => &mut service,
            "seconds" => &mut seconds,
            "type" => &mut kind,
            _ => {
                return Err(format!(
                    "unknown parameter {}: expected pid or service, seconds and type",
                    quoted(k)
                ))
            }
        };
        if slot.is_some() {
            return Err(format!("parameter {k} given more than once"));
        }
        *slot = Some(v.as_str());
    }
    let seconds = match seconds {
        None => DEFAULT_SECONDS.min(retention.max(1)),
        Some(v) => match parse_number(v) {
            Some(n) if (1..=retention).contains(&n) => n,
            _ => {
                return Err(format!(
                    "bad seconds {}: expected a whole number from 1 to {retention}",
                    quoted(v)
                ))
            }
        },
    };
    let selector = match (pid, service) {
        (Some(_), Some(_)) => return Err("give either pid or service, not both".to_string()),
        (None, None) => return Err("missing parameter: pid or service".to_string()),
        (Some(v), None) => match parse_number(v) {
            Some(n) if n > 0 => Selector::Pid(n),
            _ => {
                return Err(format!(
                    "bad pid {}: expected a process id (a positive whole number)",
                    quoted(v)
                ))
            }
        },
        (None, Some(v)) => {
            if v.is_empty() {
                return Err("bad service \"\": expected a service name".to_string());
            }
            Selector::Service(v.to_string())
        }
    };
    let kind = match kind {
        None => ProfileKind::Cpu,
        Some(v) => ProfileKind::ALL
            .into_iter()
            .find(|k| k.name() == v)
            .ok_or_else(|| format!("bad type {}: expected cpu, wall or off-cpu", quoted(v)))?,
    };
    Ok(ProfileQuery {
        selector,
        seconds,
        kind,
    })
}

/// Validates the parameters of `/api/top`.
fn parse_top_query(pairs: &[(String, String)], retention: u32) -> Result<TopQuery, String> {
    let mut q = TopQuery {
        seconds: Some(DEFAULT_SECONDS.min(retention.max(1))),
        limit: Some(DEFAULT_TOP_LIMIT),
        ..TopQuery::default()
    };
    let (mut seen_seconds, mut seen_line, mut seen_limit) = (false, false, false);
    for (k, v) in pairs {
        let once = |seen: &mut bool| {
            if std::mem::replace(seen, true) {
                Err(format!("parameter {k} given more than once"))
            } else {
                Ok(())
            }
        };
        match k.as_str() {
            "seconds" => {
                once(&mut seen_seconds)?;
                q.seconds = match (v.as_str(), parse_number(v)) {
                    ("all", _) => None,
                    (_, Some(n)) if (1..=retention).contains(&n) => Some(n),
                    _ => {
                        return Err(format!(
                            "bad seconds {}: expected a whole number from 1 to {retention}, or all",
                            quoted(v)
                        ))
                    }
                };
            }
            "type" => {
                q.kind = ProfileKind::ALL
                    .into_iter()
                    .find(|k| k.name() == v)
                    .ok_or_else(|| {
                        format!("bad type {}: expected cpu, wall or off-cpu", quoted(v))
                    })?;
            }
            "line" => {
                once(&mut seen_line)?;
                q.line_level = match v.as_str() {
                    "0" => false,
                    "1" => true,
                    _ => return Err(format!("bad line {}: expected 0 or 1", quoted(v))),
                };
            }
            "pid" => match parse_number(v) {
                Some(n) if n > 0 => {
                    if q.pids.len() == MAX_TOP_PIDS {
                        return Err(format!("too many pid parameters: at most {MAX_TOP_PIDS}"));
                    }
                    if !q.pids.contains(&n) {
                        q.pids.push(n);
                    }
                }
                _ => {
                    return Err(format!(
                        "bad pid {}: expected a process id (a positive whole number)",
                        quoted(v)
                    ))
                }
            },
            "limit" => {
                once(&mut seen_limit)?;
                q.limit = match parse_number(v) {
                    Some(n) if (1..=MAX_TOP_LIMIT).contains(&n) => Some(n),
                    _ => {
                        return Err(format!(
                            "bad limit {}: expected a whole number from 1 to {MAX_TOP_LIMIT}",
                            quoted(v)
                        ))
                    }
                };
            }
            "service" => {
                if q.service.is_some() {
                    return Err("parameter service given more than once".to_string());
                }
                if v.is_empty() {
                    return Err("bad service \"\": expected a service name".to_string());
                }
                q.service = Some(v.clone());
            }
            _ => {
                return Err(format!(
                    "unknown parameter {}: expected seconds, line, limit, pid or service",
                    quoted(k)
                ))
            }
        }
    }
    Ok(q)
}

/// What `/processes`, `/profile` and `/api/top` make of a query.
#[doc(hidden)]
pub type Parsed = (
    Result<bool, String>,
    Result<(Selector, u32), String>,
    Result<TopQuery, String>,
);

/// The three parsers above on the same pairs (for `crate::fuzz_harness`).
#[doc(hidden)]
pub fn parse_queries(pairs: &[(String, String)], retention: u32) -> Parsed {
    let profile = parse_profile_query(pairs, retention).map(|q| (q.selector, q.seconds));
    let top = parse_top_query(pairs, retention);
    (parse_processes_query(pairs), profile, top)
}

/// `GET /api/top`: the JSON [`crate::model::top::TopSnapshot`] `pyebpf top`
/// shows.
async fn top(
    State(st): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let pairs = match query {
        Ok(Query(pairs)) => pairs,
        Err(_) => return text(StatusCode::BAD_REQUEST, "malformed query string"),
    };
    let q = match parse_top_query(&pairs, st.source.retention_secs()) {
        Ok(q) => q,
        Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
    };
    let Ok(_permit) = st.profile_slots.clone().acquire_owned().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let source = st.source.clone();
    match tokio::task::spawn_blocking(move || source.top_with_python(&q)).await {
        Ok(Ok(snapshot)) => {
            let mut resp = Json(snapshot).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Ok(Err(e)) => query_error(e),
        Err(e) => {
            tracing::error!(error = %e, "top request failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error building the top snapshot",
            )
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Pprof,
    Svg,
    Folded,
}

/// What a selector reads as in titles: `pid 42` or `service web`.
fn describe(sel: &Selector) -> String {
    match sel {
        Selector::Pid(pid) => format!("pid {pid}"),
        Selector::Service(s) => format!("service {s}"),
    }
}

/// The download name of a pprof: `pyebpf-<pid|service>-<N>s.pb.gz`, the
/// service reduced to `[A-Za-z0-9._-]` so the header stays plain ASCII.
fn pprof_filename(sel: &Selector, seconds: u32) -> String {
    let who = match sel {
        Selector::Pid(pid) => pid.to_string(),
        Selector::Service(s) => {
            let clean: String = s
                .chars()
                .take(64)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            if clean.is_empty() {
                "service".to_string()
            } else {
                clean
            }
        }
    };
    format!("pyebpf-{who}-{seconds}s.pb.gz")
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// A small SVG saying there is nothing to draw (inferno refuses empty graphs).
fn empty_svg(title: &str) -> Vec<u8> {
    let title = xml_escape(title);
    format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n",
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"600\" height=\"80\" viewBox=\"0 0 600 80\">\n",
            "<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eeeeee\"/>\n",
            "<text x=\"300\" y=\"30\" text-anchor=\"middle\" font-family=\"Verdana, sans-serif\" font-size=\"16\">{}</text>\n",
            "<text x=\"300\" y=\"58\" text-anchor=\"middle\" font-family=\"Verdana, sans-serif\" font-size=\"14\">no samples</text>\n",
            "</svg>\n"
        ),
        title
    )
    .into_bytes()
}

/// `p` in the format of `kind` (CPU work: run off the async threads).
fn encode(kind: Kind, p: &Profile, q: &ProfileQuery) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match kind {
        Kind::Pprof => pprof::write(p, &mut out)?,
        Kind::Folded => folded::write(p, &mut out)?,
        Kind::Svg => {
            let title = format!(
                "pyebpf: {}, last {} s, {}",
                describe(&q.selector),
                q.seconds,
                p.kind.describe()
            );
            if p.total_samples() == 0 {
                out = empty_svg(&title);
            } else {
                svg::write(p, &title, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn query_error(e: QueryError) -> Response {
    let status = match e {
        QueryError::BadRequest(_) => StatusCode::BAD_REQUEST,
        QueryError::NotFound(_) => StatusCode::NOT_FOUND,
        QueryError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        QueryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
    };
    text(status, &e.to_string())
}

async fn profile_response(
    st: AppState,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    kind: Kind,
) -> Response {
    let pairs = match query {
        Ok(Query(pairs)) => pairs,
        Err(_) => return text(StatusCode::BAD_REQUEST, "malformed query string"),
    };
    let q = match parse_profile_query(&pairs, st.source.retention_secs()) {
        Ok(q) => q,
        Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
    };
    let Ok(_permit) = st.profile_slots.clone().acquire_owned().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let source = st.source.clone();
    let job = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = source
            .profile_of(&q.selector, q.seconds, q.kind)
            .map(|p| (encode(kind, &p, &q), p.total_samples()));
        (q, result, started.elapsed())
    });
    let (q, result, took) = match job.await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "profile request failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error building the profile",
            );
        }
    };
    let (bytes, samples) = match result {
        Err(e) => return query_error(e),
        Ok((Err(e), _)) => {
            tracing::error!(error = %format!("{e:#}"), ?kind, "encoding profile failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error encoding the profile",
            );
        }
        Ok((Ok(bytes), samples)) => (bytes, samples),
    };
    tracing::debug!(
        selector = ?q.selector,
        seconds = q.seconds,
        ?kind,
        samples,
        bytes = bytes.len(),
        build_ms = took.as_secs_f64() * 1e3,
        "profile built"
    );
    let mut resp = Response::new(Body::from(bytes));
    let headers = resp.headers_mut();
    let content_type = match kind {
        Kind::Pprof => "application/octet-stream",
        Kind::Svg => "image/svg+xml",
        Kind::Folded => TEXT_PLAIN,
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Kind::Pprof = kind {
        let disposition = format!(
            "attachment; filename=\"{}\"",
            pprof_filename(&q.selector, q.seconds)
        );
        if let Ok(v) = HeaderValue::from_str(&disposition) {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    resp
}

async fn profile_pprof(
    State(st): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    profile_response(st, q, Kind::Pprof).await
}

async fn profile_svg(
    State(st): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    profile_response(st, q, Kind::Svg).await
}

async fn profile_folded(
    State(st): State<AppState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    profile_response(st, q, Kind::Folded).await
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::sync::Mutex;
    use std::time::Duration;

    use prost::Message as _;

    use super::*;

    #[tokio::test]
    async fn a_token_guards_everything_but_the_probes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-s3cret-s3cret\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = crate::daemon::access::load_token(&path).unwrap();
        let s = start_with(Access {
            token: Some(token),
            metrics_only: false,
        })
        .await;
        let get = |path: &'static str, auth: Option<&'static str>| {
            let mut r = s.client.get(format!("{}{path}", s.base));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            async move { r.send().await.unwrap() }
        };
        for path in [
            "/processes",
            "/metrics",
            "/folded?pid=42",
            "/api/top",
            "/nope",
        ] {
            let r = get(path, None).await;
            assert_eq!(r.status().as_u16(), 401, "{path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let r = get(path, Some("Bearer wrong-wrong-wrong")).await;
            assert_eq!(r.status().as_u16(), 401, "{path}");
        }
        for path in ["/processes", "/metrics", "/folded?pid=42", "/api/top"] {
            let r = get(path, Some("Bearer s3cret-s3cret-s3cret")).await;
            assert_eq!(r.status().as_u16(), 200, "{path}");
        }
        for path in ["/healthz", "/readyz"] {
            assert_eq!(get(path, None).await.status().as_u16(), 200, "{path}");
        }
    }

    #[tokio::test]
    async fn the_metrics_listener_serves_metrics_and_probes_only() {
        let s = start_with(Access {
            token: None,
            metrics_only: true,
        })
        .await;
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(s.get_text(path).await.0, 200, "{path}");
        }
        for path in [
            "/processes",
            "/folded?pid=42",
            "/profile?pid=42",
            "/api/top",
        ] {
            let (status, _, body) = s.get_text(path).await;
            assert_eq!(status, 404, "{path}");
            assert!(body.contains("metrics_listen"), "{body}");
        }
        assert!(s.fake.asked.lock().unwrap().is_empty(), "no profile built");
    }

    #[test]
    fn only_ip_addresses_localhost_and_allowed_names_are_hosts() {
        let named = |n: &str| n == "pyebpf.monitoring.svc";
        let ok = |h: &str| host_allowed(Some(h.as_bytes()), named);
        for h in [
            "127.0.0.1:7464",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:7464",
            "[::1]",
            "localhost:7464",
            "LocalHost",
            "pyebpf.monitoring.svc:7464",
        ] {
            assert!(ok(h), "{h}");
        }
        for h in [
            "evil.example:7464",
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil.example:7464",
            "127.0.0.1:port",
            "127.0.0.1:",
            "[::1",
            "[::1]x",
            "[evil]:80",
            ":7464",
            "",
        ] {
            assert!(!ok(h), "{h}");
        }
        assert!(!host_allowed(Some(b"\xff:80"), named));
        assert!(host_allowed(None, named), "no Host header (HTTP/1.0)");
    }

    use crate::model::labels::ProcessLabels;
    use crate::model::query::ProcessView;
    use crate::model::top::TopSnapshot;
    use crate::profile::Frame;

    const RETENTION: u32 = 300;

    fn py(name: &str, file: &str, line: u32) -> Frame {
        Frame::Python {
            qualname: name.into(),
            filename: file.into(),
            line,
            first_line: 1,
        }
    }

    /// 10 samples in three stacks.
    fn hand_profile() -> Profile {
        let mut p = Profile::new(100);
        p.duration = Duration::from_secs(10);
        let main = py("<module>", "/srv/app.py", 3);
        p.add(vec![main.clone(), py("handle", "/srv/app.py", 10)], 6);
        p.add(
            vec![
                main.clone(),
                py("handle", "/srv/app.py", 11),
                py("json.dumps", "/usr/lib/python3.11/json/__init__.py", 231),
            ],
            3,
        );
        p.add(vec![main], 1);
        p
    }

    struct Fake {
        ready: Mutex<Result<(), String>>,
        live: Mutex<Result<(), String>>,
        /// Every (selector, seconds) asked of `profile`.
        asked: Mutex<Vec<(Selector, u32)>>,
    }

    impl ApiSource for Fake {
        fn processes(&self) -> Vec<ProcessView> {
            vec![
                ProcessView {
                    labels: ProcessLabels {
                        pid: 42,
                        command: "python3".into(),
                        service: "web".into(),
                        exe: "/usr/bin/python3.11".into(),
                        cmdline: "python3 app.py".into(),
                        container_id: Some("abc".into()),
                        ..Default::default()
                    },
                    python_version: "3.11.7".into(),
                    python: "3.11".into(),
                    status: "profiled",
                    since: 1_700_000_000,
                    samples: 10,
                    memory_bytes: 0,
                    evicted_samples: 0,
                    reason: None,
                    replaced_by: None,
                    types: Vec::new(),
                    gil_wait_seconds: None,
                    wall_seconds: None,
                },
                ProcessView {
                    labels: ProcessLabels {
                        pid: 43,
                        command: "python3.16".into(),
                        service: "web".into(),
                        ..Default::default()
                    },
                    python_version: "3.16.0".into(),
                    python: "3.16".into(),
                    status: STATUS_UNSUPPORTED,
                    since: 1_700_000_100,
                    samples: 0,
                    memory_bytes: 0,
                    evicted_samples: 0,
                    reason: Some(
                        "process 43 runs Python 3.16.0; pyebpf supports CPython 3.11 to 3.15"
                            .into(),
                    ),
                    replaced_by: None,
                    types: Vec::new(),
                    gil_wait_seconds: None,
                    wall_seconds: None,
                },
            ]
        }

        fn profile(&self, selector: &Selector, seconds: u32) -> Result<Profile, QueryError> {
            self.asked.lock().unwrap().push((selector.clone(), seconds));
            match selector {
                Selector::Pid(42) => Ok(hand_profile()),
                Selector::Pid(7) => Ok(Profile::new(100)),
                Selector::Service(s) if s == "web" || s == "we b\"/ü" => Ok(hand_profile()),
                Selector::Service(s) if s == "starting" => {
                    Err(QueryError::NotReady("first discovery not done".into()))
                }
                Selector::Service(s) if s == "huge" => Err(QueryError::TooLarge(
                    "this profile would take more than 65 MiB to build".into(),
                )),
                Selector::Pid(pid) => Err(QueryError::NotFound(format!(
                    "no profiled process with pid {pid}"
                ))),
                Selector::Service(s) => Err(QueryError::NotFound(format!(
                    "no profiled process of service {s:?}"
                ))),
            }
        }

        fn metrics_text(&self) -> String {
            "# HELP pyebpf_test A test.\n# TYPE pyebpf_test gauge\npyebpf_test 1\n".into()
        }

        fn ready(&self) -> Result<(), String> {
            self.ready.lock().unwrap().clone()
        }

        fn live(&self) -> Result<(), String> {
            self.live.lock().unwrap().clone()
        }

        fn retention_secs(&self) -> u32 {
            RETENTION
        }
    }

    struct Server {
        base: String,
        fake: Arc<Fake>,
        client: reqwest::Client,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start() -> Server {
        start_with(Access::default()).await
    }

    async fn start_with(access: Access) -> Server {
        let fake = Arc::new(Fake {
            ready: Mutex::new(Ok(())),
            live: Mutex::new(Ok(())),
            asked: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, fake.clone(), access, async {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Server {
            base,
            fake,
            client,
            stop: Some(tx),
            task,
        }
    }

    impl Server {
        async fn get(&self, path: &str) -> reqwest::Response {
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap()
        }

        /// Status, content type and body text of a GET.
        async fn get_text(&self, path: &str) -> (u16, String, String) {
            let r = self.get(path).await;
            let status = r.status().as_u16();
            let ct = content_type(&r);
            (status, ct, r.text().await.unwrap())
        }

        fn last_asked(&self) -> Option<(Selector, u32)> {
            self.fake.asked.lock().unwrap().last().cloned()
        }

        async fn shutdown(mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            let done = tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve did not stop after shutdown");
            done.unwrap().unwrap();
        }
    }

    fn content_type(r: &reqwest::Response) -> String {
        r.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    fn gunzip_pprof(bytes: &[u8]) -> pprof::proto::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .unwrap();
        pprof::proto::Profile::decode(&raw[..]).unwrap()
    }

    #[tokio::test]
    async fn health_ready_metrics_processes() {
        let s = start().await;
        assert_eq!(
            s.get_text("/healthz").await,
            (200, TEXT_PLAIN.into(), "ok\n".into())
        );
        assert_eq!(
            s.get_text("/readyz").await,
            (200, TEXT_PLAIN.into(), "ready\n".into())
        );
        *s.fake.ready.lock().unwrap() = Err("sampler\nnot loaded".into());
        assert_eq!(
            s.get_text("/readyz").await,
            (
                503,
                TEXT_PLAIN.into(),
                "not ready: sampler\\nnot loaded\n".into()
            )
        );
        // Liveness does not depend on readiness...
        assert_eq!(s.get_text("/healthz").await.0, 200);
        // ...but on ingest.
        *s.fake.live.lock().unwrap() = Err("ingest stalled: drained 12.0 s ago".into());
        assert_eq!(
            s.get_text("/healthz").await,
            (
                503,
                TEXT_PLAIN.into(),
                "unhealthy: ingest stalled: drained 12.0 s ago\n".into()
            )
        );
        *s.fake.live.lock().unwrap() = Ok(());

        let (status, ct, body) = s.get_text("/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(body, s.fake.metrics_text());

        let (status, ct, body) = s.get_text("/processes").await;
        assert_eq!(status, 200);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 1, "unsupported ones only with all=1: {v}");
        assert_eq!(arr[0]["labels"]["pid"], 42);
        assert_eq!(arr[0]["labels"]["service"], "web");
        assert_eq!(arr[0]["labels"]["container_id"], "abc");
        assert_eq!(arr[0]["python_version"], "3.11.7");
        assert_eq!(arr[0]["python"], "3.11");
        assert_eq!(arr[0]["status"], "profiled");
        assert_eq!(arr[0]["samples"], 10);
        let mut keys: Vec<&str> = arr[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "evicted_samples",
                "labels",
                "memory_bytes",
                "python",
                "python_version",
                "samples",
                "since",
                "status"
            ],
            "no reason for a profiled process"
        );
        assert_eq!(s.get_text("/processes?all=0").await.2, body);

        // all=1: the refused CPython processes too, with why.
        let (status, ct, body) = s.get_text("/processes?all=1").await;
        assert_eq!((status, ct.as_str()), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2, "{v}");
        assert_eq!(arr[0]["labels"]["pid"], 42);
        let u = &arr[1];
        assert_eq!(u["labels"]["pid"], 43);
        assert_eq!(u["status"], "unsupported");
        assert_eq!(u["python"], "3.16");
        assert_eq!(u["python_version"], "3.16.0");
        assert_eq!(u["samples"], 0);
        assert_eq!(
            u["reason"],
            "process 43 runs Python 3.16.0; pyebpf supports CPython 3.11 to 3.15"
        );
        for (path, want) in [
            ("/processes?all=2", "bad all \"2\": expected 0 or 1"),
            ("/processes?all=", "bad all"),
            ("/processes?all=1&all=1", "all given more than once"),
            ("/processes?pid=1", "unknown parameter \"pid\""),
        ] {
            let (status, ct, body) = s.get_text(path).await;
            assert_eq!((status, ct.as_str()), (400, TEXT_PLAIN), "{path}: {body}");
            assert!(body.contains(want), "{path}: {body:?}");
            assert_eq!(body.lines().count(), 1, "{path}: {body:?}");
        }
        s.shutdown().await;
    }

    #[tokio::test]
    async fn pprof_by_pid_and_service() {
        let s = start().await;
        let r = s.get("/profile?pid=42").await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(content_type(&r), "application/octet-stream");
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"pyebpf-42-10s.pb.gz\""
        );
        let m = gunzip_pprof(&r.bytes().await.unwrap());
        // Default seconds.
        assert_eq!(s.last_asked(), Some((Selector::Pid(42), 10)));
        assert_eq!(m.sample.len(), 3);
        let total: i64 = m.sample.iter().map(|x| x.value[0]).sum();
        assert_eq!(total, 10);
        let mut counts: Vec<i64> = m.sample.iter().map(|x| x.value[0]).collect();
        counts.sort();
        assert_eq!(counts, vec![1, 3, 6]);
        let deepest = m.sample.iter().find(|x| x.value[0] == 3).unwrap();
        assert_eq!(deepest.location_id.len(), 3);
        let names: Vec<&str> = m
            .function
            .iter()
            .map(|f| m.string_table[f.name as usize].as_str())
            .collect();
        assert!(names.contains(&"json.dumps"), "{names:?}");

        let r = s.get("/profile?service=web&seconds=60").await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"pyebpf-web-60s.pb.gz\""
        );
        assert_eq!(s.last_asked(), Some((Selector::Service("web".into()), 60)));
        let m = gunzip_pprof(&r.bytes().await.unwrap());
        assert_eq!(m.sample.iter().map(|x| x.value[0]).sum::<i64>(), 10);

        // A service name that cannot go in a header as is.
        let r = s
            .get("/profile?service=we%20b%22%2F%C3%BC&seconds=300")
            .await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"pyebpf-we_b___-300s.pb.gz\""
        );
        assert_eq!(
            s.last_asked(),
            Some((Selector::Service("we b\"/ü".into()), 300))
        );

        // HEAD answers like GET without a body.
        let r = s
            .client
            .head(format!("{}/profile?pid=42", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(content_type(&r), "application/octet-stream");
        assert!(r.bytes().await.unwrap().is_empty());
        s.shutdown().await;
    }

    #[tokio::test]
    async fn flamegraph_and_folded() {
        let s = start().await;
        let (status, ct, body) = s.get_text("/flamegraph.svg?pid=42&seconds=5").await;
        assert_eq!(status, 200);
        assert_eq!(ct, "image/svg+xml");
        assert!(body.starts_with("<?xml"));
        assert!(body.trim_end().ends_with("</svg>"));
        assert!(body.contains("pyebpf: pid 42, last 5 s"));
        assert!(body.contains("json.dumps"));

        // Empty profile: a valid SVG that says so, not an error.
        let (status, ct, body) = s.get_text("/flamegraph.svg?pid=7").await;
        assert_eq!(status, 200);
        assert_eq!(ct, "image/svg+xml");
        assert!(body.starts_with("<?xml"));
        assert!(body.contains("<svg"));
        assert!(body.trim_end().ends_with("</svg>"));
        assert!(body.contains("no samples"));
        assert!(body.contains("pyebpf: pid 7, last 10 s"));

        let (status, ct, body) = s.get_text("/folded?service=web&seconds=1").await;
        assert_eq!(status, 200);
        assert_eq!(ct, TEXT_PLAIN);
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(
            lines,
            vec![
                "<module> (/srv/app.py:3) 1",
                "<module> (/srv/app.py:3);handle (/srv/app.py:10) 6",
                "<module> (/srv/app.py:3);handle (/srv/app.py:11);json.dumps (/usr/lib/python3.11/json/__init__.py:231) 3",
            ]
        );
        assert_eq!(s.last_asked(), Some((Selector::Service("web".into()), 1)));

        let (status, _, body) = s.get_text("/folded?pid=7").await;
        assert_eq!((status, body.as_str()), (200, ""));
        s.shutdown().await;
    }

    #[tokio::test]
    async fn error_paths() {
        let s = start().await;
        let asked_before = s.fake.asked.lock().unwrap().len();
        for (path, want) in [
            ("/profile?pid=abc", "bad pid \"abc\""),
            ("/profile?pid=-1", "bad pid"),
            ("/profile?pid=+1", "bad pid"),
            ("/profile?pid=0", "bad pid"),
            ("/profile?pid=99999999999", "bad pid"),
            ("/profile?pid=", "bad pid"),
            ("/profile?pid=1&service=x", "either pid or service"),
            ("/profile?pid=1&pid=2", "pid given more than once"),
            ("/profile?pid=1&seconds=0", "bad seconds \"0\""),
            ("/profile?pid=1&seconds=99999", "from 1 to 300"),
            ("/profile?pid=1&seconds=301", "from 1 to 300"),
            ("/profile?pid=1&seconds=1.5", "bad seconds"),
            (
                "/profile?pid=1&seconds=10&seconds=20",
                "seconds given more than once",
            ),
            ("/profile?seconds=0", "bad seconds"),
            ("/profile", "missing parameter: pid or service"),
            ("/profile?", "missing parameter"),
            ("/profile?seconds=5", "missing parameter"),
            ("/profile?service=", "bad service"),
            ("/profile?pid=1&debug=1", "unknown parameter \"debug\""),
            ("/profile?pid=%0a%22x", "bad pid \"\\n\\\"x\""),
            ("/flamegraph.svg?pid=abc", "bad pid"),
            ("/folded?pid=1&service=x", "either pid or service"),
            ("/folded?pid&service", "either pid or service"),
            ("/folded?%ff%fe=1", "unknown parameter"),
        ] {
            let (status, ct, body) = s.get_text(path).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert_eq!(ct, TEXT_PLAIN, "{path}");
            assert!(body.contains(want), "{path}: {body:?}");
            assert!(
                body.ends_with('\n') && body.lines().count() == 1,
                "{path}: {body:?}"
            );
        }
        // None of them reached the source.
        assert_eq!(s.fake.asked.lock().unwrap().len(), asked_before);

        // Unknown process / service.
        for path in [
            "/profile?pid=1",
            "/flamegraph.svg?service=nope",
            "/folded?pid=5",
        ] {
            let (status, ct, body) = s.get_text(path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert_eq!(ct, TEXT_PLAIN);
            assert!(body.starts_with("no profiled process"), "{body}");
        }
        // Not ready.
        let (status, _, body) = s.get_text("/profile?service=starting").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: first discovery not done\n");
        // DNS rebinding: a page's own domain pointed at this host.
        let r = s
            .client
            .get(format!("{}/processes", s.base))
            .header("Host", "evil.example:7464")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 421);
        assert!(r.text().await.unwrap().starts_with("unknown host name"));
        // Over the per-request budget.
        let (status, _, body) = s.get_text("/folded?service=huge").await;
        assert_eq!(status, 413);
        assert_eq!(body, "this profile would take more than 65 MiB to build\n");

        // Unknown paths.
        for path in ["/", "/nope", "/profile/42", "/metrics/x", "/flamegraph"] {
            let (status, ct, body) = s.get_text(path).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(ct, TEXT_PLAIN);
            assert!(body.starts_with("not found"), "{body}");
        }

        // Methods other than GET and HEAD.
        for path in ["/profile?pid=42", "/metrics", "/healthz", "/processes"] {
            let r = s
                .client
                .post(format!("{}{path}", s.base))
                .body("x")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 405, "{path}");
            let allow = r.headers()["allow"].to_str().unwrap().to_string();
            assert!(allow.contains("GET") && allow.contains("HEAD"), "{allow}");
            assert_eq!(
                r.text().await.unwrap(),
                "method not allowed: only GET and HEAD\n"
            );
        }
        for m in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
            let r = s
                .client
                .request(m.parse().unwrap(), format!("{}/metrics", s.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 405, "{m}");
        }

        // Over-long query strings.
        let long = format!("/profile?service={}", "a".repeat(MAX_QUERY_LEN));
        let (status, ct, body) = s.get_text(&long).await;
        assert_eq!(status, 414);
        assert_eq!(ct, TEXT_PLAIN);
        assert!(body.starts_with("query string too long"), "{body}");
        // Just under the limit is fine (and unknown: 404).
        let ok = format!("/profile?service={}", "a".repeat(MAX_QUERY_LEN - 8));
        assert_eq!(s.get_text(&ok).await.0, 404);

        // The server still works after all that.
        assert_eq!(s.get_text("/healthz").await.0, 200);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn api_top_snapshot_and_errors() {
        let s = start().await;
        let (status, ct, body) = s.get_text("/api/top?pid=42&line=1&seconds=60").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ct, "application/json");
        let snap: TopSnapshot = serde_json::from_str(&body).unwrap();
        // 60 complete seconds and the current one.
        assert_eq!(s.last_asked(), Some((Selector::Pid(42), 61)));
        assert_eq!(snap.total_samples, 10);
        assert_eq!(snap.window_secs, 60);
        assert_eq!(snap.rate_hz, 100);
        assert_eq!(snap.processes_profiled, 1, "the unsupported one is not");
        assert_eq!(snap.processes.len(), 1);
        assert_eq!(snap.processes[0].service, "web");
        assert_eq!(snap.processes[0].python, "3.11");
        assert!(!snap.functions.is_empty());
        assert!(snap.functions.iter().all(|r| r.python == "3.11"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["processes"][0]["python"], "3.11");
        assert_eq!(v["functions"][0]["python"], "3.11");
        let top = &snap.functions[0];
        assert_eq!(
            (top.qualname.as_str(), top.line, top.own),
            ("handle", Some(10), 6)
        );
        // Defaults: 10 s, function level, every process; `all` is the retention.
        let (status, _, body) = s.get_text("/api/top").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(s.last_asked(), Some((Selector::Pid(42), 11)));
        let snap: TopSnapshot = serde_json::from_str(&body).unwrap();
        assert!(snap.functions.iter().all(|r| r.line.is_none()));
        let handle = snap
            .functions
            .iter()
            .find(|r| r.qualname == "handle")
            .unwrap();
        assert_eq!((handle.own, handle.total), (6, 9));
        assert_eq!(s.get_text("/api/top?seconds=all&service=web").await.0, 200);
        assert_eq!(s.last_asked(), Some((Selector::Pid(42), RETENTION)));
        // Filters that select nothing: an empty snapshot, not an error.
        let (status, _, body) = s.get_text("/api/top?pid=7&pid=8").await;
        assert_eq!(status, 200);
        let snap: TopSnapshot = serde_json::from_str(&body).unwrap();
        assert!(snap.processes.is_empty() && snap.total_samples == 0);

        let asked_before = s.fake.asked.lock().unwrap().len();
        let many_pids: String = (1..=MAX_TOP_PIDS + 1)
            .map(|p| format!("pid={p}&"))
            .collect();
        for (path, want) in [
            ("/api/top?seconds=0", "bad seconds \"0\""),
            ("/api/top?seconds=301", "from 1 to 300, or all"),
            ("/api/top?seconds=ALL", "bad seconds"),
            (
                "/api/top?seconds=1&seconds=2",
                "seconds given more than once",
            ),
            ("/api/top?line=2", "bad line \"2\": expected 0 or 1"),
            ("/api/top?line=true", "bad line"),
            ("/api/top?line=0&line=1", "line given more than once"),
            ("/api/top?pid=abc", "bad pid \"abc\""),
            ("/api/top?pid=0", "bad pid"),
            ("/api/top?pid=", "bad pid"),
            ("/api/top?service=", "bad service"),
            (
                "/api/top?service=a&service=b",
                "service given more than once",
            ),
            ("/api/top?limit=0", "bad limit \"0\""),
            ("/api/top?rows=5", "unknown parameter \"rows\""),
            (&format!("/api/top?{many_pids}"), "too many pid parameters"),
        ] {
            let (status, ct, body) = s.get_text(path).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert_eq!(ct, TEXT_PLAIN, "{path}");
            assert!(body.contains(want), "{path}: {body:?}");
            assert!(body.lines().count() == 1, "{path}: {body:?}");
        }
        assert_eq!(s.fake.asked.lock().unwrap().len(), asked_before);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn graceful_shutdown_ends_serve() {
        let s = start().await;
        // A kept-alive idle connection must not hold the shutdown.
        assert_eq!(s.get_text("/healthz").await.0, 200);
        let base = s.base.clone();
        let client = s.client.clone();
        s.shutdown().await;
        // Nothing listens any more.
        assert!(client.get(format!("{base}/healthz")).send().await.is_err());
    }

    /// `a=1&b` as the (key, value) pairs axum hands the handlers.
    fn q(s: &str) -> Vec<(String, String)> {
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_profile_query(&q("pid=12"), 300),
            Ok(ProfileQuery {
                selector: Selector::Pid(12),
                seconds: 10,
                kind: ProfileKind::Cpu,
            })
        );
        assert_eq!(
            parse_profile_query(&q("seconds=300&service=a b"), 300),
            Ok(ProfileQuery {
                selector: Selector::Service("a b".into()),
                seconds: 300,
                kind: ProfileKind::Cpu,
            })
        );
        assert_eq!(
            parse_profile_query(&q("pid=3&type=off-cpu"), 300).map(|q| q.kind),
            Ok(ProfileKind::OffCpu)
        );
        assert_eq!(
            parse_profile_query(&q("pid=3&type=wall"), 300).map(|q| q.kind),
            Ok(ProfileKind::Wall)
        );
        assert!(parse_profile_query(&q("pid=3&type=gpu"), 300).is_err());
        // Default clamped to a retention shorter than it.
        assert_eq!(
            parse_profile_query(&q("pid=1"), 5).map(|q| q.seconds),
            Ok(5)
        );
        assert!(parse_profile_query(&q("pid=1&seconds=6"), 5).is_err());
        assert!(parse_profile_query(&q("pid=4294967295"), 5).is_ok());
        assert!(parse_profile_query(&q("pid=4294967296"), 5).is_err());
        // Long values are cut in messages.
        let long = format!("pid={}", "x".repeat(1000));
        let msg = parse_profile_query(&q(&long), 5).unwrap_err();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn processes_query_parsing() {
        assert_eq!(parse_processes_query(&q("")), Ok(false));
        assert_eq!(parse_processes_query(&q("all=0")), Ok(false));
        assert_eq!(parse_processes_query(&q("all=1")), Ok(true));
        assert!(parse_processes_query(&q("all=yes")).is_err());
        assert!(parse_processes_query(&q("all")).is_err());
        assert!(parse_processes_query(&q("all=1&all=0")).is_err());
        assert!(parse_processes_query(&q("verbose=1")).is_err());
    }

    #[test]
    fn top_query_parsing() {
        assert_eq!(
            parse_top_query(&q(""), 300),
            Ok(TopQuery {
                seconds: Some(10),
                limit: Some(DEFAULT_TOP_LIMIT),
                ..Default::default()
            })
        );
        assert_eq!(
            parse_top_query(&q("pid=3&line=1&pid=4&pid=3&service=web&seconds=all"), 300),
            Ok(TopQuery {
                seconds: None,
                pids: vec![3, 4],
                service: Some("web".into()),
                line_level: true,
                limit: Some(DEFAULT_TOP_LIMIT),
                kind: ProfileKind::Cpu,
            })
        );
        assert_eq!(parse_top_query(&q(""), 5).unwrap().seconds, Some(5));
        assert!(parse_top_query(&q("seconds=6"), 5).is_err());
        assert_eq!(parse_top_query(&q("limit=7"), 5).unwrap().limit, Some(7));
        for bad in [
            "limit=0",
            "limit=-1",
            "limit=100001",
            "limit=x",
            "limit=1&limit=2",
        ] {
            let e = parse_top_query(&q(bad), 5).unwrap_err();
            assert!(e.contains("limit"), "{bad}: {e}");
        }
    }

    #[test]
    fn filenames_and_svg() {
        assert_eq!(pprof_filename(&Selector::Pid(3), 10), "pyebpf-3-10s.pb.gz");
        assert_eq!(
            pprof_filename(&Selector::Service("api.v2-x_y".into()), 1),
            "pyebpf-api.v2-x_y-1s.pb.gz"
        );
        assert_eq!(
            pprof_filename(&Selector::Service("".into()), 1),
            "pyebpf-service-1s.pb.gz"
        );
        let svg = String::from_utf8(empty_svg("a<b>&\"c\"\n")).unwrap();
        assert!(svg.contains("a&lt;b&gt;&amp;&quot;c&quot;?"));
    }
}
