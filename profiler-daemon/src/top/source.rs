//! Where `pyebpf top` gets its snapshots: one trait, two sources.
//!
//! - [`RemoteSource`]: a running `pyebpf daemon`, through `GET /api/top` on
//!   its localhost HTTP API. Nothing is loaded; no privileges are needed.
//! - [`LocalSource`]: `top` runs the daemon's discovery and sampling loop
//!   itself (without HTTP, loaded through the [`PrepareLocal`] it is given),
//!   which needs CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (or root).
//!
//! The choice is made by [`plan`] while `top` is still a single thread:
//! local mode loads the sampler there and drops the capabilities it no
//! longer needs (they are per thread) before the runtime starts; [`open`]
//! then starts the source on the runtime. Without `--daemon` or `--local`,
//! [`plan`] samples locally only when nothing listens at the daemon's
//! default address, so a host never runs two copies of the BPF programs by
//! accident.
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::runtime::Runtime;

use super::{SourceChoice, TopOptions, DEFAULT_DAEMON_ADDR, DEFAULT_DAEMON_URL, DEFAULT_RATE_HZ};
use crate::daemon::access::Token;
use crate::model::api::{LocalSampling, PrepareLocal, PreparedLocal};
use crate::model::top::{TopQuery, TopSnapshot};

/// Where the data comes from, for the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Sampling in this process.
    Local,
    /// Reading from the daemon at this base URL.
    Daemon(String),
}

impl Mode {
    /// `local`, or `daemon http://127.0.0.1:7464`.
    pub fn describe(&self) -> String {
        match self {
            Mode::Local => "local".to_string(),
            Mode::Daemon(url) => format!("daemon {url}"),
        }
    }
}

/// A source of `top` snapshots.
pub trait TopSource {
    fn mode(&self) -> &Mode;
    /// The current snapshot for `q`.
    fn snapshot(&mut self, q: &TopQuery) -> anyhow::Result<TopSnapshot>;
    /// An error once the source can no longer answer (the local sampling
    /// loop ended); `top` then exits with it.
    fn health(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Stops whatever the source runs.
    fn shutdown(self: Box<Self>) -> anyhow::Result<()>;
}

/// The source chosen before the runtime starts.
pub enum Plan {
    /// A daemon's API, asked once the runtime runs.
    Remote {
        url: String,
        token: Option<Token>,
        /// Chosen because something listens at the default address (no
        /// `--daemon`): a failure then suggests `--local`.
        auto: bool,
    },
    /// The sampler loaded here, capabilities already dropped.
    Local(Box<dyn PreparedLocal>),
}

/// Chooses the source `opts` asks for (see the module documentation). In
/// local mode, checks the privileges, loads the sampler with
/// `prepare_local` and drops every capability reading targets does not
/// need: call it before any other thread starts.
pub fn plan(opts: &TopOptions, prepare_local: PrepareLocal) -> anyhow::Result<Plan> {
    let token = match &opts.token_file {
        Some(path) => Some(crate::daemon::access::load_token(path).context("--token-file")?),
        None => None,
    };
    let local = || {
        let rate = opts.rate_hz.unwrap_or(DEFAULT_RATE_HZ);
        LocalSource::prepare(rate, local_retention(opts), opts.off_cpu, prepare_local)
            .map(Plan::Local)
    };
    match &opts.source {
        SourceChoice::Daemon(url) => Ok(Plan::Remote {
            url: url.clone(),
            token,
            auto: false,
        }),
        SourceChoice::Local => local(),
        // A plain connect, not an HTTP request: the async client would
        // start threads before the capabilities are dropped.
        SourceChoice::Auto if listening(DEFAULT_DAEMON_ADDR) => Ok(Plan::Remote {
            url: DEFAULT_DAEMON_URL.to_string(),
            token,
            auto: true,
        }),
        SourceChoice::Auto => local(),
    }
}

/// Whether something accepts connections at `addr` (a refused or timed
/// out connection: nothing).
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Starts the source `plan` chose, on `rt`. A daemon is asked once first,
/// so that a wrong address fails now, with the reason, rather than show an
/// empty screen.
pub fn open(plan: Plan, rt: Arc<Runtime>) -> anyhow::Result<Box<dyn TopSource>> {
    match plan {
        Plan::Remote { url, token, auto } => {
            let src = RemoteSource::new(&url, rt, token)?;
            match src.probe() {
                Ok(()) => Ok(Box::new(src)),
                Err(e) if auto => Err(anyhow!(
                    "{e}; use --local to sample without it, or --daemon URL for another daemon"
                )),
                Err(e) => Err(anyhow!("{e}")),
            }
        }
        Plan::Local(prepared) => Ok(Box::new(LocalSource::start(rt, prepared)?)),
    }
}

/// Local mode keeps everything since start for the whole-run view (at least
/// an hour, and at least the `--window`/`--duration` asked for).
fn local_retention(opts: &TopOptions) -> u64 {
    let once = opts.once.map_or(0, |o| o.duration_secs);
    u64::from(opts.window_secs.max(once).max(3600)).min(86_400)
}

/// The loop of `pyebpf daemon`, run in this process without HTTP.
pub struct LocalSource {
    rt: Arc<Runtime>,
    sampling: Option<Box<dyn LocalSampling>>,
    mode: Mode,
}

impl LocalSource {
    /// Checks the privileges, loads the sampler with `prepare_local`, then
    /// gives up every capability but those reading targets needs, as
    /// `pyebpf daemon` does. Must run before any other thread starts.
    pub fn prepare(
        rate_hz: u64,
        retention_secs: u64,
        off_cpu: bool,
        prepare_local: PrepareLocal,
    ) -> anyhow::Result<Box<dyn PreparedLocal>> {
        crate::caps::require(
            "pyebpf top (local mode)",
            &crate::caps::record_requirements(),
        )
        .map_err(|e| {
            anyhow!(
                "{e} Or run `pyebpf daemon` on this host: top then reads from it \
                 and needs no privileges."
            )
        })?;
        let prepared =
            prepare_local(rate_hz, retention_secs, off_cpu).context("cannot start sampling")?;
        let kept = crate::caps::drop_after_start()?;
        tracing::info!("capabilities dropped; kept: {}", crate::caps::names(&kept));
        Ok(prepared)
    }

