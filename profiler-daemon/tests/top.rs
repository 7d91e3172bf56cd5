//! End to end: `pyebpf top` against real Python 3.11 workloads and the real
//! BPF sampler: `--once --json` numbers, the interactive view driven through
//! tmux (keys in, screen out), and daemon mode over the HTTP API.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pyebpf::model::top::TopSnapshot;

/// A workload with its own service name (OTEL_SERVICE_NAME), so that the
/// process view tells processes apart.
fn workload(args: &[&str], service: &str) -> Workload {
    use std::io::BufRead;
    let mut child = Command::new(Interp::Shared.path())
        .arg(scenarios())
        .args(args)
        .env("OTEL_SERVICE_NAME", service)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line.trim(), "ready", "workload did not start");
    Workload { child }
}

fn top(args: &[&str]) -> Output {
    Command::new(pyebpf())
        .arg("top")
        .args(args)
        .output()
        .expect("run pyebpf top")
}

fn snapshot_of(out: &Output) -> TopSnapshot {
    assert_success(out);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON snapshot ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Own samples of `qualname` in `pid`, over every line.
fn own_of(s: &TopSnapshot, pid: u32, qualname: &str) -> u64 {
    s.functions
        .iter()
        .filter(|r| r.pid == pid && r.qualname == qualname)
        .map(|r| r.own)
        .sum()
}

fn dump(s: &TopSnapshot) -> String {
    s.functions
        .iter()
        .take(15)
        .map(|r| format!("{:>6} {:>6} {} [{}]", r.own, r.total, r.label(), r.pid))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1:2:3 CPU split, line level: shares within 5 points, exact hot lines.
#[test]
fn bpf_once_json_matches_a_known_cpu_split() {
    if !bpf_available() {
        return;
    }
    let w = workload(&["split"], "top-split");
    let pid = w.pid().to_string();
    let out = top(&[
        "--once",
        "--json",
        "--local",
        "--line",
        "--duration",
        "6",
        "--rate",
        "2999",
        "--pid",
        &pid,
    ]);
    let s = snapshot_of(&out);
    assert_eq!(s.rate_hz, 2999);
    assert!(s.processes_profiled >= 1);
    assert!(s.window_secs >= 5, "{}", s.window_secs);
    assert_eq!(s.processes.len(), 1, "{:?}", s.processes);
    assert_eq!(s.processes[0].pid, w.pid());
    assert_eq!(s.processes[0].service, "top-split");
    assert_eq!(s.processes[0].samples, s.total_samples);
    assert!(s.functions.iter().all(|r| r.pid == w.pid()));
    // A high rate, so that even a busy machine, which leaves the workload
    // a fraction of a CPU, gives 1000+ samples: the standard error of a
    // share is then 1.6 points at most, and 5 points over 3 sigma.
    let total = s.total_samples as f64;
    assert!(total > 1000.0, "too few samples: {total}\n{}", dump(&s));
    let m = markers();
    let file = scenarios().display().to_string();
    for (name, truth) in [
        ("split_a", 1.0 / 6.0),
        ("split_b", 2.0 / 6.0),
        ("split_c", 3.0 / 6.0),
    ] {
        let share = own_of(&s, w.pid(), name) as f64 / total;
        eprintln!("{name}: {share:.3} (truth {truth:.3})");
        assert!(
            (share - truth).abs() < 0.05,
            "{name}: {share:.3} vs {truth:.3}\n{}",
            dump(&s)
        );
        // Line level: the hottest line of each is its marked line.
        let hot = s
            .functions
            .iter()
            .filter(|r| r.qualname == name)
            .max_by_key(|r| r.own)
            .unwrap();
        assert_eq!(hot.line, Some(m[&format!("HOT={name}")]), "{hot:?}");
        assert_eq!(hot.filename, file);
        assert_eq!(
            hot.label(),
            frame(name, &format!("HOT={name}")),
            "same shape as record's frames"
        );
    }
    // Totals: loop_forever is on every stack and cpu_split on every split_*
    // stack. At line level each has a row per line on the stack (a call
    // site, mostly), and every stack holds one frame of each: they add up.
    let total_of = |q: &str| -> u64 {
        s.functions
            .iter()
            .filter(|r| r.qualname == q)
            .map(|r| r.total)
            .sum()
    };
    assert!(
        total_of("loop_forever") as f64 > 0.95 * total,
        "{}",
        dump(&s)
    );
    let split_total = total_of("cpu_split");
    let split_own: u64 = ["split_a", "split_b", "split_c"]
        .iter()
        .map(|n| own_of(&s, w.pid(), n))
        .sum();
    assert!(split_total >= split_own, "{}", dump(&s));
}

/// A tmux server of its own (its own socket), killed on drop.
struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tmux {
    fn start(name: &str) -> Tmux {
        let socket = format!("pyebpf-top-{name}-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let t = Tmux { socket, dir };
        let status = t
            .cmd()
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                "200",
                "-y",
                "50",
            ])
            .args([
                "env",
                "PS1=$ ",
                "TERM=xterm-256color",
                "bash",
                "--norc",
                "--noprofile",
            ])
            .status()
            .expect("tmux (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-L").arg(&self.socket);
        c
    }

    /// Keys by tmux name (`Enter`, `Escape`, `C-c`, `Tab`, `Down`, `q`).
    fn keys(&self, keys: &[&str]) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "t"])
            .args(keys)
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Types `text` literally, then Enter.
    fn line(&self, text: &str) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "t", "-l", text])
            .status()
            .unwrap();
        assert!(ok.success());
        self.keys(&["Enter"]);
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the pane shows the alternate screen (a full-screen program).
    fn alternate_on(&self) -> bool {
        let out = self
            .cmd()
            .args(["display-message", "-p", "-t", "t", "#{alternate_on}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Polls the screen until `ok` holds; panics with the screen after
    /// `secs` seconds.
    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if ok(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

/// The data rows of the table on `screen`: the lines after the column
/// titles, up to the first empty one.
fn data_rows(screen: &str, title: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.contains(title))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The own% of a function-table row (`>   52.3   ...`).
fn own_percent(row: &str) -> f64 {
    row.trim_start_matches('>')
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no own% in {row:?}"))
}

/// After top exited: the alternate screen is left, the exit status is 0,
/// the terminal modes are those from before (raw mode off, byte for byte),
/// and the shell's own screen is back. `tag` tells runs apart.
fn shell_is_back(t: &Tmux, before: &Path, tag: &str) {
    assert!(!t.alternate_on(), "still on the alternate screen");
    t.line(&format!("echo \"exit-{tag}=$?\""));
    let screen = t.wait("exit status", 10, |s| s.contains(&format!("\nexit-{tag}=")));
    assert!(
        screen.contains(&format!("\nexit-{tag}=0")),
        "top failed:\n{screen}"
    );
    t.line(&format!(
        "stty -g | cmp -s - {} && echo restored-{tag}-same || echo restored-{tag}-DIFFERENT",
        before.display()
    ));
    let screen = t.wait("stty comparison", 10, |s| {
        s.contains(&format!("\nrestored-{tag}-"))
    });
    assert!(
        screen.contains(&format!("\nrestored-{tag}-same")),
        "terminal modes differ:\n{screen}"
    );
    // What the shell showed before top is on the screen again.
    assert!(screen.contains("$ stty -g > "), "{screen}");
}

/// The real interface in a real terminal: hot function on top, sorting,
/// filtering, process drill-down, pause, and `q` restoring the terminal.
#[test]
fn bpf_tui_in_tmux_keys_and_quit() {
    if !bpf_available() {
        return;
    }
    let plain = workload(&["plain"], "top-plain");
    let split = workload(&["split"], "top-split");
    let t = Tmux::start("keys");
    let before = t.file("stty.before");
    t.line(&format!("stty -g > {}", before.display()));
    t.line(&format!(
        "{} top --local --rate 999 --window 5 --pid {} --pid {}",
        pyebpf(),
        plain.pid(),
        split.pid()
    ));

    // The hot function at the top, with a plausible share (two processes
    // busy on one CPU each: plain_function is about half of all samples).
    let screen = t.wait("plain_function on top", 20, |s| {
        data_rows(s, "OWN%")
            .first()
            .is_some_and(|r| r.contains("plain_function (") && own_percent(r) > 0.0)
    });
    assert!(t.alternate_on(), "not on the alternate screen");
    assert!(screen.contains("mode local"), "{screen}");
    assert!(screen.contains("rate 999 Hz"), "{screen}");
    assert!(screen.contains("window last 5 s"), "{screen}");
    let screen = t.wait("a few seconds of data", 10, |s| {
        s.lines()
            .find(|l| l.contains("samples "))
            .and_then(|l| l.split("samples ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            // Enough for the share to be within a few points, even when
            // a loaded machine leaves the workloads a small slice of CPU.
            .is_some_and(|n| n > 200)
    });
    let rows = data_rows(&screen, "OWN%");
    let pct = own_percent(&rows[0]);
    assert!(
        rows[0].contains("plain_function (") && (25.0..=80.0).contains(&pct),
        "{screen}"
    );
    let def_line = markers()["HOT=plain"] - 2;
    assert!(
        rows[0].contains(&format!("scenarios.py:{def_line})")),
        "function level shows the def line:\n{screen}"
    );
    assert!(rows[0].contains(&plain.pid().to_string()) && rows[0].contains("top-plain"));

    // Sort by name: `<module>` first; back to own.
    t.keys(&["n"]);
    t.wait("sorted by name", 5, |s| {
        s.contains("sort name")
            && data_rows(s, "OWN%")
                .first()
                .is_some_and(|r| r.contains("<module> ("))
    });
    t.keys(&["o"]);
    t.wait("sorted by own", 5, |s| {
        s.contains("sort own")
            && data_rows(s, "OWN%")
                .first()
                .is_some_and(|r| r.contains("plain_function ("))
    });

    // Line level shows the hot line itself.
    t.keys(&["l"]);
    let hot = format!("scenarios.py:{})", markers()["HOT=plain"]);
    t.wait("line level", 5, |s| {
        s.contains("level line")
            && data_rows(s, "OWN%")
                .first()
                .is_some_and(|r| r.contains("plain_function (") && r.contains(&hot))
    });
    t.keys(&["l"]);

    // Text filter: typed after `/`, applied with Enter, cleared with Esc.
    t.keys(&["/"]);
    t.keys(&["-l", "SPLIT"]);
    t.wait("filter prompt", 5, |s| s.contains("filter: /SPLIT"));
    t.keys(&["Enter"]);
    let screen = t.wait("filtered rows", 5, |s| {
        let rows = data_rows(s, "OWN%");
        s.contains("filter \"SPLIT\"")
            && rows.len() >= 3
            && rows.iter().all(|r| r.to_lowercase().contains("split"))
    });
    assert!(!screen.contains("plain_function ("), "{screen}");
    t.keys(&["Escape"]);
    t.wait("filter cleared", 5, |s| {
        !s.contains("filter \"") && s.contains("plain_function (")
    });

    // Process view, paused so that its order holds still; Enter on the
    // split process shows only its functions.
    t.keys(&["Tab"]);
    t.wait("process view", 5, |s| {
        s.contains("SAMPLES") && s.contains("top-plain") && s.contains("top-split")
    });
    t.keys(&["p"]);
    let screen = t.wait("paused", 5, |s| s.contains("PAUSED"));
    let rows = data_rows(&screen, "SAMPLES");
    assert_eq!(rows.len(), 2, "{screen}");
    assert!(rows[0].starts_with('>'), "first row selected:\n{screen}");
    let at = rows
        .iter()
        .position(|r| r.contains(&split.pid().to_string()))
        .unwrap_or_else(|| panic!("no split process row:\n{screen}"));
    for _ in 0..at {
        t.keys(&["Down"]);
    }
    t.keys(&["Enter"]);
    let screen = t.wait("functions of the split process", 5, |s| {
        s.contains("OWN%") && s.contains(&format!("pid {}", split.pid()))
    });
    let rows = data_rows(&screen, "OWN%");
    assert!(rows[0].contains("split_c ("), "{screen}");
    assert!(!screen.contains("plain_function ("), "{screen}");
    assert!(rows.iter().all(|r| r.contains(&split.pid().to_string())));
    // Help overlay, closed by any key.
    t.keys(&["?"]);
    t.wait("help", 5, |s| s.contains("pyebpf top: keys"));
    t.keys(&["x"]);
    t.wait("help closed", 5, |s| !s.contains("pyebpf top: keys"));

    t.keys(&["q"]);
    t.wait("top to exit", 10, |s| {
        s.contains("$ ") && !s.contains("OWN%")
    });
    shell_is_back(&t, &before, "q");
}

/// Ctrl-C (in raw mode, a key, not a signal) quits cleanly too, and so
/// does SIGTERM.
#[test]
fn bpf_tui_ctrl_c_and_sigterm_restore_the_terminal() {
    if !bpf_available() {
        return;
    }
    let w = workload(&["plain"], "top-ctrl-c");
    let t = Tmux::start("ctrlc");
    let before = t.file("stty.before");
    t.line(&format!("stty -g > {}", before.display()));
    let cmd = format!("{} top --local --rate 199 --pid {}", pyebpf(), w.pid());
    t.line(&cmd);
    t.wait("plain_function", 20, |s| s.contains("plain_function ("));
    assert!(t.alternate_on());
    t.keys(&["C-c"]);
    t.wait("top to exit", 10, |s| !s.contains("OWN%"));
    shell_is_back(&t, &before, "ctrl-c");

    // SIGTERM from elsewhere: the terminal is restored as well.
    t.line(&cmd);
    t.wait("plain_function again", 20, |s| {
        s.contains("plain_function (")
    });
    let pid = pid_of(&cmd);
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    t.wait("top to exit on SIGTERM", 10, |s| !s.contains("OWN%"));
    shell_is_back(&t, &before, "sigterm");

    // The terminal itself going away (window closed, session killed): top
    // ends rather than run on with nobody to show anything to.
    t.line(&cmd);
    t.wait("plain_function once more", 20, |s| {
        s.contains("plain_function (")
    });
    let pid = pid_of(&cmd);
    let _ = t.cmd().arg("kill-server").status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_running(pid) {
        assert!(
            Instant::now() < deadline,
            "top {pid} still running 10 s after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the one process whose command line is `cmd`.
fn pid_of(cmd: &str) -> u32 {
    let out = Command::new("pgrep")
        .args(["-f", "-x", "--", cmd])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<u32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 1, "processes running {cmd:?}: {pids}");
    v[0]
}

/// Alive and not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// `pyebpf daemon`, killed on drop.
struct Daemon {
    child: Child,
    base: String,
}

impl Daemon {
    /// Sampling at `rate_hz` (a config file), on a free port.
    fn start(dir: &Path, rate_hz: u32) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("pyebpf.yaml");
        std::fs::write(&config, format!("sampling:\n  rate_hz: {rate_hz}\n")).unwrap();
        let child = Command::new(pyebpf())
            .args([
                "daemon",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pyebpf daemon");
        let d = Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(port, "/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "daemon not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET on localhost: status and body.
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `setpriv` as nobody with no capabilities at all, running a copy of the
/// binary that nobody can execute wherever the build put it.
fn unprivileged(bin_dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(bin_dir.join("pyebpf"))
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

fn world_runnable_copy() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("pyebpf");
    std::fs::copy(pyebpf(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Daemon mode: no BPF in `top`, no privileges, numbers from `/api/top`,
/// which refuses bad parameters; local mode without privileges says what
/// it lacks.
#[test]
fn bpf_daemon_mode_needs_no_privileges() {
    if !bpf_available() {
        return;
    }
    let w = workload(&["plain"], "top-remote");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 999);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(d.port(), "/processes")
        .1
        .contains(&format!("\"pid\":{}", w.pid()))
    {
        assert!(
            Instant::now() < deadline,
            "daemon never profiled the workload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let bin = world_runnable_copy();
    let pid = w.pid().to_string();
    let out = unprivileged(
        bin.path(),
        &[
            "top",
            "--once",
            "--json",
            "--daemon",
            &d.base,
            "--duration",
            "3",
            "--pid",
            &pid,
        ],
    );
    let s = snapshot_of(&out);
    assert_eq!(s.rate_hz, 999, "the daemon's rate");
    assert_eq!(s.window_secs, 3);
    assert!(s.total_samples > 100, "{}", dump(&s));
    assert_eq!(s.processes.len(), 1);
    assert_eq!(s.processes[0].service, "top-remote");
    let own = own_of(&s, w.pid(), "plain_function") as f64;
    assert!(
        own / s.total_samples as f64 > 0.7,
        "plain_function not hot:\n{}",
        dump(&s)
    );
    assert_eq!(s.functions[0].qualname, "plain_function");
    // The text table, from the same daemon.
    let out = unprivileged(
        bin.path(),
        &[
            "top",
            "--once",
            "--daemon",
            &d.base,
            "--duration",
            "1",
            "--pid",
            &pid,
        ],
    );
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("pyebpf top: daemon {}, rate 999 Hz, ", d.base)),
        "{text}"
    );
    // Function level: the function's first line.
    let def_line = markers()["HOT=plain"] - 2;
    assert!(
        text.contains(&format!(
            "plain_function ({}:{def_line})",
            scenarios().display()
        )),
        "{text}"
    );
    assert!(text.contains("top-remote"), "{text}");

    // The endpoint itself.
    let (status, body) = get(d.port(), &format!("/api/top?seconds=all&line=1&pid={pid}"));
    assert_eq!(status, 200, "{body}");
    let s: TopSnapshot = serde_json::from_str(&body).unwrap();
    let hot = &s.functions[0];
    assert_eq!(
        (hot.qualname.as_str(), hot.line),
        ("plain_function", Some(markers()["HOT=plain"]))
    );
    for path in [
        "/api/top?seconds=0",
        "/api/top?seconds=999999",
        "/api/top?line=2",
        "/api/top?pid=abc",
        "/api/top?pid=1&bogus=1",
        "/api/top?service=",
        "/api/top?seconds=1&seconds=2",
    ] {
        let (status, body) = get(d.port(), path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body.lines().count(), 1, "{path}: {body}");
    }

    // Nothing there: a clear error, not a hang or a local fallback.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = top(&[
        "--once",
        "--daemon",
        &format!("127.0.0.1:{closed}"),
        "--duration",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no pyebpf daemon answers at http://127.0.0.1:{closed}"
        )),
        "{err}"
    );

    // Local mode without privileges: one clear line, with the way out.
    let out = unprivileged(bin.path(), &["top", "--once", "--local", "--duration", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pyebpf top (local mode) needs CAP_BPF")
            && err.contains("missing: CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE")
            && err.contains("run `pyebpf daemon`"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // And the interface refuses to start without a terminal.
    let out = top(&["--daemon", &d.base]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a terminal; for scripts use --once"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
