//! `pyebpf top`'s remote source against the daemon's real HTTP router, over
//! loopback (no BPF needed). An integration test because it joins two
//! frontends that do not import each other.
use std::sync::Arc;

use pyebpf::daemon::http;
use pyebpf::model::api::ApiSource;
use pyebpf::model::labels::ProcessLabels;
use pyebpf::model::query::{ProcessView, QueryError, Selector};
use pyebpf::model::top::TopQuery;
use pyebpf::profile::{Frame, Profile};
use pyebpf::top::source::{Probe, RemoteSource, TopSource};

/// One process with three samples of `hot`.
struct One;

impl ApiSource for One {
    fn processes(&self) -> Vec<ProcessView> {
        vec![ProcessView {
            labels: ProcessLabels {
                pid: 9,
                command: "python3".into(),
                service: "svc".into(),
                ..Default::default()
            },
            python_version: "3.11.9".into(),
            python: "3.11".into(),
            status: "profiled",
            since: 0,
            samples: 3,
            memory_bytes: 0,
            evicted_samples: 0,
            reason: None,
            replaced_by: None,
            types: Vec::new(),
            gil_wait_seconds: None,
            wall_seconds: None,
        }]
    }
    fn profile(&self, _: &Selector, _: u32) -> Result<Profile, QueryError> {
        let mut p = Profile::new(50);
        p.add(
            vec![Frame::Python {
                qualname: "hot".into(),
                filename: "/a b/ü.py".into(),
                line: 4,
                first_line: 3,
            }],
            3,
        );
        Ok(p)
    }
    fn metrics_text(&self) -> String {
        String::new()
    }
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn retention_secs(&self) -> u32 {
        30
    }
}

/// The real router over [`One`] with `access`, on loopback: the runtime,
/// the address, the sender that stops it and the server task.
fn serve_one(
    access: http::Access,
) -> (
    Arc<tokio::runtime::Runtime>,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(http::serve(listener, Arc::new(One), access, async {
        let _ = rx.await;
    }));
    (rt, addr, tx, server)
}

/// The remote source against the real router, over loopback.
#[test]
fn remote_source_reads_the_api_and_reports_errors() {
    let (rt, addr, tx, server) = serve_one(http::Access::default());
    let mut src = RemoteSource::new(&addr.to_string(), rt.clone(), None).unwrap();
    src.probe().unwrap();
    assert_eq!(src.mode().describe(), format!("daemon http://{addr}"));
    let q = TopQuery {
        seconds: Some(10),
        service: Some("svc".into()),
        line_level: true,
        ..Default::default()
    };
    let s = src.snapshot(&q).unwrap();
    assert_eq!(s.total_samples, 3);
    assert_eq!(s.rate_hz, 50);
    assert_eq!(s.functions[0].filename, "/a b/ü.py");
    assert_eq!(s.functions[0].line, Some(4));
    assert_eq!(s.functions[0].python, "3.11");
    assert_eq!(s.processes[0].python, "3.11");
    // Beyond the retention: the daemon's 400 message comes through.
    let err = src
        .snapshot(&TopQuery {
            seconds: Some(31),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("400") && err.contains("from 1 to 30"), "{err}");
    tx.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
    // Nobody there any more (a new client: the old one may hold a
    // kept-alive connection the server closed).
    let fresh = RemoteSource::new(&addr.to_string(), rt.clone(), None).unwrap();
    match fresh.probe() {
        Err(Probe::Unreachable(u)) => assert_eq!(u, format!("http://{addr}")),
        other => panic!("{other:?}"),
    }
    Box::new(src).shutdown().unwrap();
}

/// A daemon with `api.token_file`: top without the token is told which flag
/// to give; with `--token-file`'s token it reads the snapshot.
#[test]
fn remote_source_presents_the_token() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "0123456789abcdef-secret\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token = || pyebpf::daemon::access::load_token(&file).unwrap();
    let (rt, addr, tx, server) = serve_one(http::Access {
        token: Some(token()),
        metrics_only: false,
    });
    let without = RemoteSource::new(&addr.to_string(), rt.clone(), None).unwrap();
    match without.probe() {
        Err(Probe::Failed(m)) => assert!(m.contains("401") && m.contains("--token-file"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut with = RemoteSource::new(&addr.to_string(), rt.clone(), Some(token())).unwrap();
    with.probe().unwrap();
    assert_eq!(
        with.snapshot(&TopQuery::default()).unwrap().total_samples,
        3
    );
    tx.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
}
