use super::*;

const FIXTURE: &str = include_str!("../fixtures/dp_accounting_epsilon.csv");

fn fixture() -> Vec<(f64, f64, u64, f64, f64)> {
    FIXTURE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('q'))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn agrees_with_dp_accounting_within_one_percent() {
    let rows = fixture();
    assert!(rows.len() > 300, "fixture has {} rows", rows.len());
    let mut worst: f64 = 0.0;
    for (q, z, t, delta, expected) in rows {
        let ours = gaussian_epsilon(q, z, t, delta).unwrap();
        let rel = (ours - expected) / expected;
        worst = worst.max(rel.abs());
        assert!(
            rel.abs() <= 0.01,
            "q {q} z {z} T {t} delta {delta}: ours {ours} vs dp_accounting {expected}"
        );
    }
    eprintln!("largest relative difference from dp_accounting: {worst:.2e}");
}

#[test]
fn full_participation_is_the_plain_gaussian() {
    let orders = [2.0, 3.5, 10.0];
    for (r, alpha) in sampled_gaussian(1.0, 2.0, &orders).iter().zip(orders) {
        assert!((r - alpha / 8.0).abs() < 1e-12);
    }
    assert_eq!(sampled_gaussian(0.0, 1.0, &orders), vec![0.0; 3]);
}

#[test]
fn general_subsampling_bound_is_above_the_exact_gaussian_one() {
    let orders = integer_orders();
    for q in [0.01, 0.1, 0.5] {
        for z in [0.8, 1.0, 3.0] {
            let exact = sampled_gaussian(q, z, &orders);
            let general = poisson_subsampled(q, |a| a as f64 / (2.0 * z * z), &orders);
            for ((e, g), a) in exact.iter().zip(&general).zip(&orders) {
                assert!(g >= &(e * (1.0 - 1e-9)), "q {q} z {z} order {a}: {g} < {e}");
            }
            // And not absurdly loose where it matters (moderate orders).
            let (eps_exact, _) = epsilon(&orders, &exact, 1e-5);
            let (eps_general, _) = epsilon(&orders, &general, 1e-5);
            assert!(
                eps_general < 2.0 * eps_exact + 0.5,
                "{eps_general} vs {eps_exact}"
            );
        }
    }
}

#[test]
fn skellam_tends_to_the_gaussian_of_the_same_variance() {
    let orders = [2.0, 8.0, 32.0];
    let (l1, l2) = (100.0, 10.0);
    for mu in [1e3, 1e5, 1e7] {
        for (r, alpha) in skellam(mu, l1, l2, &orders).iter().zip(orders) {
            // Gaussian with variance 2 mu: alpha l2^2 / (2 * 2 mu).
            let gaussian = alpha * l2 * l2 / (4.0 * mu);
            assert!(*r >= gaussian);
            if mu >= 1e5 {
                assert!((r / gaussian - 1.0) < 0.01, "mu {mu}: {r} vs {gaussian}");
            }
        }
    }
}

#[test]
fn epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise() {
    let e = |q, z, t| gaussian_epsilon(q, z, t, 1e-5).unwrap();
    assert!(e(0.01, 1.0, 100) < e(0.01, 1.0, 1000));
    assert!(e(0.01, 1.0, 100) < e(0.1, 1.0, 100));
    assert!(e(0.01, 2.0, 100) < e(0.01, 1.0, 100));
}

#[test]
fn noise_multiplier_inverts_epsilon() {
    for (q, target, t) in [
        (0.01, 1.0, 1000u64),
        (0.1, 3.0, 100),
        (0.1, 8.0, 50),
        (1.0, 3.0, 10),
    ] {
        let z = gaussian_noise_multiplier(q, target, t, 1e-5).unwrap();
        let at = gaussian_epsilon(q, z, t, 1e-5).unwrap();
        assert!(at <= target, "q {q}: z {z} gives {at} > {target}");
        let below = gaussian_epsilon(q, z * 0.999, t, 1e-5).unwrap();
        assert!(below > target * 0.99, "z {z} is far from tight: {below}");
    }
}

#[test]
fn bad_inputs_are_named() {
    assert_eq!(
        gaussian_epsilon(0.0, 1.0, 1, 1e-5),
        Err(AccountingError::SamplingRate(0.0))
    );
    assert_eq!(
        gaussian_epsilon(1.5, 1.0, 1, 1e-5),
        Err(AccountingError::SamplingRate(1.5))
    );
    assert_eq!(
        gaussian_epsilon(0.1, -1.0, 1, 1e-5),
        Err(AccountingError::NoiseMultiplier(-1.0))
    );
    assert_eq!(
        gaussian_epsilon(0.1, 1.0, 1, 1.0),
        Err(AccountingError::Delta(1.0))
    );
    assert_eq!(
        gaussian_epsilon(0.1, 1.0, 0, 1e-5),
        Err(AccountingError::Rounds)
    );
    assert_eq!(
        gaussian_noise_multiplier(0.1, 0.0, 1, 1e-5),
        Err(AccountingError::Epsilon(0.0))
    );
    assert!(matches!(
        gaussian_noise_multiplier(1.0, 1e-9, 1_000_000, 1e-5),
        Err(AccountingError::Unreachable { .. })
    ));
}
