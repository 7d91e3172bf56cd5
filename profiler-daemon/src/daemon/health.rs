//! `pyebpf health`: whether a running daemon is alive, for container
//! health checks (an image without curl or a shell can run it).
use std::time::Duration;

use anyhow::{bail, Context};

/// `GET {url}/healthz`: its body if it answered 200, else an error saying
/// what it answered or why it could not be asked.
pub async fn check(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let base = url.trim_end_matches('/');
    let target = format!("{base}/healthz");
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .context("cannot build the HTTP client")?;
    let resp = client
        .get(&target)
        .send()
        .await
        .with_context(|| format!("no answer from {target}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let body = body.trim();
    if !status.is_success() {
        bail!("{target} answered {status}: {body}");
    }
    Ok(format!("{target}: {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::get;

    async fn server(status: StatusCode, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", get(move || async move { (status, body) }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn healthy_unhealthy_and_absent() {
        let ok = server(StatusCode::OK, "ok\n").await;
        assert!(check(&ok, Duration::from_secs(5))
            .await
            .unwrap()
            .ends_with("/healthz: ok"));
        let stalled = server(StatusCode::SERVICE_UNAVAILABLE, "unhealthy: ingest stalled").await;
        let e = check(&stalled, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            e.to_string().contains("503") && e.to_string().contains("ingest stalled"),
            "{e}"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let e = check(&closed, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().starts_with("no answer from"), "{e}");
    }
}
