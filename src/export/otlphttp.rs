//! The otlphttp exporter: POSTs a batch's concatenated ResourceSpans to MLflow's /v1/traces
//! (protobuf, gzip by default) with the configured headers and the batch's experiment.
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};

use super::auth::Authenticator;
use super::experiments::{self, Experiments, Lookup, WORKSPACE_HEADER};
use super::retry::{HttpVerdict, classify_http};
use super::route::{self, ExperimentRef, Target};
use super::{ExportError, OutBatch};
use crate::config::{Compression, Encoding, OtlpHttpExporterConfig};
use crate::http_client::HttpsClient;
use crate::otlp::EXPERIMENT_HEADER;

/// MLflow's header linking the traces of a request to a run.
pub(crate) const RUN_HEADER: &str = "x-mlflow-run-id";

const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// Bytes of an answer read at most.
const ANSWER_READ_LIMIT: usize = 1024 * 1024;

pub(crate) struct OtlpHttpExporter {
    client: HttpsClient,
    url: Uri,
    headers: HeaderMap,
    compression: Compression,
    json: bool,
    timeout: Duration,
    pub(crate) auth: Option<Arc<dyn Authenticator>>,
    /// The resource attribute naming an experiment (`mlflow.experiment_name_attribute`).
    named_by: String,
    experiments: Experiments,
    /// REST lookups since the stage last read them (found, created), for its metric.
    lookups: [std::sync::atomic::AtomicU64; 2],
    /// Bisect refused requests by trace (`mlflow.isolate_poison_traces`).
    pub(crate) isolate: bool,
    /// The config says MLflow is the destination (an `x-mlflow-*` header or an `mlflow` key
    /// that only MLflow serves): only then do hints name it.
    pub(crate) mlflow: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("endpoint {0:?} is not a valid URL")]
    Url(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// MLflow's REST API base: `mlflow.api_endpoint`, else `endpoint`, else `traces_endpoint`
/// without its `/v1/traces`.
pub(crate) fn api_url(cfg: &OtlpHttpExporterConfig) -> String {
    if !cfg.mlflow.api_endpoint.is_empty() {
        cfg.mlflow.api_endpoint.clone()
    } else if !cfg.endpoint.is_empty() {
        cfg.endpoint.clone()
    } else {
        let t = cfg.traces_endpoint.trim_end_matches('/');
        t.strip_suffix("/v1/traces").unwrap_or(t).to_string()
    }
}

/// `endpoint` + `/v1/traces`, unless `traces_endpoint` says where exactly.
pub(crate) fn traces_url(cfg: &OtlpHttpExporterConfig) -> String {
    if !cfg.traces_endpoint.is_empty() {
        cfg.traces_endpoint.clone()
    } else {
        format!("{}/v1/traces", cfg.endpoint.trim_end_matches('/'))
    }
}

/// Whether `cfg` says its destination is MLflow (or the gate in front of it): a header of
/// MLflow's (`x-mlflow-experiment-id`, `x-mlflow-workspace`, ...) or experiment lookups.
fn names_mlflow(cfg: &OtlpHttpExporterConfig) -> bool {
    cfg.headers.keys().any(|k| {
        k.get(..9)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("x-mlflow-"))
    }) || !cfg.mlflow.experiment_name_attribute.is_empty()
        || !cfg.mlflow.api_endpoint.is_empty()
        || cfg.mlflow.create_experiments
}

