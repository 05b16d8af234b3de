//! W3C trace context (`traceparent`, `tracestate`) in gRPC metadata: a caller puts its current
//! span's context on each request ([`TraceHeaders`]), a server makes it the parent of the span
//! it opens for the call ([`set_parent`]). Without tracing both are no-ops: the global
//! propagator is the SDK's no-op until [`crate::init`] installs the W3C one.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The propagation headers of one span's context, captured once and put on any number of
/// requests (the coordinator's calls to every worker of a run).
#[derive(Debug, Clone, Default)]
pub struct TraceHeaders(
    Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
);

impl TraceHeaders {
    /// The current `tracing` span's context.
    pub fn current() -> Self {
        Self::of(&tracing::Span::current())
    }

    pub fn of(span: &tracing::Span) -> Self {
        let mut m = HashMap::new();
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut Collect(&mut m))
        });
        Self(
            m.into_iter()
                .filter_map(|(k, v)| {
                    Some((
                        MetadataKey::from_bytes(k.as_bytes()).ok()?,
                        MetadataValue::try_from(v.as_str()).ok()?,
                    ))
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the headers to `meta`.
    pub fn apply(&self, meta: &mut MetadataMap) {
        for (k, v) in &self.0 {
            meta.insert(k.clone(), v.clone());
        }
    }

    /// `msg` as a request carrying the headers.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        self.apply(r.metadata_mut());
        r
    }
}

struct Collect<'a>(&'a mut HashMap<String, String>);

impl Injector for Collect<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct Meta<'a>(&'a MetadataMap);

impl Extractor for Meta<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes the context a caller sent in `meta` (if any) the parent of `span`. A request without
/// one leaves `span` where it is (a root, or under the current span).
pub fn set_parent(span: &tracing::Span, meta: &MetadataMap) {
    if meta.get("traceparent").is_none() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Meta(meta)));
    let _ = span.set_parent(cx);
}

/// The trace id of `span` as 32 hex digits, when it is traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
