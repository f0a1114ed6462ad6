//! Token-budget batching: sequences sorted by length and grouped so that each batch's padded
//! size (longest sequence × count) stays within `max_batch_tokens`, like TEI's
//! `max_batch_tokens`. Sorting keeps similar lengths together, so little compute goes to padding.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_batch_tokens: 16_384, max_batch_size: 64 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub sequences: usize,
    pub batches: usize,
    /// Tokens that carry text (special tokens included).
    pub real_tokens: usize,
    /// Tokens computed, padding included.
    pub padded_tokens: usize,
}

impl BatchStats {
    /// Share of computed tokens that were padding.
    pub fn padding_ratio(&self) -> f64 {
        if self.padded_tokens == 0 { 0.0 } else { 1.0 - self.real_tokens as f64 / self.padded_tokens as f64 }
    }

    pub fn add(&mut self, other: &BatchStats) {
        self.sequences += other.sequences;
        self.batches += other.batches;
        self.real_tokens += other.real_tokens;
        self.padded_tokens += other.padded_tokens;
    }
}

/// Groups indices of `lengths` into batches, longest first. A sequence longer than the budget
/// gets a batch of its own.
pub fn plan(lengths: &[usize], budget: &Budget) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let longest = current.first().map_or(lengths[i], |&f| lengths[f]);
        let fits = (current.len() + 1) * longest <= budget.max_batch_tokens && current.len() < budget.max_batch_size;
        if !current.is_empty() && !fits {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Why running one batch failed.
#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The device ran out of memory: retry the batch in smaller pieces.
    OutOfMemory(String),
    Other(String),
}

/// Runs every group through `run` and hands each result to `accept`. A group that fails with
/// `OutOfMemory` is split in two halves that are retried in its place (a single sequence that
/// still does not fit fails for real). Returns how many splits happened.
pub fn run_splitting<T>(
    groups: Vec<Vec<usize>>,
    mut run: impl FnMut(&[usize]) -> Result<T, RunError>,
    mut accept: impl FnMut(&[usize], T),
) -> Result<usize, RunError> {
    let mut splits = 0;
    let mut pending: Vec<Vec<usize>> = groups.into_iter().rev().collect();
    while let Some(group) = pending.pop() {
        match run(&group) {
            Ok(out) => accept(&group, out),
            Err(RunError::OutOfMemory(_)) if group.len() > 1 => {
                let (a, b) = group.split_at(group.len() / 2);
                pending.push(b.to_vec());
                pending.push(a.to_vec());
                splits += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_splits_the_batch_until_it_fits() {
        // a fake device that holds at most 2 sequences of a batch
        let groups = vec![vec![0, 1, 2, 3, 4], vec![5], vec![6, 7]];
        let mut seen = Vec::new();
        let splits = run_splitting(
            groups,
            |g| if g.len() > 2 { Err(RunError::OutOfMemory("CUDA out of memory".into())) } else { Ok(g.to_vec()) },
            |g, out| {
                assert_eq!(g, out.as_slice());
                seen.extend(out);
            },
        )
        .unwrap();
        assert_eq!(seen, (0..8).collect::<Vec<_>>(), "every sequence once, in order");
        assert_eq!(splits, 2, "5 -> 2 + 3 -> 2 + 1 + 2");
        let fail = run_splitting(vec![vec![0]], |_| Err::<(), _>(RunError::OutOfMemory("x".into())), |_, _| {});
        assert_eq!(fail, Err(RunError::OutOfMemory("x".into())), "a single sequence cannot split");
        let other = run_splitting(vec![vec![0, 1]], |_| Err::<(), _>(RunError::Other("bad".into())), |_, _| {});
        assert_eq!(other, Err(RunError::Other("bad".into())), "other errors are not retried");
    }

    #[test]
    fn batches_respect_the_budget_and_cover_every_sequence_once() {
        let lengths = [5, 120, 7, 64, 64, 3, 900, 30, 31, 29];
        let budget = Budget { max_batch_tokens: 200, max_batch_size: 3 };
        let batches = plan(&lengths, &budget);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() <= 3);
            assert!(b.len() == 1 || longest * b.len() <= 200, "{b:?}");
            // sorted: a batch never mixes lengths across another batch's range
            assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        assert_eq!(batches[0], vec![6], "the oversized sequence runs alone");
    }

    #[test]
    fn padding_ratio_counts_padding_share() {
        let s = BatchStats { sequences: 2, batches: 1, real_tokens: 75, padded_tokens: 100 };
        assert!((s.padding_ratio() - 0.25).abs() < 1e-12);
        assert_eq!(BatchStats::default().padding_ratio(), 0.0);
    }
}
