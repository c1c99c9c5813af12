//! Touching memory ahead of use, so that [`Engine::prefetch`](crate::Engine::prefetch) can
//! start the loads of a reading's state while the engine is still busy with earlier
//! readings.
//!
//! On x86-64, AArch64 and 32-bit ARM a touch is the processor's prefetch instruction
//! (`PREFETCHT0`, `PRFM PLDL1KEEP`, `PLD`): it starts loading the line and retires at once,
//! so the work that follows never waits for it, on out-of-order and in-order cores alike (a
//! Cortex-A53 stalls on a plain read that misses). Elsewhere, and under Miri, a touch does
//! nothing. Either way nothing changes but the caches.
//!
//! The instructions are the crate's only unsafe code, three one-line blocks below: a
//! prefetch is a hint that cannot fault and has no architectural effect, whatever the
//! address, and each is given an address inside a live value.
#![allow(unsafe_code)]

/// Cache line size assumed for the stride over arrays (64 bytes on x86-64 and on the
/// Cortex-A53/A72/A76 of Pi-class boards).
const LINE: usize = 64;

/// Starts loading every cache line `s` spans.
#[inline]
pub(crate) fn slice<T>(s: &[T]) {
    bytes(s.as_ptr().cast(), core::mem::size_of_val(s));
}

/// Starts loading every cache line `v` spans.
#[inline]
pub(crate) fn object<T>(v: &T) {
    bytes((v as *const T).cast(), core::mem::size_of::<T>());
}

/// Starts loading every cache line of the `len` bytes at `start`: one byte a line apart, and
/// the last (when `start` does not begin a line, the stride alone would miss the last line).
#[inline]
fn bytes(start: *const u8, len: usize) {
    let Some(last) = len.checked_sub(1) else {
        return;
    };
    for offset in (0..len).step_by(LINE) {
        line(start.wrapping_add(offset));
    }
    line(start.wrapping_add(last));
}

/// Starts loading the cache line of `v`.
#[inline(always)]
pub(crate) fn value<T>(v: &T) {
    line((v as *const T).cast());
}

/// Starts loading the cache line of `p`, an address inside a live value.
#[inline(always)]
fn line(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: PREFETCHT0 never faults and has no architectural effect (module docs); SSE is
    // part of the x86-64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: PRFM never faults and has no architectural effect (module docs); it touches
    // no stack and no flags.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(all(target_arch = "arm", not(miri)))]
    // SAFETY: PLD never faults and has no architectural effect (module docs); it touches no
    // stack and no flags.
    unsafe {
        core::arch::asm!("pld [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(any(
        miri,
        not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm"))
    ))]
    {
        let _ = p;
    }
}
