//! One hyper client (http and https on rustls/aws-lc-rs) for the upstream proxy and the provider calls;
//! it also implements oauth2/openidconnect's `AsyncHttpClient`, so no reqwest is needed.
pub use crate::telemetry::error_chain;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Largest provider response we read (discovery, JWKS, token responses are a few KiB).
const MAX_PROVIDER_RESPONSE: usize = 1 << 20;
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request to the identity provider failed: {0}")]
    Transport(String),
    #[error("identity provider did not answer within {0:?}")]
    Timeout(Duration),
    #[error("identity provider response unreadable: {0}")]
    Body(String),
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

#[derive(Clone)]
pub struct HttpClient {
    pub inner: Client<HttpsConnector<HttpConnector>, Body>,
}

impl HttpClient {
    pub fn new() -> HttpClient {
        let mut roots = rustls::RootCertStore::empty();
        // Missing or unreadable system roots only matter for https endpoints; http keeps working.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        HttpClient { inner }
    }

    /// A buffered request/response exchange with the provider (bounded size and time; no redirects).
    pub async fn exchange(&self, req: http::Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, HttpError> {
        let (parts, body) = req.into_parts();
        let req = http::Request::from_parts(parts, full(body));
        let resp = tokio::time::timeout(PROVIDER_TIMEOUT, self.inner.request(req))
            .await
            .map_err(|_| HttpError::Timeout(PROVIDER_TIMEOUT))?
            .map_err(|e| HttpError::Transport(error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(PROVIDER_TIMEOUT, Limited::new(body, MAX_PROVIDER_RESPONSE).collect())
            .await
            .map_err(|_| HttpError::Timeout(PROVIDER_TIMEOUT))?
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        Ok(http::Response::from_parts(parts, body.to_vec()))
    }

    /// GET a URL, returning the body of a 200 answer.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, HttpError> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| HttpError::Transport(e.to_string()))?;
        let resp = self.exchange(req).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(HttpError::Transport(format!("GET {url}: HTTP {}", resp.status())));
        }
        Ok(resp.into_body())
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl<'c> openidconnect::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<openidconnect::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(self.exchange(request))
    }
}
