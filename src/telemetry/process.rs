//! The collector's process metrics (uptime, resident memory, CPU), read from /proc when scraped.
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The process metrics of the collector (its dashboards' variables come from uptime), read from
/// /proc when scraped.
pub(super) struct ProcessGauges {
    started: std::time::Instant,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    memory_rss: Gauge,
    cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessGauges {
    pub(super) fn register(r: &mut Registry) -> ProcessGauges {
        let g = ProcessGauges {
            started: std::time::Instant::now(),
            uptime: Gauge::default(),
            memory_rss: Gauge::default(),
            cpu_seconds: Gauge::default(),
        };
        r.register(
            "otelcol_process_uptime",
            "Seconds since the process started",
            g.uptime.clone(),
        );
        r.register(
            "otelcol_process_memory_rss",
            "Resident memory of the process, in bytes",
            g.memory_rss.clone(),
        );
        r.register(
            "otelcol_process_cpu_seconds",
            "CPU time of the process (user and system), in seconds",
            g.cpu_seconds.clone(),
        );
        g
    }

    pub(super) fn refresh(&self) {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<i64>().ok())
        {
            self.memory_rss.set(kb * 1024);
        }
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        if let Some(ticks) = cpu_ticks(&stat) {
            // USER_HZ is 100 on every Linux ABI the relay is built for.
            self.cpu_seconds.set(ticks as f64 / 100.0);
        }
    }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command name in field 2 may
/// hold spaces and parentheses, so fields are counted after its last `)`.
pub(super) fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
