//! Prompt lookup: draft by copying what followed the latest earlier occurrence of the context's
//! last n tokens (n from `max_ngram` down to `min_ngram`). No model, so drafting costs nothing;
//! it pays on inputs that repeat themselves (code edits, quoting, summarising).

/// Up to `k` tokens that followed the most recent earlier match of the context's suffix, and the
/// length n of the suffix that matched (0 when none did).
pub fn lookup(context: &[u32], k: usize, min_ngram: usize, max_ngram: usize) -> (Vec<u32>, usize) {
    if k == 0 || context.len() < 2 {
        return (Vec::new(), 0);
    }
    for n in (min_ngram.max(1)..=max_ngram).rev() {
        if context.len() <= n {
            continue;
        }
        let suffix = &context[context.len() - n..];
        // Scan right to left: the latest match is the likeliest to continue the same way.
        // `start + n < len` keeps the match strictly before the suffix itself.
        for start in (0..context.len() - n).rev() {
            if &context[start..start + n] == suffix {
                let from = start + n;
                let to = (from + k).min(context.len());
                if from < to {
                    return (context[from..to].to_vec(), n);
                }
            }
        }
    }
    (Vec::new(), 0)
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn copies_what_followed_the_latest_match() {
        // ... 1 2 3 [4 5 6] ... 1 2 3 -> 4 5 6
        let ctx = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3];
        assert_eq!(lookup(&ctx, 3, 1, 3).0, vec![4, 5, 6]);
        // The latest match wins.
        let ctx = [1, 2, 7, 1, 2, 8, 1, 2];
        assert_eq!(lookup(&ctx, 1, 1, 2).0, vec![8]);
    }

    #[test]
    fn reports_the_length_of_the_match() {
        let ctx = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3];
        assert_eq!(super::lookup(&ctx, 2, 1, 8), (vec![4, 5], 3));
        assert_eq!(super::lookup(&ctx, 2, 4, 8), (vec![], 0));
    }

    #[test]
    fn falls_back_to_shorter_ngrams_and_stops_at_the_end() {
        let ctx = [5, 6, 1, 9, 9, 1];
        // No 2-gram "9 1" earlier; the 1-gram "1" matched at index 2 -> 9 9 1 (capped by k and len).
        assert_eq!(lookup(&ctx, 2, 1, 3).0, vec![9, 9]);
        assert_eq!(lookup(&ctx, 10, 2, 3).0, Vec::<u32>::new());
        assert_eq!(lookup(&[1], 4, 1, 3).0, Vec::<u32>::new());
        assert_eq!(lookup(&[1, 1], 4, 1, 3).0, vec![1]);
    }
}
