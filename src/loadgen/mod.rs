//! The load generator (`otlp-relay loadgen`): OTLP trace load with telemetrygen-compatible flags,
//! OTLP retries, an HDR latency report, and `--verify-sink` to prove zero loss end to end.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "the load generator handles only data it generated; its expects are invariants (static histogram bounds, in-memory writes)"
)]
pub(crate) mod agent;
pub(crate) mod client;
pub(crate) mod pace;
pub(crate) mod report;
pub(crate) mod spans;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use self::client::{Outcome, Target, TlsOptions, Transport};
use self::pace::Pacer;
use self::report::{Report, WorkerStats};
use self::spans::{Encoding, FastRng, Shape, Template};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoadgenArgs {
    /// Target `host:port` (default localhost:4317, or localhost:4318 with --otlp-http). A
    /// `http://` or `https://` prefix chooses plaintext or TLS explicitly.
    #[arg(long)]
    pub(crate) otlp_endpoint: Option<String>,
    /// Send OTLP/HTTP instead of gRPC.
    #[arg(long)]
    pub(crate) otlp_http: bool,
    /// URL path for OTLP/HTTP.
    #[arg(long, default_value = "/v1/traces")]
    pub(crate) otlp_http_url_path: String,
    /// Plaintext (no TLS), as telemetrygen.
    #[arg(long)]
    pub(crate) otlp_insecure: bool,
    /// CA certificate (PEM) to verify the server (default: the system roots).
    #[arg(long)]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Present a client certificate (--client-cert, --client-key).
    #[arg(long)]
    pub(crate) mtls: bool,
    /// Client certificate (PEM, the chain after it) for a relay that requires mTLS.
    #[arg(long, requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
    /// Header `key="value"` on every request (repeatable).
    #[arg(long = "otlp-header")]
    pub(crate) otlp_headers: Vec<String>,
    /// Resource attribute `key="value"` (repeatable).
    #[arg(long = "otlp-attributes")]
    pub(crate) otlp_attributes: Vec<String>,
    /// Span attribute `key="value"` (repeatable).
    #[arg(long = "telemetry-attributes")]
    pub(crate) telemetry_attributes: Vec<String>,
    /// Concurrent senders, each with its own connection and one request in flight.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Spans per second in total over all workers (0: as fast as possible). Unlike telemetrygen's
    /// per-worker traces/s, so a benchmark's load does not change with --workers.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// Run for this long (e.g. 30s); otherwise until --traces are sent.
    #[arg(long, value_parser = pace::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Traces to send in total over all workers (telemetrygen: per worker); default 1 when
    /// --duration is not given.
    #[arg(long)]
    pub(crate) traces: Option<u64>,
    /// Child spans per trace (the root span comes on top).
    #[arg(long, default_value_t = 1)]
    pub(crate) child_spans: usize,
    /// Spans per request (rounded down to whole traces, at least one trace).
    #[arg(long, default_value_t = 100)]
    pub(crate) batch_size: usize,
    /// service.name of the generated resource.
    #[arg(long, default_value = "telemetrygen")]
    pub(crate) service: String,
    #[arg(long, value_enum, default_value_t = Encoding::Proto)]
    pub(crate) encoding: Encoding,
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub(crate) compression: Compression,
    /// Size in bytes of each padding attribute (0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) attr_bytes: usize,
    /// Number of padding attributes per span when --attr-bytes is set.
    #[arg(long, default_value_t = 1)]
    pub(crate) attr_count: usize,
    /// Realistic LLM-agent traces (agent, chat, tool and retriever spans with gen_ai.* attributes).
    #[arg(long)]
    pub(crate) genai: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Seed for ids (default: from the clock).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// The sink's base URL (e.g. http://127.0.0.1:4319): compare its unique spans with ours; exit 1 on loss.
    #[arg(long)]
    pub(crate) verify_sink: Option<String>,
    /// How long --verify-sink waits for the counts to settle.
    #[arg(long, value_parser = pace::parse_duration, default_value = "120s")]
    pub(crate) verify_timeout: Duration,
    /// --verify-sink stops waiting once the sink's count has not moved for this long.
    #[arg(long, value_parser = pace::parse_duration, default_value = "5s")]
    pub(crate) verify_settle: Duration,
    /// Per-request timeout.
    #[arg(long, value_parser = pace::parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// Retries of a retryable failure before its spans count as refused.
    #[arg(long, default_value_t = 5)]
    pub(crate) max_retries: u32,
    /// Exit 1, naming the likely cause, when less than this share of the spans sent was
    /// accepted (0 to 1). Whatever its value, a run with nothing accepted fails.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub(crate) min_accepted: f64,
    /// Agent-shaped load: each trace's spans are spread over this time and sent as they end
    /// (children first, root last), many traces in flight, flushed every --export-interval or
    /// when --batch-size spans have ended, like an SDK's BatchSpanProcessor. Needs --rate.
    #[arg(long, value_parser = pace::parse_duration)]
    pub(crate) trace_duration: Option<Duration>,
    /// With --trace-duration: the SDK's export schedule (OTEL_BSP_SCHEDULE_DELAY, default 5 s).
    #[arg(long, value_parser = pace::parse_duration, default_value = "5s", requires = "trace_duration")]
    pub(crate) export_interval: Duration,
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a share between 0 and 1 (e.g. 0.99)")),
    }
}

