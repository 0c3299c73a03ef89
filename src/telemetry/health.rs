//! Liveness and readiness, and the health_check extension's answers.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use crate::config::HealthCheckConfig;
use crate::lock::LockUnpoisoned;

/// Liveness and readiness. Not ready until receivers are bound, while draining, and while any
/// component reports a reason (e.g. the token endpoint refusing our credentials).
#[derive(Default)]
pub(crate) struct Health {
    started: AtomicBool,
    /// When the relay became ready, for the collector's status body.
    up_since: Mutex<Option<std::time::SystemTime>>,
    draining: AtomicBool,
    reasons: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub(crate) fn set_started(&self) {
        *self.up_since.lock_unpoisoned() = Some(std::time::SystemTime::now());
        self.started.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Sets (Some) or clears (None) a component's reason for not being ready.
    pub(crate) fn set_unready(&self, component: &str, reason: Option<String>) {
        let mut reasons = self.reasons.lock_unpoisoned();
        match reason {
            Some(r) => reasons.insert(component.to_string(), r),
            None => reasons.remove(component),
        };
    }

    /// None when ready, else why not.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("draining".into());
        }
        if !self.started.load(Ordering::SeqCst) {
            return Some("starting".into());
        }
        let reasons = self.reasons.lock_unpoisoned();
        if reasons.is_empty() {
            None
        } else {
            Some(
                reasons
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
    }
}

pub(crate) fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The health_check extension's routes: the collector's status on its `path`, and ours.
pub(crate) fn health_response(health: &Health, settings: &HealthCheckConfig, path: &str) -> Response<Full<Bytes>> {
    if path == settings.path {
        return collector_status(health, settings);
    }
    match path {
        "/" | "/healthz" | "/livez" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match health.not_ready() {
            None => text_response(StatusCode::OK, "ready\n"),
            Some(reason) => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The collector health_check's answer: available from start until draining. Readiness reasons
/// of components (a token endpoint refusing) do not count, as in the collector: probes on this
/// path are often liveness probes, and a restart would not fix those.
fn collector_status(health: &Health, settings: &HealthCheckConfig) -> Response<Full<Bytes>> {
    let since = (!health.draining.load(Ordering::SeqCst))
        .then(|| *health.up_since.lock_unpoisoned())
        .flatten();
    let (status, body) = match (since, &settings.response_body) {
        (Some(_), Some(b)) => (StatusCode::OK, b.healthy.clone()),
        (None, Some(b)) => (StatusCode::SERVICE_UNAVAILABLE, b.unhealthy.clone()),
        (Some(t), None) => (
            StatusCode::OK,
            serde_json::json!({
                "status": "Server available",
                "upSince": rfc3339(t),
                "uptime": go_duration(t.elapsed().unwrap_or_default()),
            })
            .to_string(),
        ),
        (None, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "Server not available", "upSince": "0001-01-01T00:00:00Z", "uptime": ""})
                .to_string(),
        ),
    };
    let mut response = text_response(status, body);
    if settings.response_body.is_none() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// UTC time as RFC 3339 with nanoseconds, as Go's time.Time marshals to JSON.
pub(super) fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = ((d.as_secs() / 86_400) as i64, d.as_secs() % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        d.subsec_nanos()
    )
}

/// A duration as Go prints it (`1h2m3.5s`).
pub(super) fn go_duration(d: std::time::Duration) -> String {
    let (h, m) = (d.as_secs() / 3600, d.as_secs() % 3600 / 60);
    let s = d.as_secs_f64() - (h * 3600 + m * 60) as f64;
    let s = format!("{s:.9}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string();
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}
