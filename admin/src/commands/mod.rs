//! One module per subcommand: its clap arguments (`Args`) and `run`.

pub mod check;
pub mod fence;
pub mod gc;
pub mod inspect;
pub mod list;
pub mod metrics;
