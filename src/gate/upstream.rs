//! Talking to MLflow: forwarding a request, reading an answer to remove what the caller may not
//! see, and the gate's own look-ups (experiment names).
use std::net::SocketAddr;
use std::time::Instant;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::authz::{self, Decision, Experiment, Level, Visible};
use super::canonical;
use super::proxy::{self, BoxError};
use super::routes;
use super::session::Identity;
use super::{Body, Gate, MAX_FILTERED_ANSWER, NAME_CACHE_TTL, detail, full, query_value, read_limited, server};
use crate::http_client::error_chain;

impl Gate {
    /// MLflow's JSON answer without the experiments `groups` may not read (see `authz::visible`).
    pub(super) async fn readable_part(&self, resp: Response<Body>, groups: &[String]) -> Response<Body> {
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        if !resp.status().is_success() || !is_json {
            return resp;
        }
        if resp.headers().contains_key(header::CONTENT_ENCODING) {
            return detail(
                StatusCode::BAD_GATEWAY,
                "MLflow answered encoded; cannot apply permissions",
            );
        }
        let (mut parts, body) = resp.into_parts();
        let Some(bytes) = read_limited(body, MAX_FILTERED_ANSWER).await else {
            return detail(
                StatusCode::BAD_GATEWAY,
                "MLflow's answer is too large to apply permissions",
            );
        };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Response::from_parts(parts, full(bytes));
        };
        let readable =
            |e: &Experiment| self.policy.decide(groups, Level::Read, std::slice::from_ref(e)) == Decision::Allow;
        match authz::visible(answer, readable) {
            Visible::All => Response::from_parts(parts, full(bytes)),
            Visible::Filtered(answer) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, full(serde_json::to_vec(&answer).unwrap_or_default()))
            }
            Visible::Denied(id) => {
                self.metrics.auth_failure("permission");
                let decision = Decision::Missing {
                    need: Level::Read,
                    experiment: Some(id),
                };
                detail(StatusCode::FORBIDDEN, &decision.detail())
            }
        }
    }
    /// GET an MLflow API path as the gate itself (for look-ups that authorization needs).
    pub(super) async fn upstream_json(&self, path_and_query: &str) -> Option<serde_json::Value> {
        let uri = format!("{}://{}{path_and_query}", self.upstream_scheme, self.upstream_authority);
        let req = http::Request::get(uri)
            .header(header::HOST, &self.upstream_authority)
            .body(Vec::new())
            .ok()?;
        let resp = self.http.exchange(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        serde_json::from_slice(resp.body()).ok()
    }

    pub(super) async fn experiment_name(&self, id: &str) -> Option<String> {
        if let Some((n, at)) = self.names.lock().await.get(id)
            && at.elapsed() < NAME_CACHE_TTL
        {
            return Some(n.clone());
        }
        let v = self
            .upstream_json(&format!(
                "/api/2.0/mlflow/experiments/get?experiment_id={}",
                query_value(id)
            ))
            .await?;
        let name = v.pointer("/experiment/name")?.as_str()?.to_string();
        let mut names = self.names.lock().await;
        if names.len() > 10_000 {
            names.clear();
        }
        names.insert(id.to_string(), (name.clone(), Instant::now()));
        Some(name)
    }

    pub(super) async fn forward(
        &self,
        req: Request<Body>,
        identity: Option<&Identity>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = format!("{}://{}{}", self.upstream_scheme, self.upstream_authority, pq);
        parts.uri = match uri.parse() {
            Ok(u) => u,
            Err(_) => return detail(StatusCode::BAD_REQUEST, "Invalid request target"),
        };
        parts.version = http::Version::HTTP_11;
        let proto = self.client_proto(&parts.headers, peer);
        if !self.trusted_proxy(peer) {
            // Only a trusted proxy's chain is passed on; anyone else's would be believed by MLflow.
            for h in [
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-real-ip",
                "forwarded",
            ] {
                parts.headers.remove(h);
            }
        }
        proxy::upstream_request_headers(&mut parts.headers, identity, peer, &self.upstream_authority, &proto);
        // Trace writes spread over MLflow's workers only on connections of their own.
        let client = if is_trace_write(&parts) {
            &self.trace_writes
        } else {
            &self.upstream
        };
        let started = Instant::now();
        match client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                self.metrics.upstream_seconds.observe(started.elapsed().as_secs_f64());
                let (mut parts, body) = resp.into_parts();
                proxy::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) if server::is_body_timeout(&e) => {
                tracing::info!(%peer, "request body too slow; answered 408");
                detail(StatusCode::REQUEST_TIMEOUT, "Request body too slow")
            }
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(error = %why, upstream = %self.upstream_authority, "MLflow upstream unavailable");
                // The cause (addresses, resolver and TLS errors) is for the log, not for the client.
                detail(StatusCode::BAD_GATEWAY, "MLflow upstream unavailable")
            }
        }
    }
}

/// An OTLP trace write: the route table's ingest route (the request's path is canonical by now).
fn is_trace_write(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::POST
        && canonical::path(parts.uri.path())
            .ok()
            .and_then(|c| routes::lookup(parts.method.as_str(), &c.segments, c.trailing_slash))
            .is_some_and(|r| r.rule.is_otlp_ingest())
}
