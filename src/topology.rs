//! The relay's topology: turns a config into running stages. [`prepare`] loads everything from
//! disk that can be wrong (certificates, keys, exporter clients) without side effects, so
//! `check` and `replay` use it too; [`open_spools`] and [`bind`] take the spool directories and
//! ports; [`start`] wires pipelines (exporter stages, memory budgets, receivers) and starts
//! every task. Each component's own settings come from its constructor (`export::build`,
//! `receiver::build`); this file only says what feeds what.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchSettings;
use crate::config::{self, Config, ConfigError, Extension, PipelineConfig, Processor, Receiver};
use crate::export::auth::Authenticator;
use crate::export::build::PipelineBatch;
use crate::export::oauth::OAuth2Client;
use crate::export::{Exporter, StageControl, start_stage};
use crate::pipeline::{Intake, MemoryBudget, ProcessedRoute, Target};
use crate::receiver::build::{Endpoint, endpoints};
use crate::receiver::{Protocol, ReceiverContext};
use crate::spool::{Spool, SpoolError, SpoolSettings};
use crate::supervise::{ListenerSlot, Supervisor};
use crate::telemetry::{self, Health, Metrics};
use crate::tls::ServerTls;

/// How long open receiver connections may take to finish their requests after SIGTERM.
const RECEIVER_GRACE: Duration = Duration::from_secs(5);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("{0}")]
    Bind(std::io::Error),
    /// A spool that cannot be opened, at the YAML path that names it.
    #[error("{path}: {error}")]
    Spool { path: String, error: SpoolError },
}