/// Whether the run accepted too little: nothing at all, or less than `min_share` of what it sent.
fn too_little_accepted(sent: u64, accepted: u64, min_share: f64) -> bool {
    sent > 0 && (accepted == 0 || (accepted as f64) < min_share * sent as f64)
}

/// Everything a worker needs, shared read-only.
struct Plan {
    shape: Shape,
    template: Template,
    traces_per_request: usize,
    target: Target,
    http: bool,
    tls: Option<rustls::ClientConfig>,
    rate_per_worker: f64,
    trace_duration: Option<Duration>,
    export_interval: Duration,
    batch_size: usize,
    deadline: Option<Instant>,
    max_retries: u32,
    seed: u64,
    sent: AtomicU64,
    accepted: AtomicU64,
}

fn endpoint_base(args: &LoadgenArgs) -> (String, bool) {
    let default = if args.otlp_http {
        "localhost:4318"
    } else {
        "localhost:4317"
    };
    let ep = args.otlp_endpoint.as_deref().unwrap_or(default).trim_end_matches('/');
    if let Some(rest) = ep.strip_prefix("http://") {
        return (format!("http://{rest}"), false);
    }
    if let Some(rest) = ep.strip_prefix("https://") {
        return (format!("https://{rest}"), true);
    }
    if args.otlp_insecure {
        (format!("http://{ep}"), false)
    } else {
        (format!("https://{ep}"), true)
    }
}

