//! The seam between exporters and request authentication (the oauth2client extension).
use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, header};

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

/// Sets the Authorization header from `auth`, if any; returns the value sent, so that a 401
/// can invalidate exactly that credential.
pub(crate) async fn authorize(
    auth: Option<&Arc<dyn Authenticator>>,
    headers: &mut HeaderMap,
) -> Result<Option<HeaderValue>, AuthError> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let value = auth.authorization().await?;
    headers.insert(header::AUTHORIZATION, value.clone());
    Ok(Some(value))
}
