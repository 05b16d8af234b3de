//! Prometheus metrics: one process-wide `prometheus-client` registry (typed families, f64
//! counters such as `ringmoe_comm_wait_seconds_total`), `GET /metrics` on the process's own
//! axum, and collectors — closures that refresh gauges from live state at each scrape, so queue
//! lengths and worker counts are never stale.
//!
//! `/metrics` negotiates: OpenMetrics for a scraper that asks for it (Prometheus does), the
//! classic text format (0.0.4) otherwise — what `curl` and `promtool check metrics` read. The
//! two differ in a counter family's name (`x` with samples `x_total` vs `x_total`) and `# EOF`.
//!
//! Recording is by full Prometheus name (`ringmoe_jobs_total`), help text and labels; a family
//! registers on first use. Without `--metrics-addr` nothing reads the registry, and recording
//! costs a map lookup.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Bucket bounds (seconds) of every histogram: 10 ms to two hours.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0,
    3600.0, 7200.0,
];

type Labels = Vec<(String, String)>;
type F64Counter = Counter<f64, AtomicU64>;
type F64Gauge = Gauge<f64, AtomicU64>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

enum Fam {
    Counter(Family<Labels, F64Counter>),
    Gauge(Family<Labels, F64Gauge>),
    Histogram(Histograms),
}

struct State {
    registry: Registry,
    families: HashMap<&'static str, Fam>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(State {
            registry: Registry::default(),
            families: HashMap::new(),
        })
    })
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn new_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS.iter().copied())
}

