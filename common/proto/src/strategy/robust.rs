//! Byzantine-robust aggregation rules over individual updates.
//!
//! - Coordinate-wise median (FedMedian; Yin et al., ICML 2018).
//! - Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop
//!   the `trim` largest and `trim` smallest values and average the rest.
//! - Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): score each update
//!   by the summed squared distances to its `n - f - 2` nearest neighbours;
//!   Krum returns the best-scored update, Multi-Krum the mean of the `m`
//!   best.
//!
//! Each result depends on the set of updates, not on their order: values
//! are sorted per coordinate before anything is summed, and Krum breaks
//! score ties by position in the (client-id sorted) input.
//!
//! The rules ignore example weights, except Multi-Krum's final mean: a
//! client could otherwise buy influence by claiming more examples.

use super::ClientUpdate;

/// Coordinate-wise median of equally long vectors (the mean of the two
/// middle values for an even count). Empty input gives an empty vector.
///
/// ```
/// use fedveil_proto::strategy::robust::median;
/// let m = median(&[&[1.0, 9.0], &[2.0, -1.0], &[100.0, 0.0]]);
/// assert_eq!(m, vec![2.0, 0.0]);
/// ```
pub fn median(updates: &[&[f32]]) -> Vec<f32> {
    let n = updates.len();
    per_coordinate(updates, |column| {
        if n % 2 == 1 {
            *column.select_nth_unstable_by(n / 2, f32::total_cmp).1
        } else {
            let (low, high, _) = column.select_nth_unstable_by(n / 2, f32::total_cmp);
            let below = low.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ((f64::from(below) + f64::from(*high)) / 2.0) as f32
        }
    })
}

