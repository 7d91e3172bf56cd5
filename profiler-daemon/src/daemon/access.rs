//! Who may use the HTTP API. Profiles and process lists show what normally
//! takes CAP_SYS_PTRACE to see, so the API listens on a loopback address
//! unless a bearer token guards it; Prometheus can be given a listener of
//! its own (`metrics_listen`) that serves only metrics and health.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;

/// Shortest token accepted: 16 bytes (128 bits of a random hex or base64
/// string) is out of reach of guessing over HTTP.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read api.token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "api.token_file {path} holds {len} bytes: a token needs at least {MIN_TOKEN_LEN} \
         (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    Short { path: PathBuf, len: usize },
    #[error(
        "api.token_file {path} is readable by other users (mode {mode:o}): make it 0600 or 0400"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error(
        "listen {0} is not a loopback address, and the API serves profiles and process lists: \
         set api.token_file to require a bearer token there, or keep listen on 127.0.0.1 and \
         give Prometheus metrics_listen (metrics and health only)"
    )]
    Unguarded(SocketAddr),
}

/// The bearer token in `path` (surrounding whitespace ignored). The file
/// must not be readable by group or others.
pub fn load_token(path: &Path) -> Result<Token, AccessError> {
    use std::os::unix::fs::PermissionsExt as _;
    let read = |source| AccessError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(AccessError::Readable {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(AccessError::Short {
            path: path.to_path_buf(),
            len: token.len(),
        });
    }
    Ok(Token(token.into()))
}

/// The API may listen on `listen` only if it is a loopback address or a
/// token guards it.
pub fn check_listen(listen: SocketAddr, guarded: bool) -> Result<(), AccessError> {
    if listen.ip().is_loopback() || guarded {
        Ok(())
    } else {
        Err(AccessError::Unguarded(listen))
    }
}

/// A bearer token, compared in constant time.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// The `Authorization` header value that presents this token (what a
    /// client such as `pyebpf top --daemon` sends).
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `Authorization` header value presents this token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|a| a.strip_prefix(b"Bearer ")) else {
            return false;
        };
        bool::from(given.trim_ascii().ct_eq(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    /// Never the token itself (it would end up in logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn token_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn a_token_admits_only_itself() {
        let (_d, path) = token_file("0123456789abcdef0123\n", 0o600);
        let t = load_token(&path).unwrap();
        assert!(t.admits(Some(b"Bearer 0123456789abcdef0123")));
        for bad in [
            &b"Bearer 0123456789abcdef012"[..],
            b"Bearer 0123456789abcdef01234",
            b"bearer 0123456789abcdef0123",
            b"Basic 0123456789abcdef0123",
            b"0123456789abcdef0123",
            b"Bearer ",
            b"",
        ] {
            assert!(!t.admits(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!t.admits(None));
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn bad_token_files_are_refused_with_the_reason() {
        let (_d, path) = token_file("short", 0o600);
        assert!(matches!(
            load_token(&path),
            Err(AccessError::Short { len: 5, .. })
        ));
        let (_d, path) = token_file("0123456789abcdef0123", 0o644);
        let e = load_token(&path).unwrap_err();
        assert!(e.to_string().contains("mode 644"), "{e}");
        let e = load_token(Path::new("/nonexistent/token")).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read api.token_file"),
            "{e}"
        );
    }

    #[test]
    fn only_loopback_listens_unguarded() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_listen(addr("127.0.0.1:7464"), false).is_ok());
        assert!(check_listen(addr("[::1]:7464"), false).is_ok());
        assert!(check_listen(addr("0.0.0.0:7464"), true).is_ok());
        let e = check_listen(addr("0.0.0.0:7464"), false).unwrap_err();
        assert!(e.to_string().contains("metrics_listen"), "{e}");
        assert!(check_listen(addr("10.0.0.5:7464"), false).is_err());
    }
}
