//! OpenTelemetry trace export (feature `otel`): when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, every tracing span (jobs, tasks, tensors) is
//! also sent to that OTLP/HTTP collector, batched from a background thread.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::Layer;

/// The exporter, kept until the program ends so the last spans are sent.
pub struct Exporter(SdkTracerProvider);

impl Exporter {
    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("warning: exporting the last trace spans: {e}");
        }
    }
}

/// A boxed subscriber layer.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync>;

/// A layer exporting spans, and its exporter; `None` when no OTLP endpoint is configured.
pub fn layer<S>() -> Result<Option<(BoxedLayer<S>, Exporter)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !configured {
        return Ok(None);
    }
    // Endpoint, headers, timeout and protocol details come from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("setting up the OTLP trace exporter")?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "shardpress".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("shardpress");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
    Ok(Some((layer, Exporter(provider))))
}