    /// Starts discovery and ingest of a prepared loop on `rt`.
    pub fn start(rt: Arc<Runtime>, prepared: Box<dyn PreparedLocal>) -> anyhow::Result<Self> {
        let sampling = prepared.start(&rt).context("cannot start sampling")?;
        Ok(LocalSource {
            rt,
            sampling: Some(sampling),
            mode: Mode::Local,
        })
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        match self.sampling.take() {
            Some(s) => s.stop(&self.rt, Duration::from_secs(5)),
            None => Ok(()),
        }
    }
}

impl TopSource for LocalSource {
    fn mode(&self) -> &Mode {
        &self.mode
    }

    fn snapshot(&mut self, q: &TopQuery) -> anyhow::Result<TopSnapshot> {
        let s = self
            .sampling
            .as_ref()
            .ok_or_else(|| anyhow!("sampling has stopped"))?;
        s.api().top_with_python(q).map_err(|e| anyhow!("{e}"))
    }

    fn health(&mut self) -> anyhow::Result<()> {
        match &self.sampling {
            Some(s) if s.is_finished() => {
                let r = self.stop();
                Err(r
                    .err()
                    .unwrap_or_else(|| anyhow!("the sampling loop ended")))
                .context("sampling stopped")
            }
            Some(_) => Ok(()),
            None => Err(anyhow!("sampling has stopped")),
        }
    }

    fn shutdown(mut self: Box<Self>) -> anyhow::Result<()> {
        self.stop()
    }
}

/// How asking a daemon went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Probe {
    /// Nothing answers there (connection refused, timeout).
    #[error("no pyebpf daemon answers at {0}")]
    Unreachable(String),
    /// Something answers, but not with a snapshot.
    #[error("{0}")]
    Failed(String),
}

/// A running daemon's `/api/top`.
pub struct RemoteSource {
    rt: Arc<Runtime>,
    client: reqwest::Client,
    /// Base URL without a trailing slash.
    base: String,
    /// `Authorization` header value, when the daemon wants a token.
    bearer: Option<String>,
    mode: Mode,
}

