//! The `verdict` command line: one file per subcommand.

pub mod batch;
pub mod bench;
pub mod eval;
pub mod generate;
pub mod judge;
pub mod policy;
pub mod serve;
