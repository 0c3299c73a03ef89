//! Hostile peers against the relay's bounds: more connections than max_connections, idle and
//! slowloris connections, stalled request bodies against the memory budget, descriptor
//! exhaustion on the health listener, and a server certificate out of its validity period.
#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, one_span_request};
use support::{Proc, vm_hwm_kib, wait_for};

mod connections;
mod grpc;
mod memory;

const T: Duration = Duration::from_secs(30);

/// Taken by the tests that measure memory or hold bodies for a few seconds: the 60-stream
/// test would otherwise load the machine enough to let the others' stalled bodies time out
/// before they are probed.
static MEMORY_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory_test_lock() -> std::sync::MutexGuard<'static, ()> {
    MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A relay receiving OTLP on `transports` only (`settings` merged into each), a batch processor
/// with a 20 ms timeout and the debug exporter.
fn debug_relay(transports: &[&str], settings: Value) -> RelayConfig {
    let mut config = RelayConfig::new();
    for transport in ["grpc", "http"] {
        if !transports.contains(&transport) {
            config = config.without_transport(transport);
        }
    }
    config
        .receivers(settings)
        .batch(json!({"timeout": "20ms"}))
        .exporter("debug", json!({}))
}

/// memory_limiter settings: the budget refuses at `limit_mib` - `spike_limit_mib`.
fn memory_limiter(limit_mib: u64, spike_limit_mib: u64) -> Value {
    json!({"check_interval": "1s", "limit_mib": limit_mib, "spike_limit_mib": spike_limit_mib})
}

/// A GET that reports a failed connection or a timeout as None instead of panicking.
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Reads one HTTP/1.1 response (Content-Length framed) from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// POSTs one span on a connection that stays open; returns the status.
fn post_on(s: &mut TcpStream, body: &[u8]) -> std::io::Result<u16> {
    write!(
        s,
        "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    Ok(read_response(s)?.0)
}

/// POSTs one span on a new connection; returns the status.
fn post(addr: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    post_on(&mut s, &one_span_request("probe")).unwrap()
}

/// Whether the server has closed a connection (end of file or reset), waiting up to `within`.
fn closed_by_server(mut s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn count_lines(relay: &Proc, needle: &str) -> usize {
    relay.output().iter().filter(|l| l.contains(needle)).count()
}

/// /proc/<pid>/stat utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line; `after` starts at field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
