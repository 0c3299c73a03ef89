//! Binds the sink's listeners (plain or TLS) and serves each accepted connection.
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::count::State;
use super::export::route;
use super::jwt::JwtCheck;
use super::{SinkArgs, StartError};
use crate::supervise::LockUnpoisoned;

fn load_tls(args: &SinkArgs) -> Result<Option<tokio_rustls::TlsAcceptor>, crate::tls::TlsError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let client_ca = args.tls_client_ca.as_ref().map(|p| p.to_string_lossy());
    let config = crate::tls::server_config_from_files(
        &cert.to_string_lossy(),
        &key.to_string_lossy(),
        client_ca.as_deref(),
        crate::config::TlsVersion::default(),
    )?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

async fn serve(
    component: &'static str,
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()));
    let mut acceptor = crate::net::Acceptor::new(component);
    loop {
        let (stream, _) = acceptor.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| route(state.clone(), req));
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "tls handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Binds the sink's listeners and returns their addresses and the serving task.
pub(crate) async fn start(
    args: &SinkArgs,
) -> Result<(SocketAddr, Option<SocketAddr>, Arc<State>, tokio::task::JoinHandle<()>), StartError> {
    let tls = load_tls(args).map_err(|e| StartError::Args(e.into()))?;
    let mut state = State::new(args);
    if let (Some(url), Some(aud)) = (&args.require_jwt, &args.audience) {
        let check = JwtCheck::new(url.clone(), aud.clone()).map_err(StartError::Args)?;
        if let Err(e) = check.refetch().await {
            tracing::warn!(error = %e, "JWKS not available yet; fetched again on the first token");
            *check.last_fetch.lock_unpoisoned() = None;
        }
        state.jwt = Some(check);
    }
    let state = Arc::new(state);
    let listen = |addr: SocketAddr, what: &'static str| async move {
        let bound = TcpListener::bind(addr)
            .await
            .and_then(|l| l.local_addr().map(|a| (l, a)));
        bound.map_err(|source| StartError::Bind { what, addr, source })
    };
    let (http, http_addr) = listen(args.listen, "--listen").await?;
    let grpc = match args.grpc_listen {
        Some(a) => Some(listen(a, "--grpc-listen").await?),
        None => None,
    };
    let grpc_addr = grpc.as_ref().map(|(_, a)| *a);
    let mut tasks = vec![tokio::spawn(serve("sink-http", http, state.clone(), tls.clone()))];
    if let Some((g, _)) = grpc {
        tasks.push(tokio::spawn(serve("sink-grpc", g, state.clone(), tls)));
    }
    if let Some(addr) = args.stats_listen {
        let (plain, plain_addr) = listen(addr, "--stats-listen").await?;
        tracing::info!(component = %"sink-stats", addr = %plain_addr, "listening");
        tasks.push(tokio::spawn(serve("sink-stats", plain, state.clone(), None)));
    }
    let handle = tokio::spawn(async move {
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok((http_addr, grpc_addr, state, handle))
}
