//! Touching memory ahead of use, so that [`Engine::prefetch`](crate::Engine::prefetch) can
//! start the loads of a reading's state while the engine is still busy with earlier
//! readings.
//!
//! These are ordinary reads whose values are thrown away ([`std::hint::black_box`] keeps the
//! compiler from dropping them). They do not depend on each other, so an out-of-order core
//! keeps many of them in flight at once and goes on with the work that follows; the crate
//! stays free of unsafe code (an explicit prefetch instruction would need it). On an
//! in-order core (Cortex-A53) a touch waits for its line, so it costs there what it saves.

/// Cache line size assumed for the stride over arrays (64 bytes on x86-64 and on the
/// Cortex-A53/A72/A76 of Pi-class boards).
const LINE: usize = 64;

/// Reads one value of each cache line of `s`.
#[inline]
pub(crate) fn slice<T: Copy + Into<f64>>(s: &[T]) {
    let step = (LINE / core::mem::size_of::<T>().max(1)).max(1);
    let mut acc = 0.0;
    for v in s.iter().step_by(step) {
        acc += (*v).into();
    }
    std::hint::black_box(acc);
}

/// Reads `v`.
#[inline]
pub(crate) fn value<T: Copy>(v: &T) {
    std::hint::black_box(*v);
}