impl OtlpHttpExporter {
    pub(crate) fn new(cfg: &OtlpHttpExporterConfig, auth: Option<Arc<dyn Authenticator>>) -> Result<Self, SetupError> {
        let url_text = traces_url(cfg);
        let url: Uri = url_text.parse().map_err(|_| SetupError::Url(url_text.clone()))?;
        let tls = crate::tls::client_config(&cfg.tls, url.scheme() == Some(&http::uri::Scheme::HTTPS))?;
        let keep_alive = (!cfg.disable_keep_alives).then_some(cfg.idle_conn_timeout.0);
        let client = crate::http_client::pooled(tls, cfg.timeout.0, crate::http_client::KeepAlive(keep_alive));
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            // validate() checked names and values.
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                headers.insert(name, value);
            }
        }
        Ok(OtlpHttpExporter {
            client,
            url,
            headers,
            compression: cfg.compression,
            json: cfg.encoding == Encoding::Json,
            timeout: cfg.timeout.0,
            auth,
            named_by: cfg.mlflow.experiment_name_attribute.clone(),
            experiments: Experiments::new(
                &api_url(cfg),
                cfg.mlflow.create_experiments,
                cfg.mlflow.experiment_cache_size,
                cfg.timeout.0,
            ),
            lookups: Default::default(),
            isolate: cfg.mlflow.isolate_poison_traces,
            mlflow: names_mlflow(cfg),
        })
    }

    /// The batch's items grouped by where MLflow should put them (usually one group).
    pub(crate) fn targets(&self, batch: &OutBatch) -> Vec<(Target, Vec<usize>)> {
        route::group(
            batch.items.iter().map(|i| i.chunk.bytes.as_ref()),
            &batch.key,
            &self.named_by,
        )
    }

    /// REST lookups (found, created) since the last call.
    pub(crate) fn take_lookups(&self) -> [(Lookup, u64); 2] {
        use std::sync::atomic::Ordering::AcqRel;
        [
            (Lookup::Found, self.lookups[0].swap(0, AcqRel)),
            (Lookup::Created, self.lookups[1].swap(0, AcqRel)),
        ]
    }

    /// The MLflow headers of `target`, its experiment name looked up, and the id a name gave.
    async fn mlflow_headers(&self, target: &Target) -> Result<(HeaderMap, Option<Arc<str>>), ExportError> {
        let mut headers = HeaderMap::new();
        let id = match &target.experiment {
            None => None,
            Some(ExperimentRef::Id(id)) => Some(id.clone()),
            Some(ExperimentRef::Name(name)) => {
                let (id, how) = self
                    .experiments
                    .id(&self.client, self.auth.as_ref(), target.workspace.as_ref(), name)
                    .await?;
                let slot = match how {
                    Lookup::Cached => None,
                    Lookup::Found => Some(0),
                    Lookup::Created => Some(1),
                };
                if let Some(i) = slot {
                    self.lookups[i].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                Some(id)
            }
        };
        let looked_up = match &target.experiment {
            Some(ExperimentRef::Name(_)) => id.clone(),
            _ => None,
        };
        for (name, value) in [
            (EXPERIMENT_HEADER, id.as_deref()),
            (RUN_HEADER, target.run.as_deref()),
            (WORKSPACE_HEADER, target.workspace.as_deref()),
        ] {
            if let Some(v) = value {
                let v = HeaderValue::from_str(v).map_err(|_| ExportError::BadRouting {
                    header: name,
                    value: v.chars().take(64).collect(),
                })?;
                headers.insert(name, v);
            }
        }
        Ok((headers, looked_up))
    }

    /// One attempt. The caller owns retries.
    async fn send(&self, mlflow: HeaderMap, body: Bytes, content_type: &'static str) -> Result<(), ExportError> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        let headers = req.headers_mut();
        headers.extend(self.headers.clone());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        // Never "identity": MLflow answers it with 400.
        match self.compression {
            Compression::Gzip => {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            Compression::Deflate => {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("deflate"));
            }
            Compression::None => {}
        }
        headers.extend(mlflow);
        let sent_auth = super::auth::authorize(self.auth.as_ref(), headers)
            .await
            .map_err(ExportError::Auth)?;
        // `timeout` bounds the whole exchange (connect, send, headers and body): a destination
        // or proxy that answers headers and then stalls the body would otherwise hold this
        // sender forever, with no log and no retry.
        let exchange = async {
            let response = self
                .client
                .request(req)
                .await
                .map_err(|e| ExportError::Transport(crate::telemetry::error_chain(&e)))?;
            let status = response.status();
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let verdict = classify_http(status, retry_after.as_ref(), SystemTime::now());
            let body = read_body(response.into_body(), verdict).await?;
            Ok::<_, ExportError>((status, verdict, body))
        };
        let (status, verdict, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExportError::Timeout(self.timeout))??;
        match verdict {
            HttpVerdict::Delivered => Ok(()),
            HttpVerdict::Retry { retry_after } => Err(ExportError::Retryable {
                status,
                body,
                retry_after,
            }),
            HttpVerdict::Unauthorized => {
                if let (Some(auth), Some(value)) = (&self.auth, &sent_auth) {
                    auth.invalidate(value);
                }
                Err(ExportError::Unauthorized {
                    body,
                    with_token: sent_auth.is_some(),
                })
            }
            HttpVerdict::Permanent => Err(ExportError::Permanent { status, body }),
        }
    }

    /// Sends every group of the batch (see `targets`), stopping at the first failure.
    pub(crate) async fn export(&self, batch: &OutBatch) -> Result<(), ExportError> {
        for (target, members) in self.targets(batch) {
            let part = batch.subset(&members);
            self.export_to(&part, &target).await?;
        }
        Ok(())
    }

    /// One attempt to send `batch` to `target`. When MLflow answers that the experiment a name
    /// was looked up to does not exist (deleted and purged since), the remembered id is dropped
    /// and the batch sent once more to what the name resolves to now (created when allowed).
    pub(crate) async fn export_to(&self, batch: &OutBatch, target: &Target) -> Result<(), ExportError> {
        let (mlflow, looked_up) = self.mlflow_headers(target).await?;
        let result = self.export_with(batch, mlflow).await;
        if let (Err(e), Some(id), Some(ExperimentRef::Name(name))) = (&result, &looked_up, &target.experiment)
            && experiments::no_such_experiment(e)
            && self.experiments.forget(target.workspace.as_ref(), name, id)
        {
            let (mlflow, _) = self.mlflow_headers(target).await?;
            return self.export_with(batch, mlflow).await;
        }
        result
    }

    async fn export_with(&self, batch: &OutBatch, mlflow: HeaderMap) -> Result<(), ExportError> {
        // Compressing a large batch takes milliseconds of CPU: on the blocking pool it does not
        // stall the async workers, so receivers keep answering and the batcher keeps draining
        // their intake (a stalled batcher shows up as 429s to agents).
        let (payload, json, compression) = (batch.payload(), self.json, self.compression);
        let (body, content_type) = tokio::task::spawn_blocking(move || encode_body(payload, json, compression))
            .await
            .map_err(|e| ExportError::Encode(e.to_string()))??;
        self.send(mlflow, body, content_type).await
    }
}

