//! A progress line for long scans: on stderr, only when stderr is a terminal, redrawn at most
//! ten times a second and only once the scan has run for a moment (a small pool shows none).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use loopvol::inspect::Progress;

const AFTER: Duration = Duration::from_millis(300);
const EVERY: Duration = Duration::from_millis(100);

pub struct ProgressLine {
    enabled: bool,
    start: Instant,
    last: Option<Instant>,
}

impl ProgressLine {
    pub fn new(wanted: bool) -> ProgressLine {
        ProgressLine {
            enabled: wanted && std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
        }
    }

    pub fn show(&mut self, p: Progress) {
        if !self.enabled || self.start.elapsed() < AFTER {
            return;
        }
        if self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[Kscanning {} {}/{}",
            p.what,
            p.done,
            p.total
        );
    }

    pub fn clear(&mut self) {
        if self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
