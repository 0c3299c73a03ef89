//! Wiring and lifecycle of `otlp-relay run` and `check`: config → TLS → exporters → receivers,
//! then an ordered shutdown on SIGTERM/SIGINT: not ready, stop accepting, flush batches, drain
//! exporters within the deadline, account for every accepted span.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchSettings;
use crate::cli::{EXIT_BAD_CONFIG, LogFormat};
use crate::config::{self, Config, ConfigError, Exporter as ExporterConfig, Extension, Processor, Receiver};
use crate::export::auth::Authenticator;
use crate::export::debug::DebugExporter;
use crate::export::oauth::OAuth2Client;
use crate::export::otlphttp::OtlpHttpExporter;
use crate::export::retry::RetryPolicy;
use crate::export::{Exporter, StageControl, StageSettings, start_stage};
use crate::pipeline::{Intake, MemoryBudget, Target};
use crate::receiver::{Protocol, ReceiverContext};
use crate::spool::deadletter::DeadLetter;
use crate::spool::{Spool, SpoolError, SpoolSettings};
use crate::supervise::{ListenerSlot, Supervisor};
use crate::telemetry::{self, ExporterReasonLabels, Health, Metrics, ReceiverLabels, exporter_labels};
use crate::tls::ServerTls;

/// How long open receiver connections may take to finish their requests after SIGTERM.
const RECEIVER_GRACE: Duration = Duration::from_secs(5);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("{0}")]
    Bind(std::io::Error),
    #[error("{0}")]
    Spool(#[from] SpoolError),
}

impl StartError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StartError::Config(_) => ExitCode::from(EXIT_BAD_CONFIG),
            StartError::Bind(_) | StartError::Spool(_) => ExitCode::from(1),
        }
    }
}

pub fn check_main(path: &Path) -> ExitCode {
    match config::load_file(path).and_then(|c| prepare(&c).map(|_| c)) {
        Ok(c) => {
            let pipelines: Vec<&String> = c.service.pipelines.keys().collect();
            println!(
                "{}: valid ({} receivers, {} exporters, pipelines {:?})",
                path.display(),
                c.receivers.len(),
                c.exporters.len(),
                pipelines
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} problem(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(1)
        }
    }
}

pub fn run_main(path: &Path, log_format: LogFormat, rt: tokio::runtime::Runtime) -> ExitCode {
    let config = match config::load_file(path).and_then(|c| prepare(&c).map(|p| (c, p))) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "otlp-relay: refusing to start, {} has {} problem(s):",
                path.display(),
                errors.0.len()
            );
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    crate::cli::init_logging(log_format, config.0.service.telemetry.logs.level.as_deref());
    crate::supervise::install_panic_hook();
    match rt.block_on(run(config.0, config.1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "relay failed to start");
            e.exit_code()
        }
    }
}

/// Everything loaded from disk before any port is bound: failures here are config errors.
pub struct Prepared {
    server_tls: BTreeMap<(String, &'static str), Arc<ServerTls>>,
    exporters: BTreeMap<String, Arc<Exporter>>,
    oauth: BTreeMap<String, Arc<OAuth2Client>>,
}

impl Prepared {
    /// A ready exporter by id (used by `replay`).
    pub fn exporter(&self, id: &str) -> Option<Arc<Exporter>> {
        self.exporters.get(id).cloned()
    }
}

pub fn prepare(config: &Config) -> Result<Prepared, config::ConfigErrors> {
    let mut errors = Vec::new();
    let mut server_tls = BTreeMap::new();
    for (id, r) in &config.receivers {
        let Receiver::Otlp(otlp) = r;
        for (name, proto) in [("grpc", &otlp.protocols.grpc), ("http", &otlp.protocols.http)] {
            if let Some(tls) = proto.as_ref().and_then(|p| p.tls.as_ref()) {
                match ServerTls::load(tls) {
                    Ok(t) => {
                        server_tls.insert((id.clone(), name), t);
                    }
                    Err(e) => errors.push(ConfigError::new(
                        format!("receivers.{id}.protocols.{name}.tls"),
                        e.to_string(),
                    )),
                }
            }
        }
    }
    // One token cache per enabled oauth2client, shared by every exporter naming it.
    let mut oauth = BTreeMap::new();
    for (id, ext) in &config.extensions {
        if let Extension::OAuth2Client(o) = ext
            && config.service.extensions.contains(id)
        {
            match OAuth2Client::new(id, o) {
                Ok(c) => {
                    oauth.insert(id.clone(), Arc::new(c));
                }
                Err(e) => errors.push(ConfigError::new(format!("extensions.{id}"), e.to_string())),
            }
        }
    }
    let mut exporters = BTreeMap::new();
    for (id, e) in &config.exporters {
        let exporter = match e {
            ExporterConfig::OtlpHttp(cfg) => {
                let auth = match &cfg.auth {
                    // Validation made sure it names an enabled oauth2client; a missing one failed above.
                    Some(a) => match oauth.get(&a.authenticator) {
                        Some(c) => Some(c.clone() as Arc<dyn Authenticator>),
                        None => continue,
                    },
                    None => None,
                };
                match OtlpHttpExporter::new(cfg, auth) {
                    Ok(x) => Exporter::OtlpHttp(Box::new(x)),
                    Err(err) => {
                        errors.push(ConfigError::new(format!("exporters.{id}"), err.to_string()));
                        continue;
                    }
                }
            }
            ExporterConfig::Debug(cfg) => Exporter::Debug(DebugExporter {
                name: id.clone(),
                verbosity: cfg.verbosity.clone(),
            }),
        };
        exporters.insert(id.clone(), Arc::new(exporter));
    }
    if errors.is_empty() {
        Ok(Prepared {
            server_tls,
            exporters,
            oauth,
        })
    } else {
        Err(config::ConfigErrors(errors))
    }
}

#[expect(
    clippy::expect_used,
    reason = "config validation refused unparsable endpoints before run"
)]
fn listen_addr(endpoint: &str, default: &str) -> SocketAddr {
    let e = if endpoint.is_empty() { default } else { endpoint };
    config::parse_listen_addr(e).expect("validated endpoint")
}

