//! Logs and traces.
//!
//! Two `tracing` layers, each with its own filter:
//! - log lines on stderr (text or JSON), filtered by `RUST_LOG` (default `info`);
//! - when an OTLP endpoint is configured, spans exported over OTLP/gRPC, filtered by a fixed
//!   rule (leaderlink's spans and events down to `debug`), so `RUST_LOG=warn` quiets the logs
//!   without silencing the exported spans.
//!
//! The spans of a call (its server span, each leader request) are made with the OpenTelemetry
//! SDK directly ([`spans`]); the other exported spans (each metadata refresh) are `tracing`
//! spans at debug level, which the span layer takes while the log layer at its default `info`
//! neither sees nor formats them. A process that exports no spans pays next to nothing for
//! either.
//!
//! Export never blocks forwarding: finished spans go to the SDK's batch processor, whose
//! queue is bounded by [`SPAN_QUEUE`]; spans that find it full, and spans of a batch the
//! collector refused or did not take in time, are dropped and counted ([`spans_dropped`]).

mod spans;

pub use spans::{CallTrace, SendSpan, call_event};

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use opentelemetry::{Context, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
        SpanExporter, SpanProcessor,
    },
};
use serde::{Deserialize, Serialize};
use tracing::{Level, level_filters::LevelFilter};
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines are written to stderr (config key `log_format`). It lives here, not in
/// `config`, so that the wire layer's use of [`TASK_TARGET`] does not tie `kafka` to `config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Target of the spans of long-lived tasks (servers, the cluster watcher, connections). They
/// give log lines their context but are not exported: a span open for the life of the process
/// is no trace.
pub const TASK_TARGET: &str = "leaderlink::task";

/// Target of the `tracing` span of each call, which gives its log lines (at debug) the method
/// and request id. It is not exported: the exported span of a call is its [`CallTrace`].
pub const CALL_TARGET: &str = "leaderlink::call";

/// Most finished spans waiting for export (or being exported). Bounds the memory tracing can
/// take while the collector is slow or down; a span that finds the queue full is dropped and
/// counted.
pub const SPAN_QUEUE: usize = 16 * 1024;

/// Spans per export request.
const EXPORT_BATCH: usize = 512;

/// How long finished spans may wait before an export is started anyway.
const EXPORT_DELAY: Duration = Duration::from_secs(1);

/// How long one export request may take before its spans count as dropped (the exporter's
/// own timeout).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Sampled spans handed to the batch processor and not yet exported or dropped.
static SPANS_OUTSTANDING: AtomicUsize = AtomicUsize::new(0);

/// Spans the collector accepted so far.
pub fn spans_exported() -> u64 {
    SPANS_EXPORTED.load(Ordering::Relaxed)
}

/// Spans lost so far: queue full, or the collector refused them or did not answer in time.
pub fn spans_dropped() -> u64 {
    SPANS_DROPPED.load(Ordering::Relaxed)
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is still queued (bounded by the export timeout) and stops the exporter.
    /// Call it from a thread outside the async runtime, while the runtime still runs: the
    /// exporter's gRPC client lives on it.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(EXPORT_TIMEOUT)
        {
            tracing::warn!(cause = %e, "span exporter did not shut down cleanly");
        }
    }
}

/// Where to export spans: the configured endpoint, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn otlp_endpoint(configured: Option<&str>) -> Option<String> {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

/// Whether text log lines carry ANSI colour codes: only on a terminal (`stderr_is_terminal`),
/// and never with `NO_COLOR` set to anything but the empty string (no-color.org). Lines that go
/// to a file or a pipe, as a pod's do (`kubectl logs`), stay plain.
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: log lines in `format`, and span export to `otlp` (when
/// given) with parent-based ratio sampling. Must run inside the Tokio runtime that will
/// outlive the exporter (the gRPC client is bound to it).
pub fn init(format: LogFormat, otlp: Option<&str>, sample_ratio: f64) -> Result<Telemetry, String> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(Level::INFO.as_str()));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colour(
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                std::env::var_os("NO_COLOR"),
            ))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let (provider, spans) = match otlp {
        None => (None, None),
        Some(endpoint) => {
            let provider = tracer_provider(endpoint, sample_ratio)?;
            // Source locations, thread names and busy/idle times are left out: they cost on
            // every span and say nothing the span names do not.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("leaderlink"))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(
                    Targets::new()
                        .with_target("leaderlink", Level::DEBUG)
                        .with_target(TASK_TARGET, LevelFilter::OFF)
                        .with_target(CALL_TARGET, LevelFilter::OFF),
                );
            (Some(provider), Some(layer))
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    if let Some(p) = &provider {
        spans::install(p.tracer("leaderlink"));
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(endpoint: &str, sample_ratio: f64) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter for {endpoint}: {e}"))?;
    let batch = BatchSpanProcessor::builder(CountingExporter(exporter))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(SPAN_QUEUE)
                .with_max_export_batch_size(EXPORT_BATCH)
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
    // OTEL_SERVICE_NAME wins when set; otherwise the service is "leaderlink".
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "leaderlink".into());
    Ok(SdkTracerProvider::builder()
        .with_span_processor(Gate(batch))
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// Admits a finished span to the batch processor only while fewer than [`SPAN_QUEUE`] are
/// outstanding, so every drop is counted here: the SDK's own queue (as large) never overflows,
/// and it does not publish its drop count.
#[derive(Debug)]
struct Gate(BatchSpanProcessor);

impl SpanProcessor for Gate {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if SPANS_OUTSTANDING.fetch_add(1, Ordering::Relaxed) >= SPAN_QUEUE {
            SPANS_OUTSTANDING.fetch_sub(1, Ordering::Relaxed);
            SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// Counts the spans of each export as exported or dropped, however the export ends
/// (including being abandoned at its timeout).
#[derive(Debug)]
struct CountingExporter<E>(E);

/// Settles one export's spans: dropped unless [`Settle::exported`] was called.
struct Settle {
    spans: usize,
    exported: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        SPANS_OUTSTANDING.fetch_sub(self.spans, Ordering::Relaxed);
        let counter = if self.exported {
            &SPANS_EXPORTED
        } else {
            &SPANS_DROPPED
        };
        counter.fetch_add(self.spans as u64, Ordering::Relaxed);
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let settle = Settle {
            spans: batch.len(),
            exported: false,
        };
        let export = self.0.export(batch);
        async move {
            // Moved in whole, so it settles when the export ends or is abandoned.
            let mut settle = settle;
            let r = export.await;
            settle.exported = r.is_ok();
            r
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some("".into())),
            "an empty NO_COLOR does not count"
        );
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None), "a file or a pipe gets plain lines");
        assert!(!colour(false, Some("1".into())));
    }
}
