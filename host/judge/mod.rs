//! The judge head's offline pipeline: mine labels from the draft/target pair
//! ([`mine`]), train the linear head ([`train`]), and measure the policies on HumanEval
//! ([`eval`], tests executed by [`humaneval`]'s sandbox). The head itself (file format and the
//! scoring the engine runs every step) lives with verification: [`crate::verify::judge`].

pub mod eval;
pub mod humaneval;
pub mod mine;
pub mod train;
