//! The seam between exporters and request authentication (the oauth2client extension).
use std::future::Future;
use std::pin::Pin;

use http::HeaderValue;

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
}