/// Runs `f` on the family `name`, registering it (made by `make`) on first use. A name used
/// before with another type is a programming error: the sample is dropped.
fn with_family(name: &'static str, help: &'static str, make: fn() -> Fam, f: impl FnOnce(&Fam)) {
    let Ok(mut s) = state().lock() else { return };
    if !s.families.contains_key(name) {
        let fam = make();
        // prometheus-client appends `_total` to a counter's samples itself.
        let reg_name = match &fam {
            Fam::Counter(_) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        match &fam {
            Fam::Counter(c) => s.registry.register(reg_name, help, c.clone()),
            Fam::Gauge(g) => s.registry.register(reg_name, help, g.clone()),
            Fam::Histogram(h) => s.registry.register(reg_name, help, h.clone()),
        }
        s.families.insert(name, fam);
    }
    if let Some(fam) = s.families.get(name) {
        f(fam);
    }
}

/// Adds `by` to the counter `name` (which ends in `_total`) at `l`.
pub fn counter(name: &'static str, help: &'static str, l: &[(&'static str, &str)], by: f64) {
    with_family(
        name,
        help,
        || Fam::Counter(Family::default()),
        |f| {
            if let Fam::Counter(c) = f {
                c.get_or_create(&labels(l)).inc_by(by);
            }
        },
    );
}

/// Sets the gauge `name` at `l`.
pub fn gauge(name: &'static str, help: &'static str, l: &[(&'static str, &str)], value: f64) {
    with_family(
        name,
        help,
        || Fam::Gauge(Family::default()),
        |f| {
            if let Fam::Gauge(g) = f {
                g.get_or_create(&labels(l)).set(value);
            }
        },
    );
}

/// Records `value` (seconds) in the histogram `name` at `l`.
pub fn observe(name: &'static str, help: &'static str, l: &[(&'static str, &str)], value: f64) {
    with_family(
        name,
        help,
        || {
            Fam::Histogram(Family::new_with_constructor(
                new_histogram as fn() -> Histogram,
            ))
        },
        |f| {
            if let Fam::Histogram(h) = f {
                h.get_or_create(&labels(l)).observe(value);
            }
        },
    );
}

type Collect = Arc<dyn Fn() + Send + Sync>;

fn collectors() -> &'static Mutex<BTreeMap<u64, Collect>> {
    static C: OnceLock<Mutex<BTreeMap<u64, Collect>>> = OnceLock::new();
    C.get_or_init(Mutex::default)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Removes its collector when dropped (a stopped coordinator or worker stops reporting).
#[must_use = "the collector is removed when this guard drops"]
#[derive(Debug)]
pub struct CollectorGuard(u64);

impl Drop for CollectorGuard {
    fn drop(&mut self) {
        if let Ok(mut c) = collectors().lock() {
            c.remove(&self.0);
        }
    }
}

/// Runs `f` before every scrape (to set gauges from live state).
pub fn on_scrape(f: impl Fn() + Send + Sync + 'static) -> CollectorGuard {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut c) = collectors().lock() {
        c.insert(id, Arc::new(f));
    }
    CollectorGuard(id)
}

/// This process's resident set, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The exposition after running the collectors: OpenMetrics, or the classic text format.
pub fn render(openmetrics: bool) -> String {
    let cs: Vec<Collect> = collectors()
        .lock()
        .map(|c| c.values().cloned().collect())
        .unwrap_or_default();
    for c in cs {
        c();
    }
    if let Some(rss) = rss_bytes() {
        gauge(
            "process_resident_memory_bytes",
            "Resident memory of this process (VmRSS).",
            &[],
            rss as f64,
        );
    }
    let mut out = String::new();
    if let Ok(s) = state().lock() {
        let _ = prometheus_client::encoding::text::encode(&mut out, &s.registry);
    }
    if openmetrics { out } else { classic_text(&out) }
}

/// OpenMetrics text as the classic Prometheus text format: counter families take their
/// samples' `_total` name in `# HELP`/`# TYPE`, `unknown` becomes `untyped`, `# UNIT` and
/// `# EOF` go.
pub fn classic_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if p == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{HeaderMap, header};
    listener.set_nonblocking(true)?;
    let l = tokio::net::TcpListener::from_std(listener)?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|headers: HeaderMap| async move {
            let om = headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let ct = if om {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            // Collectors may take locks the async threads also take: off them.
            let body = tokio::task::spawn_blocking(move || render(om))
                .await
                .unwrap_or_default();
            ([(header::CONTENT_TYPE, ct)], body)
        }),
    );
    axum::serve(l, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_both_formats() {
        counter(
            "ringmoe_test_things_total",
            "Things.",
            &[("op", "ring")],
            1.5,
        );
        counter(
            "ringmoe_test_things_total",
            "Things.",
            &[("op", "ring")],
            1.0,
        );
        gauge("ringmoe_test_level", "A level.", &[], 3.0);
        observe(
            "ringmoe_test_wait_seconds",
            "Waits.",
            &[("phase", "x")],
            0.3,
        );
        // A name reused with another type is dropped, not a panic.
        gauge("ringmoe_test_things_total", "Wrong.", &[], 9.0);
        let om = render(true);
        assert!(om.contains("# TYPE ringmoe_test_things counter"), "{om}");
        assert!(
            om.contains("ringmoe_test_things_total{op=\"ring\"} 2.5"),
            "{om}"
        );
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
        let text = render(false);
        assert!(
            text.contains("# HELP ringmoe_test_things_total Things."),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ringmoe_test_things_total counter"),
            "{text}"
        );
        assert!(
            text.contains("ringmoe_test_things_total{op=\"ring\"} 2.5"),
            "{text}"
        );
        assert!(text.contains("# TYPE ringmoe_test_level gauge"), "{text}");
        assert!(
            text.contains("ringmoe_test_wait_seconds_bucket{le=\"0.5\",phase=\"x\"} 1")
                || text.contains("ringmoe_test_wait_seconds_bucket{phase=\"x\",le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn collectors_run_at_each_scrape_until_dropped() {
        let n = Arc::new(AtomicU64::new(0));
        let g = {
            let n = n.clone();
            on_scrape(move || {
                let v = n.fetch_add(1, Ordering::SeqCst) + 1;
                gauge("ringmoe_test_scrapes", "Scrapes.", &[], v as f64);
            })
        };
        render(false);
        let t = render(false);
        assert!(t.contains("ringmoe_test_scrapes 2"), "{t}");
        drop(g);
        render(false);
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
