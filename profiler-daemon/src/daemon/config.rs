//! The daemon's YAML configuration (`/etc/pyebpf/pyebpf.yaml`).
//!
//! Every key is optional: an empty file, and no file at all, give
//! [`Config::default()`]. Unknown keys are errors (`deny_unknown_fields`), so
//! a typo never silently falls back to a default. `deploy/pyebpf.yaml` is the
//! commented reference of every option; a test parses it, so it cannot rot.
//!
//! Every error, syntactic or semantic, names the place in the file:
//! `<file>:<line>:<column>: <what is wrong>`, e.g.
//! `pyebpf.yaml:4:12: sampling.rate_hz: 0 is out of range 1..=10000`.
//! Single-value checks (ranges, regexes, URLs, paths) run inside the
//! deserializer's visitors, so serde_yaml attaches the position of the value
//! itself; the few checks across keys (`retention_secs >= window_secs`) run
//! after parsing and find the offending value's position with [`locate`].
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::model::labels::ProcessLabels;
use profiler_common::MAX_PROCS_ENTRIES;

mod otlp;
pub use otlp::{Otlp, OtlpCompression, OtlpProtocol, OtlpTls};

/// The conventional location of the file (used by the systemd unit and the
/// container manifests); without `--config` the daemon uses the defaults.
pub const DEFAULT_PATH: &str = "/etc/pyebpf/pyebpf.yaml";

/// A process whose environment has this variable set to `1` (or `true`,
/// `yes`, `on`) is never profiled, whatever the include rules say (checked by discovery, which
/// reads `/proc/PID/environ`; [`ProcessLabels`] do not carry the environment).
pub const DISABLE_ENV: &str = "PYEBPF_DISABLE";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: cannot read the configuration: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text is not a valid configuration. `line` and `column` are
    /// 1-based; `message` starts with the dotted path of the offending key
    /// when there is one (`sampling.rate_hz: ...`).
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// The file name (or other origin) given to [`parse`].
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    /// `(line, column)`, 1-based, of an [`ConfigError::Invalid`] error.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP API (`/metrics`, `/healthz`, `/readyz`,
    /// `/processes`, `/profile`): an IP address and port, no host names.
    /// Default `127.0.0.1:7464`: the API serves profiles of every process
    /// on the host, so it is not exposed beyond the host unless asked.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// A second listener serving only `/metrics`, `/healthz` and `/readyz`,
    /// without a token (e.g. `0.0.0.0:7465` for Prometheus and probes
    /// while `listen` stays on localhost); default none.
    #[serde(deserialize_with = "some_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// How stacks are sampled.
    pub sampling: Sampling,
    /// Which processes are profiled.
    pub discovery: Discovery,
    /// How samples are kept in memory.
    pub aggregation: Aggregation,
    /// Limits of the HTTP API's queries.
    pub api: Api,
    /// Prometheus metrics derived from the profiles.
    pub metrics: Metrics,
    /// Where closed windows are exported (nothing by default).
    pub outputs: Outputs,
    /// The daemon's own log output.
    pub logging: Logging,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7464)),
            metrics_listen: None,
            sampling: Sampling::default(),
            discovery: Discovery::default(),
            aggregation: Aggregation::default(),
            api: Api::default(),
            metrics: Metrics::default(),
            outputs: Outputs::default(),
            logging: Logging::default(),
        }
    }
}

/// `sampling:` how stacks are sampled.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// Samples per second per CPU, `1..=10000`; default 99 (not 100, to
    /// avoid lock-step with timers that fire at round frequencies).
    #[serde(deserialize_with = "ranged::<_, _, 1, 10_000>")]
    pub rate_hz: u64,
    /// Deepest Python stack walked, in frames, `1..=4096`; default 2048.
    /// Deeper stacks are cut and marked `[truncated]`.
    #[serde(deserialize_with = "ranged::<_, _, 1, 4096>")]
    pub max_depth: u32,
    /// Size of the BPF ring buffer shared by all CPUs, in bytes,
    /// `65536..=1073741824`; default 8388608 (8 MiB). Rounded up to a power
    /// of two. Samples are dropped (and counted) when it is full.
    #[serde(deserialize_with = "ranged::<_, _, 65_536, 1_073_741_824>")]
    pub ring_buffer_bytes: u32,
    /// Profile types kept per process: any of `cpu`, `wall`, `off-cpu`;
    /// default `[cpu]`. `wall` or `off-cpu` turn on off-CPU sampling (the
    /// scheduler hooks, with kernel stacks); wall is derived at query time
    /// from the CPU samples and off-CPU time, never stored twice.
    #[serde(deserialize_with = "profile_types")]
    pub types: Vec<crate::profile::ProfileKind>,
    /// End each stack's Python frames with its native leaf (the C function
    /// the thread was in, named from the target's ELF files); default false.
    pub native: bool,
    /// Whole native stacks merged with the Python frames (implies
    /// `native`): each sample carries a copy of its thread's user stack,
    /// unwound in the daemon; default false.
    pub native_stacks: bool,
}

impl Sampling {
    /// Whether threads on CPU are sampled (cpu or wall).
    pub fn on_cpu(&self) -> bool {
        self.types.iter().any(|k| k.on_cpu())
    }

    /// Whether off-CPU intervals are traced (wall or off-cpu).
    pub fn off_cpu(&self) -> bool {
        self.types.iter().any(|k| k.off_cpu())
    }
}

/// `sampling.types`: a non-empty list of distinct profile type names.
fn profile_types<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<crate::profile::ProfileKind>, D::Error> {
    use crate::profile::ProfileKind;
    let names: Vec<String> = Vec::deserialize(d)?;
    if names.is_empty() {
        return Err(de::Error::custom(
            "an empty list: expected at least one of cpu, wall, off-cpu",
        ));
    }
    let mut out = Vec::new();
    for n in &names {
        let k = ProfileKind::ALL
            .into_iter()
            .find(|k| k.name() == n)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown profile type {n:?}: expected cpu, wall or off-cpu"
                ))
            })?;
        if out.contains(&k) {
            return Err(de::Error::custom(format!("profile type {n} listed twice")));
        }
        out.push(k);
    }
    Ok(out)
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            rate_hz: 99,
            max_depth: profiler_common::DEFAULT_MAX_DEPTH,
            ring_buffer_bytes: 8 << 20,
            types: vec![crate::profile::ProfileKind::Cpu],
            native: false,
            native_stacks: false,
        }
    }
}

/// `discovery:` which processes are profiled.
///
/// A process is profiled when it runs a supported CPython, matches at least one
/// `include` rule (or `include` is empty), matches no `exclude` rule, and
/// does not have `PYEBPF_DISABLE=1` in its environment ([`DISABLE_ENV`]):
/// that opt-out always wins.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Discovery {
    /// Seconds between scans of `/proc` for new and exited processes,
    /// `1..=3600`; default 10.
    #[serde(deserialize_with = "ranged::<_, _, 1, 3600>")]
    pub rescan_interval_secs: u64,
    /// Profile only processes matching one of these rules; empty (the
    /// default) means every supported CPython process.
    pub include: Vec<Rule>,
    /// Never profile processes matching one of these rules; default empty.
    pub exclude: Vec<Rule>,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            rescan_interval_secs: 10,
            include: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

impl Discovery {
    /// Whether the include and exclude rules select this process. The
    /// `PYEBPF_DISABLE=1` opt-out is not seen here (labels carry no
    /// environment); discovery checks it separately.
    pub fn selects(&self, labels: &ProcessLabels) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.matches(labels)))
            && !self.exclude.iter().any(|r| r.matches(labels))
    }
}

/// One include or exclude rule: it matches a process when ALL the fields it
/// sets match. A rule must set at least one field.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Exact `/proc/PID/comm` (the kernel truncates it to 15 bytes, so a
    /// longer value is rejected: it could never match).
    pub command: Option<String>,
    /// Regular expression searched in the command line (arguments joined by
    /// single spaces); unanchored, use `^...$` to match the whole line.
    /// Compiled when the configuration is loaded.
    pub cmdline: Option<Regex>,
    /// Exact executable path as the process sees it (`/proc/PID/exe`
    /// target, inside its container), e.g. `/usr/local/bin/python3.11`.
    pub exe: Option<String>,
    /// Container id: the full id, or a prefix of at least 12 characters
    /// (the short form `docker ps` shows). Processes outside containers
    /// never match.
    pub container_id: Option<String>,
}

