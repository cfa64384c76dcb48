use super::*;

fn config(mechanism: Mechanism, noise: NoiseLevel) -> DpConfig {
    DpConfig {
        mechanism,
        clip_norm: 1.0,
        noise,
        delta: 1e-5,
        planned_rounds: 100,
        budget: None,
        min_contributors: None,
    }
}

#[test]
fn central_plan_hits_the_target_and_noises_the_sum() {
    let plan = config(Mechanism::Central, NoiseLevel::TargetEpsilon(3.0))
        .plan(0.1, 1000, 93_322, 200, false)
        .unwrap();
    assert!(plan.epsilon_after(100) <= 3.0 && plan.epsilon_after(100) > 2.9);
    assert_eq!(plan.budget, 3.0);
    assert_eq!(plan.server_noise_std, plan.noise_multiplier);
    assert_eq!(plan.denominator, Some(100.0));
    assert_eq!(plan.round, DpRound::Central { clip_norm: 1.0 });
}

#[test]
fn local_plan_uses_twice_the_clip_as_sensitivity() {
    let plan = config(Mechanism::Local, NoiseLevel::TargetEpsilon(8.0))
        .plan(0.1, 1000, 10, 200, false)
        .unwrap();
    let DpRound::Local { noise_std, .. } = plan.round else {
        panic!()
    };
    assert!((noise_std - 2.0 * plan.noise_multiplier).abs() < 1e-12);
    // One round spends about the per-round target.
    let one = plan.epsilon_after(1);
    assert!(one <= 8.0 && one > 7.9, "{one}");
    assert!(plan.budget > one);
}

#[test]
fn distributed_plan_is_calibrated_to_the_minimum_contributors_and_cannot_wrap() {
    let dim = 93_322;
    let cfg = config(Mechanism::Distributed, NoiseLevel::TargetEpsilon(3.0));
    assert_eq!(
        cfg.plan(0.1, 1000, dim, 200, false),
        Err(DpConfigError::DistributedWithoutSecAgg)
    );
    let plan = cfg.plan(0.1, 1000, dim, 200, true).unwrap();
    assert_eq!(plan.min_contributors, 70);
    let eps = plan.epsilon_after(100);
    assert!(eps <= 3.0 && eps > 2.85, "{eps}");
    let DpRound::Distributed {
        granularity,
        rounded_norm,
        skellam_mu,
        ..
    } = plan.round
    else {
        panic!()
    };
    // m - 1 = 69 clients together carry the Skellam parameter the accounting uses.
    let mu = plan.noise_multiplier.powi(2) * rounded_norm * rounded_norm / 2.0;
    assert!((skellam_mu * 69.0 / mu - 1.0).abs() < 1e-9);
    // Worst case: 200 clients each with all their norm on one coordinate,
    // plus a 12-sigma noise tail from all 200, stays inside half the modulus.
    let worst = 200.0 * rounded_norm + NOISE_TAIL_STDS * (2.0 * skellam_mu * 200.0).sqrt();
    assert!(worst < 2f64.powi(31), "{worst}");
    // The rounding distortion is small next to the signal.
    assert!(1.0 / granularity > 16.0 * (dim as f64).sqrt());
    // Skellam is a bit costlier than the Gaussian with the same multiplier.
    let gaussian = rdp::gaussian_epsilon(0.1, plan.noise_multiplier, 100, 1e-5).unwrap();
    assert!(
        gaussian <= eps * 1.001 && gaussian > eps * 0.5,
        "{gaussian} vs {eps}"
    );
}

#[test]
fn bad_configs_are_refused_before_any_round() {
    let base = config(Mechanism::Central, NoiseLevel::NoiseMultiplier(1.0));
    let plan = |c: DpConfig| c.plan(0.1, 100, 10, 20, true);
    assert_eq!(
        plan(DpConfig {
            clip_norm: 0.0,
            ..base.clone()
        }),
        Err(DpConfigError::ClipNorm(0.0))
    );
    assert_eq!(
        plan(DpConfig {
            noise: NoiseLevel::NoiseMultiplier(-1.0),
            ..base.clone()
        }),
        Err(DpConfigError::NoiseMultiplier(-1.0))
    );
    assert!(matches!(
        plan(DpConfig {
            noise: NoiseLevel::TargetEpsilon(0.0),
            ..base.clone()
        }),
        Err(DpConfigError::Accounting(rdp::AccountingError::Epsilon(_)))
    ));
    assert!(matches!(
        plan(DpConfig {
            delta: 1.0,
            ..base.clone()
        }),
        Err(DpConfigError::Accounting(rdp::AccountingError::Delta(_)))
    ));
    assert_eq!(
        plan(DpConfig {
            budget: Some(-2.0),
            ..base.clone()
        }),
        Err(DpConfigError::Budget(-2.0))
    );
    assert_eq!(
        plan(DpConfig {
            planned_rounds: 0,
            ..base.clone()
        }),
        Err(DpConfigError::PlannedRounds)
    );
    assert_eq!(
        plan(DpConfig {
            mechanism: Mechanism::Distributed,
            min_contributors: Some(1),
            ..base.clone()
        }),
        Err(DpConfigError::TooFewContributors(1))
    );
    // Far too much noise for 32 bits and a huge cohort.
    assert!(matches!(
        config(Mechanism::Distributed, NoiseLevel::NoiseMultiplier(1000.0))
            .plan(1.0, 100_000, 1_000_000, 100_000, true),
        Err(DpConfigError::NoHeadroom { .. })
    ));
}
