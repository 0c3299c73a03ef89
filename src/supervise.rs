//! Supervision of the relay's long-lived tasks: a panic is caught, logged once with the
//! component, counted, shown on `/readyz` while the task is down, and the task restarts with
//! backoff. What the task held is salvaged by the caller's `on_panic` (counted or dead-lettered),
//! so a bug costs at most the data in hand and never stops the pipeline.
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinSet;

pub(crate) use crate::lock::LockUnpoisoned;
use crate::telemetry::{ComponentLabels, Health, Metrics};

/// What a panicked task leaves to its supervisor: salvage what it held.
pub(crate) type OnPanic = Box<dyn FnMut(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The restart delay after each panic: doubling from `FIRST` to `MAX`, back to `FIRST` once a
/// run lasted `HEALTHY` (one bad request should not slow restarts for the rest of the day).
#[derive(Debug, Clone)]
pub(crate) struct RestartBackoff {
    first: Duration,
    next: Duration,
}

impl RestartBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
    const HEALTHY: Duration = Duration::from_secs(60);

    pub(crate) fn new() -> Self {
        Self::starting_at(Self::FIRST)
    }

    fn starting_at(first: Duration) -> Self {
        RestartBackoff { first, next: first }
    }

    /// The delay before the next start, given how long the run that just panicked lasted.
    pub(crate) fn after_run(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= Self::HEALTHY {
            self.next = self.first;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

/// The panic payload as text (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic payload)".to_string()
    }
}

/// Spawns and supervises tasks for one relay run.
#[derive(Clone)]
pub(crate) struct Supervisor {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    backoff: RestartBackoff,
}

impl Supervisor {
    pub(crate) fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Supervisor {
            metrics,
            health,
            backoff: RestartBackoff::new(),
        }
    }

    /// Runs `make()` until it returns; after a panic, salvages with `on_panic`, waits the
    /// backoff (readiness says why) and starts it again. `component` is the metric label;
    /// `instance` tells apart tasks of one component (e.g. `sender 2`) in `/readyz`.
    pub(crate) fn spawn<F, Fut>(
        &self,
        tasks: &mut JoinSet<()>,
        component: &str,
        instance: String,
        mut make: F,
        mut on_panic: OnPanic,
    ) where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let metrics = self.metrics.clone();
        let health = self.health.clone();
        let mut backoff = self.backoff.clone();
        let labels = ComponentLabels {
            component: component.to_string(),
        };
        tasks.spawn(async move {
            let restarts = metrics.component_restarts.get_or_create(&labels).clone();
            loop {
                let started = Instant::now();
                let Err(payload) = AssertUnwindSafe(make()).catch_unwind().await else {
                    return;
                };
                let message = panic_message(payload.as_ref());
                restarts.inc();
                let delay = backoff.after_run(started.elapsed());
                health.set_unready(
                    &instance,
                    Some(format!("down after a panic ({message}); restarting in {delay:?}")),
                );
                tracing::error!(component = %labels.component, task = %instance, panic = %message, restart_in = ?delay, "task panicked; what it held is accounted for, restarting");
                on_panic(message).await;
                tokio::time::sleep(delay).await;
                health.set_unready(&instance, None);
            }
        });
    }
}

/// A listener shared by the runs of a supervised accept loop. Each run leases it; a run that
/// panics gives it back, so the restart accepts on the socket bound (and logged) at start; a run
/// that ends closes it, so clients are refused at once instead of waiting in the backlog.
pub(crate) struct ListenerSlot(std::sync::Mutex<Option<tokio::net::TcpListener>>);

impl ListenerSlot {
    pub(crate) fn new(listener: tokio::net::TcpListener) -> Arc<ListenerSlot> {
        Arc::new(ListenerSlot(std::sync::Mutex::new(Some(listener))))
    }

    /// The listener for one run; None once a run has ended normally.
    pub(crate) fn lease(self: &Arc<Self>) -> Option<ListenerLease> {
        let listener = self.0.lock_unpoisoned().take()?;
        Some(ListenerLease {
            slot: self.clone(),
            listener: Some(listener),
            done: false,
        })
    }
}

pub(crate) struct ListenerLease {
    slot: Arc<ListenerSlot>,
    listener: Option<tokio::net::TcpListener>,
    done: bool,
}

impl ListenerLease {
    /// The run ends normally: the listener closes when the lease is dropped.
    pub(crate) fn finish(&mut self) {
        self.done = true;
    }
}

impl std::ops::Deref for ListenerLease {
    type Target = tokio::net::TcpListener;
    #[expect(clippy::expect_used, reason = "the listener is only taken in drop")]
    fn deref(&self) -> &tokio::net::TcpListener {
        self.listener.as_ref().expect("leased listener")
    }
}

impl Drop for ListenerLease {
    fn drop(&mut self) {
        // A panicked run's future is dropped after the panic was caught, so `done` (not
        // thread::panicking) tells a crash from an orderly end.
        if !self.done {
            *self.slot.0.lock_unpoisoned() = self.listener.take();
        }
    }
}