/// Shortest container-id prefix a rule may use.
pub const MIN_CONTAINER_ID_PREFIX: usize = 12;
/// `/proc/PID/comm` holds at most this many bytes (TASK_COMM_LEN - 1).
pub const MAX_COMM_LEN: usize = 15;

impl Rule {
    /// Whether every field this rule sets matches the process.
    pub fn matches(&self, labels: &ProcessLabels) -> bool {
        if let Some(c) = &self.command {
            if *c != labels.command {
                return false;
            }
        }
        if let Some(re) = &self.cmdline {
            if !re.is_match(&labels.cmdline) {
                return false;
            }
        }
        if let Some(e) = &self.exe {
            if *e != labels.exe {
                return false;
            }
        }
        if let Some(want) = &self.container_id {
            let Some(id) = &labels.container_id else {
                return false;
            };
            let ok = id == want
                || (want.len() >= MIN_CONTAINER_ID_PREFIX && id.starts_with(want.as_str()));
            if !ok {
                return false;
            }
        }
        true
    }
}

impl PartialEq for Rule {
    /// Regexes compare by their source text.
    fn eq(&self, other: &Rule) -> bool {
        self.command == other.command
            && self.cmdline.as_ref().map(Regex::as_str) == other.cmdline.as_ref().map(Regex::as_str)
            && self.exe == other.exe
            && self.container_id == other.container_id
    }
}

/// Largest `aggregation.max_processes`: the entries the sampler's BPF map
/// of processes may be given.
pub const MAX_PROCESSES: u64 = MAX_PROCS_ENTRIES as u64;

/// `aggregation:` how samples are kept in memory.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Aggregation {
    /// Length of an export window in seconds, `1..=3600`; default 60. Each
    /// closed window becomes one pprof file / one Pyroscope upload per
    /// process.
    #[serde(deserialize_with = "ranged::<_, _, 1, 3600>")]
    pub window_secs: u64,
    /// Seconds of samples kept for the HTTP API (`/profile?seconds=`),
    /// `window_secs..=86400`; default 600.
    #[serde(deserialize_with = "ranged::<_, _, 1, 86_400>")]
    pub retention_secs: u64,
    /// Most processes tracked at once, `1..=65536`; default 1000. Further
    /// processes are not profiled (and counted) until others exit. The BPF
    /// map of sampled processes is sized from it at start (the kernel
    /// preallocates its entries), so the maximum is what that map may hold
    /// ([`MAX_PROCS_ENTRIES`]); a larger value after a reload takes effect
    /// at the next restart.
    #[serde(deserialize_with = "ranged::<_, _, 1, MAX_PROCESSES>")]
    pub max_processes: u32,
    /// Most distinct stacks (at line level) kept per process within the
    /// retention, `1..=10000000`; default 100000. Samples of further new
    /// stacks are counted under `[stack table full]`.
    #[serde(deserialize_with = "ranged::<_, _, 1, 10_000_000>")]
    pub max_stacks_per_process: u32,
    /// Memory all profiles may hold together, in MiB (interned frames and
    /// stacks, per-second counts, the raw-stack and symbol caches),
    /// `16..=65536`; default 256, half of the DaemonSet's memory limit.
    /// Beyond it the oldest seconds of the largest processes are evicted
    /// (counted in `pyebpf_store_evicted_samples_total`).
    #[serde(deserialize_with = "ranged::<_, _, 16, 65_536>")]
    pub memory_budget_mib: u32,
    /// Memory one process's profile may hold, in MiB, `1..=65536`; default
    /// 32. Beyond it that process's oldest seconds are evicted (counted).
    #[serde(deserialize_with = "ranged::<_, _, 1, 65_536>")]
    pub process_memory_budget_mib: u32,
    /// Keep each thread's stacks apart, rooted at a `thread TID (name)`
    /// frame (OTLP: the samples' `thread.id` and `thread.name`); default
    /// false. A process then holds up to a copy of its stacks per thread,
    /// within the same memory bounds.
    pub per_thread: bool,
}

impl Default for Aggregation {
    fn default() -> Self {
        Aggregation {
            window_secs: 60,
            retention_secs: 600,
            max_processes: 1000,
            max_stacks_per_process: 100_000,
            memory_budget_mib: 256,
            process_memory_budget_mib: 32,
            per_thread: false,
        }
    }
}

/// `api:` limits of the HTTP API's queries.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    /// Memory one `/profile` request may spell its stacks out into, in MiB,
    /// `1..=4096`; default 64. A larger answer is refused (413) with its
    /// size, rather than risking the daemon's memory limit: ask for fewer
    /// seconds or one process. At most 4 such requests run at once.
    #[serde(deserialize_with = "ranged::<_, _, 1, 4096>")]
    pub max_query_mib: u32,
    /// Whether `/processes` shows command lines; default false: they often
    /// hold secrets (tokens or passwords passed as arguments), so they are
    /// shown as `[redacted]` unless the operator turns this on. Include
    /// rules on `cmdline` work either way.
    pub show_cmdline: bool,
    /// Host names requests may use for the API besides IP addresses and
    /// `localhost` (e.g. a Kubernetes Service name); default none. Any
    /// other `Host` header is refused (421), so that a web page cannot
    /// reach the API by re-pointing its own domain at this host (DNS
    /// rebinding).
    #[serde(deserialize_with = "host_names")]
    pub allowed_hosts: Vec<String>,
    /// A file holding a bearer token (at least 16 bytes, mode 0600 or
    /// 0400) that every request but `/healthz` and `/readyz` must present
    /// (`Authorization: Bearer TOKEN`); default none. Required when
    /// `listen` is not a loopback address.
    #[serde(deserialize_with = "some_absolute_path")]
    pub token_file: Option<PathBuf>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            max_query_mib: 64,
            show_cmdline: false,
            allowed_hosts: Vec::new(),
            token_file: None,
        }
    }
}

impl Api {
    pub fn max_query_bytes(&self) -> usize {
        (self.max_query_mib as usize) << 20
    }
}

/// `metrics:` Prometheus metrics derived from the profiles.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Per process, export CPU time of this many hottest functions (self
    /// time) as labelled series, `0..=100`; default 10; 0 turns the
    /// per-function series off.
    #[serde(deserialize_with = "ranged::<_, _, 0, 100>")]
    pub top_functions: u32,
    /// Cap on the number of per-function series across all processes, to
    /// bound Prometheus cardinality, `1..=1000000`; default 5000.
    #[serde(deserialize_with = "ranged::<_, _, 1, 1_000_000>")]
    pub max_function_series: u32,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            top_functions: 10,
            max_function_series: 5000,
        }
    }
}

/// `outputs:` where closed windows go. Each is off when absent or `null`;
/// `{}` turns one on with all its defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Outputs {
    /// Write one gzipped pprof file per process and window; default off.
    pub pprof_dir: Option<PprofDir>,
    /// Push each window to a Pyroscope server; default off.
    pub pyroscope: Option<Pyroscope>,
    /// Export each window to an OpenTelemetry Collector over OTLP; default
    /// off.
    pub otlp: Option<Otlp>,
}

/// `outputs.pprof_dir:` pprof files on disk.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PprofDir {
    /// Directory for the files (created if missing); must be absolute;
    /// default `/var/lib/pyebpf/profiles`.
    #[serde(deserialize_with = "absolute_path")]
    pub path: PathBuf,
    /// Files older than this many seconds are deleted,
    /// `60..=31536000`, at least `aggregation.window_secs`; default 86400.
    #[serde(deserialize_with = "ranged::<_, _, 60, 31_536_000>")]
    pub max_age_secs: u64,
    /// Oldest files are deleted while the directory holds more than this
    /// many bytes, `1048576..=1099511627776`; default 1073741824 (1 GiB).
    #[serde(deserialize_with = "ranged::<_, _, 1_048_576, 1_099_511_627_776>")]
    pub max_total_bytes: u64,
}