fn build_shape(args: &LoadgenArgs) -> anyhow::Result<Shape> {
    let mut resource = vec![spans::kv_str("service.name", &args.service)];
    for a in &args.otlp_attributes {
        resource.push(spans::parse_attribute(a).with_context(|| format!("bad --otlp-attributes {a:?}"))?);
    }
    let span_attrs = args
        .telemetry_attributes
        .iter()
        .map(|a| spans::parse_attribute(a).with_context(|| format!("bad --telemetry-attributes {a:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pad = (args.attr_count, args.attr_bytes);
    Ok(if args.genai {
        spans::genai_shape(resource, &span_attrs, pad)
    } else {
        spans::plain_shape(resource, &span_attrs, args.child_spans, pad)
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn sink_unique(url: &str, tls: Option<rustls::ClientConfig>) -> anyhow::Result<u64> {
    let url = format!("{}/stats", url.trim_end_matches('/'));
    let stats = client::get_json(&url, tls).await?;
    stats["unique_spans"]
        .as_u64()
        .with_context(|| format!("{url}: no unique_spans in {stats}"))
}

/// How a run ended, for the exit code: `Passed` (0), or `Failed` (1: loss, or too little accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Passed,
    Failed,
}

/// What the run needs besides the plan: the endpoint and TLS for messages and `--verify-sink`,
/// and the sink's count before the load.
struct Setup {
    plan: Arc<Plan>,
    start: Instant,
    total_traces: Option<u64>,
    endpoint: String,
    use_tls: bool,
    tls_config: rustls::ClientConfig,
    verify_before: Option<u64>,
}

/// Sends the load, prints the report and judges it. Err: loadgen could not run (a bad argument,
/// the sink's counts unreadable, a worker that failed).
pub(crate) async fn run(args: LoadgenArgs) -> anyhow::Result<Verdict> {
    let setup = prepare(&args).await?;
    let (stats, elapsed) = run_workers(&args, &setup).await?;
    let mut report = Report::new(&stats, elapsed, labels(&args), args.workers);
    if let (Some(url), Some(before)) = (&args.verify_sink, setup.verify_before) {
        let after = settled_sink_count(&args, url, &setup.tls_config, before + stats.counts.spans_accepted).await?;
        report.verify = Some(report::verify(url, stats.counts.spans_accepted, before, after));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    if too_little_accepted(
        report.counts.spans_sent,
        report.counts.spans_accepted,
        args.min_accepted,
    ) {
        eprintln!(
            "otlp-relay loadgen: {} of {} spans accepted (--min-accepted {}): {}",
            report.counts.spans_accepted,
            report.counts.spans_sent,
            args.min_accepted,
            report::diagnose(
                &report.counts.first_errors,
                &setup.endpoint,
                setup.use_tls,
                args.client_cert.is_some()
            )
        );
        return Ok(Verdict::Failed);
    }
    Ok(match &report.verify {
        Some(v) if !v.ok => Verdict::Failed,
        _ => Verdict::Passed,
    })
}

/// Checks the arguments and builds the plan (shape, template, target, TLS).
async fn prepare(args: &LoadgenArgs) -> anyhow::Result<Setup> {
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let (base, use_tls) = endpoint_base(args);
    let endpoint = base
        .split_once("://")
        .map_or(base.as_str(), |(_, rest)| rest)
        .to_string();
    let opts = TlsOptions {
        ca_cert: args.ca_cert.clone(),
        client_cert: args.client_cert.clone(),
        client_key: args.client_key.clone(),
    };
    if args.mtls {
        anyhow::ensure!(
            args.client_cert.is_some() && args.client_key.is_some(),
            "--mtls needs --client-cert and --client-key"
        );
    }
    let tls_config = client::client_tls(&opts)?;
    let tls = use_tls.then(|| tls_config.clone());
    let shape = build_shape(args)?;
    if args.trace_duration.is_some() {
        anyhow::ensure!(
            args.rate > 0.0,
            "--trace-duration needs --rate (spans/s): agents start traces at a pace, not as fast as possible"
        );
    }
    let trace_len = shape.spans.len();
    let traces_per_request = (args.batch_size / trace_len).max(1);
    let seed = args.seed.unwrap_or_else(now_ns);
    let template = Template::build(&shape, traces_per_request, args.encoding, seed)?;
    let headers = client::parse_headers(&args.otlp_headers)?;
    let total_traces = match (args.traces, args.duration) {
        (Some(n), _) => Some(n),
        (None, Some(_)) => None,
        (None, None) => Some(1),
    };
    let verify_before = match &args.verify_sink {
        Some(url) => Some(
            sink_unique(url, Some(tls_config.clone()))
                .await
                .context("--verify-sink: reading the sink's /stats before the run")?,
        ),
        None => None,
    };
    let start = Instant::now();
    let plan = Arc::new(Plan {
        shape,
        template,
        traces_per_request,
        target: Target {
            base,
            path: args.otlp_http_url_path.clone(),
            headers,
            encoding: args.encoding,
            gzip: args.compression == Compression::Gzip,
            timeout: args.timeout,
        },
        http: args.otlp_http,
        tls,
        rate_per_worker: args.rate / args.workers as f64,
        trace_duration: args.trace_duration,
        export_interval: args.export_interval,
        batch_size: args.batch_size,
        deadline: args.duration.map(|d| start + d),
        max_retries: args.max_retries,
        seed,
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
    });
    Ok(Setup {
        plan,
        start,
        total_traces,
        endpoint,
        use_tls,
        tls_config,
        verify_before,
    })
}

/// Runs the workers (with a progress line on a terminal) until they are done or Ctrl-C.
async fn run_workers(args: &LoadgenArgs, setup: &Setup) -> anyhow::Result<(WorkerStats, Duration)> {
    let (plan, start) = (&setup.plan, setup.start);
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
    }
    let progress = std::io::stderr().is_terminal().then(|| {
        let plan = plan.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let secs = start.elapsed().as_secs_f64();
                let acc = plan.accepted.load(Ordering::Relaxed);
                eprint!(
                    "\r{secs:6.1}s  sent {:>10}  accepted {:>10}  {:>9.0} spans/s ",
                    plan.sent.load(Ordering::Relaxed),
                    acc,
                    acc as f64 / secs
                );
            }
        })
    });
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let plan = plan.clone();
        let cancel = cancel.clone();
        let traces = setup.total_traces.map(|t| pace::split(t, args.workers, w));
        tasks.push(tokio::spawn(async move {
            if plan.trace_duration.is_some() {
                agent_worker(w, plan, traces, cancel).await
            } else {
                worker(w, plan, traces, cancel).await
            }
        }));
    }
    let mut stats = WorkerStats::default();
    for t in tasks {
        stats.merge(&t.await.context("worker panicked")??);
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    Ok((stats, elapsed))
}

/// The report's transport, encoding and compression labels.
fn labels(args: &LoadgenArgs) -> (&'static str, &'static str, &'static str) {
    (
        if args.otlp_http { "http" } else { "grpc" },
        match args.encoding {
            Encoding::Proto => "proto",
            Encoding::Json => "json",
        },
        match args.compression {
            Compression::None => "none",
            Compression::Gzip => "gzip",
        },
    )
}

/// The sink's unique spans once they reach `want`, stop moving for --verify-settle, or
/// --verify-timeout passes.
async fn settled_sink_count(
    args: &LoadgenArgs,
    url: &str,
    tls_config: &rustls::ClientConfig,
    want: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + args.verify_timeout;
    let settle = args.verify_settle;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let now_unique = sink_unique(url, Some(tls_config.clone())).await?;
        if now_unique >= want || Instant::now() > deadline {
            return Ok(now_unique);
        }
        if now_unique != last.0 {
            last = (now_unique, Instant::now());
        } else if last.1.elapsed() > settle {
            return Ok(now_unique);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exponential backoff with ±20 % jitter: 100 ms, 200 ms, ... capped at 5 s.
fn backoff(attempt: u32, rng: &mut FastRng) -> Duration {
    let base = 0.1 * 2f64.powi(attempt.min(6) as i32);
    let jitter = 0.8 + 0.4 * (rng.next_u64() % 1000) as f64 / 1000.0;
    Duration::from_secs_f64((base * jitter).min(5.0))
}

async fn worker(
    index: usize,
    plan: Arc<Plan>,
    mut traces_left: Option<u64>,
    cancel: CancellationToken,
) -> anyhow::Result<WorkerStats> {
    let mut stats = WorkerStats::default();
    let mut rng = worker_rng(&plan, index);
    let mut transport = transport(&plan)?;
    let mut pacer = Pacer::new(plan.rate_per_worker);
    let mut remainder: Option<Template> = None;
    loop {
        if cancel.is_cancelled() || plan.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let traces = match traces_left {
            Some(0) => break,
            Some(n) => (n as usize).min(plan.traces_per_request),
            None => plan.traces_per_request,
        };
        let template = if traces == plan.traces_per_request {
            &plan.template
        } else {
            if remainder.as_ref().is_none_or(|t| t.traces != traces) {
                remainder = Some(Template::build(&plan.shape, traces, plan.template.encoding, plan.seed)?);
            }
            remainder.as_ref().expect("built above")
        };
        if let Some(due) = pacer.due(template.spans, Instant::now()) {
            if plan.deadline.is_some_and(|d| due >= d) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = cancel.cancelled() => break,
            }
        }
        // Rendered straight into the buffer the request owns: one copy of the template per request.
        let mut buf = Vec::with_capacity(template.len());
        template.render(&mut rng, now_ns(), &mut buf);
        let body = Bytes::from(buf);
        deliver(
            &mut transport,
            body,
            template.spans as u64,
            &plan,
            &mut stats,
            &mut rng,
            &cancel,
        )
        .await;
        if let Some(n) = traces_left.as_mut() {
            *n -= traces as u64;
        }
    }
    Ok(stats)
}

fn worker_rng(plan: &Plan, index: usize) -> FastRng {
    FastRng::new(
        plan.seed
            .wrapping_add((index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    )
}

fn transport(plan: &Plan) -> anyhow::Result<Transport> {
    if plan.http {
        Ok(Transport::http(plan.target.clone(), plan.tls.clone())?)
    } else {
        Ok(Transport::grpc(plan.target.clone(), plan.tls.clone())?)
    }
}

/// Sends one request of `spans` spans, retrying by the OTLP rules, and counts the outcome.
async fn deliver(
    transport: &mut Transport,
    body: Bytes,
    spans: u64,
    plan: &Plan,
    stats: &mut WorkerStats,
    rng: &mut FastRng,
    cancel: &CancellationToken,
) {
    stats.counts.spans_sent += spans;
    plan.sent.fetch_add(spans, Ordering::Relaxed);
    let mut attempt = 0;
    loop {
        let t0 = Instant::now();
        let (outcome, bytes) = transport.send(body.clone()).await;
        stats.record_latency(t0.elapsed());
        stats.counts.requests += 1;
        stats.bytes += bytes;
        match outcome {
            Outcome::Accepted { rejected } => {
                let rejected = rejected.min(spans);
                stats.counts.spans_accepted += spans - rejected;
                plan.accepted.fetch_add(spans - rejected, Ordering::Relaxed);
                if rejected > 0 {
                    stats.counts.spans_refused += rejected;
                    *stats.counts.refused_by.entry("partial_success".into()).or_default() += rejected;
                }
                break;
            }
            Outcome::Failed(f) => {
                stats.counts.requests_failed += 1;
                *stats.counts.failures_by.entry(f.label.clone()).or_default() += 1;
                if !stats.counts.first_errors.contains_key(&f.label) {
                    stats.counts.first_errors.insert(f.label.clone(), f.detail.clone());
                }
                if f.retryable && attempt < plan.max_retries && !cancel.is_cancelled() {
                    let wait = backoff(attempt, rng).max(f.retry_after.unwrap_or_default());
                    attempt += 1;
                    stats.counts.retries += 1;
                    stats.counts.spans_retried += spans;
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => continue,
                        _ = cancel.cancelled() => {}
                    }
                }
                stats.counts.spans_refused += spans;
                *stats.counts.refused_by.entry(f.label).or_default() += spans;
                break;
            }
        }
    }
}

/// `--trace-duration`: traces in flight, spans sent as they end (see `agent`).
async fn agent_worker(
    index: usize,
    plan: Arc<Plan>,
    traces: Option<u64>,
    cancel: CancellationToken,
) -> anyhow::Result<WorkerStats> {
    let mut stats = WorkerStats::default();
    let mut rng = worker_rng(&plan, index);
    let mut transport = transport(&plan)?;
    let spans_per_trace = plan.shape.spans.len().max(1) as f64;
    let agent_plan = agent::AgentPlan {
        traces_per_sec: plan.rate_per_worker / spans_per_trace,
        trace_duration: plan.trace_duration.unwrap_or_default(),
        export_interval: plan.export_interval,
        max_batch: plan.batch_size,
        traces,
    };
    let start = Instant::now();
    let mut traffic = agent::AgentTraffic::new(plan.shape.clone(), agent_plan, rng.next_u64(), now_ns());
    loop {
        if plan.deadline.is_some_and(|d| Instant::now() >= d) {
            traffic.stop_starting();
        }
        match traffic.step(start.elapsed()) {
            agent::Step::Send(spans) => {
                let count = spans.len() as u64;
                let body = Bytes::from(agent::encode_request(&plan.shape, spans, plan.template.encoding)?);
                deliver(&mut transport, body, count, &plan, &mut stats, &mut rng, &cancel).await;
            }
            agent::Step::WaitUntil(at) => {
                let mut due = start + at;
                // Wake at the deadline to stop starting traces; after it, only the schedule.
                if let Some(deadline) = plan.deadline.filter(|d| *d > Instant::now()) {
                    due = due.min(deadline);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = cancel.cancelled() => break,
                }
            }
            agent::Step::Done => break,
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn too_little_accepted_follows_the_share() {
        assert!(too_little_accepted(10, 0, 0.0), "nothing accepted always fails");
        assert!(
            !too_little_accepted(0, 0, 0.0),
            "nothing sent is not a failure of the relay"
        );
        assert!(!too_little_accepted(10, 1, 0.0));
        assert!(too_little_accepted(10, 8, 0.9));
        assert!(!too_little_accepted(10, 9, 0.9));
        assert!(parse_share("0.99").is_ok() && parse_share("1.5").is_err() && parse_share("x").is_err());
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn telemetrygen_flags_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "--otlp-endpoint",
            "127.0.0.1:4317",
            "--otlp-insecure",
            "--otlp-header",
            r#"x-mlflow-experiment-id="0""#,
            "--workers",
            "4",
            "--rate",
            "10000",
            "--duration",
            "30s",
            "--child-spans",
            "9",
            "--batch-size",
            "100",
            "--compression",
            "gzip",
        ])
        .unwrap();
        assert_eq!(endpoint_base(&cli.args), ("http://127.0.0.1:4317".into(), false));
        assert_eq!(cli.args.duration, Some(Duration::from_secs(30)));
        let secure = Cli::try_parse_from(["x", "--otlp-http"]).unwrap();
        assert_eq!(endpoint_base(&secure.args), ("https://localhost:4318".into(), true));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut rng = FastRng::new(1);
        let first = backoff(0, &mut rng);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        assert!(backoff(3, &mut rng) > Duration::from_millis(600));
        assert!(backoff(30, &mut rng) <= Duration::from_secs(5));
    }
}
