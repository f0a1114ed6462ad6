//! The process-wide log writer (`main.rs` installs it for every command, the worker's included):
//! stderr, around the progress bar the demo may show.

use std::io::Write;
use std::sync::Mutex;




/// The line of the progress bar now on stderr (None: no bar shown). Log lines written through
/// [`LogWriter`] clear it first and draw it again after, so they do not land on the bar.
static BAR: Mutex<Option<String>> = Mutex::new(None);

pub const CLEAR_LINE: &str = "\r\x1b[2K";

pub fn bar_line() -> std::sync::MutexGuard<'static, Option<String>> {
    BAR.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message on its own line while the bar may be shown (the bar is drawn again under it).
pub fn progress_message(text: &str) {
    let bar = bar_line();
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(&around_bar(bar.as_deref(), format!("{text}\n").as_bytes()));
    let _ = err.flush();
}

/// `log` as written while `bar` is shown: the bar's line cleared, the log, the bar again.
fn around_bar(bar: Option<&str>, log: &[u8]) -> Vec<u8> {
    match bar {
        None => log.to_vec(),
        Some(line) => [CLEAR_LINE.as_bytes(), log, line.as_bytes()].concat(),
    }
}

/// The writer for the tracing subscriber (`tracing_subscriber::fmt().with_writer(LogWriter)`):
/// stderr, but a log line written while the demo's progress bar is shown clears the bar's line
/// first and draws the bar again below it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// One log record: buffered, written to stderr around the progress bar when dropped.
pub struct BarAwareStderr {
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = BarAwareStderr;

    fn make_writer(&'a self) -> Self::Writer {
        BarAwareStderr { buf: Vec::with_capacity(256) }
    }
}

impl Write for BarAwareStderr {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BarAwareStderr {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let bar = bar_line();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&around_bar(bar.as_deref(), &self.buf));
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn log_lines_clear_the_progress_bar_and_redraw_it_below() {
        assert_eq!(around_bar(None, b"INFO started\n"), b"INFO started\n");
        let out = String::from_utf8(around_bar(Some("  enriching [##--] 1/2"), b"INFO started\n")).unwrap();
        assert_eq!(out, "\r\x1b[2KINFO started\n  enriching [##--] 1/2");
        // the writer buffers one record, written whole (around the bar) when it is dropped
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&LogWriter);
        w.write_all(b"INFO ").unwrap();
        w.write_all(b"started\n").unwrap();
        assert_eq!(w.buf, b"INFO started\n");
        w.buf.clear(); // nothing to write to the test's stderr
    }
}