impl Default for PprofDir {
    fn default() -> Self {
        PprofDir {
            path: PathBuf::from("/var/lib/pyebpf/profiles"),
            max_age_secs: 86_400,
            max_total_bytes: 1 << 30,
        }
    }
}

/// `outputs.pyroscope:` pushes to a Pyroscope (or Grafana Cloud Profiles)
/// server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pyroscope {
    /// Server base URL, `http://` or `https://` with a host; credentials go
    /// in `basic_auth`, not in the URL. Default `http://127.0.0.1:4040`.
    #[serde(deserialize_with = "http_url")]
    pub url: String,
    /// Application name the profiles are filed under; each process's
    /// labels (service_name, pid, command, container_id, ...) are attached
    /// as tags. Default `python`.
    #[serde(deserialize_with = "application_name")]
    pub application_name: String,
    /// Timeout of one upload in seconds, `1..=300`; default 10.
    #[serde(deserialize_with = "ranged::<_, _, 1, 300>")]
    pub timeout_secs: u64,
    /// Memory for profiles waiting to be sent (or being sent), in bytes of
    /// gzipped pprof and request plus a small fixed overhead per profile,
    /// `1048576..=17179869184` (1 MiB to 16 GiB); default 67108864 (64 MiB).
    /// Beyond it the oldest queued profiles are dropped (and counted).
    #[serde(deserialize_with = "ranged::<_, _, 1_048_576, 17_179_869_184>")]
    pub max_queue_bytes: u64,
    /// Uploads in progress at once, `1..=256`; default 8.
    #[serde(deserialize_with = "ranged::<_, _, 1, 256>")]
    pub max_concurrent_uploads: u32,
    /// Removed (the queue is bounded in bytes now): present only so that
    /// setting it is an error naming its replacement, at its position.
    #[serde(deserialize_with = "removed_max_queue_windows")]
    #[doc(hidden)]
    pub max_queue_windows: Removed,
    /// How long one window's upload is retried (with exponential back-off,
    /// 1 s up to 30 s between attempts) before it is dropped and counted, in
    /// seconds, `1..=86400`; default 300.
    #[serde(deserialize_with = "ranged::<_, _, 1, 86_400>")]
    pub max_retry_secs: u64,
    /// HTTP basic authentication; default none.
    pub basic_auth: Option<BasicAuth>,
    /// Tenant sent as `X-Scope-OrgID` (multi-tenant Pyroscope); default none.
    #[serde(deserialize_with = "optional_non_empty")]
    pub tenant_id: Option<String>,
}

impl Default for Pyroscope {
    fn default() -> Self {
        Pyroscope {
            url: "http://127.0.0.1:4040".into(),
            application_name: "python".into(),
            timeout_secs: 10,
            max_queue_bytes: 64 << 20,
            max_concurrent_uploads: 8,
            max_queue_windows: Removed,
            max_retry_secs: 300,
            basic_auth: None,
            tenant_id: None,
        }
    }
}

/// A removed option: it never deserializes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed;

fn removed_max_queue_windows<'de, D: Deserializer<'de>>(d: D) -> Result<Removed, D::Error> {
    removed(
        d,
        "max_queue_windows was removed: the queue is bounded in bytes now; use \
         max_queue_bytes (default 67108864, 64 MiB) instead",
    )
}

/// Fails with `message` at the value's position, whatever the value.
fn removed<'de, D: Deserializer<'de>>(d: D, message: &'static str) -> Result<Removed, D::Error> {
    struct Reject(&'static str);
    impl<'de> Visitor<'de> for Reject {
        type Value = Removed;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Removed, E> {
            Err(E::custom(self.0))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Removed, A::Error> {
            Err(de::Error::custom(self.0))
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Removed, A::Error> {
            Err(de::Error::custom(self.0))
        }
    }
    d.deserialize_any(Reject(message))
}

/// `outputs.pyroscope.basic_auth:` both fields required.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    /// User name (for Grafana Cloud: the stack's user id).
    pub username: String,
    /// Password or API token.
    pub password: String,
}

impl fmt::Debug for BasicAuth {
    /// The password is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `logging:` the daemon's own logs (to stderr, i.e. the journal).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Logging {
    /// `text` (default) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or
    /// `warn,pyebpf::daemon=debug`; default `info`.
    #[serde(deserialize_with = "log_filter")]
    pub level: String,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Reads and parses the configuration file at `path`. Callers without a
/// file use [`Config::default()`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses configuration text; `origin` (usually the file name) prefixes
/// error messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    // An empty (or comments-only) document is an empty configuration.
    let config: Config = if is_blank(text) {
        Config::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| yaml_error(&e, origin))?
    };
    cross_check(&config, text, origin)?;
    Ok(config)
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// Converts a serde_yaml error to `origin:line:column: message`.
fn yaml_error(e: &serde_yaml::Error, origin: &str) -> ConfigError {
    let text = e.to_string();
    let (line, column, message) = match e.location() {
        Some(loc) => {
            // serde_yaml appends " at line L column C"; the position is
            // reported in front instead.
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            let message = match text.find(&suffix) {
                Some(i) => format!("{}{}", &text[..i], &text[i + suffix.len()..]),
                None => text,
            };
            (loc.line(), loc.column(), message)
        }
        // Only errors about the document as a whole lack a position
        // (e.g. several documents in one file): report its start.
        None => (1, 1, text),
    };
    ConfigError::Invalid {
        origin: origin.to_string(),
        line,
        column,
        message,
    }
}

/// Checks that relate several keys, reported at the value of the key that
/// was written (or the first of them that was).
fn cross_check(config: &Config, text: &str, origin: &str) -> Result<(), ConfigError> {
    let fail = |paths: &[&[&str]], message: String| {
        let (line, column) = paths
            .iter()
            .find_map(|p| locate(text, p))
            .map_or((1, 1), |l| (l.line(), l.column()));
        Err(ConfigError::Invalid {
            origin: origin.to_string(),
            line,
            column,
            message,
        })
    };
    let agg = &config.aggregation;
    if agg.retention_secs < agg.window_secs {
        return fail(
            &[
                &["aggregation", "retention_secs"],
                &["aggregation", "window_secs"],
            ],
            format!(
                "aggregation.retention_secs: {} is less than aggregation.window_secs ({}); \
                 retention must hold at least one window",
                agg.retention_secs, agg.window_secs
            ),
        );
    }
    if let Some(o) = &config.outputs.otlp {
        if let Err((key, message)) = o.cross_check() {
            return fail(&[&["outputs", "otlp", key]], message);
        }
    }
    if let Some(p) = &config.outputs.pprof_dir {
        if p.max_age_secs < agg.window_secs {
            return fail(
                &[
                    &["outputs", "pprof_dir", "max_age_secs"],
                    &["aggregation", "window_secs"],
                ],
                format!(
                    "outputs.pprof_dir.max_age_secs: {} is less than aggregation.window_secs \
                     ({}); files would be deleted as soon as they are written",
                    p.max_age_secs, agg.window_secs
                ),
            );
        }
    }
    Ok(())
}

/// Position (1-based) of the value at `path` (a chain of mapping keys) in
/// the YAML `text`, or `None` when it is not there.
///
/// serde_yaml keeps no positions in its `Value`s, but it stamps an error
/// raised inside a visitor with the position of the value being visited:
/// walk down the keys and fail on purpose at the target.
pub fn locate(text: &str, path: &[&str]) -> Option<serde_yaml::Location> {
    const HERE: &str = "\u{0}pyebpf-locate";

    struct Seek<'p>(&'p [&'p str]);
    impl<'de> DeserializeSeed<'de> for Seek<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            match self.0.split_first() {
                None => d.deserialize_any(Here),
                Some((key, rest)) => d.deserialize_any(Walk { key, rest }),
            }
        }
    }

    struct Here;
    impl<'de> Visitor<'de> for Here {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(HERE)
        }
        // Every visit_* defaults to an `invalid_type` error mentioning
        // `expecting`, i.e. HERE.
    }

    struct Walk<'p> {
        key: &'p str,
        rest: &'p [&'p str],
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(k) = map.next_key::<serde_yaml::Value>()? {
                if k.as_str() == Some(self.key) {
                    return map.next_value_seed(Seek(self.rest));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }

    let err = Seek(path)
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    if err.to_string().contains(HERE) {
        err.location()
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// Validating deserializers. Each check runs inside a visitor, so serde_yaml
// reports the failing value's position and its dotted path.

/// An integer in `MIN..=MAX`, as any integer type that holds `MAX`.
fn ranged<'de, D, T, const MIN: u64, const MAX: u64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Range<T, const MIN: u64, const MAX: u64>(PhantomData<T>);
    impl<'de, T: TryFrom<u64>, const MIN: u64, const MAX: u64> Visitor<'de> for Range<T, MIN, MAX> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer in {MIN}..={MAX}")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            if !(MIN..=MAX).contains(&v) {
                return Err(E::custom(format!("{v} is out of range {MIN}..={MAX}")));
            }
            T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range {MIN}..={MAX}")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::custom(format!("{v} is out of range {MIN}..={MAX}"))),
            }
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::custom(format!("{v} is out of range {MIN}..={MAX}"))),
            }
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::custom(format!("{v} is out of range {MIN}..={MAX}"))),
            }
        }
    }
    // deserialize_any: serde_yaml's deserialize_u64 rejects negative
    // numbers as a type error before the visitor can say "out of range".
    d.deserialize_any(Range::<T, MIN, MAX>(PhantomData))
}