/// Everything loaded from disk before any port is bound: failures here are config errors.
pub(crate) struct Prepared {
    server_tls: BTreeMap<(String, &'static str), Arc<ServerTls>>,
    exporters: BTreeMap<String, Arc<Exporter>>,
    oauth: BTreeMap<String, Arc<OAuth2Client>>,
    /// Every enabled auth extension, oauth2client included.
    auth: BTreeMap<String, Arc<dyn Authenticator>>,
}

impl Prepared {
    /// A ready exporter by id (used by `replay`).
    pub(crate) fn exporter(&self, id: &str) -> Option<Arc<Exporter>> {
        self.exporters.get(id).cloned()
    }
}

pub(crate) fn prepare(config: &Config) -> Result<Prepared, config::ConfigErrors> {
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
    // Every enabled authenticator by extension id: oauth2client and the static-credential ones.
    let mut auth: BTreeMap<String, Arc<dyn Authenticator>> = oauth
        .iter()
        .map(|(id, c)| (id.clone(), c.clone() as Arc<dyn Authenticator>))
        .collect();
    for (id, ext) in &config.extensions {
        if !config.service.extensions.contains(id) {
            continue;
        }
        match crate::export::auth::from_extension(id, ext) {
            Ok(Some(a)) => {
                auth.insert(id.clone(), a);
            }
            Ok(None) => {}
            Err(e) => errors.push(ConfigError::new(format!("extensions.{id}"), e)),
        }
    }
    let mut exporters = BTreeMap::new();
    for (id, e) in &config.exporters {
        match crate::export::build::exporter(id, e, &auth) {
            Ok(Some(exporter)) => {
                exporters.insert(id.clone(), Arc::new(exporter));
            }
            Ok(None) => {}
            Err(err) => errors.push(err),
        }
    }
    if errors.is_empty() {
        Ok(Prepared {
            server_tls,
            exporters,
            oauth,
            auth,
        })
    } else {
        Err(config::ConfigErrors(errors))
    }
}

/// The ids of the exporters some pipeline uses, once each, in pipeline order.
fn used_exporters(config: &Config) -> Vec<&String> {
    let mut used: Vec<&String> = Vec::new();
    for id in config.service.pipelines.values().flat_map(|p| p.exporters.iter()) {
        if !used.contains(&id) {
            used.push(id);
        }
    }
    used
}

/// The spool of every used exporter that has one, opened (and locked) before any port is bound:
/// a directory that cannot be made or is in use is a configuration problem.
pub(crate) fn open_spools(
    config: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<BTreeMap<String, Arc<Spool>>, StartError> {
    let mut spools = BTreeMap::new();
    for id in used_exporters(config) {
        if let Some((storage_id, storage)) = config.exporter_storage(id) {
            let spool = Spool::open(SpoolSettings::from_config(id, storage), metrics.clone()).map_err(|error| {
                StartError::Spool {
                    path: format!("extensions.{storage_id}"),
                    error,
                }
            })?;
            spool.attach_health(health.clone());
            spools.insert(id.clone(), spool);
        }
    }
    Ok(spools)
}

/// Every port the relay listens on, bound before anything runs so a clash fails the start.
pub(crate) struct Listeners<'a> {
    /// None with `service.telemetry.metrics.level: none`.
    metrics: Option<TcpListener>,
    health: Option<TcpListener>,
    /// (receiver id, endpoint, listener), in config order.
    receivers: Vec<(String, Endpoint<'a>, TcpListener)>,
}

async fn bind_one(component: &str, addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    telemetry::bind(component, addr).await.map_err(StartError::Bind)
}

pub(crate) async fn bind(config: &Config) -> Result<Listeners<'_>, StartError> {
    let metrics = match config.service.telemetry.metrics.listen() {
        Some(addr) => Some(bind_one("metrics", addr.0).await?),
        None => None,
    };
    let health = match config.health_check() {
        Some(h) => Some(bind_one("health", h.endpoint.0).await?),
        None => None,
    };
    let mut receivers = Vec::new();
    for (id, r) in &config.receivers {
        if !config.service.pipelines.values().any(|p| p.receivers.contains(id)) {
            continue;
        }
        let Receiver::Otlp(otlp) = r;
        for e in endpoints(otlp) {
            let listener = bind_one(&format!("{id}-{}", e.transport), e.addr).await?;
            receivers.push((id.clone(), e, listener));
        }
    }
    Ok(Listeners {
        metrics,
        health,
        receivers,
    })
}

/// The running relay: its tasks, and the tokens that stop them in order.
pub(crate) struct Running {
    pub(crate) spools: BTreeMap<String, Arc<Spool>>,
    pub(crate) stage_tasks: JoinSet<()>,
    pub(crate) receiver_tasks: JoinSet<()>,
    pub(crate) admin_tasks: JoinSet<()>,
    pub(crate) admin_stop: CancellationToken,
    pub(crate) receivers_stop: CancellationToken,
    /// Stages without a spool: they drain what they hold within the shutdown deadline.
    pub(crate) control: StageControl,
    /// Spooled stages stop at once on SIGTERM: what they hold in memory is on disk already.
    pub(crate) spool_control: StageControl,
}

/// Starts exporter stages, spool readers, receivers and the admin listeners, in that order.
pub(crate) fn start(
    config: &Config,
    prepared: Prepared,
    spools: BTreeMap<String, Arc<Spool>>,
    listeners: Listeners<'_>,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    supervisor: &Supervisor,
) -> Result<Running, StartError> {
    let mut running = Running {
        spools,
        stage_tasks: JoinSet::new(),
        receiver_tasks: JoinSet::new(),
        admin_tasks: JoinSet::new(),
        admin_stop: CancellationToken::new(),
        receivers_stop: CancellationToken::new(),
        control: StageControl::default(),
        spool_control: StageControl::default(),
    };
    for (id, client) in &prepared.oauth {
        metrics.token_extension(id);
        client.attach(metrics.clone(), health.clone());
        client.spawn_warmup();
    }
    for a in prepared.auth.values() {
        a.attach(metrics, health);
    }
    let budgets = memory_budgets(config, metrics);
    let inputs = start_stages(config, &prepared, &mut running, metrics, supervisor, &budgets)?;
    // One intake per receiver, shared by its protocols.
    let mut intakes: BTreeMap<String, Arc<Intake>> = BTreeMap::new();
    for (id, e, listener) in listeners.receivers {
        let intake = intakes
            .entry(id.clone())
            .or_insert_with(|| Arc::new(receiver_intake(config, &id, &inputs, &budgets, metrics)))
            .clone();
        let transport = e.transport;
        let ctx = Arc::new(ReceiverContext::new(
            &id,
            transport,
            e.config,
            intake,
            metrics.clone(),
            health.clone(),
        ));
        let tls = prepared.server_tls.get(&(id.clone(), transport)).cloned();
        if let Some(t) = &tls {
            let component = format!("{id}-{transport}");
            t.watch_validity(&component, health.clone(), supervisor, running.receivers_stop.clone());
            t.spawn_reloader(component, supervisor, running.receivers_stop.clone());
        }
        spawn_receiver(&mut running, supervisor, listener, e.protocol, tls, ctx);
    }
    spawn_admin(
        &mut running,
        supervisor,
        listeners.metrics,
        listeners
            .health
            .map(|l| (l, config.health_check().cloned().unwrap_or_default())),
        metrics,
        health,
    );
    Ok(running)
}

/// The batching of a pipeline: its first batch processor; without one each request travels on
/// its own.
fn pipeline_batch(config: &Config, pipeline: &PipelineConfig) -> PipelineBatch {
    pipeline
        .processors
        .iter()
        .find_map(|id| match config.processors.get(id) {
            Some(Processor::Batch(b)) => Some(PipelineBatch {
                settings: BatchSettings {
                    send_batch_size: b.send_batch_size,
                    send_batch_max_size: b.send_batch_max_size,
                    timeout: b.timeout.0,
                },
                processor: id.clone(),
            }),
            _ => None,
        })
        .unwrap_or(PipelineBatch {
            settings: BatchSettings {
                send_batch_size: 1,
                send_batch_max_size: 0,
                timeout: Duration::ZERO,
            },
            processor: String::new(),
        })
}

/// The pipeline's groupbytrace, held in each exporter's stage. Its held bytes are bounded by
/// half the memory_limiter's budget (64 MiB without one), and past three quarters of the budget
/// in use the oldest held traces leave.
fn pipeline_group(
    config: &Config,
    pipeline: &PipelineConfig,
    budgets: &BTreeMap<String, Arc<MemoryBudget>>,
) -> Option<crate::processor::grouping::GroupSettings> {
    let (id, g) = pipeline
        .processors
        .iter()
        .find_map(|id| match config.processors.get(id) {
            Some(Processor::GroupByTrace(g)) => Some((id, g)),
            _ => None,
        })?;
    let budgets: Vec<(Arc<MemoryBudget>, usize)> = pipeline
        .processors
        .iter()
        .filter_map(|p| budgets.get(p))
        .map(|b| (b.clone(), b.soft_limit() / 4 * 3))
        .collect();
    let max_bytes = budgets
        .iter()
        .map(|(b, _)| b.soft_limit() / 2)
        .min()
        .unwrap_or(64 << 20);
    Some(crate::processor::grouping::GroupSettings {
        processor: id.clone(),
        rules: crate::processor::groupbytrace::HoldRules {
            wait_duration: g.wait_duration.0,
            release_on_root: g.release_on_root,
            root_grace: g.root_grace.0,
            max_hold: g.max_hold.0,
            num_traces: g.num_traces,
            max_bytes,
        },
        budgets,
    })
}

/// One stage per exporter used by a pipeline (batched as the first pipeline naming it says);
/// a spooled exporter's stage reads from its spool. Returns where each exporter takes items.
fn start_stages(
    config: &Config,
    prepared: &Prepared,
    running: &mut Running,
    metrics: &Arc<Metrics>,
    supervisor: &Supervisor,
    budgets: &BTreeMap<String, Arc<MemoryBudget>>,
) -> Result<BTreeMap<String, Target>, StartError> {
    let mut inputs = BTreeMap::new();
    for pipeline in config.service.pipelines.values() {
        for id in &pipeline.exporters {
            if inputs.contains_key(id) {
                continue;
            }
            // Registered now: every series of the exporter is served at zero from start.
            let enqueue_failed = metrics.exporter(id).enqueue_failed.clone();
            let cfg = &config.exporters[id];
            let mut settings = crate::export::build::stage_settings(id, cfg, pipeline_batch(config, pipeline));
            settings.group = pipeline_group(config, pipeline, budgets);
            if let Some(group) = &settings.group {
                // Registered now, like the exporter's: served at zero from start.
                drop(metrics.processor(&group.processor));
            }
            let mut stage_control = running.control.clone();
            let spool = running.spools.get(id).cloned();
            if let (Some(spool), Some((_, storage))) = (&spool, config.exporter_storage(id)) {
                settings = crate::export::build::with_spool(settings, cfg, storage, spool.clone());
                stage_control = running.spool_control.clone();
            }
            let input = start_stage(
                settings,
                prepared.exporters[id].clone(),
                metrics.clone(),
                stage_control,
                supervisor,
                &mut running.stage_tasks,
            );
            let target = match spool {
                Some(spool) => {
                    spool.start_reader(input).map_err(|error| StartError::Spool {
                        path: format!("exporters.{id}.sending_queue.storage"),
                        error,
                    })?;
                    Target::Spool(spool, enqueue_failed)
                }
                None => Target::Memory(input, enqueue_failed),
            };
            inputs.insert(id.clone(), target);
        }
    }
    Ok(inputs)
}

/// One budget per memory_limiter processor used by a pipeline, shared by its receivers; its
/// processor item series registered now, at zero until the first request.
fn memory_budgets(config: &Config, metrics: &Metrics) -> BTreeMap<String, Arc<MemoryBudget>> {
    let mut budgets = BTreeMap::new();
    for pipeline in config.service.pipelines.values() {
        for id in &pipeline.processors {
            if let Some(Processor::MemoryLimiter(m)) = config.processors.get(id) {
                budgets.entry(id.clone()).or_insert_with(|| {
                    let (limit, spike) = m.effective_mib();
                    MemoryBudget::counted(limit, spike, metrics.processor(id))
                });
            }
        }
    }
    budgets
}

/// What receiver `id` feeds: every exporter of every pipeline it is in, each once, under the
/// memory budgets of those pipelines. Pipelines with span-editing processors get a processed
/// copy per distinct processor list (`processor::apply`).
fn receiver_intake(
    config: &Config,
    id: &String,
    inputs: &BTreeMap<String, Target>,
    budgets: &BTreeMap<String, Arc<MemoryBudget>>,
    metrics: &Arc<Metrics>,
) -> Intake {
    let mut targets = Vec::new();
    let mut routes: Vec<ProcessedRoute> = Vec::new();
    let mut seen = Vec::new();
    let mut receiver_budgets: Vec<Arc<MemoryBudget>> = Vec::new();
    for p in config.service.pipelines.values().filter(|p| p.receivers.contains(id)) {
        let chain = crate::processor::apply::chain(config, &p.processors, metrics);
        for e in &p.exporters {
            if seen.contains(e) {
                continue;
            }
            seen.push(e.clone());
            match &chain {
                None => targets.push(inputs[e].clone()),
                Some(chain) => match routes.iter_mut().find(|r| r.chain.ids() == chain.ids()) {
                    Some(route) => route.targets.push(inputs[e].clone()),
                    None => routes.push(ProcessedRoute {
                        chain: chain.clone(),
                        targets: vec![inputs[e].clone()],
                    }),
                },
            }
        }
        for proc_id in &p.processors {
            if let Some(b) = budgets.get(proc_id)
                && !receiver_budgets.iter().any(|x| Arc::ptr_eq(x, b))
            {
                receiver_budgets.push(b.clone());
            }
        }
    }
    Intake::new(targets, receiver_budgets).with_processed(routes)
}

/// A receiver's accept loop, supervised like the stages: the listener is shared, so a
/// restarted loop accepts on the socket that was bound (and logged) at start. Requests in
/// flight belong to their connection tasks, which outlive a panicked accept loop.
fn spawn_receiver(
    running: &mut Running,
    supervisor: &Supervisor,
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<ReceiverContext>,
) {
    let component = format!("{}-{}", ctx.receiver, ctx.transport);
    let (slot, stop) = (ListenerSlot::new(listener), running.receivers_stop.clone());
    supervisor.spawn(
        &mut running.receiver_tasks,
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

/// The metrics and health listeners, supervised like the receivers.
fn spawn_admin(
    running: &mut Running,
    supervisor: &Supervisor,
    metrics_listener: Option<TcpListener>,
    health_listener: Option<(TcpListener, crate::config::HealthCheckConfig)>,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) {
    let mut admin_handlers: Vec<(TcpListener, &'static str, crate::admin::AdminHandler)> = Vec::new();
    if let Some(metrics_listener) = metrics_listener {
        let m = metrics.clone();
        admin_handlers.push((
            metrics_listener,
            "metrics",
            Arc::new(move |req| crate::admin::metrics_response(&m, req.uri().path())),
        ));
    }
    if let Some((listener, settings)) = health_listener {
        let h = health.clone();
        admin_handlers.push((
            listener,
            "health",
            Arc::new(move |req| telemetry::health_response(&h, &settings, req.uri().path())),
        ));
    }
    for (listener, name, handler) in admin_handlers {
        let (slot, stop) = (ListenerSlot::new(listener), running.admin_stop.clone());
        supervisor.spawn(
            &mut running.admin_tasks,
            "admin",
            format!("{name} listener"),
            move || {
                let (lease, handler, stop) = (slot.lease(), handler.clone(), stop.clone());
                async move {
                    if let Some(lease) = lease {
                        crate::admin::serve_admin(lease, name, handler, stop).await;
                    }
                }
            },
            Box::new(|_| Box::pin(async {})),
        );
    }
}
