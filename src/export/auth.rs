//! The seam between exporters and request authentication: the auth extensions
//! (`oauth2client`, `bearertokenauth`, `basicauth`) behind one [`Authenticator`] trait.
pub(crate) mod credentials;
pub(crate) mod file;

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::Extension;
use crate::telemetry::{Health, Metrics};

/// Why no credential could be had. Always retryable for the data: a token endpoint that is
/// down or refusing us makes batches wait, never vanish.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct AuthError {
    pub(crate) message: String,
}

pub(crate) type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<HeaderValue, AuthError>> + Send + 'a>>;

pub(crate) trait Authenticator: Send + Sync {
    /// The Authorization header value for the next request.
    fn authorization(&self) -> AuthFuture<'_>;
    /// The destination answered 401 to `rejected`: forget it so the next call fetches a new one.
    fn invalidate(&self, rejected: &HeaderValue);
    /// The header the value goes in (bearertokenauth's `header` may name another).
    fn header_name(&self) -> HeaderName {
        header::AUTHORIZATION
    }
    /// Connects to the relay's metrics and readiness (once, before serving). The oauth2client
    /// extension is attached by the topology itself, which also warms its token up.
    fn attach(&self, _metrics: &Arc<Metrics>, _health: &Arc<Health>) {}
}

/// The authenticator of client auth extension `id` other than oauth2client (built by
/// `OAuth2Client::new`); Ok(None) for extensions that are not one. Err is a configuration
/// problem of the extension (a token file missing at start).
pub(crate) fn from_extension(id: &str, ext: &Extension) -> Result<Option<Arc<dyn Authenticator>>, String> {
    Ok(match ext {
        Extension::BearerTokenAuth(c) => Some(Arc::new(credentials::BearerTokenAuth::new(id, c)?)),
        Extension::BasicAuth(c) => credentials::BasicAuth::new(id, c)?.map(|a| Arc::new(a) as Arc<dyn Authenticator>),
        _ => None,
    })
}

/// Sets the authenticator's header (Authorization unless configured otherwise) from `auth`, if
/// any; returns the value sent, so that a 401 can invalidate exactly that credential.
pub(crate) async fn authorize(
    auth: Option<&Arc<dyn Authenticator>>,
    headers: &mut HeaderMap,
) -> Result<Option<HeaderValue>, AuthError> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let value = auth.authorization().await?;
    headers.insert(auth.header_name(), value.clone());
    Ok(Some(value))
}
