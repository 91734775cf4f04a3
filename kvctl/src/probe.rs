//! `kvctl probe`: an HTTP(S) health probe of a status port (`/status`, `/metrics`), for health
//! checks of servers that run with TLS (the image's `atoll-probe` speaks plain HTTP only).
//! With the global `--cacert` (and `--cert`/`--key` when the port wants a client certificate)
//! it speaks HTTPS, verifying the server; without, plain HTTP.

use anyhow::Context;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// HOST:PORT of the status port.
    pub addr: String,
    /// Path to ask for.
    #[arg(default_value = "/status")]
    pub path: String,
    /// Also require this text in the body (repeatable).
    #[arg(long)]
    pub contains: Vec<String>,
}

/// One `GET PATH` (HTTP/1.0: the server closes after answering): the status code and body.
async fn get(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    host: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    // A body over 4 MiB is not a health answer.
    s.take(4 << 20).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", head.lines().next()))?;
    Ok((code, body.to_string()))
}

/// Exits through the error path unless the answer is 200 with every `--contains` text.
pub async fn run(a: &ProbeArgs, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let addr = a
        .addr
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .with_context(|| format!("{:?} is not HOST:PORT", a.addr))?;
    let ask = async {
        match crate::etcd::tls() {
            Some(tls) => get(tls.dial(host, port).await?, addr, &a.path).await,
            None => {
                get(
                    tokio::net::TcpStream::connect((host, port)).await?,
                    addr,
                    &a.path,
                )
                .await
            }
        }
    };
    let (code, body) = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout:?}"))??;
    anyhow::ensure!(
        code == 200,
        "{addr}{} answered {code}: {}",
        a.path,
        body.trim()
    );
    for t in &a.contains {
        anyhow::ensure!(body.contains(t.as_str()), "the answer lacks {t:?}");
    }
    Ok(serde_json::json!({"addr": addr, "path": a.path, "code": code}))
}