/// Coordinate-wise mean after dropping the `trim` smallest and `trim`
/// largest values of each coordinate. `2 * trim` must be below the count.
///
/// ```
/// use fedveil_proto::strategy::robust::trimmed_mean;
/// let m = trimmed_mean(&[&[1.0], &[2.0], &[3.0], &[1000.0]], 1);
/// assert_eq!(m, vec![2.5]);
/// ```
pub fn trimmed_mean(updates: &[&[f32]], trim: usize) -> Vec<f32> {
    let n = updates.len();
    assert!(2 * trim < n, "trimming {trim} from each end of {n} values");
    per_coordinate(updates, |column| {
        column.sort_unstable_by(f32::total_cmp);
        let kept = &column[trim..n - trim];
        (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
    })
}

/// The Krum score of every update: the sum of squared L2 distances to its
/// `n - byzantine - 2` nearest other updates. Needs `n > 2 * byzantine + 2`.
pub fn krum_scores(updates: &[&[f32]], byzantine: usize) -> Vec<f64> {
    let n = updates.len();
    assert!(
        n > 2 * byzantine + 2,
        "Krum with {byzantine} faulty needs more than {} updates, got {n}",
        2 * byzantine + 2
    );
    let mut distance = vec![0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(updates[i], updates[j]);
            distance[i * n + j] = d;
            distance[j * n + i] = d;
        }
    }
    let neighbours = n - byzantine - 2;
    (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distance[i * n + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect()
}

/// Indices of the `keep` best-scored updates (lowest Krum score; ties go
/// to the earlier index), best first.
pub fn krum_select(updates: &[&[f32]], byzantine: usize, keep: usize) -> Vec<usize> {
    let scores = krum_scores(updates, byzantine);
    let mut order: Vec<usize> = (0..updates.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(keep.clamp(1, updates.len()));
    order
}

/// Multi-Krum: the weighted mean of the `keep` best-scored updates (Krum
/// itself is `keep = 1`).
pub fn multi_krum(updates: &[ClientUpdate<'_>], byzantine: usize, keep: usize) -> Vec<f32> {
    let values: Vec<&[f32]> = updates.iter().map(|u| u.values).collect();
    let mut chosen = krum_select(&values, byzantine, keep);
    chosen.sort_unstable();
    let chosen: Vec<ClientUpdate<'_>> = chosen.into_iter().map(|i| updates[i]).collect();
    super::weighted_mean(&chosen)
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// Applies `f` to each coordinate's values (in input order; `f` may
/// reorder them).
fn per_coordinate(updates: &[&[f32]], mut f: impl FnMut(&mut [f32]) -> f32) -> Vec<f32> {
    let len = updates.first().map_or(0, |u| u.len());
    debug_assert!(updates.iter().all(|u| u.len() == len));
    let mut column = vec![0f32; updates.len()];
    (0..len)
        .map(|i| {
            for (c, u) in column.iter_mut().zip(updates) {
                *c = u[i];
            }
            f(&mut column)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[&[3.0], &[1.0], &[2.0]]), vec![2.0]);
        assert_eq!(median(&[&[3.0], &[1.0], &[2.0], &[10.0]]), vec![2.5]);
        assert_eq!(median(&[&[-1.0, 4.0]]), vec![-1.0, 4.0]);
        assert!(median(&[]).is_empty());
    }

    #[test]
    fn trimming_nothing_is_the_mean() {
        let v = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        assert_eq!(trimmed_mean(&refs(&v), 0), vec![2.0, 4.0]);
    }

    #[test]
    #[should_panic(expected = "trimming")]
    fn trimming_everything_is_refused() {
        trimmed_mean(&[&[1.0], &[2.0]], 1);
    }

    #[test]
    fn krum_rejects_the_outliers() {
        // Five honest updates near (1, 1), two attackers far away.
        let v = vec![
            vec![1.0, 1.0],
            vec![1.1, 0.9],
            vec![0.9, 1.0],
            vec![1.0, 1.1],
            vec![1.0, 0.9],
            vec![50.0, -50.0],
            vec![-40.0, 60.0],
        ];
        let chosen = krum_select(&refs(&v), 2, 5);
        assert!(chosen.iter().all(|&i| i < 5), "{chosen:?}");
        let updates: Vec<ClientUpdate<'_>> = v
            .iter()
            .enumerate()
            .map(|(i, values)| ClientUpdate {
                client: i as u64,
                values,
                weight: 1.0,
            })
            .collect();
        let mean = multi_krum(&updates, 2, 5);
        assert!((mean[0] - 1.0).abs() < 1e-6 && (mean[1] - 0.98).abs() < 1e-6);
        let one = multi_krum(&updates, 2, 1);
        assert!(v[..5].contains(&one), "Krum returns one honest update");
    }

    #[test]
    #[should_panic(expected = "needs more than 4 updates")]
    fn krum_needs_enough_updates() {
        krum_scores(&[&[1.0], &[2.0], &[3.0], &[4.0]], 1);
    }

    fn vectors() -> impl Strategy<Value = Vec<Vec<f32>>> {
        (1usize..9, 1usize..5).prop_flat_map(|(n, d)| {
            prop::collection::vec(prop::collection::vec(-1e6f32..1e6, d), n)
        })
    }

    proptest! {
        #[test]
        fn rules_do_not_depend_on_order(v in vectors(), seed in any::<u64>()) {
            use rand::SeedableRng;
            use rand::seq::SliceRandom;
            let mut shuffled = v.clone();
            shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            prop_assert_eq!(median(&refs(&v)), median(&refs(&shuffled)));
            let trim = (v.len() - 1) / 2;
            prop_assert_eq!(trimmed_mean(&refs(&v), trim), trimmed_mean(&refs(&shuffled), trim));
        }

        #[test]
        fn robust_values_stay_within_the_honest_range(v in vectors()) {
            // Each coordinate of the median and of any trimmed mean lies
            // between that coordinate's minimum and maximum.
            let m = median(&refs(&v));
            let t = trimmed_mean(&refs(&v), (v.len() - 1) / 2);
            for i in 0..m.len() {
                let lo = v.iter().map(|u| u[i]).fold(f32::INFINITY, f32::min);
                let hi = v.iter().map(|u| u[i]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(lo <= m[i] && m[i] <= hi);
                prop_assert!(lo <= t[i] && t[i] <= hi);
            }
        }

        #[test]
        fn one_attacker_cannot_move_the_median_outside_the_honest_values(
            v in (3usize..9, 1usize..4).prop_flat_map(|(n, d)| {
                prop::collection::vec(prop::collection::vec(-10f32..10.0, d), n)
            }),
            attack in prop::collection::vec(-1e30f32..1e30, 4),
        ) {
            // With n honest updates and one attacker, the median of n + 1
            // values is bounded by the honest extremes.
            let d = v[0].len();
            let mut all = v.clone();
            all.push(attack[..d].to_vec());
            let m = median(&refs(&all));
            for i in 0..d {
                let lo = v.iter().map(|u| u[i]).fold(f32::INFINITY, f32::min);
                let hi = v.iter().map(|u| u[i]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(lo <= m[i] && m[i] <= hi, "{} not in [{lo}, {hi}]", m[i]);
            }
        }
    }
}
