//! Lifecycle of the relay: bind → start → wait → drain. What runs comes from `topology`;
//! here is the order: spools and ports are taken before anything runs, then after `shutdown`
//! resolves (SIGTERM/SIGINT): not ready, stop accepting, flush batches, drain exporters within
//! the deadline, account for every accepted span.
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Config, Exporter as ExporterConfig};
use crate::spool::Spool;
use crate::supervise::Supervisor;
use crate::telemetry::{Health, Metrics};
use crate::topology::{self, Prepared, Running, StartError};

pub(crate) async fn run(
    config: Config,
    prepared: Prepared,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let instance = crate::telemetry::instance_id();
    let metrics = Arc::new(Metrics::with_labels(
        config.service.telemetry.resource_labels(&instance),
    ));
    let health = Arc::new(Health::default());
    let supervisor = Supervisor::new(metrics.clone(), health.clone());
    // Disk, then ports, then tasks: a start that fails leaves nothing running or half-sent.
    let spools = topology::open_spools(&config, &metrics, &health)?;
    let listeners = topology::bind(&config).await?;
    let mut running = topology::start(&config, prepared, spools, listeners, &metrics, &health, &supervisor)?;
    health.set_started();
    log_destinations(&config);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "relay started"
    );

    shutdown.await;
    let deadline = config.service.shutdown_timeout.0;
    tracing::info!(deadline = ?deadline, "shutting down: refusing new data, draining what was accepted");
    health.set_draining();
    drain(&mut running, deadline).await;
    log_accounting(&config, &metrics, &running.spools);
    running.admin_stop.cancel();
    while running.admin_tasks.join_next().await.is_some() {}
    Ok(())
}

/// Stops receivers, lets spooled stages go at once (their data is on disk), and gives the
/// others until `deadline` to deliver; what is left then is counted dropped.
async fn drain(running: &mut Running, deadline: std::time::Duration) {
    running.receivers_stop.cancel();
    while running.receiver_tasks.join_next().await.is_some() {}
    // Spools: commit what was admitted, stop reading; their stages let go of memory at once.
    for spool in running.spools.values() {
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.shutdown()).await;
    }
    running.spool_control.close.cancel();
    running.spool_control.abort.cancel();
    running.control.close.cancel();
    let stage_tasks = &mut running.stage_tasks;
    let drained = tokio::time::timeout(deadline, async { while stage_tasks.join_next().await.is_some() {} })
        .await
        .is_ok();
    if !drained {
        tracing::warn!(deadline = ?deadline, "drain deadline reached; counting what is left as dropped");
        running.control.abort.cancel();
        while running.stage_tasks.join_next().await.is_some() {}
    }
    for spool in running.spools.values() {
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.join_reader()).await;
    }
}

/// Says where spans go, per exporter in a pipeline: a first run should show the URL, the
/// default experiment and how it authenticates, not only where the relay listens.
fn log_destinations(config: &Config) {
    let used: std::collections::BTreeSet<&String> = config
        .service
        .pipelines
        .values()
        .flat_map(|p| p.exporters.iter())
        .collect();
    for id in used {
        match &config.exporters[id] {
            ExporterConfig::OtlpHttp(c) => {
                let experiment = c
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(crate::otlp::EXPERIMENT_HEADER))
                    .map_or(
                        "(none: MLflow answers 422 unless spans carry mlflow.experiment_id)",
                        |(_, v)| v.as_str(),
                    );
                let auth = c.auth.as_ref().map_or("none (direct)".to_string(), |a| {
                    format!("credentials from {}", a.authenticator)
                });
                let spool = config
                    .exporter_storage(id)
                    .map_or("none (memory queue)".to_string(), |(_, s)| s.directory.clone());
                tracing::info!(
                    exporter = %id,
                    url = %crate::export::otlphttp::traces_url(c),
                    experiment = %experiment,
                    auth = %auth,
                    spool = %spool,
                    "spans go here"
                );
            }
            ExporterConfig::OtlpGrpc(c) => {
                let auth = c
                    .auth
                    .as_ref()
                    .map_or("none".to_string(), |a| format!("bearer token from {}", a.authenticator));
                let spool = config
                    .exporter_storage(id)
                    .map_or("none (memory queue)".to_string(), |(_, s)| s.directory.clone());
                tracing::info!(exporter = %id, endpoint = %c.endpoint, protocol = "OTLP/gRPC", auth = %auth, spool = %spool, "spans go here");
            }
            ExporterConfig::Debug(c) => {
                tracing::info!(exporter = %id, verbosity = ?c.verbosity.as_str(), "spans are logged (debug exporter)");
            }
        }
    }
}

/// accepted = sent + failed + dropped for every exporter, logged at exit. With a spool, spans
/// recovered at start come in on top and spans still on disk go out on top.
fn log_accounting(config: &Config, metrics: &Metrics, spools: &BTreeMap<String, Arc<Spool>>) {
    for exporter in config.exporters.keys() {
        let receivers: Vec<&String> = config
            .service
            .pipelines
            .values()
            .filter(|p| p.exporters.contains(exporter))
            .flat_map(|p| p.receivers.iter())
            .collect();
        if receivers.is_empty() {
            continue;
        }
        // Typed counters, each receiver once (a receiver in two pipelines to this exporter).
        let accepted: u64 = receivers
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|r| metrics.accepted_spans(r))
            .sum();
        let counts = metrics.exporter(exporter);
        let (sent, failed, dropped) = (counts.sent.get(), counts.send_failed.get(), counts.dropped_total.get());
        match spools.get(exporter) {
            None => {
                tracing::info!(exporter = %exporter, accepted, sent, failed, dropped, balanced = accepted == sent + failed + dropped, "final span accounting");
            }
            Some(spool) => {
                let (recovered, in_spool) = (spool.recovered_spans(), spool.pending_spans());
                // Spans lost to damaged spool records are in `dropped`, and named here.
                let corrupt = counts.dropped.get(crate::telemetry::drop_reason::CORRUPT);
                // A damaged segment whose loss could not be counted leaves the sums short.
                let uncounted = spool.segments_with_uncounted_loss();
                tracing::info!(exporter = %exporter, accepted, recovered, sent, failed, dropped, corrupt, in_spool, segments_with_uncounted_loss = uncounted, balanced = uncounted == 0 && accepted + recovered == sent + failed + dropped + in_spool, "final span accounting");
            }
        }
    }
}
