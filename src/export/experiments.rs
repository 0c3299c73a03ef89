//! Experiment names to ids through MLflow's REST API (`experiments/get-by-name`, and
//! `experiments/create` when the exporter may create them), remembered in a bounded cache per
//! workspace. The calls carry the exporter's own Authorization, so they pass the gate with the
//! same token as the spans.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};

use super::ExportError;
use super::auth::Authenticator;
use super::retry::{HttpVerdict, classify_http};
use crate::http_client::HttpsClient;
use crate::supervise::LockUnpoisoned;

/// MLflow's workspace header (its REST API scopes experiment names by it).
pub(crate) const WORKSPACE_HEADER: &str = "x-mlflow-workspace";

/// Largest REST answer read (an experiment with its tags is a few KiB).
const MAX_ANSWER: usize = 256 * 1024;
/// Bytes of an error answer kept for the log.
const ERROR_TEXT: usize = 512;

/// How an id was had, for the lookups metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Cached,
    Found,
    Created,
}

impl Lookup {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Lookup::Cached => "cached",
            Lookup::Found => "found",
            Lookup::Created => "created",
        }
    }
}

type Key = (Option<Arc<str>>, Arc<str>);

/// Names to ids, at most `capacity`, the oldest forgotten first.
struct Cache {
    ids: HashMap<Key, Arc<str>>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl Cache {
    fn get(&self, key: &Key) -> Option<Arc<str>> {
        self.ids.get(key).cloned()
    }

    /// Forgets `key` if it still names `id` (a sender may have looked up a newer id meanwhile).
    fn forget(&mut self, key: &Key, id: &str) -> bool {
        if self.ids.get(key).is_none_or(|cached| &**cached != id) {
            return false;
        }
        self.ids.remove(key);
        self.order.retain(|k| k != key);
        true
    }

    fn insert(&mut self, key: Key, id: Arc<str>) {
        if self.ids.insert(key.clone(), id).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

pub(crate) struct Experiments {
    /// The REST API's base URL, without a trailing slash.
    api: String,
    create: bool,
    timeout: Duration,
    cache: Mutex<Cache>,
}

/// What one REST call answered.
struct Answer {
    status: StatusCode,
    verdict: HttpVerdict,
    retry_after: Option<Duration>,
    body: Bytes,
    /// The call carried a token (a 401 then means it expired: retryable).
    with_token: bool,
}

impl Experiments {
    pub(crate) fn new(api: &str, create: bool, capacity: usize, timeout: Duration) -> Experiments {
        Experiments {
            api: api.trim_end_matches('/').to_string(),
            create,
            timeout,
            cache: Mutex::new(Cache {
                ids: HashMap::new(),
                order: VecDeque::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    /// The id of experiment `name` in `workspace`: remembered, found, or created when allowed.
    pub(crate) async fn id(
        &self,
        client: &HttpsClient,
        auth: Option<&Arc<dyn Authenticator>>,
        workspace: Option<&Arc<str>>,
        name: &Arc<str>,
    ) -> Result<(Arc<str>, Lookup), ExportError> {
        let key: Key = (workspace.cloned(), name.clone());
        if let Some(id) = self.cache.lock_unpoisoned().get(&key) {
            return Ok((id, Lookup::Cached));
        }
        let lookup = |e: ExportError| lookup_error(name, e);
        let (id, how) = match self.get_by_name(client, auth, workspace, name).await.map_err(lookup)? {
            Ok(id) => (id, Lookup::Found),
            Err(missing) if !self.create => {
                return Err(ExportError::UnknownExperiment {
                    name: name.to_string(),
                    detail: format!("{missing}; mlflow.create_experiments is off"),
                });
            }
            Err(_) => match self.create(client, auth, workspace, name).await.map_err(lookup)? {
                Some(id) => (id, Lookup::Created),
                // Created meanwhile by another sender or relay: read the winner's id.
                None => match self.get_by_name(client, auth, workspace, name).await.map_err(lookup)? {
                    Ok(id) => (id, Lookup::Found),
                    Err(_) => {
                        return Err(ExportError::UnknownExperiment {
                            name: name.to_string(),
                            detail: "MLflow says it exists but does not find it (a deleted experiment holds the name: restore or purge it)".into(),
                        });
                    }
                },
            },
        };
        self.cache.lock_unpoisoned().insert(key, id.clone());
        Ok((id, how))
    }

    /// Forgets the id remembered for `name` when it is `id`: MLflow said it has no experiment
    /// of that id (deleted and purged, or a new database), so the next lookup asks again and
    /// creates the experiment anew when allowed. True when it was remembered.
    pub(crate) fn forget(&self, workspace: Option<&Arc<str>>, name: &Arc<str>, id: &str) -> bool {
        let forgotten = self
            .cache
            .lock_unpoisoned()
            .forget(&(workspace.cloned(), name.clone()), id);
        if forgotten {
            tracing::warn!(experiment = %name, id, "MLflow no longer has the experiment remembered for this name; looking it up again");
        }
        forgotten
    }

    /// Ok(id) when MLflow has an active experiment of that name, Err(MLflow's message) when it
    /// has none (or no such workspace).
    async fn get_by_name(
        &self,
        client: &HttpsClient,
        auth: Option<&Arc<dyn Authenticator>>,
        workspace: Option<&Arc<str>>,
        name: &str,
    ) -> Result<Result<Arc<str>, String>, ExportError> {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("experiment_name", name)
            .finish();
        let uri = format!("{}/api/2.0/mlflow/experiments/get-by-name?{query}", self.api);
        let answer = self.call(client, auth, workspace, Method::GET, &uri, None).await?;
        if answer.status == StatusCode::NOT_FOUND && error_code(&answer.body) == Some("RESOURCE_DOES_NOT_EXIST") {
            let message = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v["message"].as_str().map(|m| m.chars().take(ERROR_TEXT).collect()))
                .unwrap_or_else(|| "MLflow has no experiment of this name".to_string());
            return Ok(Err(message));
        }
        let json = success(answer)?;
        let experiment = &json["experiment"];
        if experiment["lifecycle_stage"].as_str() == Some("deleted") {
            return Err(ExportError::UnknownExperiment {
                name: name.to_string(),
                detail: "the experiment of this name is deleted in MLflow: restore it, or purge it so it can be created again".into(),
            });
        }
        match experiment["experiment_id"].as_str() {
            Some(id) if crate::otlp::ExperimentId::is_valid(id) => Ok(Ok(Arc::from(id))),
            _ => Err(ExportError::Permanent {
                status: StatusCode::OK,
                body: "get-by-name answered without a numeric experiment_id".into(),
            }),
        }
    }

    /// Some(id) once created; None when MLflow says the name is taken.
    async fn create(
        &self,
        client: &HttpsClient,
        auth: Option<&Arc<dyn Authenticator>>,
        workspace: Option<&Arc<str>>,
        name: &str,
    ) -> Result<Option<Arc<str>>, ExportError> {
        let uri = format!("{}/api/2.0/mlflow/experiments/create", self.api);
        let body = serde_json::json!({ "name": name }).to_string();
        let answer = self
            .call(client, auth, workspace, Method::POST, &uri, Some(Bytes::from(body)))
            .await?;
        if answer.status.is_client_error() && error_code(&answer.body) == Some("RESOURCE_ALREADY_EXISTS") {
            return Ok(None);
        }
        let json = success(answer)?;
        match json["experiment_id"].as_str() {
            Some(id) if crate::otlp::ExperimentId::is_valid(id) => {
                tracing::info!(experiment = %name, id, "created the MLflow experiment named by spans");
                Ok(Some(Arc::from(id)))
            }
            _ => Err(ExportError::Permanent {
                status: StatusCode::OK,
                body: "experiments/create answered without a numeric experiment_id".into(),
            }),
        }
    }

    async fn call(
        &self,
        client: &HttpsClient,
        auth: Option<&Arc<dyn Authenticator>>,
        workspace: Option<&Arc<str>>,
        method: Method,
        uri: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, ExportError> {
        let mut req = Request::new(Full::new(body.clone().unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = uri
            .parse()
            .map_err(|_| ExportError::Encode(format!("MLflow API URL {uri:?} is not valid")))?;
        let headers = req.headers_mut();
        if body.is_some() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(ws) = workspace
            && let Ok(v) = HeaderValue::from_str(ws)
        {
            headers.insert(WORKSPACE_HEADER, v);
        }
        let sent_auth = super::auth::authorize(auth, headers).await.map_err(ExportError::Auth)?;
        let exchange = async {
            let response = client
                .request(req)
                .await
                .map_err(|e| ExportError::Transport(crate::telemetry::error_chain(&e)))?;
            let status = response.status();
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let verdict = classify_http(status, retry_after.as_ref(), SystemTime::now());
            let retry_after = match verdict {
                HttpVerdict::Retry { retry_after } => retry_after,
                _ => None,
            };
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ExportError::Transport(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ExportError>(Answer {
                status,
                verdict,
                retry_after,
                body,
                with_token: sent_auth.is_some(),
            })
        };
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExportError::Timeout(self.timeout))??;
        if answer.verdict == HttpVerdict::Unauthorized
            && let (Some(a), Some(value)) = (auth, &sent_auth)
        {
            a.invalidate(value);
        }
        Ok(answer)
    }
}

/// MLflow's answer to spans for an experiment id it does not have.
pub(crate) fn no_such_experiment(error: &ExportError) -> bool {
    matches!(error, ExportError::Permanent { status, body }
        if *status == StatusCode::NOT_FOUND && error_code(body.as_bytes()) == Some("RESOURCE_DOES_NOT_EXIST"))
}

/// MLflow's `error_code` in an error answer.
fn error_code(body: &[u8]) -> Option<&str> {
    // Cheap: the code is a fixed word; the body is at most MAX_ANSWER.
    ["RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"]
        .into_iter()
        .find(|code| memchr::memmem::find(body, code.as_bytes()).is_some())
}

/// The answer's JSON when it is a success, else the error it is by the OTLP rules.
fn success(answer: Answer) -> Result<serde_json::Value, ExportError> {
    let text = || {
        let end = answer.body.len().min(ERROR_TEXT);
        String::from_utf8_lossy(&answer.body[..end]).trim().to_string()
    };
    match answer.verdict {
        HttpVerdict::Delivered => serde_json::from_slice(&answer.body).map_err(|e| ExportError::Permanent {
            status: answer.status,
            body: format!("not JSON: {e}"),
        }),
        HttpVerdict::Retry { .. } => Err(ExportError::Retryable {
            status: answer.status,
            body: text(),
            retry_after: answer.retry_after,
        }),
        HttpVerdict::Unauthorized => Err(ExportError::Unauthorized {
            body: text(),
            with_token: answer.with_token,
        }),
        HttpVerdict::Permanent => Err(ExportError::Permanent {
            status: answer.status,
            body: text(),
        }),
    }
}

/// A failed REST call, said to be about the experiment lookup.
fn lookup_error(name: &str, e: ExportError) -> ExportError {
    match e {
        ExportError::Permanent { status, body } => ExportError::UnknownExperiment {
            name: name.to_string(),
            detail: format!("MLflow's REST API answered {status}: {body}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_forgets_the_oldest_beyond_its_capacity() {
        let mut c = Cache {
            ids: HashMap::new(),
            order: VecDeque::new(),
            capacity: 2,
        };
        let key = |ws: Option<&str>, n: &str| (ws.map(Arc::from), Arc::from(n));
        c.insert(key(None, "a"), Arc::from("1"));
        c.insert(key(Some("w"), "a"), Arc::from("2"));
        assert_eq!(c.get(&key(None, "a")).as_deref(), Some("1"));
        assert_eq!(c.get(&key(Some("w"), "a")).as_deref(), Some("2"));
        c.insert(key(None, "b"), Arc::from("3"));
        assert_eq!(c.get(&key(None, "a")), None);
        assert_eq!(c.ids.len(), 2);
        assert_eq!(c.order.len(), 2);
    }

    #[test]
    fn forget_drops_only_the_id_that_failed() {
        let mut c = Cache {
            ids: HashMap::new(),
            order: VecDeque::new(),
            capacity: 2,
        };
        let key = |n: &str| (None, Arc::from(n));
        c.insert(key("a"), Arc::from("1"));
        c.insert(key("b"), Arc::from("2"));
        // Another sender already looked up a newer id: it stays.
        assert!(!c.forget(&key("a"), "9"));
        assert!(!c.forget(&key("c"), "1"));
        assert_eq!(c.get(&key("a")).as_deref(), Some("1"));
        assert!(c.forget(&key("a"), "1"));
        assert_eq!((c.get(&key("a")), c.ids.len(), c.order.len()), (None, 1, 1));
        // The freed slot is reusable without evicting "b".
        c.insert(key("a"), Arc::from("3"));
        assert_eq!(c.get(&key("b")).as_deref(), Some("2"));
        let experiments = Experiments::new("http://x", true, 4, Duration::from_secs(1));
        experiments.cache.lock_unpoisoned().insert(key("n"), Arc::from("5"));
        assert!(experiments.forget(None, &Arc::from("n"), "5"));
        assert!(!experiments.forget(None, &Arc::from("n"), "5"));
    }

    #[test]
    fn only_a_missing_resource_means_no_such_experiment() {
        let answer = |status: u16, body: &str| ExportError::Permanent {
            status: StatusCode::from_u16(status).unwrap(),
            body: body.into(),
        };
        let missing = r#"{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "No Experiment with id=3 exists"}"#;
        assert!(no_such_experiment(&answer(404, missing)));
        assert!(!no_such_experiment(&answer(404, "not found")));
        assert!(!no_such_experiment(&answer(400, missing)));
        assert!(!no_such_experiment(&ExportError::Transport("x".into())));
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            error_code(br#"{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}"#),
            Some("RESOURCE_DOES_NOT_EXIST")
        );
        assert_eq!(error_code(b"<html>"), None);
    }
}