/// `URL` as given to `--daemon`: `http://` is added when no scheme is given,
/// and a trailing `/` removed.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim();
    if url.is_empty() {
        anyhow::bail!("--daemon: empty URL");
    }
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    if !with_scheme.starts_with("http://") && !with_scheme.starts_with("https://") {
        anyhow::bail!("--daemon {url:?}: expected an http:// URL such as {DEFAULT_DAEMON_URL}");
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// The `/api/top` query parameters for `q`.
pub fn query_params(q: &TopQuery) -> Vec<(&'static str, String)> {
    let mut v = vec![
        (
            "seconds",
            q.seconds
                .map_or_else(|| "all".to_string(), |s| s.to_string()),
        ),
        ("line", if q.line_level { "1" } else { "0" }.to_string()),
    ];
    v.extend(q.pids.iter().map(|p| ("pid", p.to_string())));
    if let Some(s) = &q.service {
        v.push(("service", s.clone()));
    }
    if let Some(n) = q.limit {
        v.push(("limit", n.to_string()));
    }
    // Only when asked: a daemon without types knows no `type`.
    if q.kind != crate::profile::ProfileKind::Cpu {
        v.push(("type", q.kind.name().to_string()));
    }
    v
}

impl RemoteSource {
    pub fn new(url: &str, rt: Arc<Runtime>, token: Option<Token>) -> anyhow::Result<Self> {
        let base = normalize_url(url)?;
        let client = reqwest::Client::builder()
            // The API is meant for localhost: never through a proxy.
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(RemoteSource {
            rt,
            client,
            mode: Mode::Daemon(base.clone()),
            base,
            bearer: token.map(|t| t.bearer()),
        })
    }

    /// One small request that tells whether a daemon with `/api/top` is there.
    pub fn probe(&self) -> Result<(), Probe> {
        let q = TopQuery {
            seconds: Some(1),
            pids: vec![1],
            ..TopQuery::default()
        };
        self.fetch(&q, Duration::from_millis(1500)).map(|_| ())
    }

    fn fetch(&self, q: &TopQuery, timeout: Duration) -> Result<TopSnapshot, Probe> {
        let url = format!("{}/api/top", self.base);
        let mut req = self
            .client
            .get(&url)
            .query(&query_params(q))
            .timeout(timeout);
        if let Some(b) = &self.bearer {
            req = req.header(reqwest::header::AUTHORIZATION, b);
        }
        let base = &self.base;
        self.rt.block_on(async move {
            let resp = req.send().await.map_err(|e| {
                if e.is_connect() || e.is_timeout() {
                    Probe::Unreachable(base.clone())
                } else {
                    Probe::Failed(format!("{url}: {e}"))
                }
            })?;
            let status = resp.status();
            let body = resp
                .bytes()
                .await
                .map_err(|e| Probe::Failed(format!("{url}: reading the answer: {e}")))?;
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                let why = text.lines().next().unwrap_or("").trim();
                return Err(Probe::Failed(
                    if status == reqwest::StatusCode::NOT_FOUND && why.starts_with("not found") {
                        format!("the pyebpf daemon at {base} has no /api/top (an older version?)")
                    } else if status == reqwest::StatusCode::UNAUTHORIZED {
                        format!(
                            "the pyebpf daemon at {base} answered {status}: {why} (give its \
                             api.token_file with --token-file)"
                        )
                    } else {
                        format!("the pyebpf daemon at {base} answered {status}: {why}")
                    },
                ));
            }
            serde_json::from_slice(&body).map_err(|e| {
                Probe::Failed(format!("{url}: not a top snapshot (is this pyebpf?): {e}"))
            })
        })
    }
}

impl TopSource for RemoteSource {
    fn mode(&self) -> &Mode {
        &self.mode
    }

    fn snapshot(&mut self, q: &TopQuery) -> anyhow::Result<TopSnapshot> {
        self.fetch(q, Duration::from_secs(5))
            .map_err(|e| anyhow!("{e}"))
    }

    fn shutdown(self: Box<Self>) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_params() {
        assert_eq!(
            normalize_url("127.0.0.1:7464").unwrap(),
            "http://127.0.0.1:7464"
        );
        assert_eq!(
            normalize_url("http://localhost:1/").unwrap(),
            "http://localhost:1"
        );
        assert!(normalize_url("").is_err());
        assert!(normalize_url("ftp://x").is_err());
        let q = TopQuery {
            seconds: None,
            pids: vec![3, 4],
            service: Some("a b".into()),
            line_level: true,
            limit: Some(50),
            kind: crate::profile::ProfileKind::OffCpu,
        };
        assert_eq!(
            query_params(&q),
            [
                ("seconds", "all".to_string()),
                ("line", "1".to_string()),
                ("pid", "3".to_string()),
                ("pid", "4".to_string()),
                ("service", "a b".to_string()),
                ("limit", "50".to_string()),
                ("type", "off-cpu".to_string())
            ]
        );
        assert_eq!(
            query_params(&TopQuery {
                seconds: Some(7),
                ..Default::default()
            }),
            [("seconds", "7".to_string()), ("line", "0".to_string())]
        );
        let opts = TopOptions::default();
        assert_eq!(local_retention(&opts), 3600);
        let opts = TopOptions {
            window_secs: 7200,
            ..TopOptions::default()
        };
        assert_eq!(local_retention(&opts), 7200);
    }
}
