//! Logging setup for the binary: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`
//! (default `info`). Nothing in this crate logs a token or a secret: tokens appear only as
//! [`crate::token_fingerprint`]s.
//!
//! Lines are written by a dedicated thread (`tracing-appender`), so the audit log's line per
//! decision costs the calling thread its formatting, not a write to stderr under its lock.
//! Nothing is dropped: when the thread falls behind by [`LOG_BUFFER_LINES`] lines, callers wait.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

/// Lines buffered between the logging threads and the writer thread.
pub const LOG_BUFFER_LINES: usize = 65_536;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the log writer thread alive; dropping it flushes the lines still buffered. Hold it
/// for the life of the process (`let _log = telemetry::init(…)`).
#[must_use = "dropping the guard stops log output"]
#[derive(Debug)]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing and
/// return an inert guard).
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("clerk-auth-log")
        // Buffered: the writer thread flushes whenever it has drained the queue, so a burst
        // of lines costs a few large writes instead of one syscall per line.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    // Colours only for a terminal: escape codes in files and log pipelines are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}
