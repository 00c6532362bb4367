//! Logging setup for the binary: `tracing` to stderr, text or JSON, filtered by `RUST_LOG`
//! (default `info`). Nothing in this crate logs a token or a secret: tokens appear only as
//! [`crate::secret::token_fingerprint`]s.
//!
//! Lines go to a shared 64 KiB buffer that is written out when full and at least every
//! [`FLUSH_EVERY`] by a small flusher thread, and when the [`LogGuard`] drops. The audit log's
//! line per decision thus costs the calling thread its formatting and a copy, not a write
//! system call nor a wake-up of another thread. The price: a line may reach stderr up to
//! [`FLUSH_EVERY`] late, and a process killed without unwinding loses at most that much.
//!
//! The text format is tracing-subscriber's default line (time, level, target, span context,
//! fields), written by [`TextFields`] and [`LineTime`] instead of the defaults: the same
//! layout (`name="value"` for strings, `name=7` for numbers; an error's sources are not
//! listed), at a fraction of the cost per line
//! (a string that needs no escaping is copied, not escaped character by character; the date
//! is formatted once a second), and with control characters, line separators and bidi
//! controls escaped in every field, not only in the message — a request field cannot start a
//! forged log line.

use std::{
    cell::RefCell,
    fmt::{self as stdfmt, Write as _},
    io::{self, BufWriter, Stderr, Write},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt,
    fmt::{format::Writer, time::FormatTime, FormatFields, MakeWriter},
    EnvFilter,
};

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
        LogFormat::Text => builder
            .fmt_fields(TextFields)
            .with_timer(LineTime)
            .try_init(),
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

/// The text format's fields: `message` as written, then `name=value` separated by spaces —
/// strings quoted (`"…"`, escaped as `{:?}` escapes them when they hold a quote, a backslash
/// or anything outside printable ASCII), numbers and booleans bare, other values by their
/// `Debug` (or, for errors, `Display`) text with control characters escaped. The layout of
/// tracing-subscriber's default, without its per-character escaping of every string.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> stdfmt::Result {
        let mut v = TextVisitor {
            w: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct TextVisitor<'w> {
    w: Writer<'w>,
    first: bool,
    result: stdfmt::Result,
}