async fn bind(component: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    telemetry::bind(component, addr).await.map_err(StartError::Bind)
}

struct ReceiverRun {
    protocol: Protocol,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<ReceiverContext>,
}

pub async fn run(config: Config, prepared: Prepared) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let admin_stop = CancellationToken::new();
    let receivers_stop = CancellationToken::new();
    let control = StageControl::default();
    // Spooled stages stop at once on SIGTERM: what they hold in memory is on disk already.
    let spool_control = StageControl::default();
    let mut spools: BTreeMap<String, Arc<Spool>> = BTreeMap::new();
    let supervisor = Supervisor::new(metrics.clone(), health.clone());

    // Bind everything first, so a port clash fails the start before anything runs.
    let metrics_listener = bind(
        "metrics",
        listen_addr(&config.service.telemetry.metrics.address, "0.0.0.0:8888"),
    )
    .await?;
    let health_listener = match config.health_check() {
        Some(h) => Some(bind("health", listen_addr(&h.endpoint, "0.0.0.0:13133")).await?),
        None => None,
    };

    for client in prepared.oauth.values() {
        client.attach(metrics.clone(), health.clone());
        client.spawn_warmup();
    }

    // Exporter stages, one per exporter used by a pipeline.
    let mut stage_tasks = JoinSet::new();
    let mut inputs = BTreeMap::new();
    let mut budgets: BTreeMap<String, Arc<MemoryBudget>> = BTreeMap::new();
    for pipeline in config.service.pipelines.values() {
        let (batch, batch_id) = pipeline
            .processors
            .iter()
            .find_map(|id| match config.processors.get(id) {
                Some(Processor::Batch(b)) => Some((
                    BatchSettings {
                        send_batch_size: b.send_batch_size,
                        send_batch_max_size: b.send_batch_max_size,
                        timeout: b.timeout.0,
                    },
                    id.clone(),
                )),
                _ => None,
            })
            // Without a batch processor each request travels on its own.
            .unwrap_or((
                BatchSettings {
                    send_batch_size: 1,
                    send_batch_max_size: 0,
                    timeout: Duration::ZERO,
                },
                String::new(),
            ));
        for id in &pipeline.processors {
            if let Some(Processor::MemoryLimiter(m)) = config.processors.get(id) {
                budgets
                    .entry(id.clone())
                    .or_insert_with(|| MemoryBudget::new(id, m.limit_mib, m.spike_limit_mib));
            }
        }
        for id in &pipeline.exporters {
            if inputs.contains_key(id) {
                continue;
            }
            let (queue_size, num_consumers, retry) = match &config.exporters[id] {
                ExporterConfig::OtlpHttp(c) => {
                    let q = &c.sending_queue;
                    let (size, consumers) = if q.enabled {
                        (q.queue_size, q.num_consumers)
                    } else {
                        (1, 1)
                    };
                    (size, consumers, RetryPolicy::new(&c.retry_on_failure))
                }
                ExporterConfig::Debug(_) => (
                    100,
                    1,
                    RetryPolicy::new(&config::RetryConfig {
                        enabled: false,
                        ..Default::default()
                    }),
                ),
            };
            let mut settings = StageSettings {
                name: id.clone(),
                batch,
                batch_processor: batch_id.clone(),
                queue_size,
                num_consumers,
                retry,
                spool: None,
                dead_letter: None,
                destination: match &config.exporters[id] {
                    ExporterConfig::OtlpHttp(c) => crate::export::otlphttp::traces_url(c),
                    ExporterConfig::Debug(_) => "debug log".into(),
                },
                failures_since_delivery: Default::default(),
            };
            let mut stage_control = control.clone();
            if let Some((_, storage)) = config.exporter_storage(id) {
                let spool = Spool::open(SpoolSettings::from_config(id, storage), metrics.clone())?;
                spool.attach_health(health.clone());
                let dead_letter_root = if storage.dead_letter_directory.is_empty() {
                    Path::new(&storage.directory).join("dead_letter")
                } else {
                    Path::new(&storage.dead_letter_directory).to_path_buf()
                };
                settings.dead_letter = Some(Arc::new(DeadLetter::new(
                    dead_letter_root.join(crate::spool::dir_name(id)),
                    storage.fsync,
                )));
                // The spool is the queue: memory holds only a few batches per sender, and
                // retryable failures wait in it rather than give up (the spool pushes back).
                settings.queue_size = settings.queue_size.min(settings.num_consumers * 2);
                if let ExporterConfig::OtlpHttp(c) = &config.exporters[id] {
                    let mut retry = c.retry_on_failure.clone();
                    retry.max_elapsed_time = config::GoDuration::default();
                    settings.retry = RetryPolicy::new(&retry);
                }
                settings.spool = Some(spool.clone());
                stage_control = spool_control.clone();
                spools.insert(id.clone(), spool);
            }
            let input = start_stage(
                settings,
                prepared.exporters[id].clone(),
                metrics.clone(),
                stage_control,
                &supervisor,
                &mut stage_tasks,
            );
            let target = match spools.get(id) {
                Some(spool) => {
                    spool.start_reader(input)?;
                    Target::Spool(spool.clone())
                }
                None => Target::Memory(input),
            };
            inputs.insert(id.clone(), target);
        }
    }

    // Receivers: each feeds every exporter of every pipeline it is in.
    let mut receiver_runs = Vec::new();
    for (id, r) in &config.receivers {
        let in_pipelines: Vec<_> = config
            .service
            .pipelines
            .values()
            .filter(|p| p.receivers.contains(id))
            .collect();
        if in_pipelines.is_empty() {
            continue;
        }
        let mut targets = Vec::new();
        let mut seen = Vec::new();
        let mut receiver_budgets = Vec::new();
        for p in &in_pipelines {
            for e in &p.exporters {
                if !seen.contains(e) {
                    seen.push(e.clone());
                    targets.push(inputs[e].clone());
                }
            }
            for proc_id in &p.processors {
                if let Some(b) = budgets.get(proc_id)
                    && !receiver_budgets.iter().any(|x: &Arc<MemoryBudget>| Arc::ptr_eq(x, b))
                {
                    receiver_budgets.push(b.clone());
                }
            }
        }
        let intake = Arc::new(Intake::new(targets, receiver_budgets));
        let Receiver::Otlp(otlp) = r;
        for (protocol, transport, proto, default) in [
            (
                Protocol::Grpc,
                "grpc",
                &otlp.protocols.grpc,
                config::DEFAULT_GRPC_ENDPOINT,
            ),
            (
                Protocol::Http,
                "http",
                &otlp.protocols.http,
                config::DEFAULT_HTTP_ENDPOINT,
            ),
        ] {
            let Some(p) = proto else { continue };
            let listener = bind(&format!("{id}-{transport}"), listen_addr(&p.endpoint, default)).await?;
            let ctx = Arc::new(ReceiverContext {
                receiver: id.clone(),
                transport,
                intake: intake.clone(),
                metrics: metrics.clone(),
                max_recv_msg_size_mib: p.max_recv_msg_size_mib,
                include_metadata: p.include_metadata,
                ignored_metadata_warned: Default::default(),
                connections: crate::receiver::ConnectionSettings::from_config(p),
                health: health.clone(),
            });
            let tls = prepared.server_tls.get(&(id.clone(), transport)).cloned();
            if let Some(t) = &tls {
                t.spawn_reloader(format!("{id}-{transport}"), receivers_stop.clone());
            }
            receiver_runs.push(ReceiverRun {
                protocol,
                listener,
                tls,
                ctx,
            });
        }
    }

    // Accept loops are supervised like the stages: the listeners are shared, so a restarted
    // loop accepts on the socket that was bound (and logged) at start.
    let mut admin_tasks = JoinSet::new();
    let mut admin_handlers: Vec<(TcpListener, &'static str, telemetry::AdminHandler)> = Vec::new();
    {
        let m = metrics.clone();
        admin_handlers.push((
            metrics_listener,
            "metrics",
            Arc::new(move |req| telemetry::metrics_response(&m, req.uri().path())),
        ));
    }
    if let Some(listener) = health_listener {
        let h = health.clone();
        admin_handlers.push((
            listener,
            "health",
            Arc::new(move |req| telemetry::health_response(&h, req.uri().path())),
        ));
    }
    for (listener, name, handler) in admin_handlers {
        let (slot, stop) = (ListenerSlot::new(listener), admin_stop.clone());
        supervisor.spawn(
            &mut admin_tasks,
            "admin",
            format!("{name} listener"),
            move || {
                let (lease, handler, stop) = (slot.lease(), handler.clone(), stop.clone());
                async move {
                    if let Some(lease) = lease {
                        telemetry::serve_admin(lease, name, handler, stop).await;
                    }
                }
            },
            Box::new(|_| Box::pin(async {})),
        );
    }
    let mut receiver_tasks = JoinSet::new();
    for run in receiver_runs {
        let component = format!("{}-{}", run.ctx.receiver, run.ctx.transport);
        let (slot, stop) = (ListenerSlot::new(run.listener), receivers_stop.clone());
        let (protocol, tls, ctx) = (run.protocol, run.tls, run.ctx);
        // Requests in flight belong to their connection tasks, which outlive a panicked accept
        // loop: nothing accepted is held by the loop itself.
        supervisor.spawn(
            &mut receiver_tasks,
            "receiver",
            format!("{component} listener"),
            move || {
                let (lease, tls, ctx, stop) = (slot.lease(), tls.clone(), ctx.clone(), stop.clone());
                async move {
                    if let Some(lease) = lease {
                        crate::receiver::serve(lease, protocol, tls, ctx, stop, RECEIVER_GRACE).await;
                    }
                }
            },
            Box::new(|_| Box::pin(async {})),
        );
    }
    drop(inputs);
    health.set_started();
    log_destinations(&config);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "relay started"
    );

    wait_for_signal().await;
    let deadline = config.service.shutdown_timeout.0;
    tracing::info!(deadline = ?deadline, "shutting down: refusing new data, draining what was accepted");
    health.set_draining();
    receivers_stop.cancel();
    while receiver_tasks.join_next().await.is_some() {}
    // Spools: commit what was admitted, stop reading; their stages let go of memory at once.
    for spool in spools.values() {
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.shutdown()).await;
    }
    spool_control.close.cancel();
    spool_control.abort.cancel();
    control.close.cancel();
    let drained = tokio::time::timeout(deadline, async { while stage_tasks.join_next().await.is_some() {} })
        .await
        .is_ok();
    if !drained {
        tracing::warn!(deadline = ?deadline, "drain deadline reached; counting what is left as dropped");
        control.abort.cancel();
        while stage_tasks.join_next().await.is_some() {}
    }
    for spool in spools.values() {
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.join_reader()).await;
    }
    log_accounting(&config, &metrics, &spools);
    admin_stop.cancel();
    while admin_tasks.join_next().await.is_some() {}
    Ok(())
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
                    format!("bearer token from {}", a.authenticator)
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
            ExporterConfig::Debug(c) => {
                tracing::info!(exporter = %id, verbosity = ?c.verbosity, "spans are logged (debug exporter)");
            }
        }
    }
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the relay cleanly");
            None
        }
    };
    let sigterm = async {
        match term.as_mut() {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sigterm => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
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
        let mut accepted = 0;
        for r in receivers.iter().collect::<std::collections::BTreeSet<_>>() {
            for transport in ["grpc", "http"] {
                accepted += metrics
                    .receiver_accepted_spans
                    .get_or_create(&ReceiverLabels {
                        receiver: r.to_string(),
                        transport: transport.into(),
                    })
                    .get();
            }
        }
        let labels = exporter_labels(exporter);
        let sent = metrics.exporter_sent_spans.get_or_create(&labels).get();
        let failed = metrics.exporter_send_failed_spans.get_or_create(&labels).get();
        let dropped = metrics.dropped_spans(exporter);
        match spools.get(exporter) {
            None => {
                tracing::info!(exporter = %exporter, accepted, sent, failed, dropped, balanced = accepted == sent + failed + dropped, "final span accounting");
            }
            Some(spool) => {
                let (recovered, in_spool) = (spool.recovered_spans(), spool.pending_spans());
                // Spans lost to damaged spool records are in `dropped`, and named here.
                let corrupt = metrics
                    .exporter_dropped_spans
                    .get_or_create(&ExporterReasonLabels {
                        exporter: exporter.clone(),
                        reason: "corrupt".into(),
                    })
                    .get();
                // A damaged segment whose loss could not be counted leaves the sums short.
                let uncounted = spool.segments_with_uncounted_loss();
                tracing::info!(exporter = %exporter, accepted, recovered, sent, failed, dropped, corrupt, in_spool, segments_with_uncounted_loss = uncounted, balanced = uncounted == 0 && accepted + recovered == sent + failed + dropped + in_spool, "final span accounting");
            }
        }
    }
}
