//! Defence in depth around third-party parsers and codecs.
//!
//! Hostile input must never take the box down. The DICOM parser and the
//! image codecs are checked against malformed input, but a panic inside one
//! of them (a bug we have not found yet) must still become a clean error for
//! that one request, not a crash. [`no_panic`] runs a closure and turns a
//! panic into an error message; [`install_quiet_panic_hook`] keeps such a
//! caught panic from printing a backtrace over the one-line error.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a panic inside it becomes `Err("<what> failed internally: …")`.
///
/// # Errors
/// The panic's message, prefixed with `what`.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    let was = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        format!(
            "{what} failed internally on this input ({})",
            message.replace('\n', " ")
        )
    })
}

/// Installs a panic hook that stays silent for panics caught by [`no_panic`]
/// and keeps the default report for every other panic.
pub fn install_quiet_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(Cell::get) {
            default(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors() {
        let err = no_panic("codec", || -> u8 { panic!("boom") }).expect_err("must catch");
        assert!(err.contains("codec failed internally"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert_eq!(no_panic("codec", || 7), Ok(7));
    }
}
