use std::sync::Arc;

use fedveil_proto::wire::{Evaluation, Update};

use super::*;

#[test]
fn delay_distributions_parse_and_print() {
    assert_eq!(
        "fixed:250ms".parse::<DelayDist>().unwrap(),
        DelayDist::Fixed(Duration::from_millis(250))
    );
    assert_eq!(
        "exp:2s".parse::<DelayDist>().unwrap(),
        DelayDist::Exponential {
            mean: Duration::from_secs(2)
        }
    );
    assert_eq!(
        "uniform:1s..1.5m".parse::<DelayDist>().unwrap(),
        DelayDist::Uniform {
            low: Duration::from_secs(1),
            high: Duration::from_secs(90)
        }
    );
    for d in ["exp:2s", "fixed:0.25s", "uniform:1s..3s"] {
        let parsed: DelayDist = d.parse().unwrap();
        assert_eq!(parsed.to_string().parse::<DelayDist>().unwrap(), parsed);
    }
    for bad in [
        "exp",
        "exp:0s",
        "exp:2",
        "exp:2h",
        "gauss:1s",
        "uniform:3s..1s",
        "uniform:1s",
    ] {
        assert!(bad.parse::<DelayDist>().is_err(), "{bad}");
    }
}

#[test]
fn dropout_must_be_a_probability_below_one() {
    assert!(FaultPlan::new(1.0, None, 0).is_err());
    assert!(FaultPlan::new(-0.1, None, 0).is_err());
    assert!(FaultPlan::new(f64::NAN, None, 0).is_err());
    assert!(!FaultPlan::new(0.0, None, 0).unwrap().is_active());
}

/// Fates replay exactly from the seed, vanish at the configured rate, and
/// spread evenly over the protocol's stages.
#[test]
fn fates_are_seeded_and_match_the_configured_rate_and_stages() {
    let plan = FaultPlan::new(0.2, Some("exp:1s".parse().unwrap()), 7).unwrap();
    let mut by_stage = std::collections::BTreeMap::<Stage, u32>::new();
    let (mut vanished, mut delay) = (0u32, 0.0f64);
    let draws = 20_000u64;
    for i in 0..draws {
        let (client, round) = (i % 1000, i / 1000);
        let fate = plan.fate(client, round, true);
        assert_eq!(fate, plan.fate(client, round, true), "replays");
        if let Some(stage) = fate.vanish_at {
            assert!(Stage::SECURE.contains(&stage));
            vanished += 1;
            *by_stage.entry(stage).or_default() += 1;
        }
        delay += fate.delay.as_secs_f64();
    }
    // Binomial(20000, 0.2): sd 57; 5 sd is 283.
    assert!((vanished as i64 - 4000).abs() < 283, "{vanished}");
    assert_eq!(by_stage.len(), 4);
    for (stage, n) in &by_stage {
        assert!(
            (*n as f64 / vanished as f64 - 0.25).abs() < 0.03,
            "{stage:?}: {n}"
        );
    }
    assert!(
        (delay / draws as f64 - 1.0).abs() < 0.05,
        "mean delay {}",
        delay / draws as f64
    );
    // Another seed, other fates.
    let other = FaultPlan::new(0.2, None, 8).unwrap();
    assert!((0..100).any(|c| other.fate(c, 1, true).vanish_at != plan.fate(c, 1, true).vanish_at));
    // Plain rounds have one stage.
    assert!(
        (0..200).all(|c| matches!(plan.fate(c, 1, false).vanish_at, None | Some(Stage::Update)))
    );
}

#[test]
fn the_hook_vanishes_at_the_drawn_stage_and_delays_only_the_update() {
    let plan = FaultPlan::new(0.5, Some("fixed:3s".parse().unwrap()), 1).unwrap();
    let (client, round) = (0..)
        .map(|c| (c, 4))
        .find(|&(c, r)| plan.fate(c, r, false).vanish_at.is_none())
        .unwrap();
    let log = Arc::new(FaultLog::default());
    let hook = plan.hook(client, Arc::clone(&log));
    let update = Message::Update(Update {
        round,
        num_examples: 1,
        train_loss: 0.0,
        delta: vec![],
    });
    let eval = Message::Evaluation(Evaluation {
        round,
        num_examples: 1,
        loss: 0.0,
        scores: fedveil_proto::metrics::TaskScores::classification(0.0),
    });
    assert_eq!(hook.before_send(&eval), Fault::Send);
    assert_eq!(
        hook.before_send(&update),
        Fault::Delay(Duration::from_secs(3))
    );

    let (client, round) = (0..)
        .map(|c| (c, 4))
        .find(|&(c, r)| plan.fate(c, r, false).vanish_at == Some(Stage::Update))
        .unwrap();
    let hook = plan.hook(client, Arc::clone(&log));
    let Message::Update(mut u) = update else {
        unreachable!()
    };
    u.round = round;
    assert_eq!(hook.before_send(&Message::Update(u)), Fault::Vanish);
    let tally = log.tally();
    assert_eq!(tally.vanished.get(&Stage::Update), Some(&1));
    assert_eq!(
        (tally.delayed, tally.total_delay),
        (1, Duration::from_secs(3))
    );
}
