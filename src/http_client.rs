//! Outbound HTTP: one pooled connector (http and https on rustls/aws-lc-rs) for exporters, the
//! gate's upstream and provider calls, and a bounded, buffered client for token endpoints,
//! discovery documents, JWKS and the gate's look-ups. That client implements oauth2's
//! `AsyncHttpClient` (openidconnect re-exports it), so neither crate needs reqwest.
pub(crate) use crate::telemetry::error_chain;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::config::ClientTlsConfig;
use crate::supervise::LockUnpoisoned;

/// Largest answer read from a provider (token responses, discovery and JWKS are a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// The pooled client exporters send request bodies with (see [`pooled`]).
pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// True when any of `urls` needs TLS (only then are trust roots loaded).
pub(crate) fn any_https<'a>(urls: impl IntoIterator<Item = &'a str>) -> bool {
    urls.into_iter()
        .any(|u| u.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")))
}

/// How long an idle connection stays open for the next request (zero: no limit); `None`: not at
/// all (a new connection per request, the collector's `disable_keep_alives`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAlive(pub(crate) Option<Duration>);

/// A pooled hyper client over http or https with `tls`; TCP_NODELAY because every request is
/// written whole and waits for its answer.
pub(crate) fn pooled<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    keep_alive: KeepAlive,
) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let mut builder = Client::builder(TokioExecutor::new());
    match keep_alive.0 {
        Some(idle) => builder.pool_idle_timeout((!idle.is_zero()).then_some(idle)),
        None => builder.pool_max_idle_per_host(0),
    };
    builder.build(connector)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("response unreadable: {0}")]
    Body(String),
    #[error("cannot build the request: {0}")]
    Request(String),
}

#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// `tls` decides the trust roots (ca_file, else the system's and SSL_CERT_FILE) and an
    /// optional client certificate; `https` says whether any URL it will be given is https;
    /// `timeout` bounds each whole exchange.
    pub(crate) fn new(
        tls: &ClientTlsConfig,
        https: bool,
        timeout: Duration,
    ) -> Result<HttpClient, crate::tls::TlsError> {
        let tls = crate::tls::client_config(tls, https)?;
        let inner = pooled(tls, timeout, KeepAlive(Some(Duration::from_secs(30))));
        Ok(HttpClient { inner, timeout })
    }

    /// One buffered request/response exchange (no redirects).
    pub(crate) async fn exchange(&self, req: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, HttpError> {
        let timeout = self.timeout;
        let work = async {
            let (parts, body) = req.into_parts();
            let resp = self
                .inner
                .request(http::Request::from_parts(parts, Full::new(Bytes::from(body))))
                .await
                .map_err(|e| HttpError::Transport(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| HttpError::Body(e.to_string()))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }

    /// GET a URL; any status but 200 is an error.
    pub(crate) async fn get(&self, url: &str) -> Result<Vec<u8>, HttpError> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| HttpError::Request(e.to_string()))?;
        let resp = self.exchange(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(HttpError::Transport(format!("GET {url}: HTTP {}", resp.status())));
        }
        Ok(resp.into_body())
    }

    /// GET a JSON document; any status but 200 is an error.
    pub(crate) async fn get_json(&self, url: &str) -> Result<serde_json::Value, HttpError> {
        let body = self.get(url).await?;
        serde_json::from_slice(&body).map_err(|e| HttpError::Body(format!("GET {url}: {e}")))
    }
}

/// Lends the client to oauth2 for one token request and remembers the answer's status, which
/// oauth2's error type does not carry: a 400/401 means "fix the credentials", a 5xx "wait".
pub(crate) struct Recording<'a> {
    client: &'a HttpClient,
    status: Mutex<Option<StatusCode>>,
}

impl<'a> Recording<'a> {
    pub(crate) fn new(client: &'a HttpClient) -> Self {
        Recording {
            client,
            status: Mutex::new(None),
        }
    }

    pub(crate) fn status(&self) -> Option<StatusCode> {
        *self.status.lock_unpoisoned()
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Recording<'_> {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let resp = self.client.exchange(request).await?;
            *self.status.lock_unpoisoned() = Some(resp.status());
            Ok(resp)
        })
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.exchange(request))
    }
}

#[cfg(test)]
mod tests {
    use super::any_https;

    #[test]
    fn https_is_decided_by_the_scheme_of_any_url() {
        assert!(!any_https(["http://127.0.0.1:5000/v1/traces", ""]));
        assert!(any_https(["http://mlflow:5000", "HTTPS://keycloak/realms/x"]));
        assert!(!any_https(["httpsx", "ftp://https://"]));
        assert!(!any_https(Vec::<&str>::new()));
    }
}