/// The blocking twin of `Supervisor::spawn`, for the spool's threads: runs `run` until it returns;
/// after a panic, counts it, reports it to readiness while down and runs it again after the
/// backoff. The thread's state lives in what `run` borrows, so a restart carries on from it.
pub(crate) fn supervise_thread(
    component: &str,
    instance: &str,
    metrics: &Metrics,
    health: &dyn Fn() -> Option<Arc<Health>>,
    mut run: impl FnMut(),
) {
    let restarts = metrics
        .component_restarts
        .get_or_create(&ComponentLabels {
            component: component.to_string(),
        })
        .clone();
    let mut backoff = RestartBackoff::new();
    loop {
        let started = Instant::now();
        let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(&mut run)) else {
            return;
        };
        let message = panic_message(payload.as_ref());
        restarts.inc();
        let delay = backoff.after_run(started.elapsed());
        let h = health();
        if let Some(h) = &h {
            h.set_unready(
                instance,
                Some(format!("down after a panic ({message}); restarting in {delay:?}")),
            );
        }
        tracing::error!(component, task = instance, panic = %message, restart_in = ?delay, "thread panicked; restarting");
        std::thread::sleep(delay);
        if let Some(h) = &h {
            h.set_unready(instance, None);
        }
    }
}

/// Logs panics through tracing (one structured line with the location) instead of the default
/// hook's bare stderr text, so they reach the same log pipeline as everything else.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), %location, panic = %message, "panic");
    }));
}

/// Test-only fault injection for the supervision tests: `OTLP_RELAY_TEST_PANIC=batcher:3,sender:1`
/// makes those points panic the next N times they are reached (with data in hand). The points:
/// receiver, batcher, sender, spool_writer, spool_reader, tls_reloader, tls_validity. Unset in
/// production, it costs one initialised-once lookup.
pub(crate) fn fault_point(point: &str) {
    static PLAN: OnceLock<Vec<(String, AtomicU32)>> = OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        std::env::var("OTLP_RELAY_TEST_PANIC")
            .map(|spec| parse_fault_plan(&spec))
            .unwrap_or_default()
    });
    for (name, left) in plan {
        if name == point
            && left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected fault at {point} (OTLP_RELAY_TEST_PANIC)");
        }
    }
}

fn parse_fault_plan(spec: &str) -> Vec<(String, AtomicU32)> {
    spec.split(',')
        .filter_map(|part| {
            let (name, count) = part.trim().split_once(':')?;
            Some((name.to_string(), AtomicU32::new(count.parse().ok()?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_healthy_run() {
        let mut b = RestartBackoff::new();
        let quick = Duration::from_millis(10);
        let delays: Vec<Duration> = (0..10).map(|_| b.after_run(quick)).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[2], Duration::from_secs(2));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(30));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(b.after_run(Duration::from_secs(61)), Duration::from_millis(500));
    }

    #[test]
    fn panic_messages_of_both_payload_kinds() {
        let r = std::panic::catch_unwind(|| panic!("plain"));
        assert_eq!(panic_message(r.unwrap_err().as_ref()), "plain");
        let n = 3;
        let r = std::panic::catch_unwind(|| panic!("formatted {n}"));
        assert_eq!(panic_message(r.unwrap_err().as_ref()), "formatted 3");
    }

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = Arc::new(std::sync::Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _guard = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock_unpoisoned() += 1;
        assert_eq!(*m.lock_unpoisoned(), 2);
    }

    #[test]
    fn fault_plan_parses_counts_and_skips_junk() {
        let plan = parse_fault_plan("batcher:3, sender:1,bogus,x:y");
        let names: Vec<(&str, u32)> = plan
            .iter()
            .map(|(n, c)| (n.as_str(), c.load(Ordering::Relaxed)))
            .collect();
        assert_eq!(names, vec![("batcher", 3), ("sender", 1)]);
    }

    #[tokio::test]
    async fn a_listener_survives_a_panicked_run_and_closes_after_a_finished_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slot = ListenerSlot::new(listener);
        let crashed = AssertUnwindSafe(async {
            let _lease = slot.lease().unwrap();
            panic!("accept loop bug");
        })
        .catch_unwind()
        .await;
        assert!(crashed.is_err());
        let mut lease = slot.lease().expect("given back after the panic");
        assert_eq!(lease.local_addr().unwrap(), addr);
        lease.finish();
        drop(lease);
        assert!(slot.lease().is_none(), "closed after an orderly end");
        assert!(std::net::TcpStream::connect(addr).is_err(), "the socket is closed");
    }

    #[tokio::test]
    async fn a_panicking_task_restarts_counts_and_salvages() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        health.set_started();
        let mut sup = Supervisor::new(metrics.clone(), health.clone());
        sup.backoff = RestartBackoff::starting_at(Duration::from_millis(1));
        let runs = Arc::new(AtomicU32::new(0));
        let salvaged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        let (r, s) = (runs.clone(), salvaged.clone());
        sup.spawn(
            &mut tasks,
            "test",
            "test 0".into(),
            move || {
                let r = r.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("boom");
                    }
                }
            },
            Box::new(move |msg| {
                s.lock().unwrap().push(msg);
                Box::pin(async {})
            }),
        );
        tasks.join_next().await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(*salvaged.lock().unwrap(), vec!["boom".to_string(), "boom".to_string()]);
        let restarts = metrics
            .component_restarts
            .get_or_create(&ComponentLabels {
                component: "test".into(),
            })
            .get();
        assert_eq!(restarts, 2);
        assert_eq!(health.not_ready(), None, "ready again once restarted");
    }
}
