//! The small plain-HTTP admin servers (metrics, health) of the relay.
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{Metrics, text_response};

pub(crate) fn metrics_response(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Answers one admin request (health or metrics); cheap and synchronous.
pub(crate) type AdminHandler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves a small plain-HTTP admin endpoint (health, metrics) until `cancel` fires.
pub(crate) async fn serve_admin(
    mut listener: crate::supervise::ListenerLease,
    component: &'static str,
    handler: AdminHandler,
    cancel: CancellationToken,
) {
    let mut acceptor = crate::net::Acceptor::new(component);
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => {
                listener.finish();
                return;
            }
            accepted = acceptor.accept(&listener) => accepted,
        };
        let handler = handler.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = handler(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            // Probes and scrapes send their request at once: a connection that sends nothing
            // (or waits between scrapes) gives its descriptor back after ADMIN_HEADER_TIMEOUT.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