/// The request body: the batch as protobuf (or OTLP/JSON), compressed as configured.
fn encode_body(payload: Bytes, json: bool, compression: Compression) -> Result<(Bytes, &'static str), ExportError> {
    let (raw, content_type) = if json {
        use prost::Message;
        let request =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(payload.as_ref())
                .map_err(|e| ExportError::Encode(e.to_string()))?;
        let json = serde_json::to_vec(&request).map_err(|e| ExportError::Encode(e.to_string()))?;
        (Bytes::from(json), "application/json")
    } else {
        (payload, "application/x-protobuf")
    };
    let body = compress(raw, compression).map_err(|e| ExportError::Encode(e.to_string()))?;
    Ok((body, content_type))
}

/// Compresses fast: MLflow, not the wire, is the bottleneck, and CPU is what the relay saves.
fn compress(raw: Bytes, compression: Compression) -> std::io::Result<Bytes> {
    let level = flate2::Compression::fast();
    let out = Vec::with_capacity(raw.len() / 4);
    let compressed = match compression {
        Compression::None => return Ok(raw),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(out, level);
            enc.write_all(&raw)?;
            enc.finish()?
        }
        Compression::Deflate => {
            let mut enc = flate2::write::ZlibEncoder::new(out, level);
            enc.write_all(&raw)?;
            enc.finish()?
        }
    };
    Ok(Bytes::from(compressed))
}

/// Reads the answer's body whole (so the connection can be reused), keeping at most 16 KiB of
/// an error's text. A body that breaks off is a transport error: the answer is not trusted. One
/// far larger than any OTLP answer is not read to its end (the connection is dropped instead).
async fn read_body(body: hyper::body::Incoming, verdict: HttpVerdict) -> Result<String, ExportError> {
    let mut body = std::pin::pin!(body);
    let mut kept = Vec::new();
    let mut read = 0usize;
    while read <= ANSWER_READ_LIMIT
        && let Some(frame) = body.frame().await
    {
        let frame = frame.map_err(|e| ExportError::Transport(format!("reading the answer: {e}")))?;
        if let Ok(data) = frame.into_data() {
            read += data.len();
            if verdict != HttpVerdict::Delivered && kept.len() < ERROR_BODY_LIMIT {
                let room = ERROR_BODY_LIMIT - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }
    Ok(String::from_utf8_lossy(&kept).trim().to_string())
}