/// A string turned into `T` by `check`, whose error message is reported at
/// the string's position.
fn checked_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Str<F, T> {
        expecting: &'static str,
        check: F,
        out: PhantomData<T>,
    }
    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for Str<F, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.check)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(Str {
        expecting,
        check,
        out: PhantomData,
    })
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    checked_str(d, "an IP address and port, e.g. 127.0.0.1:7464", |s| {
        s.parse().map_err(|_| {
            format!("`{s}` is not an IP address and port (e.g. 127.0.0.1:7464 or [::1]:7464)")
        })
    })
}

/// A DNS name (letters, digits, `-`, `.`; at most 253 bytes), lowercased;
/// checked element by element so that an error names its place.
struct HostName(String);

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = String::deserialize(d)?;
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            Ok(HostName(n.to_ascii_lowercase()))
        } else {
            Err(de::Error::custom(format!(
                "`{n}` is not a host name (letters, digits, `-` and `.`)"
            )))
        }
    }
}

fn host_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<HostName>::deserialize(d)?
        .into_iter()
        .map(|h| h.0)
        .collect())
}

fn some_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

fn some_absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    absolute_path(d).map(Some)
}

fn absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    checked_str(d, "an absolute path", |s| {
        if s.starts_with('/') {
            Ok(PathBuf::from(s))
        } else {
            Err(format!("`{s}` is not an absolute path"))
        }
    })
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

fn optional_non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<NonEmpty>::deserialize(d).map(|o| o.map(|n| n.0))
}

/// A non-empty string (for `Option` fields).
struct NonEmpty(String);
impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a non-empty string", non_empty).map(NonEmpty)
    }
}

