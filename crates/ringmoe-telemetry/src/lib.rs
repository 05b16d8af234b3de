//! `ringmoe-telemetry`: where every ringmoe process sets up what it tells operators.
//!
//! * **Logs** ([`init`]): `tracing` to stderr, as text or as one JSON object per line with the
//!   trace and span ids of the span it happened in ([`LogFormat`]).
//! * **Traces** ([`init`]): when `--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is given,
//!   `tracing` spans become OpenTelemetry spans, batched on the SDK's own thread and exported
//!   over OTLP/gRPC; a collector that is down costs dropped spans, never a blocked job. Off, the
//!   layer is not installed at all. The standard environment applies (`OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`[`_ARG`]).
//! * **Context across processes** ([`propagate`]): W3C `traceparent`/`tracestate` in gRPC
//!   metadata, so one job is one trace over the client, the coordinator and every worker.
//! * **Metrics** ([`metrics`]): the process-wide Prometheus recorder, its `GET /metrics`
//!   endpoint, and collectors that refresh gauges at scrape time.

pub mod metrics;
pub mod propagate;
mod setup;

pub use setup::{LogFormat, Options, Telemetry, TelemetryError, init};
