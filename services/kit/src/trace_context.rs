//! W3C trace context (`traceparent`) on `tracing` spans when no OpenTelemetry
//! exporter is configured.
//!
//! Without an exporter nothing reads a span's attributes, events or timings, but its
//! trace id still matters: it goes into every audit event and log line of the request
//! and on to the next service. [`TraceContextLayer`] keeps only that — a trace id, a
//! span id and the trace flags in each span's extensions, inherited from the parent
//! span or adopted from the caller's `traceparent` — for a fraction of the cost of
//! building OpenTelemetry spans that would be thrown away. With an exporter,
//! [`crate::telemetry::init`] installs the OpenTelemetry layer instead, and
//! [`crate::telemetry`] reads the ids from there.

use tracing::span::{Attributes, Id};
use tracing::{Span, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::{LookupSpan, SpanData};

/// The ids of one span in a W3C trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// The `trace-flags` byte (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The start of a new trace: random non-zero ids, sampled.
    pub fn root() -> Self {
        Self {
            trace_id: nonzero(rand::random::<u128>),
            span_id: nonzero(rand::random::<u64>),
            flags: 1,
        }
    }

    /// A child span in the same trace.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(rand::random::<u64>),
            ..*self
        }
    }

    /// Parses a `traceparent` header value: `version-trace_id-parent_id-flags` in
    /// lowercase hex. Version `ff` and all-zero ids are invalid; a version above `00`
    /// may append fields after the flags (W3C Trace Context, "versioning").
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_u8(&value[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let trace_id = hex(&value[3..35]).filter(|&t| t != 0)?;
        let span_id = u64::try_from(hex(&value[36..52])?)
            .ok()
            .filter(|&s| s != 0)?;
        Some(Self {
            trace_id,
            span_id,
            flags: hex_u8(&value[53..55])?,
        })
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, self.trace_id, 32);
        s.push('-');
        push_hex(&mut s, u128::from(self.span_id), 16);
        s.push('-');
        push_hex(&mut s, u128::from(self.flags), 2);
        s
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, self.trace_id, 32);
        s
    }
}

/// Appends the low `digits` nibbles of `v` in lowercase hex, zero-padded (the
/// formatting machinery costs several times more, once per request and hop).
fn push_hex(out: &mut String, v: u128, digits: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(DIGITS[((v >> (4 * i)) & 0xf) as usize]));
    }
}

fn nonzero<T: Default + PartialEq>(mut random: impl FnMut() -> T) -> T {
    loop {
        let v = random();
        if v != T::default() {
            return v;
        }
    }
}

/// Lowercase hex only, as the specification requires.
fn hex(s: &str) -> Option<u128> {
    if !s
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

fn hex_u8(s: &str) -> Option<u8> {
    hex(s).and_then(|v| u8::try_from(v).ok())
}

/// Gives every new span a [`TraceContext`]: a child of its parent span's, or a new
/// trace. [`adopt`] then moves a request's span into its caller's trace.
#[derive(Debug, Default, Clone, Copy)]
pub struct TraceContextLayer;

impl<S> tracing_subscriber::Layer<S> for TraceContextLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = if let Some(parent) = attrs.parent() {
            ctx.span(parent)
        } else if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            None
        };
        let cx = parent
            .and_then(|p| p.extensions().get::<TraceContext>().copied())
            .map_or_else(TraceContext::root, |p| p.child());
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(cx);
        }
    }
}

/// Runs `f` on the trace context of `span` (`None` when the span is disabled or the
/// layer is not installed).
fn with_context<R>(span: &Span, f: impl FnOnce(&mut TraceContext) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span_data(id)?;
        let mut ext = data.extensions_mut();
        ext.get_mut::<TraceContext>().map(f)
    })
    .flatten()
}

/// The trace context of `span`.
pub fn of(span: &Span) -> Option<TraceContext> {
    with_context(span, |cx| *cx)
}

/// The trace context of the current span, read in place: unlike
/// `of(&Span::current())` it neither takes nor releases a reference to the span,
/// each of which goes through every layer of the subscriber.
pub fn current() -> Option<TraceContext> {
    tracing::dispatcher::get_default(|dispatch| {
        let current = dispatch.current_span();
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span_data(current.id()?)?;
        data.extensions().get::<TraceContext>().copied()
    })
}

/// Moves `span` into the trace of `remote` (the caller's `traceparent`), keeping its
/// own span id. Spans created inside it afterwards inherit the trace.
pub fn adopt(span: &Span, remote: TraceContext) {
    with_context(span, |cx| {
        cx.trace_id = remote.trace_id;
        cx.flags = remote.flags;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let cx = TraceContext::parse(PARENT).unwrap();
        assert_eq!(cx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(cx.flags, 1);
        assert_eq!(cx.traceparent(), PARENT);
        // A later version may append fields; version 00 may not.
        assert!(TraceContext::parse(&format!("01{}-extra", &PARENT[2..])).is_some());
        for bad in [
            "",
            &PARENT[..54],
            &format!("{PARENT}-extra"),
            &format!("ff{}", &PARENT[2..]),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn spans_inherit_their_parents_trace_and_adopt_a_remote_one() {
        let subscriber = Registry::default().with(TraceContextLayer);
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("http");
            let own = of(&request).unwrap();
            let remote = TraceContext::parse(PARENT).unwrap();
            adopt(&request, remote);
            let adopted = of(&request).unwrap();
            assert_eq!(adopted.trace_id, remote.trace_id);
            assert_eq!(adopted.span_id, own.span_id);

            let child = request.in_scope(|| tracing::info_span!("rpc"));
            let explicit = tracing::info_span!(parent: &request, "call");
            for span in [&child, &explicit] {
                let cx = of(span).unwrap();
                assert_eq!(cx.trace_id, remote.trace_id);
                assert_ne!(cx.span_id, own.span_id);
            }

            let other = tracing::info_span!("another request");
            assert_ne!(of(&other).unwrap().trace_id, remote.trace_id);

            // The current span's context, read in place.
            assert_eq!(current(), None);
            assert_eq!(request.in_scope(current), Some(adopted));
            assert_eq!(child.in_scope(current), of(&child));
            assert_eq!(other.in_scope(current), of(&other));
        });
    }

    #[test]
    fn without_the_layer_there_is_no_context() {
        let subscriber = Registry::default();
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(of(&tracing::info_span!("http")), None);
        });
    }
}
