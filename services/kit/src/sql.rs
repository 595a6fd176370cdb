//! Shaping multi-row SQL statements so that their text repeats.
//!
//! A statement with one `VALUES` row or `IN` item per record has a different text for
//! every batch size, and a database prepares (parses and plans) each new text again:
//! sqlx caches prepared statements by their text, per connection. Cutting a batch into
//! chunks whose sizes are powers of two bounds the distinct texts to one per power (at
//! most 10 for 500 rows), which stay in the cache, for one more statement per set bit
//! of the batch size.

/// `items` in chunks of at most `max` (at least 1), each as long as the largest power
/// of two that fits in what is left, in order.
pub fn power_of_two_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let max = prev_power_of_two(max.max(1));
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(prev_power_of_two(rest.len()).min(max));
        rest = tail;
        Some(chunk)
    })
}

/// The largest power of two not above `n` (n >= 1).
fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(n: usize, max: usize) -> Vec<usize> {
        let items: Vec<usize> = (0..n).collect();
        let chunks: Vec<&[usize]> = power_of_two_chunks(&items, max).collect();
        // Every item once, in order.
        assert_eq!(chunks.concat(), items);
        chunks.iter().map(|c| c.len()).collect()
    }

    #[test]
    fn chunks_are_powers_of_two_in_order() {
        assert_eq!(sizes(0, 500), Vec::<usize>::new());
        assert_eq!(sizes(1, 500), [1]);
        assert_eq!(sizes(50, 500), [32, 16, 2]);
        assert_eq!(sizes(64, 500), [64]);
        assert_eq!(sizes(1_000, 500), [256, 256, 256, 128, 64, 32, 8]);
        // The cap is rounded down to a power of two; zero counts as one.
        assert_eq!(sizes(7, 3), [2, 2, 2, 1]);
        assert_eq!(sizes(3, 0), [1, 1, 1]);
    }
}
