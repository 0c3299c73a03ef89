//! Exporters from their config: the client, its retry policy and its stage's settings, with the
//! defaults of exporters that have no queue config (debug) and what a spool changes, so the
//! topology only says which exporter feeds which pipeline.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::auth::Authenticator;
use super::debug::DebugExporter;
use super::otlp_grpc::OtlpGrpcExporter;
use super::otlphttp::{OtlpHttpExporter, traces_url};
use super::retry::RetryPolicy;
use super::{Exporter, StageSettings};
use crate::batch::BatchSettings;
use crate::config::{self, AuthConfig, ConfigError, Exporter as ExporterConfig, FileStorageConfig};
use crate::spool::Spool;
use crate::spool::deadletter::DeadLetter;

/// The debug exporter has no `sending_queue`: this many batches wait for its one sender.
const DEBUG_QUEUE_SIZE: usize = 100;

/// The exporter `id` as configured. Ok(None) when its authenticator failed to build (that
/// failure is reported at the extension); `auth` holds the enabled auth extensions.
pub(crate) fn exporter(
    id: &str,
    cfg: &ExporterConfig,
    auth: &BTreeMap<String, Arc<dyn Authenticator>>,
) -> Result<Option<Exporter>, ConfigError> {
    match cfg {
        ExporterConfig::OtlpHttp(cfg) => {
            let Ok(auth) = authenticator(cfg.auth.as_ref(), auth) else {
                return Ok(None);
            };
            match OtlpHttpExporter::new(cfg, auth) {
                Ok(x) => Ok(Some(Exporter::OtlpHttp(Box::new(x)))),
                Err(err) => Err(ConfigError::new(format!("exporters.{id}"), err.to_string())),
            }
        }
        ExporterConfig::OtlpGrpc(cfg) => {
            let Ok(auth) = authenticator(cfg.auth.as_ref(), auth) else {
                return Ok(None);
            };
            match OtlpGrpcExporter::new(id, cfg, auth) {
                Ok(x) => Ok(Some(Exporter::OtlpGrpc(Box::new(x)))),
                Err(err) => Err(ConfigError::new(format!("exporters.{id}"), err.to_string())),
            }
        }
        ExporterConfig::Debug(cfg) => Ok(Some(Exporter::Debug(DebugExporter {
            name: id.to_string(),
            verbosity: cfg.verbosity,
        }))),
    }
}

/// The authenticator `auth` names: none without `auth`; Err when the extension failed to build
/// (that failure is reported at the extension). Validation made sure it names an enabled one.
fn authenticator(
    auth: Option<&AuthConfig>,
    enabled: &BTreeMap<String, Arc<dyn Authenticator>>,
) -> Result<Option<Arc<dyn Authenticator>>, ()> {
    match auth {
        Some(a) => match enabled.get(&a.authenticator) {
            Some(c) => Ok(Some(c.clone())),
            None => Err(()),
        },
        None => Ok(None),
    }
}

/// How an exporter retries: its `retry_on_failure`; the debug exporter never fails transiently.
pub(crate) fn retry_policy(cfg: &ExporterConfig) -> RetryPolicy {
    match cfg.retry_on_failure() {
        Some(r) => RetryPolicy::new(r),
        None => RetryPolicy::new(&config::RetryConfig {
            enabled: false,
            ..Default::default()
        }),
    }
}

/// The batching of the pipeline an exporter's stage serves, and the batch processor's id for
/// its metric label ("" when the pipeline has none).
pub(crate) struct PipelineBatch {
    pub(crate) settings: BatchSettings,
    pub(crate) processor: String,
}

/// The settings of exporter `id`'s stage, in memory (see [`with_spool`]).
pub(crate) fn stage_settings(id: &str, cfg: &ExporterConfig, batch: PipelineBatch) -> StageSettings {
    let (queue_size, num_consumers, merge_waiting) = match cfg.sending_queue() {
        Some(q) if q.enabled => (q.queue_size, q.num_consumers, q.merge_waiting_batches),
        Some(_) => (1, 1, false),
        None => (DEBUG_QUEUE_SIZE, 1, false),
    };
    StageSettings {
        name: id.to_string(),
        batch: batch.settings,
        batch_processor: batch.processor,
        queue_size,
        num_consumers,
        merge_waiting,
        retry: retry_policy(cfg),
        spool: None,
        dead_letter: None,
        group: None,
        destination: match cfg {
            ExporterConfig::OtlpHttp(c) => traces_url(c),
            ExporterConfig::OtlpGrpc(c) => c.endpoint.clone(),
            ExporterConfig::Debug(_) => "debug log".into(),
        },
        failures_since_delivery: Default::default(),
        isolation_log: Default::default(),
    }
}

/// A stage behind a spool: the spool is the queue, so memory holds only a few batches per
/// sender, and retryable failures wait in it rather than give up (the spool pushes back).
/// Batches refused for good go to the dead-letter directory.
pub(crate) fn with_spool(
    mut settings: StageSettings,
    cfg: &ExporterConfig,
    storage: &FileStorageConfig,
    spool: Arc<Spool>,
) -> StageSettings {
    let dead_letter_root = if storage.dead_letter_directory.is_empty() {
        Path::new(&storage.directory).join("dead_letter")
    } else {
        Path::new(&storage.dead_letter_directory).to_path_buf()
    };
    settings.dead_letter = Some(Arc::new(DeadLetter::new(
        dead_letter_root.join(crate::spool::dir_name(&settings.name)),
        storage.fsync,
    )));
    settings.queue_size = settings.queue_size.min(settings.num_consumers * 2);
    if let Some(r) = cfg.retry_on_failure() {
        let mut retry = r.clone();
        retry.max_elapsed_time = config::GoDuration::default();
        settings.retry = RetryPolicy::new(&retry);
    }
    settings.spool = Some(spool);
    settings
}
