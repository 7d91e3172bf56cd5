//! Worker deaths in gunicorn's error log (level info).

use serde::Serialize;

/// One worker that ended abnormally, as the master logged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Death {
    pub pid: u32,
    /// `SIGSEGV`, `exit code 1` or `timeout`.
    pub how: String,
    pub line: String,
}

/// The number after `(pid:` in `line`.
fn pid_in(line: &str) -> Option<u32> {
    let rest = line.split_once("(pid:")?.1;
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Deaths logged in `text`: gunicorn's arbiter writes "Worker (pid:N) was
/// sent SIGNAME!", "Worker (pid:N) exited with code N." and "WORKER TIMEOUT
/// (pid:N)" (a worker that stopped answering its heartbeat, killed next).
pub fn deaths(text: &str) -> Vec<Death> {
    let mut out = Vec::new();
    for line in text.lines() {
        let how = if let Some(rest) = line.split_once(") was sent ").map(|p| p.1) {
            rest.split(['!', ' ']).next().unwrap_or(rest).to_string()
        } else if let Some(rest) = line.split_once(") exited with code ").map(|p| p.1) {
            format!("exit code {}", rest.trim_end_matches('.').trim())
        } else if line.contains("WORKER TIMEOUT") {
            "timeout".to_string()
        } else {
            continue;
        };
        if let Some(pid) = pid_in(line) {
            out.push(Death {
                pid,
                how,
                line: line.trim().to_string(),
            });
        }
    }
    out
}

/// Workers booted in `text` ("Booting worker with pid: N").
pub fn boots(text: &str) -> usize {
    text.lines()
        .filter(|l| l.contains("Booting worker with pid:"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_deaths() {
        let log = "[2026-01-01 00:00:00 +0000] [7] [INFO] Booting worker with pid: 9\n\
                   [2026-01-01 00:00:01 +0000] [7] [ERROR] Worker (pid:9) was sent SIGSEGV!\n\
                   [2026-01-01 00:00:01 +0000] [7] [ERROR] Worker (pid:10) was sent SIGKILL! Perhaps out of memory?\n\
                   [2026-01-01 00:00:02 +0000] [7] [ERROR] Worker (pid:11) exited with code 3.\n\
                   [2026-01-01 00:00:03 +0000] [7] [CRITICAL] WORKER TIMEOUT (pid:12)\n\
                   [2026-01-01 00:00:04 +0000] [7] [INFO] Booting worker with pid: 13\n";
        let d = deaths(log);
        let got: Vec<(u32, &str)> = d.iter().map(|d| (d.pid, d.how.as_str())).collect();
        assert_eq!(
            got,
            [
                (9, "SIGSEGV"),
                (10, "SIGKILL"),
                (11, "exit code 3"),
                (12, "timeout")
            ]
        );
        assert_eq!(boots(log), 2);
        assert!(deaths("[INFO] Listening at: http://127.0.0.1:1 (7)\n").is_empty());
    }
}
