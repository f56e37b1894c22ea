//! The spans every call has: its server span ([`CallTrace`]) and one client span per Produce
//! request it sends ([`SendSpan`]).
//!
//! They are made with the OpenTelemetry SDK directly, not as `tracing` spans exported by
//! `tracing-opentelemetry`: that bridge's own bookkeeping per span (a registry entry with its
//! extensions, each field visited into a builder, the span entered and left on every poll of
//! the call) came on top of the SDK's span; without it, a call whose spans are exported costs
//! the server about 0.79 of the CPU it did (README, "Tracing, 2026-12-06"). The call's context is
//! attached around each poll of the call ([`CallTrace::scope`]), so a request's span, and the
//! `tracing` spans still exported through the bridge (a metadata refresh), take the call's
//! server span as their parent.
//!
//! Nothing is built when no span is exported: without an exporter there is no tracer, and a
//! request span is made only when its call's span is sampled.

use std::{borrow::Cow, collections::HashMap, future::Future, sync::OnceLock};

use futures::future::Either;
use opentelemetry::{
    Context, KeyValue, Value,
    context::{FutureExt as _, WithContext},
    propagation::{Extractor, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _},
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{SdkTracer, Span},
};
use tonic::{Code, metadata::MetadataMap};

/// The tracer of the exported spans, set once by [`super::init`] when spans are exported.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Makes `tracer` the one that creates the call and request spans.
pub(super) fn install(tracer: SdkTracer) {
    // Only the first subscriber's init gets here (a second one fails before it).
    let _ = TRACER.set(tracer);
}

/// Reads W3C trace context from gRPC metadata.
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
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

/// The server span of one Forward call or ForwardStream/ForwardBatches request (OpenTelemetry
/// RPC conventions), a child of the caller's `traceparent` when it sends one. Ended by
/// [`CallTrace::end`], or when dropped (a call whose caller went).
pub struct CallTrace {
    /// The caller's context with this span as the current one: the parent of what the call
    /// traces. `None` when spans are not exported.
    cx: Option<Context>,
}

impl CallTrace {
    /// Starts the span of a call to `method` (its full gRPC path) with request id `id`. When
    /// `downstream` asks for it, also returns the `traceparent` that continues the trace
    /// downstream: the span's own when spans are exported, else the caller's (so consumers
    /// still join the caller's trace); `None` when there is neither. Without `downstream` (no
    /// record header wanted) nothing is formatted, and without a caller's `traceparent` nothing
    /// is parsed: this runs on every call.
    pub fn start(
        method: &'static str,
        id: u64,
        md: &MetadataMap,
        downstream: bool,
    ) -> (Self, Option<String>) {
        let propagator = TraceContextPropagator::new();
        let caller = if md.contains_key("traceparent") {
            propagator.extract(&Metadata(md))
        } else {
            Context::new()
        };
        let cx = TRACER.get().map(|tracer| {
            let span = tracer
                .span_builder(method)
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", "leaderlink.v1.Forwarder"),
                    KeyValue::new("rpc.method", method.rsplit('/').next().unwrap_or(method)),
                    // OpenTelemetry has no unsigned attributes: an id beyond i64 goes
                    // as a string.
                    KeyValue::new(
                        "leaderlink.request_id",
                        i64::try_from(id)
                            .map(Value::I64)
                            .unwrap_or_else(|_| Value::String(id.to_string().into())),
                    ),
                ])
                .start_with_context(tracer, &caller);
            caller.with_span(span)
        });
        let traceparent = if downstream {
            let cx = cx.as_ref().unwrap_or(&caller);
            if cx.span().span_context().is_valid() {
                let mut out = HashMap::new();
                propagator.inject_context(cx, &mut out);
                out.remove("traceparent")
            } else {
                None
            }
        } else {
            None
        };
        (Self { cx }, traceparent)
    }

    /// Runs `call` with this span as the current one on every poll, so that what the call
    /// traces is its child. Without export, `call` runs as it is.
    pub fn scope<F: Future>(&self, call: F) -> Either<WithContext<F>, F> {
        match &self.cx {
            Some(cx) => Either::Left(call.with_context(cx.clone())),
            None => Either::Right(call),
        }
    }

    /// Ends the span with the call's gRPC code and outcome (the label of
    /// `leaderlink_forward_calls_total`). The span is an error only for the codes that mean the
    /// server failed (OpenTelemetry gRPC conventions), not for the caller's mistakes; `message`
    /// is then its description.
    pub fn end(self, code: Code, outcome: &'static str, message: Option<&str>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        span.set_attribute(KeyValue::new("leaderlink.outcome", outcome));
        if let Some(m) = message
            && matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            )
        {
            span.set_status(Status::error(m.to_string()));
        }
        span.end();
    }
}

/// Adds event `name` to the current call's span (see [`CallTrace::scope`]) if it is recorded;
/// `attributes` runs only then.
pub fn call_event(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    if TRACER.get().is_none() {
        return;
    }
    Context::map_current(|cx| {
        let span = cx.span();
        if span.is_recording() {
            span.add_event(name, attributes());
        }
    });
}

/// A client span within a call (one Produce request to a leader): a child of the call's span,
/// made only when that span is sampled. Ended when dropped.
#[derive(Default)]
pub struct SendSpan(Option<Span>);

impl SendSpan {
    /// Starts a client span named `name` with `attributes`, as a child of the current call's
    /// span (see [`CallTrace::scope`]). `describe` runs only when the span is recorded.
    pub fn start(describe: impl FnOnce() -> (Cow<'static, str>, Vec<KeyValue>)) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Self(None);
        };
        Context::map_current(|cx| {
            if !cx.span().span_context().is_sampled() {
                return Self(None);
            }
            let (name, attributes) = describe();
            Self(Some(
                tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .with_attributes(attributes)
                    .start_with_context(tracer, cx),
            ))
        })
    }

    /// Whether the span is recorded (else setting attributes does nothing).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// Sets attribute `key`.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed, with `description`.
    pub fn fail(&mut self, description: impl FnOnce() -> String) {
        if let Some(s) = &mut self.0 {
            s.set_status(Status::error(description()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_traceparent_is_passed_on_without_an_exporter() {
        let start = |md: &MetadataMap| CallTrace::start("/x/Y", 1, md, true).1;
        let mut md = MetadataMap::new();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        md.insert("traceparent", tp.parse().unwrap());
        assert_eq!(start(&md).as_deref(), Some(tp));
        assert_eq!(start(&MetadataMap::new()), None);
        md.insert("traceparent", "00-garbage".parse().unwrap());
        assert_eq!(start(&md), None, "a malformed one is ignored");
    }
}
