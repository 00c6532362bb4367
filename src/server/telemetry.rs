//! Logging setup for the binary: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`
//! (default `info`). Nothing in this crate logs a token or a secret: tokens appear only as
//! [`crate::secret::token_fingerprint`]s.
//!
//! Lines go to a shared 64 KiB buffer that is written out when full and at least every
//! [`FLUSH_EVERY`] by a small flusher thread, and when the [`LogGuard`] drops. The audit log's
//! line per decision thus costs the calling thread its formatting and a copy, not a write
//! system call nor a wake-up of another thread. The price: a line may reach stderr up to
//! [`FLUSH_EVERY`] late, and a process killed without unwinding loses at most that much.

use std::{
    io::{self, BufWriter, Stderr, Write},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::{fmt, fmt::MakeWriter, EnvFilter};

/// Longest time a log line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Log output format (`CLERK_AUTH_LOG_FORMAT`: `text` or `json`; default `text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (`text`).
    #[default]
    Text,
    /// One JSON object per line (`json`).
    Json,
}

impl LogFormat {
    /// The names [`LogFormat`]'s `FromStr` accepts, exactly as written.
    pub const NAMES: [&'static str; 2] = ["text", "json"];
}

/// The name is not one of [`LogFormat::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("neither text nor json")]
pub struct UnknownLogFormat;

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(UnknownLogFormat),
        }
    }
}

/// The buffered stderr shared by every thread.
#[derive(Clone)]
struct Sink(Arc<Mutex<BufWriter<Stderr>>>);

impl Sink {
    fn flush_now(&self) {
        if let Ok(mut w) = self.0.lock() {
            let _ = w.flush();
        }
    }
}

/// One event's writer: tracing-subscriber formats a whole line, then writes it at once.
struct SinkWriter<'a>(&'a Sink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut w = self
            .0
             .0
            .lock()
            .map_err(|_| io::Error::other("log buffer poisoned"))?;
        w.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter(self)
    }
}

/// Keeps the flusher thread running; dropping it writes out what is still buffered and stops
/// the thread. Hold it for the life of the process (`let _log = telemetry::init(…)`).
#[must_use = "dropping the guard stops flushing log output"]
pub struct LogGuard {
    flusher: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    sink: Option<Sink>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.flusher.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        if let Some(sink) = &self.sink {
            sink.flush_now();
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing and
/// return an inert guard).
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let sink = Sink(Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        io::stderr(),
    ))));
    // Colours only for a terminal: escape codes in files and log pipelines are noise.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(sink.clone());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    if installed.is_err() {
        return LogGuard {
            flusher: None,
            sink: None,
        };
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let flushing = sink.clone();
    let thread = std::thread::Builder::new()
        .name("clerk-auth-log-flush".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                flushing.flush_now();
            }
        })
        .ok();
    LogGuard {
        flusher: thread.map(|t| (stop, t)),
        sink: Some(sink),
    }
}
