//! The SecAgg+ communication graph: a random k-regular graph (a Harary
//! graph on a random permutation, as in Bell et al. 2020), so each client
//! exchanges keys, shares and masks with k neighbours instead of n - 1.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

/// Neighbours of every cohort member. `k` must be even and below the cohort
/// size, or `k >= n - 1` for the complete graph.
pub fn harary(cohort: &[u64], k: usize, seed: u64) -> BTreeMap<u64, Vec<u64>> {
    let n = cohort.len();
    let mut order = cohort.to_vec();
    order.sort_unstable();
    if k + 1 >= n {
        return order
            .iter()
            .map(|&i| (i, order.iter().copied().filter(|&j| j != i).collect()))
            .collect();
    }
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let half = k / 2;
    (0..n)
        .map(|p| {
            let mut nb: Vec<u64> = (1..=half)
                .flat_map(|d| [order[(p + d) % n], order[(p + n - d) % n]])
                .collect();
            nb.sort_unstable();
            (order[p], nb)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_symmetric_and_loop_free() {
        for (n, k) in [(10, 4), (50, 8), (7, 6), (5, 10), (64, 2)] {
            let cohort: Vec<u64> = (1..=n as u64).map(|i| i * 3).collect();
            let g = harary(&cohort, k, 9);
            let deg = k.min(n - 1);
            for (&i, nb) in &g {
                assert_eq!(nb.len(), deg, "n {n} k {k}");
                assert!(!nb.contains(&i));
                for j in nb {
                    assert!(g[j].contains(&i), "symmetric");
                }
            }
        }
    }

    #[test]
    fn seeded() {
        let cohort: Vec<u64> = (1..=30).collect();
        assert_eq!(harary(&cohort, 6, 1), harary(&cohort, 6, 1));
        assert_ne!(harary(&cohort, 6, 1), harary(&cohort, 6, 2));
    }
}
