//! Per-thread scratch buffers of the CPU kernels (padded planes, unfolded
//! columns, transformed tiles): kept between calls on a thread, because
//! allocating them afresh each time costs page faults.
//!
//! A thread of the compute pool that waits for its own parallel tasks
//! runs other tasks meanwhile, and with inference itself running on the
//! pool ([`crate::Model::predict_batch`]) those may belong to another
//! convolution, or another request, that wants the same buffer. So a
//! buffer is borrowed, never assumed free: [`with_scratch`] hands out a
//! fresh one when this thread's is in use.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` with this thread's buffer in `key`, or with a fresh one when
/// that is in use further up this thread's stack.
pub(crate) fn with_scratch<T: Default + 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => f(&mut buffer),
        Err(_) => f(&mut T::default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_buffer_in_use_gives_a_fresh_one_and_is_kept_otherwise() {
        with_scratch(&BUFFER, |outer| {
            outer.push(1);
            // Re-entered while borrowed: a fresh, empty buffer.
            with_scratch(&BUFFER, |inner| {
                assert!(inner.is_empty());
                inner.push(2);
            });
            assert_eq!(outer, &[1]);
        });
        // Not in use: this thread's buffer, as the outer call left it.
        with_scratch(&BUFFER, |buffer| assert_eq!(buffer, &[1]));
    }
}