/// Checks a Pyroscope server URL: `http(s)://host[:port][/path]`, no
/// credentials, no whitespace.
pub fn check_http_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("`{s}` is not an http:// or https:// URL"))?;
    if s.chars().any(char::is_whitespace) {
        return Err(format!("`{s}` contains whitespace"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{s}` contains credentials; put them in basic_auth instead"
        ));
    }
    // A port follows the last ':' outside an IPv6 literal `[...]`.
    let after_ipv6 = authority.rsplit(']').next().unwrap_or("");
    if let Some((host, port)) = after_ipv6.rsplit_once(':') {
        if host.is_empty() && !authority.starts_with('[') {
            return Err(format!("`{s}` has no host"));
        }
        if port.parse::<u16>().is_err() {
            return Err(format!("`{s}` has an invalid port `{port}`"));
        }
    }
    Ok(())
}

fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked_str(d, "an http:// or https:// URL", |s| {
        check_http_url(s).map(|()| s.to_string())
    })
}

fn application_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked_str(d, "an application name", |s| {
        non_empty(s)?;
        // Pyroscope accepts [A-Za-z0-9_.\-/]+ as an application name.
        match s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/')))
        {
            Some(c) => Err(format!(
                "`{s}` contains {c:?}; Pyroscope application names allow only A-Z a-z 0-9 _ . - /"
            )),
            None => Ok(s.to_string()),
        }
    })
}

fn log_filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked_str(d, "a tracing filter directive such as `info`", |s| {
        non_empty(s)?;
        tracing_subscriber::EnvFilter::try_new(s)
            .map(|_| s.to_string())
            .map_err(|e| format!("`{s}` is not a valid filter directive: {e}"))
    })
}

/// `Rule.command`: an exact comm, at most 15 bytes.
struct Comm(String);
impl<'de> Deserialize<'de> for Comm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a command name (/proc/PID/comm)", |s| {
            non_empty(s)?;
            if s.len() > MAX_COMM_LEN {
                return Err(format!(
                    "`{s}` is longer than {MAX_COMM_LEN} bytes; the kernel truncates \
                     /proc/PID/comm to {MAX_COMM_LEN}, so it could never match (use `{}`)",
                    truncate_comm(s)
                ));
            }
            Ok(Comm(s.to_string()))
        })
    }
}

/// The first 15 bytes of `s`, cut at a character boundary.
fn truncate_comm(s: &str) -> &str {
    let mut end = MAX_COMM_LEN.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `Rule.cmdline`: compiled at load.
struct Pattern(Regex);
impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a regular expression", |s| {
            Regex::new(s).map(Pattern).map_err(|e| {
                // regex's syntax errors span several lines (pattern, caret,
                // `error: ...`); keep the one that says what is wrong.
                let text = e.to_string();
                let why = text
                    .lines()
                    .find_map(|l| l.strip_prefix("error: "))
                    .map(str::to_string)
                    .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "));
                format!("`{s}` is not a valid regular expression: {why}")
            })
        })
    }
}

/// `Rule.exe`: an absolute path.
struct Exe(String);
impl<'de> Deserialize<'de> for Exe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        absolute_path(d).map(|p| Exe(p.to_string_lossy().into_owned()))
    }
}

/// `Rule.container_id`: a full id or a prefix of at least 12 characters.
struct ContainerId(String);
impl<'de> Deserialize<'de> for ContainerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a container id", |s| {
            if s.len() < MIN_CONTAINER_ID_PREFIX || s.chars().any(char::is_whitespace) {
                return Err(format!(
                    "`{s}` is not a container id or a prefix of at least \
                     {MIN_CONTAINER_ID_PREFIX} characters"
                ));
            }
            Ok(ContainerId(s.to_string()))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    command: Option<Comm>,
    #[serde(default)]
    cmdline: Option<Pattern>,
    #[serde(default)]
    exe: Option<Exe>,
    #[serde(default)]
    container_id: Option<ContainerId>,
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = Rule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rule: a mapping with command, cmdline, exe and/or container_id")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Rule, A::Error> {
                let raw = RawRule::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let rule = Rule {
                    command: raw.command.map(|c| c.0),
                    cmdline: raw.cmdline.map(|p| p.0),
                    exe: raw.exe.map(|e| e.0),
                    container_id: raw.container_id.map(|c| c.0),
                };
                if rule.command.is_none()
                    && rule.cmdline.is_none()
                    && rule.exe.is_none()
                    && rule.container_id.is_none()
                {
                    // Raised inside the visitor: reported at the rule.
                    return Err(de::Error::custom(
                        "a rule must set at least one of command, cmdline, exe, container_id",
                    ));
                }
                Ok(rule)
            }
        }
        d.deserialize_map(RuleVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, usize, String) {
        match parse(text, "pyebpf.yaml") {
            Err(ConfigError::Invalid {
                origin,
                line,
                column,
                message,
            }) => {
                assert_eq!(origin, "pyebpf.yaml");
                (line, column, message)
            }
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    /// The error's line and column, with the message checked to contain
    /// every piece of `needles`.
    fn err_at(text: &str, needles: &[&str]) -> (usize, usize) {
        let (line, column, message) = err(text);
        for n in needles {
            assert!(message.contains(n), "{message:?} lacks {n:?}");
        }
        assert!(!message.contains(" at line "), "{message:?}");
        (line, column)
    }

    /// The BPF map of sampled processes cannot hold more than
    /// `MAX_PROCS_ENTRIES`: a larger limit is refused where it is written.
    #[test]
    fn max_processes_beyond_bpf_capacity_is_rejected() {
        let text = "aggregation:\n  window_secs: 60\n  max_processes: 100000\n";
        let (line, col) = err_at(
            text,
            &["aggregation.max_processes: 100000 is out of range 1..=65536"],
        );
        assert_eq!((line, col), (3, 18));
        let ok = format!("aggregation:\n  max_processes: {MAX_PROCS_ENTRIES}\n");
        assert_eq!(
            parse(&ok, "test").unwrap().aggregation.max_processes,
            MAX_PROCS_ENTRIES
        );
    }

    fn labels() -> ProcessLabels {
        ProcessLabels {
            pid: 42,
            command: "gunicorn".into(),
            service: "shop".into(),
            exe: "/usr/local/bin/python3.11".into(),
            cmdline: "/usr/local/bin/python3.11 /app/bin/gunicorn app:wsgi".into(),
            container_id: Some(
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            ),
            ..Default::default()
        }
    }

    fn rule(yaml: &str) -> Rule {
        let c = parse(&format!("discovery:\n  include:\n    - {yaml}\n"), "t").unwrap();
        c.discovery.include.into_iter().next().unwrap()
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7464");
        assert_eq!(c.sampling.rate_hz, 99);
        assert_eq!(c.sampling.max_depth, 2048);
        assert_eq!(c.sampling.ring_buffer_bytes, 8_388_608);
        assert_eq!(c.discovery.rescan_interval_secs, 10);
        assert!(c.discovery.include.is_empty() && c.discovery.exclude.is_empty());
        assert_eq!(c.aggregation.window_secs, 60);
        assert_eq!(c.aggregation.retention_secs, 600);
        assert_eq!(c.aggregation.max_processes, 1000);
        assert_eq!(c.aggregation.max_stacks_per_process, 100_000);
        assert_eq!(c.aggregation.memory_budget_mib, 256);
        assert_eq!(c.aggregation.process_memory_budget_mib, 32);
        assert_eq!(c.metrics.top_functions, 10);
        assert_eq!(c.metrics.max_function_series, 5000);
        assert_eq!(c.outputs, Outputs::default());
        assert!(c.outputs.pprof_dir.is_none() && c.outputs.pyroscope.is_none());
        assert_eq!(c.logging.format, LogFormat::Text);
        assert_eq!(c.logging.level, "info");
        let p = PprofDir::default();
        assert_eq!(p.path, Path::new("/var/lib/pyebpf/profiles"));
        assert_eq!((p.max_age_secs, p.max_total_bytes), (86_400, 1_073_741_824));
        let y = Pyroscope::default();
        assert_eq!(y.url, "http://127.0.0.1:4040");
        assert_eq!(y.application_name, "python");
        assert_eq!(
            (
                y.timeout_secs,
                y.max_queue_bytes,
                y.max_concurrent_uploads,
                y.max_retry_secs
            ),
            (10, 64 << 20, 8, 300)
        );
        // The pusher's own defaults agree.
        let p = crate::daemon::export::pyroscope::PyroscopeConfig::new("http://h", "a");
        assert_eq!(p.max_queue_bytes, y.max_queue_bytes);
        assert_eq!(p.max_concurrent_uploads, y.max_concurrent_uploads as usize);
        assert!(y.basic_auth.is_none() && y.tenant_id.is_none());
        // The sampler's own defaults agree.
        let s = crate::bpf::sampler::SamplerConfig::default();
        assert_eq!(s.rate_hz, c.sampling.rate_hz);
        assert_eq!(s.max_depth, c.sampling.max_depth);
        assert_eq!(s.ring_bytes, c.sampling.ring_buffer_bytes);
    }

    #[test]
    fn empty_documents_are_defaults() {
        for text in ["", "\n", "# only a comment\n\n", "---\n", "{}\n"] {
            assert_eq!(parse(text, "t").unwrap(), Config::default(), "{text:?}");
        }
        // An empty section is that section's defaults.
        let c = parse("sampling:\noutputs:\n", "t").unwrap();
        assert_eq!(c, Config::default());
        // `{}` turns an output on with its defaults; `null` leaves it off.
        let c = parse("outputs:\n  pprof_dir: {}\n  pyroscope: null\n", "t").unwrap();
        assert_eq!(c.outputs.pprof_dir, Some(PprofDir::default()));
        assert_eq!(c.outputs.pyroscope, None);
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pyebpf.yaml");
        std::fs::write(&path, "").unwrap();
        assert_eq!(load(&path).unwrap(), Config::default());
        std::fs::write(&path, "sampling:\n  rate_hz: 0\n").unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.location(), Some((2, 12)));
        assert!(
            e.to_string()
                .starts_with(&format!("{}:2:12: ", path.display())),
            "{e}"
        );
        let e = load(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.yaml"), "{e}");
    }

    /// The deploy files follow the `## prose` / `# disabled: setting`
    /// convention: uncomment every line whose comment starts with a single
    /// `#` followed by a space (or is a lone `#`).
    fn uncomment(text: &str) -> String {
        text.lines()
            .map(|l| {
                let t = l.trim_start();
                let indent = &l[..l.len() - t.len()];
                if t == "#" {
                    "\n".to_string()
                } else if let Some(rest) = t.strip_prefix("# ") {
                    format!("{indent}{rest}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    }

    fn deploy_file(rel: &str) -> (PathBuf, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(rel);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (path, text)
    }

    #[test]
    fn kubernetes_configmap_config_is_valid() {
        use serde::Deserialize as _;
        let (_, text) = deploy_file("kubernetes/daemonset.yaml");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let kind = |d: &serde_yaml::Value| d["kind"].as_str().map(str::to_string);
        let cm = docs
            .iter()
            .find(|d| kind(d).as_deref() == Some("ConfigMap"))
            .expect("a ConfigMap");
        let embedded = cm["data"]["pyebpf.yaml"]
            .as_str()
            .expect("data.pyebpf.yaml");
        let c = parse(embedded, "ConfigMap pyebpf.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.logging.format, LogFormat::Json);
        // The API stays on loopback (allowed without a token); metrics and
        // probes are on the port the pod exposes.
        assert!(crate::daemon::access::check_listen(c.listen, false).is_ok());
        let metrics_port = c.metrics_listen.expect("metrics_listen").port();
        let c = parse(&uncomment(embedded), "uncommented ConfigMap pyebpf.yaml")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.outputs.pyroscope.is_some());

        // The DaemonSet reads it from where the ConfigMap is mounted.
        let ds = docs
            .iter()
            .find(|d| kind(d).as_deref() == Some("DaemonSet"))
            .expect("a DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostPID"].as_bool(), Some(true));
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args, ["daemon", "--config", "/etc/pyebpf/pyebpf.yaml"]);
        let ports = container["ports"].as_sequence().unwrap();
        assert_eq!(ports.len(), 1, "only the metrics port is exposed");
        assert_eq!(ports[0]["name"].as_str(), Some("metrics"));
        assert_eq!(
            ports[0]["containerPort"].as_u64(),
            Some(metrics_port.into())
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"].as_str(),
                Some("metrics")
            );
        }
        // Confined by pyebpf's own seccomp profile, which the init container
        // (same image) writes where the kubelet looks for it.
        let sc = &container["securityContext"]["seccompProfile"];
        assert_eq!(sc["type"].as_str(), Some("Localhost"));
        let profile = sc["localhostProfile"].as_str().expect("localhostProfile");
        let init = &pod["initContainers"][0];
        assert_eq!(init["image"], container["image"]);
        let mount = init["volumeMounts"][0]["mountPath"].as_str().unwrap();
        let init_args: Vec<&str> = init["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            init_args,
            ["seccomp-profile", "--output", &format!("{mount}/{profile}")]
        );
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == init["volumeMounts"][0]["name"])
            .expect("the init container's volume");
        assert_eq!(
            volume["hostPath"]["path"].as_str(),
            Some("/var/lib/kubelet/seccomp")
        );
        let np = docs
            .iter()
            .find(|d| kind(d).as_deref() == Some("NetworkPolicy"))
            .expect("a NetworkPolicy, on by default");
        let ingress = np["spec"]["ingress"].as_sequence().unwrap();
        let allowed: Vec<u64> = ingress
            .iter()
            .flat_map(|r| r["ports"].as_sequence().unwrap())
            .filter_map(|p| p["port"].as_u64())
            .collect();
        assert_eq!(allowed, [u64::from(metrics_port)]);
        let mounts = container["volumeMounts"].as_sequence().unwrap();
        assert!(mounts
            .iter()
            .any(|m| m["mountPath"].as_str() == Some("/etc/pyebpf")));
    }

    #[test]
    fn ecs_task_definition_is_well_formed() {
        let (_, text) = deploy_file("ecs/task-definition.json");
        let td: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(td["pidMode"], "host");
        assert_eq!(td["networkMode"], "host");
        let c = &td["containerDefinitions"][0];
        assert_eq!(
            c["command"],
            serde_json::json!(["daemon", "--config", "/etc/pyebpf/pyebpf.yaml"])
        );
        // The health check asks the daemon, not only the binary.
        assert_eq!(
            c["healthCheck"]["command"],
            serde_json::json!(["CMD", "/usr/local/bin/pyebpf", "health"])
        );
        // ECS only accepts its own list of capability names (no BPF, PERFMON).
        let ecs_allows = ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];
        for cap in c["linuxParameters"]["capabilities"]["add"]
            .as_array()
            .unwrap()
        {
            assert!(ecs_allows.contains(&cap.as_str().unwrap()), "{cap}");
        }
    }

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let (path, _) = deploy_file("pyebpf.yaml");
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        // Everything in the example is a default value written out.
        assert_eq!(c, Config::default());

        // Its commented-out examples must be valid too.
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented = uncomment(&text);
        let c = parse(&uncommented, "uncommented pyebpf.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.discovery.include.len(), 1);
        assert_eq!(c.discovery.exclude.len(), 2);
        let inc = &c.discovery.include[0];
        assert_eq!(inc.command, None);
        assert!(inc
            .cmdline
            .as_ref()
            .unwrap()
            .is_match("python3.11 -m gunicorn app:wsgi"));
        assert_eq!(c.discovery.exclude[0].command.as_deref(), Some("pytest"));
        assert_eq!(
            c.discovery.exclude[1].container_id.as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(c.outputs.pprof_dir, Some(PprofDir::default()));
        let o = c.outputs.otlp.clone().unwrap();
        assert_eq!(o.endpoint(), "https://otel-collector.observability:4317");
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            o.headers,
            [("authorization".to_string(), "Bearer replace_me".to_string())]
        );
        assert_eq!(
            o.tls.unwrap().ca_file.unwrap(),
            PathBuf::from("/etc/pyebpf/otlp-ca.pem")
        );
        assert_eq!(o.host_name.as_deref(), Some("node-1"));
        assert_eq!(
            (o.timeout_secs, o.max_queue_bytes, o.max_retry_secs),
            (10, 64 << 20, 300)
        );
        let py = c.outputs.pyroscope.unwrap();
        assert_eq!(py.url, "http://127.0.0.1:4040");
        assert_eq!(py.application_name, "python");
        let auth = py.basic_auth.unwrap();
        assert_eq!(auth.username, "123456");
        assert!(!format!("{auth:?}").contains(&auth.password));
        assert_eq!(py.tenant_id.as_deref(), Some("team-a"));
    }

    #[test]
    fn full_configuration() {
        let text = r#"
listen: "[::1]:9000"
sampling: { rate_hz: 19, max_depth: 512, ring_buffer_bytes: 65536, native: true }
discovery:
  rescan_interval_secs: 5
  include:
    - command: gunicorn
      cmdline: 'app:wsgi$'
  exclude:
    - exe: /usr/bin/python3.11
aggregation:
  window_secs: 10
  retention_secs: 10
  max_processes: 5
  max_stacks_per_process: 100
  memory_budget_mib: 64
  process_memory_budget_mib: 4
metrics: { top_functions: 0, max_function_series: 1 }
outputs:
  pprof_dir: { path: /tmp/p, max_age_secs: 60, max_total_bytes: 1048576 }
  pyroscope:
    url: https://profiles.example.com:443/
    application_name: shop
    timeout_secs: 1
    max_queue_bytes: 1048576
    max_concurrent_uploads: 1
    max_retry_secs: 1
    basic_auth: { username: u, password: p }
    tenant_id: t
logging: { format: json, level: "warn,pyebpf=debug" }
"#;
        let c = parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.to_string(), "[::1]:9000");
        assert_eq!(
            c.sampling,
            Sampling {
                rate_hz: 19,
                max_depth: 512,
                ring_buffer_bytes: 65536,
                types: vec![crate::profile::ProfileKind::Cpu],
                native: true,
                native_stacks: false,
            }
        );
        assert_eq!(c.discovery.rescan_interval_secs, 5);
        assert_eq!(c.discovery.include[0].command.as_deref(), Some("gunicorn"));
        assert_eq!(
            c.aggregation,
            Aggregation {
                window_secs: 10,
                retention_secs: 10,
                max_processes: 5,
                max_stacks_per_process: 100,
                memory_budget_mib: 64,
                process_memory_budget_mib: 4,
                per_thread: false,
            }
        );
        assert_eq!(
            c.metrics,
            Metrics {
                top_functions: 0,
                max_function_series: 1
            }
        );
        let p = c.outputs.pprof_dir.unwrap();
        assert_eq!(p.path, Path::new("/tmp/p"));
        let y = c.outputs.pyroscope.unwrap();
        assert_eq!(y.url, "https://profiles.example.com:443/");
        assert_eq!(
            y.basic_auth,
            Some(BasicAuth {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(y.tenant_id.as_deref(), Some("t"));
        assert_eq!((y.max_queue_bytes, y.max_concurrent_uploads), (1 << 20, 1));
        assert_eq!(c.logging.format, LogFormat::Json);
        assert_eq!(c.logging.level, "warn,pyebpf=debug");
        assert!(c.discovery.selects(&labels()));
    }

    #[test]
    fn unknown_keys_are_reported_where_they_are() {
        let (line, col, msg) = err("sampling:\n  rate_hz: 99\n  rte_hz: 5\n");
        assert_eq!((line, col), (3, 3));
        assert!(
            msg.starts_with("sampling: unknown field `rte_hz`, expected one of"),
            "{msg}"
        );
        assert!(msg.contains("`rate_hz`"), "{msg}");

        let (line, col, msg) = err("# top\nlisten: 127.0.0.1:1\nsamplng: {}\n");
        assert_eq!((line, col), (3, 1));
        assert!(
            msg.starts_with("unknown field `samplng`, expected one of"),
            "{msg}"
        );

        let (line, col, msg) = err("discovery:\n  include:\n    - command: x\n      pid: 3\n");
        assert_eq!((line, col), (4, 7));
        assert!(
            msg.starts_with("discovery.include[0]: unknown field `pid`"),
            "{msg}"
        );

        let (line, _, msg) =
            err("outputs:\n  pyroscope:\n    basic_auth: {username: a, password: b, x: 1}\n");
        assert_eq!(line, 3);
        assert!(msg.contains("unknown field `x`"), "{msg}");
    }

    #[test]
    fn pyroscope_queue_options() {
        let y = parse("outputs:\n  pyroscope: {url: http://h:4040}\n", "t")
            .unwrap()
            .outputs
            .pyroscope
            .unwrap();
        assert_eq!((y.max_queue_bytes, y.max_concurrent_uploads), (64 << 20, 8));
        let y = parse(
            "outputs:\n  pyroscope:\n    max_queue_bytes: 17179869184\n    \
             max_concurrent_uploads: 256\n",
            "t",
        )
        .unwrap()
        .outputs
        .pyroscope
        .unwrap();
        assert_eq!(
            (y.max_queue_bytes, y.max_concurrent_uploads),
            (16 << 30, 256)
        );

        // The removed option is refused where it is, naming its replacement.
        for value in ["120", "0", "x", "[1]", "{a: 1}", "null"] {
            let text = format!(
                "outputs:\n  pyroscope:\n    url: http://h:4040\n    max_queue_windows: {value}\n"
            );
            let (line, col, msg) = err(&text);
            assert_eq!((line, col), (4, 24), "{text}");
            assert!(
                msg.starts_with(
                    "outputs.pyroscope.max_queue_windows: max_queue_windows was removed"
                ),
                "{msg}"
            );
            assert!(msg.contains("use max_queue_bytes"), "{msg}");
        }

        // Wrong types and values, at the value.
        for key in ["max_queue_bytes", "max_concurrent_uploads"] {
            for (value, what) in [
                ("\"64MiB\"", "invalid type: string \"64MiB\""),
                ("1.5", "invalid type: floating point"),
                ("true", "invalid type: boolean"),
                ("[8]", "invalid type: sequence"),
                ("-1", "-1 is out of range"),
                ("0", "0 is out of range"),
            ] {
                let text = format!("outputs:\n  pyroscope:\n    {key}: {value}\n");
                let (line, col) = err_at(&text, &[&format!("outputs.pyroscope.{key}: "), what]);
                assert_eq!((line, col), (3, key.len() + 7), "{text}");
            }
        }
    }

    #[test]
    fn message_format() {
        let e = parse("sampling:\n  rate_hz: 0\n", "pyebpf.yaml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pyebpf.yaml:2:12: sampling.rate_hz: 0 is out of range 1..=10000"
        );
    }

    #[test]
    fn api_settings_parse_and_bad_host_names_are_located() {
        let c = parse(
            "api:\n  max_query_mib: 8\n  show_cmdline: true\n  allowed_hosts: [Pyebpf.Svc, node-1]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.api.max_query_bytes(), 8 << 20);
        assert!(c.api.show_cmdline);
        assert_eq!(c.api.allowed_hosts, ["pyebpf.svc", "node-1"]);
        let (line, _) = err_at(
            "api:\n  allowed_hosts:\n    - ok.example\n    - \"evil/x\"\n",
            &["api.allowed_hosts", "`evil/x` is not a host name"],
        );
        assert!(line >= 2, "{line}");
        let (line, _) = err_at("api:\n  show_cmdline: yes please\n", &["api.show_cmdline"]);
        assert_eq!(line, 2);
    }

    #[test]
    fn range_violations_point_at_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("sampling", "rate_hz", "0 is out of range 1..=10000"),
            ("sampling", "rate_hz", "10001 is out of range 1..=10000"),
            ("sampling", "rate_hz", "-1 is out of range 1..=10000"),
            ("sampling", "max_depth", "0 is out of range 1..=4096"),
            ("sampling", "max_depth", "4097 is out of range 1..=4096"),
            (
                "sampling",
                "ring_buffer_bytes",
                "65535 is out of range 65536..=1073741824",
            ),
            (
                "sampling",
                "ring_buffer_bytes",
                "4294967296 is out of range 65536..=1073741824",
            ),
            (
                "discovery",
                "rescan_interval_secs",
                "0 is out of range 1..=3600",
            ),
            (
                "discovery",
                "rescan_interval_secs",
                "3601 is out of range 1..=3600",
            ),
            ("aggregation", "window_secs", "0 is out of range 1..=3600"),
            (
                "aggregation",
                "window_secs",
                "3601 is out of range 1..=3600",
            ),
            (
                "aggregation",
                "retention_secs",
                "86401 is out of range 1..=86400",
            ),
            (
                "aggregation",
                "max_processes",
                "0 is out of range 1..=65536",
            ),
            (
                "aggregation",
                "max_processes",
                "65537 is out of range 1..=65536",
            ),
            (
                "aggregation",
                "memory_budget_mib",
                "15 is out of range 16..=65536",
            ),
            (
                "aggregation",
                "process_memory_budget_mib",
                "0 is out of range 1..=65536",
            ),
            (
                "aggregation",
                "max_stacks_per_process",
                "0 is out of range 1..=10000000",
            ),
            ("metrics", "top_functions", "101 is out of range 0..=100"),
            ("api", "max_query_mib", "0 is out of range 1..=4096"),
            ("api", "max_query_mib", "4097 is out of range 1..=4096"),
            (
                "metrics",
                "max_function_series",
                "0 is out of range 1..=1000000",
            ),
        ];
        for (section, key, what) in cases {
            let value = what.split(' ').next().unwrap();
            let text = format!("# comment\n{section}:\n  {key}: {value}\n");
            let (line, col) = err_at(&text, &[&format!("{section}.{key}: {what}")]);
            assert_eq!((line, col), (3, key.len() + 5), "{text}");
        }
        let nested: &[(&str, &str)] = &[
            (
                "pprof_dir: {max_age_secs: 59}",
                "59 is out of range 60..=31536000",
            ),
            (
                "pprof_dir: {max_total_bytes: 1}",
                "1 is out of range 1048576..=1099511627776",
            ),
            ("pyroscope: {timeout_secs: 0}", "0 is out of range 1..=300"),
            (
                "pyroscope: {max_queue_bytes: 0}",
                "0 is out of range 1048576..=17179869184",
            ),
            (
                "pyroscope: {max_queue_bytes: 17179869185}",
                "17179869185 is out of range 1048576..=17179869184",
            ),
            (
                "pyroscope: {max_concurrent_uploads: 0}",
                "0 is out of range 1..=256",
            ),
            (
                "pyroscope: {max_concurrent_uploads: 257}",
                "257 is out of range 1..=256",
            ),
            (
                "pyroscope: {max_retry_secs: 86401}",
                "86401 is out of range 1..=86400",
            ),
        ];
        for (yaml, what) in nested {
            let text = format!("outputs:\n  {yaml}\n");
            let (line, _) = err_at(&text, &["outputs.", what]);
            assert_eq!(line, 2);
        }
    }

    #[test]
    fn retention_shorter_than_window() {
        let text = "aggregation:\n  retention_secs: 30\n  window_secs: 60\n";
        let (line, col, msg) = err(text);
        assert_eq!((line, col), (2, 19));
        assert!(
            msg.starts_with(
                "aggregation.retention_secs: 30 is less than aggregation.window_secs (60)"
            ),
            "{msg}"
        );
        // Retention left at its default (600): the window is what was written.
        let (line, col, msg) = err("aggregation:\n  window_secs: 3600\n");
        assert_eq!((line, col), (2, 16));
        assert!(msg.contains("600 is less than"), "{msg}");
        // pprof files must outlive a window.
        let (line, _, msg) =
            err("aggregation: {window_secs: 600}\noutputs:\n  pprof_dir:\n    max_age_secs: 120\n");
        assert_eq!(line, 4);
        assert!(
            msg.starts_with("outputs.pprof_dir.max_age_secs: 120 is less than"),
            "{msg}"
        );
    }

    #[test]
    fn bad_regex() {
        let text = "discovery:\n  exclude:\n    - cmdline: 'celery ('\n";
        let (line, col) = err_at(
            text,
            &[
                "discovery.exclude[0].cmdline: `celery (` is not a valid regular expression",
                "unclosed group",
            ],
        );
        assert_eq!((line, col), (3, 16));
    }

    #[test]
    fn rule_without_fields() {
        for (text, pos) in [
            ("discovery:\n  include:\n    - {}\n", (3, 7)),
            ("discovery:\n  include:\n    - command: x\n    -\n", (4, 6)),
            ("discovery:\n  exclude:\n    - cmdline: ~\n", (3, 7)),
        ] {
            let (line, col, msg) = err(text);
            assert!(
                msg.ends_with(
                    "a rule must set at least one of command, cmdline, exe, container_id"
                ),
                "{msg}"
            );
            assert!(msg.starts_with("discovery."), "{msg}");
            assert_eq!((line, col), pos, "{text:?}: {msg}");
        }
    }

    #[test]
    fn rule_field_checks() {
        let (line, _) = err_at(
            "discovery:\n  include:\n    - command: a-very-long-command-name\n",
            &["longer than 15 bytes", "`a-very-long-com`"],
        );
        assert_eq!(line, 3);
        let (line, _) = err_at(
            "discovery:\n  include:\n    - exe: python3.11\n",
            &["discovery.include[0].exe: `python3.11` is not an absolute path"],
        );
        assert_eq!(line, 3);
        let (line, _) = err_at(
            "discovery:\n  include:\n    - container_id: abc\n",
            &["prefix of at least 12"],
        );
        assert_eq!(line, 3);
    }

    #[test]
    fn bad_url() {
        for (url, what) in [
            ("ftp://x", "is not an http:// or https:// URL"),
            ("127.0.0.1:4040", "is not an http:// or https:// URL"),
            ("http://", "has no host"),
            ("http:///x", "has no host"),
            ("https://user:pw@host", "basic_auth"),
            ("http://host:port", "invalid port"),
            ("http://h ost", "whitespace"),
        ] {
            let text = format!("outputs:\n  pyroscope:\n    url: '{url}'\n");
            let (line, col) = err_at(&text, &["outputs.pyroscope.url: ", what]);
            assert_eq!((line, col), (3, 10), "{url}");
        }
        for ok in [
            "http://pyroscope:4040",
            "https://profiles-prod-001.grafana.net",
            "http://[::1]:4040/",
            "http://10.0.0.1/prefix",
        ] {
            check_http_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn wrong_types() {
        let cases: &[(&str, (usize, usize), &str)] = &[
            (
                "sampling:\n  rate_hz: fast\n",
                (2, 12),
                "sampling.rate_hz: invalid type: string \"fast\", expected an integer in 1..=10000",
            ),
            (
                "sampling:\n  rate_hz: 1.5\n",
                (2, 12),
                "invalid type: floating point",
            ),
            (
                "sampling: 5\n",
                (1, 11),
                "invalid type: integer `5`, expected struct Sampling",
            ),
            (
                "discovery:\n  include: gunicorn\n",
                (2, 12),
                "discovery.include: invalid type: string \"gunicorn\", expected a sequence",
            ),
            (
                "discovery:\n  include:\n    - gunicorn\n",
                (3, 7),
                "expected a rule",
            ),
            (
                "listen: localhost:7464\n",
                (1, 9),
                "listen: `localhost:7464` is not an IP address and port",
            ),
            ("listen: 7464\n", (1, 9), "is not an IP address and port"),
            (
                "logging:\n  format: xml\n",
                (2, 11),
                "logging.format: unknown variant `xml`, expected `text` or `json`",
            ),
            (
                "logging:\n  level: 'info,[unclosed'\n",
                (2, 10),
                "logging.level: `info,[unclosed` is not a valid filter directive",
            ),
            (
                "outputs:\n  pprof_dir:\n    path: profiles\n",
                (3, 11),
                "outputs.pprof_dir.path: `profiles` is not an absolute path",
            ),
            (
                "outputs:\n  pyroscope:\n    basic_auth: {username: u}\n",
                (3, 17),
                "missing field `password`",
            ),
            (
                "outputs:\n  pyroscope:\n    tenant_id: ''\n",
                (3, 16),
                "outputs.pyroscope.tenant_id: must not be empty",
            ),
            (
                "outputs:\n  pyroscope:\n    application_name: 'a b'\n",
                (3, 23),
                "contains ' '",
            ),
            (
                "- 1\n",
                (1, 1),
                "invalid type: sequence, expected struct Config",
            ),
            (
                "sampling: {rate_hz: 1, rate_hz: 2}\n",
                (1, 11),
                "sampling: duplicate field `rate_hz`",
            ),
        ];
        for (text, pos, what) in cases {
            let (line, col, msg) = err(text);
            assert!(msg.contains(what), "{text:?}: {msg:?} lacks {what:?}");
            assert!(!msg.contains(" at line "), "{msg:?}");
            assert_eq!((line, col), *pos, "{text:?}: {msg}");
        }
    }

    #[test]
    fn syntax_errors_have_positions() {
        let (line, col, msg) = err("sampling:\n  rate_hz: 99\n max_depth: 3\n");
        assert!(line >= 2, "{line}:{col}: {msg}");
        assert!(!msg.is_empty());
        let (line, _, msg) = err("sampling: {rate_hz: 1\n");
        assert!(line >= 1, "{msg}");
    }

    #[test]
    fn rules_match_all_given_fields() {
        let l = labels();
        assert!(rule("command: gunicorn").matches(&l));
        assert!(!rule("command: celery").matches(&l));
        assert!(rule("cmdline: 'gunicorn app:'").matches(&l));
        assert!(!rule("cmdline: '^gunicorn'").matches(&l));
        assert!(rule("exe: /usr/local/bin/python3.11").matches(&l));
        assert!(!rule("exe: /usr/bin/python3.11").matches(&l));
        assert!(rule("{command: gunicorn, exe: /usr/local/bin/python3.11}").matches(&l));
        assert!(!rule("{command: gunicorn, exe: /usr/bin/python3.11}").matches(&l));
        // Container ids: full, or a prefix of at least 12 characters.
        assert!(rule("container_id: '0123456789ab'").matches(&l));
        assert!(rule(
            "container_id: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        )
        .matches(&l));
        assert!(!rule("container_id: '123456789abc'").matches(&l));
        let host = ProcessLabels {
            container_id: None,
            ..labels()
        };
        assert!(!rule("container_id: '0123456789ab'").matches(&host));
        // A rule built by hand with a short prefix matches only exactly.
        let short = Rule {
            command: None,
            cmdline: None,
            exe: None,
            container_id: Some("0123".into()),
        };
        assert!(!short.matches(&l));
    }

    #[test]
    fn discovery_selection() {
        let l = labels();
        let d = |text: &str| parse(text, "t").unwrap().discovery;
        assert!(d("").selects(&l));
        assert!(d("discovery: {include: [{command: gunicorn}, {command: x}]}").selects(&l));
        assert!(!d("discovery: {include: [{command: x}]}").selects(&l));
        assert!(!d("discovery: {exclude: [{cmdline: wsgi}]}").selects(&l));
        assert!(!d(
            "discovery: {include: [{command: gunicorn}], exclude: [{exe: /usr/local/bin/python3.11}]}"
        )
        .selects(&l));
    }

    #[test]
    fn locate_finds_values() {
        let text = "a:\n  b: 1\n  c:\n    d: [1, 2]\n";
        let at = |p: &[&str]| locate(text, p).map(|l| (l.line(), l.column()));
        assert_eq!(at(&["a", "b"]), Some((2, 6)));
        assert_eq!(at(&["a", "c", "d"]), Some((4, 8)));
        assert_eq!(at(&["a", "x"]), None);
        assert_eq!(at(&["a", "b", "c"]), None);
    }

    #[test]
    fn profile_types() {
        use crate::profile::ProfileKind;
        let c =
            parse("sampling:\n  types: [cpu, off-cpu]\n", "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.sampling.types, [ProfileKind::Cpu, ProfileKind::OffCpu]);
        assert!(c.sampling.on_cpu() && c.sampling.off_cpu());
        let c = parse("sampling:\n  types: [wall]\n", "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.sampling.on_cpu() && c.sampling.off_cpu());
        let d = Config::default();
        assert!(d.sampling.on_cpu() && !d.sampling.off_cpu());
        for (bad, why) in [
            ("[]", "empty"),
            ("[gpu]", "unknown profile type \"gpu\""),
            ("[cpu, cpu]", "listed twice"),
        ] {
            let e = parse(&format!("sampling:\n  types: {bad}\n"), "t").unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}
