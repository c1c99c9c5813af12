//! Evaluating a batch of readings with the engine told ahead of time which state it will
//! need: the loop the agent's rules stage runs over each delivery.

/// How many inputs ahead of the one being evaluated the rules engine is told to start
/// loading state for ([`Engine::prefetch`](crate::Engine::prefetch)): enough for
/// the loads to overlap the work on the readings in between, few enough that what they bring
/// in is still in the cache when its reading comes (a reading's state is a few KiB).
pub const PREFETCH_AHEAD: usize = 8;

/// Empties `batch` in order into `each`, telling `prefetch` first about the item
/// [`PREFETCH_AHEAD`] places further on (and about the first ones before the first item), so
/// that the engine loads a reading's state while the readings before it are evaluated. Both
/// get `state`, one at a time. The agent's rules stage runs this loop over every delivery, and
/// the rules bench measures it.
pub fn drain_prefetching<T, S>(
    batch: &mut Vec<T>,
    state: &mut S,
    prefetch: impl Fn(&S, &T),
    mut each: impl FnMut(&mut S, T),
) {
    let mut items = batch.drain(..);
    for ahead in items.as_slice().iter().take(PREFETCH_AHEAD) {
        prefetch(state, ahead);
    }
    while let Some(item) = items.next() {
        if let Some(ahead) = items.as_slice().get(PREFETCH_AHEAD - 1) {
            prefetch(state, ahead);
        }
        each(state, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Step {
        Prefetch(usize),
        Eval(usize),
    }

    /// Every item is prefetched once, exactly `PREFETCH_AHEAD` items before it is evaluated
    /// (the first ones before the first item), and evaluated once, in order.
    #[test]
    fn drain_prefetching_tells_of_each_item_once_and_in_time() {
        for n in 0..3 * PREFETCH_AHEAD {
            let mut batch: Vec<usize> = (0..n).collect();
            let mut log = std::cell::RefCell::new(Vec::new());
            drain_prefetching(
                &mut batch,
                &mut log,
                |log, item| log.borrow_mut().push(Step::Prefetch(*item)),
                |log, item| log.get_mut().push(Step::Eval(item)),
            );
            assert!(batch.is_empty());
            let log = log.into_inner();
            assert_eq!(log.len(), 2 * n, "n = {n}: {log:?}");
            let evals: Vec<usize> = log
                .iter()
                .filter_map(|s| match s {
                    Step::Eval(i) => Some(*i),
                    Step::Prefetch(_) => None,
                })
                .collect();
            assert_eq!(evals, (0..n).collect::<Vec<_>>(), "n = {n}");
            for item in 0..n {
                let at: Vec<usize> = (0..log.len())
                    .filter(|&k| log[k] == Step::Prefetch(item))
                    .collect();
                assert_eq!(at.len(), 1, "n = {n}, item {item}: {log:?}");
                let evaluated_before = log[..at[0]]
                    .iter()
                    .filter(|s| matches!(s, Step::Eval(_)))
                    .count();
                assert_eq!(
                    evaluated_before,
                    item.saturating_sub(PREFETCH_AHEAD),
                    "n = {n}, item {item}: {log:?}"
                );
            }
        }
    }
}
