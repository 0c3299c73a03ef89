//! `otlp-relay replay --from DIR --config FILE`: sends the records of a dead-letter (or spool)
//! directory again through the config's exporter, once an operator has fixed what made the
//! destination refuse them. Delivered files are renamed `*.replayed`; records refused again are
//! written back to DIR as a new file, so nothing is lost and nothing is sent twice by a rerun.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use super::deadletter::DeadLetter;
use super::{frame, list_segments, proto, record_to_routed};
use crate::batch::Batch;
use crate::config::{self, Exporter as ExporterConfig};
use crate::export::retry::RetryPolicy;
use crate::export::{ExportError, Exporter, OutBatch};

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// A dead-letter directory (its per-exporter subdirectories are read too).
    #[arg(long)]
    pub from: PathBuf,
    #[arg(long, default_value = "config.yaml")]
    pub config: PathBuf,
    /// Send everything through this exporter instead of the one each record names.
    #[arg(long)]
    pub exporter: Option<String>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Totals {
    pub records: u64,
    pub spans: u64,
    pub failed_records: u64,
    pub failed_spans: u64,
}

pub fn main(args: ReplayArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    match rt.block_on(run(&args)) {
        Ok(t) => {
            println!(
                "replay: {} record(s), {} span(s) delivered; {} record(s), {} span(s) refused again",
                t.records, t.spans, t.failed_records, t.failed_spans
            );
            if t.failed_records == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("otlp-relay replay: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Segment files in `dir` and in its immediate subdirectories.
fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = list_segments(dir)?.into_iter().map(|(_, p)| p).collect();
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        out.extend(list_segments(&sub)?.into_iter().map(|(_, p)| p));
    }
    Ok(out)
}

pub async fn run(args: &ReplayArgs) -> anyhow::Result<Totals> {
    let cfg = config::load_file(&args.config).map_err(|e| anyhow::anyhow!("{}:\n{e}", args.config.display()))?;
    let prepared = crate::app::prepare(&cfg).map_err(|e| anyhow::anyhow!("{}:\n{e}", args.config.display()))?;
    let resolve = |id: &str| -> anyhow::Result<(Arc<Exporter>, RetryPolicy)> {
        let exporter = prepared
            .exporter(id)
            .with_context(|| format!("exporter {id:?} is not in {}", args.config.display()))?;
        let retry = match cfg.exporters.get(id) {
            Some(ExporterConfig::OtlpHttp(c)) => RetryPolicy::new(&c.retry_on_failure),
            _ => RetryPolicy::new(&config::RetryConfig {
                enabled: false,
                ..Default::default()
            }),
        };
        Ok((exporter, retry))
    };
    let paths = files(&args.from).with_context(|| format!("reading {}", args.from.display()))?;
    if paths.is_empty() {
        bail!("no record files (*.seg) in {}", args.from.display());
    }
    let mut totals = Totals::default();
    for path in paths {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let scan = frame::scan(&data);
        if let Some(e) = &scan.tail_error {
            tracing::warn!(file = %path.display(), error = %e, kept = scan.records.len(), "torn tail ignored");
        }
        let mut refused = Vec::new();
        for mut record in scan.records {
            let id = args.exporter.clone().unwrap_or_else(|| record.exporter.clone());
            if id.is_empty() {
                bail!("{}: a record names no exporter; pass --exporter", path.display());
            }
            let (exporter, retry) = resolve(&id)?;
            let spans = record.spans as u64;
            match send(&exporter, &retry, &record).await {
                Ok(()) => {
                    totals.records += 1;
                    totals.spans += spans;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), exporter = %id, spans, error = %e, "refused again");
                    totals.failed_records += 1;
                    totals.failed_spans += spans;
                    record.attempts += 1;
                    record.error = e.to_string();
                    record.exporter = id;
                    refused.push(record);
                }
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if !refused.is_empty() {
            let dl = DeadLetter::new(dir.to_path_buf(), true);
            for r in &refused {
                dl.write(r)
                    .with_context(|| format!("writing back to {}", dir.display()))?;
            }
        }
        let done = path.with_extension("replayed");
        std::fs::rename(&path, &done).with_context(|| format!("renaming {}", path.display()))?;
    }
    Ok(totals)
}

/// Sends one record, retrying retryable failures by the exporter's policy.
async fn send(exporter: &Exporter, retry: &RetryPolicy, record: &proto::Record) -> Result<(), ExportError> {
    let routed = record_to_routed(record.clone(), None);
    let batch: OutBatch = Batch {
        key: routed.destination,
        items: vec![routed.item],
        spans: record.spans as usize,
    };
    let started = Instant::now();
    let mut schedule = retry.schedule();
    loop {
        let error = match exporter.export(&batch).await {
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
