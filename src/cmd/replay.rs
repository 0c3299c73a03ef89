//! `otlp-relay replay --from DIR --config FILE`: sends dead-lettered (or spooled) records again
//! through the config's exporters, with their retry policy; the file handling is in
//! `crate::spool::replay`.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use super::Exit;
use super::logging::{self, LogFormat};
use crate::batch::Batch;
use crate::config::{self, Config};
use crate::export::retry::RetryPolicy;
use crate::export::{ExportError, Exporter, OutBatch};
use crate::pipeline::{Destination, Item};
use crate::spool::replay::Resend;

#[derive(Debug, Clone, clap::Args)]
pub(super) struct ReplayArgs {
    /// A dead-letter directory (its per-exporter subdirectories are read too).
    #[arg(long)]
    from: PathBuf,
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// Send everything through this exporter instead of the one each record names.
    #[arg(long)]
    exporter: Option<String>,
}

pub(super) fn main(args: ReplayArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    logging::init(LogFormat::Text, None);
    match rt.block_on(run(&args)) {
        Ok(t) => {
            println!(
                "replay: {} record(s), {} span(s) delivered; {} record(s), {} span(s) refused again; {} file(s) in use, skipped",
                t.records, t.spans, t.failed_records, t.failed_spans, t.skipped_files
            );
            if t.failed_records == 0 && t.skipped_files == 0 {
                Exit::Success.into()
            } else {
                Exit::Failure.into()
            }
        }
        Err(e) => {
            eprintln!("otlp-relay replay: {e:#}");
            Exit::Usage.into()
        }
    }
}

async fn run(args: &ReplayArgs) -> anyhow::Result<crate::spool::replay::Totals> {
    let config = config::load_file(&args.config).map_err(|e| anyhow::anyhow!("{}:\n{e}", args.config.display()))?;
    let prepared = crate::topology::prepare(&config).map_err(|e| anyhow::anyhow!("{}:\n{e}", args.config.display()))?;
    let exporters = ConfigExporters {
        path: args.config.clone(),
        config,
        prepared,
    };
    crate::spool::replay::run(&args.from, args.exporter.as_deref(), &exporters).await
}

/// The exporters of one config, as the relay would build them.
struct ConfigExporters {
    path: PathBuf,
    config: Config,
    prepared: crate::topology::Prepared,
}

impl Resend for ConfigExporters {
    async fn resend(&self, id: &str, batch: Batch<Destination, Item>) -> anyhow::Result<Result<(), String>> {
        let exporter = self
            .prepared
            .exporter(id)
            .with_context(|| format!("exporter {id:?} is not in {}", self.path.display()))?;
        let retry = match self.config.exporters.get(id) {
            Some(cfg) => crate::export::build::retry_policy(cfg),
            None => RetryPolicy::new(&config::RetryConfig {
                enabled: false,
                ..Default::default()
            }),
        };
        Ok(send(&exporter, &retry, &batch).await.map_err(|e| e.to_string()))
    }
}

/// Sends one batch, retrying retryable failures by the exporter's policy.
async fn send(exporter: &Exporter, retry: &RetryPolicy, batch: &OutBatch) -> Result<(), ExportError> {
    let started = Instant::now();
    let mut schedule = retry.schedule();
    loop {
        let error = match exporter.export(batch).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !error.is_retryable() {
            return Err(error);
        }
        match schedule.next_delay(started.elapsed(), error.retry_after(), rand::random()) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return Err(error),
        }
    }
}
