use super::*;
use rand::SeedableRng;

fn config(mechanism: Mechanism, noise: NoiseLevel) -> DpConfig {
    DpConfig {
        mechanism,
        clip_norm: 1.0,
        noise,
        delta: 1e-5,
        planned_rounds: 100,
        budget: None,
        min_contributors: None,
        adaptive: None,
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
    assert_eq!(
        plan.round,
        DpRound::Central {
            clip_norm: 1.0,
            clip_indicator: false
        }
    );
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
    // The largest minimum up to 70% of the expected 100 whose gate (a
    // round runs only with that many) fits its share of delta over the
    // planned 100 rounds.
    let fits = |m: usize| {
        crate::dp::gate::fits(crate::dp::gate::per_round(1000, 0.1, m) * 100.0, 3.0, 1e-5)
    };
    let m = plan.min_contributors;
    assert!(fits(m) && !fits(m + 1) && m < 70, "{m}");
    assert_eq!(plan.min_cohort, m);
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
    // m - 1 clients together carry the Skellam parameter the accounting uses.
    let mu = plan.noise_multiplier.powi(2) * rounded_norm * rounded_norm / 2.0;
    assert!((skellam_mu * (m - 1) as f64 / mu - 1.0).abs() < 1e-9);
    // Worst case: 200 clients each with all their norm on one coordinate,
    // plus a 12-sigma noise tail from all 200, stays inside half the modulus.
    let worst = 200.0 * rounded_norm + NOISE_TAIL_STDS * (2.0 * skellam_mu * 200.0).sqrt();
    assert!(worst < 2f64.powi(31), "{worst}");
    // The rounding distortion is small next to the signal.
    assert!(1.0 / granularity > 16.0 * (dim as f64).sqrt());
    // Skellam is costlier than the Gaussian with the same multiplier (the
    // generic Poisson-subsampling bound is looser than the Gaussian's exact
    // one): about twice the epsilon here.
    let gaussian = rdp::gaussian_epsilon(0.1, plan.noise_multiplier, 100, 1e-5).unwrap();
    assert!(
        gaussian <= eps * 1.001 && gaussian > eps * 0.45,
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
    assert_eq!(
        config(Mechanism::Local, NoiseLevel::NoiseMultiplier(1.0))
            .adaptive_on()
            .plan(0.1, 100, 10, 20, false),
        Err(DpConfigError::AdaptiveWithLocal)
    );
    for bad in [
        AdaptiveClipping {
            target_quantile: 1.0,
            ..Default::default()
        },
        AdaptiveClipping {
            learning_rate: 0.0,
            ..Default::default()
        },
        AdaptiveClipping {
            count_noise_std: Some(f64::NAN),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            plan(DpConfig {
                adaptive: Some(bad),
                ..base.clone()
            }),
            Err(DpConfigError::Adaptive(_))
        ));
    }
}

impl DpConfig {
    fn adaptive_on(self) -> Self {
        Self {
            adaptive: Some(AdaptiveClipping::default()),
            ..self
        }
    }
}

#[test]
fn the_clip_bound_moves_geometrically_towards_the_quantile() {
    let a = AdaptiveClipping::default();
    // Hand-computed: C * exp(-0.2 * (b - 0.5)).
    assert!((a.next_clip_norm(1.0, 0.2) - 0.06f64.exp()).abs() < 1e-15);
    assert!((a.next_clip_norm(2.0, 0.9) - 2.0 * (-0.08f64).exp()).abs() < 1e-15);
    assert_eq!(a.next_clip_norm(1.5, 0.5), 1.5);
    // A noisy estimate outside [0, 1] moves the bound no further than 0 or 1.
    assert_eq!(a.next_clip_norm(1.0, -3.0), a.next_clip_norm(1.0, 0.0));
    assert_eq!(a.next_clip_norm(1.0, 7.0), a.next_clip_norm(1.0, 1.0));
    assert_eq!(a.next_clip_norm(1.0, f64::NAN), 1.0);
}

#[test]
fn adaptive_central_plan_accounts_the_count_noise() {
    let plain = config(Mechanism::Central, NoiseLevel::TargetEpsilon(3.0))
        .plan(0.1, 1000, 10, 200, false)
        .unwrap();
    let plan = config(Mechanism::Central, NoiseLevel::TargetEpsilon(3.0))
        .adaptive_on()
        .plan(0.1, 1000, 10, 200, false)
        .unwrap();
    let (a, count_std) = plan.adaptive.unwrap();
    assert_eq!(a, AdaptiveClipping::default());
    assert_eq!(count_std, 5.0, "expected cohort 100 / 20");
    // The joint mechanism is the one of the plain plan: same epsilon,
    // slightly more noise on the update to pay for the count.
    let joint = adaptive::joint_noise_multiplier(plan.noise_multiplier, count_std);
    assert!((joint - plain.noise_multiplier).abs() < 1e-9 * joint);
    assert!(plan.noise_multiplier > plain.noise_multiplier);
    let eps = plan.epsilon_after(100);
    assert!(eps <= 3.0 && eps > 2.9, "{eps}");
    assert_eq!(plan.round.extra_values(), 1);
    // A fixed noise multiplier is the update's; the accounted one is lower.
    let fixed = config(Mechanism::Central, NoiseLevel::NoiseMultiplier(1.0))
        .adaptive_on()
        .plan(0.1, 1000, 10, 200, false)
        .unwrap();
    let unadapted = config(Mechanism::Central, NoiseLevel::NoiseMultiplier(1.0))
        .plan(0.1, 1000, 10, 200, false)
        .unwrap();
    assert!(fixed.epsilon_after(100) > unadapted.epsilon_after(100));
    // Count noise too small for the target: said so, not ignored.
    assert!(matches!(
        config(Mechanism::Central, NoiseLevel::TargetEpsilon(0.05))
            .adaptive_on()
            .plan(0.1, 1000, 10, 200, false),
        Err(DpConfigError::Adaptive(_))
    ));
    let z = adaptive::update_noise_multiplier(1.3, 5.0).unwrap();
    assert!((adaptive::joint_noise_multiplier(z, 5.0) - 1.3).abs() < 1e-12);
}

#[test]
fn adaptive_distributed_plan_charges_the_indicator_and_still_hits_the_target() {
    let dim = 1000;
    let base = config(Mechanism::Distributed, NoiseLevel::NoiseMultiplier(1.0));
    let plain = base.clone().plan(0.1, 1000, dim, 200, true).unwrap();
    let adapted = base.adaptive_on().plan(0.1, 1000, dim, 200, true).unwrap();
    for (with, without) in adapted.rdp_per_round.iter().zip(&plain.rdp_per_round) {
        assert!(with > without, "the indicator costs privacy");
    }
    let DpRound::Distributed {
        indicator_mu: Some(mu),
        ..
    } = adapted.round
    else {
        panic!("{:?}", adapted.round)
    };
    // Sk(2 sigma_b^2) over the minimum contributors, less one.
    let m = adapted.min_contributors as f64;
    assert!((mu - 2.0 * 25.0 / (m - 1.0)).abs() < 1e-12);
    let target = config(Mechanism::Distributed, NoiseLevel::TargetEpsilon(3.0))
        .adaptive_on()
        .plan(0.1, 1000, dim, 200, true)
        .unwrap();
    let eps = target.epsilon_after(100);
    assert!(eps <= 3.0 && eps > 2.85, "{eps}");
}

#[test]
fn clients_append_their_clipping_indicator() {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let central = DpRound::Central {
        clip_norm: 1.0,
        clip_indicator: true,
    };
    let (Privatized::Real(v), _) = central.privatize(vec![3.0, 4.0], &mut rng).unwrap() else {
        panic!()
    };
    assert_eq!(v.len(), 3);
    assert_eq!(v[2], -0.5, "clipped");
    let (Privatized::Real(v), _) = central.privatize(vec![0.3, 0.4], &mut rng).unwrap() else {
        panic!()
    };
    assert_eq!(v, vec![0.3, 0.4, 0.5]);
    // Distributed: +-1 plus Skellam noise of variance 2 mu.
    let plan = config(Mechanism::Distributed, NoiseLevel::NoiseMultiplier(1.0))
        .adaptive_on()
        .plan(0.1, 1000, 4, 200, true)
        .unwrap();
    let DpRound::Distributed {
        indicator_mu: Some(mu),
        ..
    } = plan.round
    else {
        panic!()
    };
    let draws = 4000;
    let mut sum = 0.0;
    let mut sq = 0.0;
    for _ in 0..draws {
        let (Privatized::Integers(v), _) = plan.round.privatize(vec![0.0; 4], &mut rng).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.len(), 5);
        let x = v[4] as f64;
        sum += x;
        sq += (x - 1.0) * (x - 1.0);
    }
    let mean = sum / draws as f64;
    let var = sq / draws as f64;
    let sd_of_mean = (2.0 * mu / draws as f64).sqrt();
    assert!((mean - 1.0).abs() < 5.0 * sd_of_mean, "{mean}");
    assert!(
        (var / (2.0 * mu) - 1.0).abs() < 0.15,
        "{var} vs {}",
        2.0 * mu
    );
}

#[test]
fn a_new_clip_bound_keeps_the_distributed_integers_the_same() {
    let plan = config(Mechanism::Distributed, NoiseLevel::NoiseMultiplier(1.0))
        .plan(0.1, 1000, 100, 200, true)
        .unwrap();
    let moved = plan.round.with_clip_norm(2.5);
    let (
        DpRound::Distributed {
            clip_norm: c0,
            granularity: g0,
            rounded_norm: r0,
            skellam_mu: m0,
            ..
        },
        DpRound::Distributed {
            clip_norm: c1,
            granularity: g1,
            rounded_norm: r1,
            skellam_mu: m1,
            ..
        },
    ) = (&plan.round, &moved)
    else {
        panic!()
    };
    assert_eq!((*c0, *c1), (1.0, 2.5));
    assert!((c1 / g1 - c0 / g0).abs() < 1e-9 * c0 / g0);
    assert_eq!((r0, m0), (r1, m1));
}
