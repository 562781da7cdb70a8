//! The built-in policies, compiled to wasm by build.rs and embedded in the binary, so verdict
//! serves them from any directory.

include!(concat!(env!("OUT_DIR"), "/builtin_policies.rs"));

/// Names of the built-in policies (reserved: nothing can be registered under them).
pub const BUILTIN_NAMES: [&str; 3] = ["strict", "judge", "threshold"];

/// The embedded component of built-in `name`, if the build could compile it.
pub fn wasm(name: &str) -> Option<&'static [u8]> {
    BUILT.iter().find(|(n, _)| *n == name).map(|(_, w)| *w)
}

/// The error for a build without the wasm target (or whose plugin build failed).
pub(crate) fn missing_message() -> String {
    let mut msg = "built-in policies were not compiled in: run `rustup target add wasm32-wasip2` \
                   and rebuild"
        .to_string();
    if !MISSING_REASON.is_empty() {
        msg.push_str(" (build: ");
        msg.push_str(MISSING_REASON);
        msg.push(')');
    }
    msg
}
