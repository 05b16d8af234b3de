//! The subscriber: an env filter, a text or JSON log layer to stderr, and (when an OTLP endpoint
//! is configured) the OpenTelemetry layer with its batch exporter.

use std::fmt::Write as _;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("unknown log format {0:?}: want text or json")]
    LogFormat(String),
}

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, `spans` (outermost
    /// first, each with its fields) and, inside a traced span, `trace_id` and `span_id`.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(TelemetryError::LogFormat(other.to_string())),
        }
    }
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` says otherwise.
    pub service: &'static str,
    /// The filter when `RUST_LOG` is unset.
    pub default_filter: &'static str,
    pub log_format: LogFormat,
    /// The OTLP/gRPC endpoint (`http://HOST:4317`); `None`: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) if set, else no tracing export.
    pub otlp_endpoint: Option<String>,
}

/// Keeps the trace pipeline alive; dropping it flushes the spans still queued (bounded wait).
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Flush what is queued; a collector that is gone costs at most the timeout.
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

fn env_set(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The endpoint traces go to, if any.
fn endpoint(o: &Options) -> Option<String> {
    if env_set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    o.otlp_endpoint
        .clone()
        .or_else(|| env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env_set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// This process's resource: the environment's attributes, our service name unless the
/// environment names one, and a `service.instance.id` unique to the process unless given.
fn resource(service: &'static str) -> Resource {
    let attrs = env_set("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let given = |key: &str| {
        attrs
            .split(',')
            .any(|kv| kv.split('=').next().is_some_and(|k| k.trim() == key))
    };
    let mut b = Resource::builder();
    if env_set("OTEL_SERVICE_NAME").is_none() && !given("service.name") {
        b = b.with_service_name(service);
    }
    if !given("service.instance.id") {
        let host = env_set("HOSTNAME")
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|| "host".into());
        b = b.with_attribute(KeyValue::new(
            "service.instance.id",
            format!("{host}-{}", std::process::id()),
        ));
    }
    b.build()
}

/// What the trace layer records: every span at info, not the HTTP/2 stack under the
/// exporter.
const SPAN_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tonic=warn,tower=warn";

/// Installs the global subscriber (and, with an endpoint, the trace pipeline and the W3C
/// propagator). Call it inside a Tokio runtime: the gRPC exporter's channel lives on it. A
/// second call keeps the first subscriber.
pub fn init(o: Options) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(o.default_filter));
    let provider = match endpoint(&o) {
        None => None,
        Some(ep) => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            // An explicit endpoint wins; otherwise the exporter reads the OTEL_* variables.
            if o.otlp_endpoint.is_some() {
                b = b.with_endpoint(ep.clone());
            }
            let exporter = b.build().map_err(|e| TelemetryError::Exporter {
                endpoint: ep.clone(),
                message: e.to_string(),
            })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource(o.service))
                    .build(),
            )
        }
    };
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    // Spans are exported at info whatever the log level (`submit` logs only warnings but
    // starts the trace), without the exporter's own gRPC stack.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("ringmoe"))
            .with_filter(EnvFilter::new(SPAN_FILTER))
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log: Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync> = match o.log_format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(JsonLines),
        ),
    };
    let _ = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// One JSON object per event, with the OpenTelemetry ids of the span it happened in.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut o = Map::new();
        o.insert("timestamp".into(), Value::String(timestamp()));
        o.insert("level".into(), Value::String(meta.level().to_string()));
        o.insert("target".into(), Value::String(meta.target().to_string()));
        let mut fields = FieldMap(Map::new());
        event.record(&mut fields);
        o.insert("fields".into(), Value::Object(fields.0));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|s| {
                    let mut m = Map::new();
                    m.insert("name".into(), Value::String(s.name().to_string()));
                    let ext = s.extensions();
                    if let Some(Value::Object(f)) = ext
                        .get::<FormattedFields<N>>()
                        .and_then(|f| serde_json::from_str::<Value>(f).ok())
                    {
                        m.extend(f);
                    }
                    Value::Object(m)
                })
                .collect();
            o.insert("spans".into(), Value::Array(spans));
        }
        // The current span's OpenTelemetry context (invalid, so absent, without tracing).
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            o.insert("trace_id".into(), Value::String(sc.trace_id().to_string()));
            o.insert("span_id".into(), Value::String(sc.span_id().to_string()));
        }
        writeln!(w, "{}", Value::Object(o))
    }
}

/// RFC 3339 UTC with microseconds, from the system clock.
fn timestamp() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// `now` (since the Unix epoch) as RFC 3339 UTC with microseconds.
fn rfc3339(now: Duration) -> String {
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut s = String::with_capacity(27);
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    );
    s
}

struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0
            .insert(f.name().to_string(), Value::String(format!("{v:?}")));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), Value::String(v.into()));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        // Checked against Python's datetime.fromtimestamp(s, timezone.utc).
        for (secs, micros, want) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.000005Z"),
            (1_796_215_205, 123_456, "2026-12-02T12:40:05.123456Z"),
            (4_107_542_399, 999_999, "2100-02-28T23:59:59.999999Z"),
        ] {
            let d = Duration::from_secs(secs) + Duration::from_micros(micros);
            assert_eq!(rfc3339(d), want);
        }
        assert_eq!(timestamp().len(), 27);
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
