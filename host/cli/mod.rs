//! The `verdict` command line: one file per subcommand.

pub mod policy;
pub mod serve;