impl TextVisitor<'_> {
    /// Writes the separator and `name=`; false when the field is not written.
    fn name(&mut self, field: &Field) -> bool {
        if self.result.is_err() || field.name().starts_with("log.") {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        // Plain writes: no formatting machinery for the separator and the name.
        self.result = self.w.write_str(sep);
        if name != "message" {
            self.result = self
                .result
                .and_then(|()| self.w.write_str(name))
                .and_then(|()| self.w.write_char('='));
        }
        self.result.is_ok()
    }

    /// `name=value` for a value whose text never needs escaping (a number, a boolean).
    fn bare(&mut self, field: &Field, value: stdfmt::Arguments<'_>) {
        if self.name(field) {
            self.result = self.w.write_fmt(value);
        }
    }

    /// `value`'s text with control characters (newlines, escape sequences) escaped.
    fn escaped(&mut self, value: stdfmt::Arguments<'_>) {
        self.result = write!(NoControl(&mut self.w), "{value}");
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.name(field) {
            return;
        }
        if field.name() == "message" {
            return self.escaped(format_args!("{value}"));
        }
        // Every byte looked at (no early exit), so that the loop runs over whole words.
        let plain = value.bytes().fold(true, |plain, b| {
            plain & (b.wrapping_sub(0x20) < 0x5f) & (b != b'"') & (b != b'\\')
        });
        self.result = if plain {
            self.w
                .write_char('"')
                .and_then(|()| self.w.write_str(value))
                .and_then(|()| self.w.write_char('"'))
        } else {
            write!(self.w, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.bare(field, format_args!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.name(field) {
            self.escaped(format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn stdfmt::Debug) {
        if self.name(field) {
            self.escaped(format_args!("{value:?}"));
        }
    }
}

/// Whether `c` could end a line or restyle what follows in a log viewer: C0 and C1 controls
/// and DEL, the Unicode line and paragraph separators, and the bidirectional controls.
fn unsafe_in_logs(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes through, with each character [`unsafe_in_logs`] as `\u{…}`.
struct NoControl<'a, 'w>(&'a mut Writer<'w>);

impl stdfmt::Write for NoControl<'_, '_> {
    fn write_str(&mut self, s: &str) -> stdfmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| unsafe_in_logs(c)) {
            self.0.write_str(&rest[..i])?;
            write!(self.0, "\\u{{{:x}}}", u32::from(c))?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The text format's timestamp, as tracing-subscriber's default writes it
/// (`2026-12-02T01:46:40.123456Z`, UTC), with the date and time of day formatted once per
/// second per thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineTime;

thread_local! {
    /// The last second formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS`.
    static LAST_SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LineTime {
    fn format_time(&self, w: &mut Writer<'_>) -> stdfmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        LAST_SECOND.with(|last| {
            let mut last = last.borrow_mut();
            if last.0 != secs {
                last.1.clear();
                write_second(&mut last.1, secs)?;
                last.0 = secs;
            }
            w.write_str(&last.1)?;
            let tail = micros_tail(now.subsec_micros());
            w.write_str(std::str::from_utf8(&tail).map_err(|_| stdfmt::Error)?)
        })
    }
}

/// `.uuuuuuZ` for `micros` (below a million), as `format!(".{micros:06}Z")` writes it, by hand:
/// the formatting machinery costs more than the text.
fn micros_tail(micros: u32) -> [u8; 8] {
    let mut tail = *b".000000Z";
    let mut rest = micros;
    for digit in tail[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    tail
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC, proleptic Gregorian).
fn write_second(out: &mut impl stdfmt::Write, secs: u64) -> stdfmt::Result {
    let days = (secs / 86_400) as i64;
    let time = secs % 86_400;
    // Days to a civil date (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        time / 3_600,
        time / 60 % 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;

    #[test]
    fn seconds_are_formatted_as_rfc_3339() {
        // Each instant from `date -u -d @SECS +%Y-%m-%dT%H:%M:%S`: the epoch, leap days of a
        // year divisible by 400 and by 4, the end of a century that is not a leap year, a
        // year's last second, and today.
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_210_096, "2024-02-29T12:34:56"),
            (4_107_542_399, "2100-02-28T23:59:59"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (1_798_761_599, "2026-12-31T23:59:59"),
            (1_796_169_599, "2026-12-01T23:59:59"),
        ] {
            let mut s = String::new();
            write_second(&mut s, secs).unwrap();
            assert_eq!(s, text, "{secs}");
        }
    }

    fn line(event: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = fmt()
            .with_ansi(false)
            .fmt_fields(TextFields)
            .with_timer(LineTime)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn text_lines_read_as_the_default_format_and_escape_control_characters() {
        let text = line(|| {
            let err = std::io::Error::other("broken\npipe");
            tracing::info!(
                target: "clerk_grpc_auth::audit",
                method = "VerifyToken",
                what = "user_1\" x=\"y",
                who = "us\u{1b}[31mer",
                none = Option::<&str>::None,
                n = 7u64,
                neg = -3i64,
                ok = true,
                dbg = ?"a\nb",
                shown = %"line\nbreak\u{85}\u{2028}\u{202e}",
                f = 1.0f64,
                error = &err as &(dyn std::error::Error + 'static),
                "decision \n forged"
            );
        });
        let mut lines = text.lines();
        let first = lines.next().unwrap();
        assert!(lines.next().is_none(), "one line only: {text:?}");
        let (time, rest) = first.split_once(' ').unwrap();
        // 2026-12-02T01:46:40.123456Z
        assert_eq!(time.len(), 27, "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert_eq!(
            rest.trim_start(),
            "INFO clerk_grpc_auth::audit: decision \\u{a} forged method=\"VerifyToken\" \
             what=\"user_1\\\" x=\\\"y\" who=\"us\\u{1b}[31mer\" n=7 neg=-3 ok=true \
             dbg=\"a\\nb\" shown=line\\u{a}break\\u{85}\\u{2028}\\u{202e} f=1.0 \
             error=broken\\u{a}pipe"
        );
    }

    #[test]
    fn microseconds_are_written_as_format_writes_them() {
        for micros in [0, 5, 42, 1_000, 123_456, 999_999] {
            let tail = micros_tail(micros);
            assert_eq!(
                std::str::from_utf8(&tail).unwrap(),
                format!(".{micros:06}Z")
            );
        }
    }

    #[test]
    fn the_timestamp_is_now() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut s = String::new();
        LineTime.format_time(&mut Writer::new(&mut s)).unwrap();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let candidates: Vec<String> = (before..=after)
            .map(|t| {
                let mut c = String::new();
                write_second(&mut c, t).unwrap();
                c
            })
            .collect();
        assert!(candidates.iter().any(|c| s.starts_with(c.as_str())), "{s}");
    }
}
