//! `atoll-probe`: a dependency-free HTTP health probe for the scratch image (which has no shell,
//! curl or wget). Built by `scripts/docker-build.sh` with plain `rustc` (std only, no Cargo).
//!
//!     atoll-probe [--timeout SECS] HOST:PORT [PATH] [--contains TEXT]... [--absent TEXT]...
//!
//! Sends `GET PATH` (default `/status`) over HTTP/1.0 and exits 0 when the answer is `200` and
//! the body holds every `--contains` text and none of the `--absent` texts; 1 otherwise (with
//! the reason on stderr, which `docker inspect` shows in the health log); 2 on bad usage.
//! HOST must be an IP address (no name resolution needed in a health check).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::exit;
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: atoll-probe [--timeout SECS] HOST:PORT [PATH] [--contains TEXT]... [--absent TEXT]..."
    );
    exit(2)
}

fn fail(msg: String) -> ! {
    eprintln!("atoll-probe: {msg}");
    exit(1)
}

fn main() {
    let mut timeout = Duration::from_secs(2);
    let mut addr: Option<SocketAddr> = None;
    let mut path: Option<String> = None;
    let mut contains = vec![];
    let mut absent = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--timeout" => {
                let v = args.next().unwrap_or_else(|| usage());
                let secs: f64 = v.parse().unwrap_or_else(|_| usage());
                timeout = Duration::from_secs_f64(secs.max(0.1));
            }
            "--contains" => contains.push(args.next().unwrap_or_else(|| usage())),
            "--absent" => absent.push(args.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            _ if addr.is_none() => {
                addr = Some(a.parse().unwrap_or_else(|e| {
                    eprintln!("atoll-probe: {a:?} is not IP:PORT: {e}");
                    exit(2)
                }))
            }
            _ if path.is_none() => path = Some(a),
            _ => usage(),
        }
    }
    let addr = addr.unwrap_or_else(|| usage());
    let path = path.unwrap_or_else(|| "/status".to_string());

    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| fail(format!("connect {addr}: {e}")));
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| fail(format!("send to {addr}: {e}")));
    let mut resp = Vec::new();
    // Bounded: a status page is small; refuse to buffer more than 4 MiB.
    s.take(4 << 20)
        .read_to_end(&mut resp)
        .unwrap_or_else(|e| fail(format!("read from {addr}: {e}")));
    let resp = String::from_utf8_lossy(&resp);
    let status_line = resp.lines().next().unwrap_or("");
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        fail(format!("GET {path} on {addr}: {status_line:?}"));
    }
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    for c in &contains {
        if !body.contains(c.as_str()) {
            fail(format!("GET {path} on {addr}: body lacks {c:?}: {body}"));
        }
    }
    for a in &absent {
        if body.contains(a.as_str()) {
            fail(format!("GET {path} on {addr}: body holds {a:?}: {body}"));
        }
    }
    println!("ok: GET {path} on {addr}");
}
