//! The demo's progress on stderr, drawn around the log lines (`telemetry::log`).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};




/// The demo's progress on stderr: a bar redrawn in place on a terminal, otherwise a line every
/// few seconds when it changed.
pub struct Progress {
    total: usize,
    live: bool,
    started: Instant,
    last_draw: Option<Instant>,
    last_done: Option<usize>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self { total, live: std::io::stderr().is_terminal(), started: Instant::now(), last_draw: None, last_done: None }
    }

    pub fn text(&self, done: usize, idle: Duration) -> String {
        let width = 40;
        let filled = (done * width).checked_div(self.total).unwrap_or(width).min(width);
        let mut line = format!(
            "  enriching [{}{}] {done}/{} events, {}s",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total,
            self.started.elapsed().as_secs()
        );
        if done == 0 {
            line.push_str(" (the worker joins the group and loads the models first)");
        } else if idle >= Duration::from_secs(10) {
            line.push_str(&format!(" (nothing new for {}s)", idle.as_secs()));
        }
        line
    }

    pub fn update(&mut self, done: usize, idle: Duration) {
        let every = if self.live { Duration::from_millis(200) } else { Duration::from_secs(10) };
        let due = self.last_draw.is_none_or(|t| t.elapsed() >= every);
        if !due || (!self.live && self.last_done == Some(done)) {
            return;
        }
        let line = self.text(done, idle);
        let mut bar = bar_line();
        let mut err = std::io::stderr().lock();
        if self.live {
            let _ = write!(err, "{CLEAR_LINE}{line}");
            *bar = Some(line);
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
        self.last_done = Some(done);
    }

    pub fn finish(&mut self, done: usize) {
        let line = self.text(done, Duration::ZERO);
        let mut bar = bar_line();
        let mut err = std::io::stderr().lock();
        let _ = if self.live { writeln!(err, "{CLEAR_LINE}{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
        *bar = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    pub fn the_bar_says_what_it_waits_for() {
        let p = Progress { total: 10, live: false, started: Instant::now(), last_draw: None, last_done: None };
        assert!(p.text(0, Duration::ZERO).contains("0/10 events") && p.text(0, Duration::ZERO).contains("loads the models"));
        assert!(p.text(5, Duration::from_secs(30)).contains("[####################--------------------] 5/10"));
        assert!(p.text(5, Duration::from_secs(30)).contains("nothing new for 30s"));
        assert!(p.text(12, Duration::ZERO).contains(&"#".repeat(40)), "never more than full");
    }
}

use crate::telemetry::log::{CLEAR_LINE, bar_line};
