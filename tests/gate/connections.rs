//! The gate's connections to MLflow: every OTLP trace write on a new one, closed once answered
//! (`mlflow server --workers N` keeps a kept-alive connection on one worker), the UI and REST API
//! on pooled, kept-alive ones; GATE_TRACE_WRITE_CONNECTIONS=pooled puts trace writes there too.
//! Counted by an upstream of the test's own, not by anything the gate reports.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// An HTTP/1.1 upstream that keeps connections alive, counts those it accepted and those still
/// open, and answers every request 200 with a small JSON body.
struct CountingUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl CountingUpstream {
    fn start() -> CountingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, o) = (accepted.clone(), open.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, a, o));
        });
        CountingUpstream { addr, accepted, open }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until at most `n` connections are open (the gate closes its side asynchronously).
    fn wait_open_at_most(&self, n: usize, what: &str) {
        wait_for(what, Duration::from_secs(10), || (self.open() <= n).then_some(()));
    }
}

async fn serve(listener: TcpListener, accepted: Arc<AtomicUsize>, open: Arc<AtomicUsize>) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        tokio::spawn(async move {
            let answer = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut resp = http::Response::new(Full::new(bytes::Bytes::from_static(b"{}")));
                resp.headers_mut()
                    .insert("content-type", http::HeaderValue::from_static("application/json"));
                Ok::<_, std::convert::Infallible>(resp)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, answer)
                .await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One client connection to the gate, kept alive across requests.
struct ClientConnection(BufReader<std::net::TcpStream>);

impl ClientConnection {
    fn open(addr: SocketAddr) -> ClientConnection {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        ClientConnection(BufReader::new(s))
    }

    /// Sends one request and reads its whole answer; the status. The gate must keep the
    /// connection open.
    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = self.0.get_mut();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line from the gate: {line:?}"));
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.0.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => len = v.parse().unwrap(),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => assert!(!v.contains("close"), "the gate closed the client connection"),
                _ => {}
            }
        }
        if chunked {
            loop {
                line.clear();
                self.0.read_line(&mut line).unwrap();
                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.0.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
            }
        } else {
            self.0.read_exact(&mut vec![0; len]).unwrap();
        }
        status
    }
}

/// One OTLP trace write as the relay sends it, as an admin (the gate looks nothing up).
fn write_trace(c: &mut ClientConnection, auth: &str) -> u16 {
    let (body, _) = otlp_request("connections");
    let headers = [
        ("authorization", auth),
        ("content-type", "application/x-protobuf"),
        ("x-mlflow-experiment-id", "0"),
    ];
    c.send("POST", "/v1/traces", &headers, &body)
}

/// UI and REST API requests, one after another on `c`.
fn browse(c: &mut ClientConnection, auth: &str, n: usize) {
    let paths = ["/", "/api/2.0/mlflow/experiments/get?experiment_id=0"];
    for i in 0..n {
        let s = c.send("GET", paths[i % 2], &[("authorization", auth)], b"");
        assert_eq!(s, 200, "GET {}", paths[i % 2]);
    }
}

#[test]
fn each_trace_write_gets_its_own_upstream_connection_and_the_ui_shares_pooled_ones() {
    const N: usize = 6;
    let w = world();
    let up = CountingUpstream::start();
    let g = gate(&w.provider, &format!("http://{}", up.addr), &[]);
    let auth = bearer(&w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET));

    // Trace writes kept alive on one client connection: a new upstream connection each, closed
    // once the write is answered.
    let mut client = ClientConnection::open(g.addr);
    for i in 1..=N {
        assert_eq!(write_trace(&mut client, &auth), 200);
        assert_eq!(up.accepted(), i, "trace write {i}: upstream connections accepted");
        up.wait_open_at_most(0, "the trace write's upstream connection closed");
    }

    // The UI and API on one client connection: pooled, so fewer upstream connections than
    // requests, and they stay open for the next request.
    let before = up.accepted();
    browse(&mut client, &auth, N);
    let pooled = up.accepted() - before;
    assert!(
        (1..N).contains(&pooled),
        "{N} UI/API requests opened {pooled} upstream connections"
    );
    let kept = up.open();
    assert!(kept >= 1, "the UI/API connection is kept alive");

    // With an idle pooled connection at hand, trace writes still each take a new one, and only
    // theirs are closed.
    for i in 1..=N {
        let before = up.accepted();
        assert_eq!(write_trace(&mut client, &auth), 200);
        assert_eq!(up.accepted(), before + 1, "trace write {i} after the UI");
        up.wait_open_at_most(kept, "the trace write's upstream connection closed");
    }

    // Concurrent writers, each on its own kept-alive client connection.
    let before = up.accepted();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let auth = auth.clone();
            let addr = g.addr;
            std::thread::spawn(move || {
                let mut c = ClientConnection::open(addr);
                for _ in 0..3 {
                    assert_eq!(write_trace(&mut c, &auth), 200);
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    assert_eq!(up.accepted() - before, 12, "12 concurrent trace writes");
    up.wait_open_at_most(kept, "the concurrent trace writes' upstream connections closed");
}

#[test]
fn pooled_trace_writes_reuse_upstream_connections() {
    const N: usize = 6;
    let w = world();
    let up = CountingUpstream::start();
    let g = gate(
        &w.provider,
        &format!("http://{}", up.addr),
        &[("GATE_TRACE_WRITE_CONNECTIONS", "pooled")],
    );
    let auth = bearer(&w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET));
    let mut client = ClientConnection::open(g.addr);
    for _ in 0..N {
        assert_eq!(write_trace(&mut client, &auth), 200);
    }
    let opened = up.accepted();
    assert!(
        (1..N).contains(&opened),
        "{N} pooled trace writes opened {opened} upstream connections"
    );
    assert!(up.open() >= 1, "pooled connections stay open");
}
