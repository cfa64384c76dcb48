use super::*;
use crate::metrics::TaskScores;
use crate::server_opt::{ServerOptimizerConfig, ServerOptimizerKind};

#[test]
fn evaluations_are_weighted_by_examples_in_any_order() {
    let report = |client, num_examples, accuracy: f32| ClientEvaluation {
        client,
        num_examples,
        loss: 1.0 - accuracy,
        scores: TaskScores::classification(accuracy),
    };
    let reports = [report(1, 10, 0.9), report(2, 30, 0.5), report(3, 0, 0.0)];
    let s = example_weighted(&reports).unwrap();
    assert_eq!(s.examples, 40);
    assert!((s.scores.accuracy.unwrap() - 0.6).abs() < 1e-7);
    assert_eq!((s.scores.mse, s.scores.mae), (None, None));
    let mut reversed = reports;
    reversed.reverse();
    assert_eq!(example_weighted(&reversed), Some(s));
    assert_eq!(example_weighted(&[report(1, 0, 1.0)]), None);
    let absurd = ClientEvaluation {
        loss: 1e30,
        ..report(4, 1_000_000, 0.5)
    };
    assert_eq!(
        example_weighted(&[reports[0], absurd]).unwrap().examples,
        10,
        "a report beyond the exact range is left out, not mixed in"
    );
    // Regression reports average their errors the same way.
    let regression = |client, num_examples, mse: f32| ClientEvaluation {
        client,
        num_examples,
        loss: mse,
        scores: TaskScores::regression(mse, mse.sqrt()),
    };
    let s = example_weighted(&[regression(1, 1, 4.0), regression(2, 3, 16.0)]).unwrap();
    assert_eq!(s.scores.mse, Some(13.0));
    assert_eq!(s.scores.mae, Some(3.5));
    assert_eq!(s.scores.accuracy, None);
}

#[test]
fn a_stateless_strategy_refuses_saved_state() {
    #[derive(Debug)]
    struct Plain;
    impl Strategy for Plain {
        fn name(&self) -> String {
            "plain".into()
        }
        fn step(&mut self, _: u64, _: &mut [f32], _: &[f32]) {}
    }
    assert!(Plain.restore(StrategyState::default()).is_ok());
    let saved = StrategyState {
        step: 3,
        ..Default::default()
    };
    let err = Plain.restore(saved).unwrap_err();
    assert!(err.to_string().contains("plain"), "{err}");
}

#[test]
fn robust_strategies_need_the_individual_updates() {
    let mut s = AggregationRule::Median.strategy(ServerOptimizerConfig::default(), 2);
    assert_eq!(s.name(), "fedmedian (fedavg)");
    assert_eq!(s.input(), AggregationInput::Individual);
    let mean = RoundUpdates::Mean {
        mean: &[1.0, 1.0],
        contributors: 3,
        total_weight: 3.0,
    };
    assert!(matches!(
        s.aggregate(1, mean),
        Err(StrategyError::NeedsIndividualUpdates { .. })
    ));
    // The server optimizer's moments are the strategy's state.
    let adam = ServerOptimizerConfig::new(ServerOptimizerKind::FedAdam);
    let mut s = AggregationRule::TrimmedMean { trim_fraction: 0.1 }.strategy(adam, 2);
    let updates = [
        ClientUpdate {
            client: 1,
            values: &[1.0, 2.0],
            weight: 1.0,
        },
        ClientUpdate {
            client: 2,
            values: &[3.0, 4.0],
            weight: 5.0,
        },
    ];
    let aggregate = s.aggregate(1, RoundUpdates::Individual(&updates)).unwrap();
    assert_eq!(aggregate, vec![2.0, 3.0], "trimmed mean ignores weights");
    let mut model = vec![0.0; 2];
    s.step(1, &mut model, &aggregate);
    let state = s.state();
    assert_eq!((state.step, state.buffers.len()), (1, 2));
}

#[test]
fn rule_settings_are_checked_by_name() {
    let err = AggregationRule::from_settings("average", 0.1, 1, None).unwrap_err();
    assert!(err.to_string().contains("one of mean, median"), "{err}");
    let err = AggregationRule::from_settings("multi-krum", 0.1, 1, Some(0)).unwrap_err();
    assert!(err.to_string().contains("krum_keep"), "{err}");
    assert_eq!(
        AggregationRule::from_settings("multi-krum", 0.1, 2, Some(4)),
        Ok(AggregationRule::MultiKrum {
            byzantine: 2,
            keep: Some(4)
        })
    );
    assert_eq!(AggregationRule::Krum { byzantine: 2 }.min_updates(), 7);
}
