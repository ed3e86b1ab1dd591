//! Benchmarks that hold still: one statistics helper for the backend, CSI and FlexVolume
//! benchmarks. Every ratio comes from interleaved pairs (ours, then the baseline, then the
//! baseline, then ours, ...: the order alternates so neither side always runs first, on a
//! cache the other warmed), each pair gives one ratio, and a row reports the median of those
//! ratios with their spread (min–max) and the number of pairs. A noisy neighbour or a burst of
//! host cache moves one pair, not the median, and the spread shows how much the machine moved.

use std::fmt;

/// How many pairs a benchmark runs: `BENCH_PAIRS`, default 7. Fewer than [`MIN_PAIRS`] is a
/// smoke run: its table says so.
pub fn pairs_from_env() -> usize {
    std::env::var("BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(7)
}

/// The fewest pairs a figure is taken from.
pub const MIN_PAIRS: usize = 5;

/// The median and the range of some numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// The summary of `values` (not empty). An even count's median is the mean of the two middle
    /// values.
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "no values to summarize");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

impl fmt::Display for Summary {
    /// `0.97 (0.93–1.01)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// Measurements of ours and of the baseline, taken in interleaved pairs.
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    pub ours: Vec<f64>,
    pub base: Vec<f64>,
}

impl Pairs {
    /// Runs `n` pairs of one measurement of ours and one of the baseline, alternating which goes
    /// first. Each closure returns its measurement (a time, a rate: the row says which).
    pub fn run(n: usize, mut ours: impl FnMut() -> f64, mut base: impl FnMut() -> f64) -> Pairs {
        let mut p = Pairs::default();
        for i in 0..n {
            let (o, b) = if i % 2 == 0 {
                let o = ours();
                (o, base())
            } else {
                let b = base();
                (ours(), b)
            };
            p.push(o, b);
        }
        p
    }

    pub fn push(&mut self, ours: f64, base: f64) {
        self.ours.push(ours);
        self.base.push(base);
    }

    pub fn len(&self) -> usize {
        self.ours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ours.is_empty()
    }

    /// Each pair's ours ÷ baseline, summarized.
    pub fn ratio(&self) -> Summary {
        let r: Vec<f64> = self
            .ours
            .iter()
            .zip(&self.base)
            .map(|(o, b)| o / b)
            .collect();
        Summary::of(&r)
    }

    pub fn ours(&self) -> Summary {
        Summary::of(&self.ours)
    }

    pub fn base(&self) -> Summary {
        Summary::of(&self.base)
    }
}

/// Which way a ratio must go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A rate: ours ÷ baseline at least this.
    AtLeast(f64),
    /// A time: ours ÷ baseline at most this.
    AtMost(f64),
}

impl Target {
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(t) => ratio >= t,
            Target::AtMost(t) => ratio <= t,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::AtLeast(t) => write!(f, "≥ {t}"),
            Target::AtMost(t) => write!(f, "≤ {t}"),
        }
    }
}

/// One row of a ratio table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    /// Ours, its median with its unit.
    pub ours: String,
    /// The baseline's median, with its unit and what it is.
    pub baseline: String,
    pub ratio: Summary,
    pub target: Target,
}

impl Row {
    /// A row from `pairs`, values shown by `show` (the unit), baseline named `name`.
    pub fn new(
        what: impl Into<String>,
        pairs: &Pairs,
        show: impl Fn(f64) -> String,
        name: &str,
        target: Target,
    ) -> Row {
        Row {
            what: what.into(),
            ours: show(pairs.ours().median),
            baseline: format!("{} ({name})", show(pairs.base().median)),
            ratio: pairs.ratio(),
            target,
        }
    }
}

/// Prints `rows` as a Markdown table: median ratio with its spread, the number of pairs, the
/// target (✘ when the median misses it). A table with fewer than [`MIN_PAIRS`] pairs in a row
/// says it is a smoke run, not a figure.
pub fn print_table(rows: &[Row]) {
    println!("| what | loopvol | baseline | ratio, median (min–max) | pairs | target |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let miss = if r.target.met(r.ratio.median) {
            ""
        } else {
            " ✘"
        };
        println!(
            "| {} | {} | {} | {} | {} | {}{miss} |",
            r.what, r.ours, r.baseline, r.ratio, r.ratio.n, r.target
        );
    }
    if rows.iter().any(|r| r.ratio.n < MIN_PAIRS) {
        println!("\n(smoke run: fewer than {MIN_PAIRS} pairs; not a figure)");
    }
}

/// What the numbers were measured on: cores, CPU model, kernel, and the load average (a busy
/// machine shows in it, and in the spreads).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} cores, {cpu}, kernel {}, load average {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim(),
        load_average()
    )
}

/// The 1-minute load average.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(s.to_string(), "2.00 (1.00–3.00)");
    }

    #[test]
    fn pairs_alternate_and_give_one_ratio_each() {
        let mut order = Vec::new();
        let log = std::cell::RefCell::new(&mut order);
        let p = Pairs::run(
            4,
            || {
                log.borrow_mut().push('o');
                2.0
            },
            || {
                log.borrow_mut().push('b');
                1.0
            },
        );
        assert_eq!(order.iter().collect::<String>(), "obboobbo");
        assert_eq!(p.len(), 4);
        assert_eq!(p.ratio().median, 2.0);
        assert!(Target::AtLeast(0.97).met(0.97) && !Target::AtMost(1.1).met(1.2));
    }
}
