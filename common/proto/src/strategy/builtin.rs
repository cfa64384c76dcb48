//! The built-in strategies, as a run's settings name them: an aggregation
//! rule, then a server optimizer step.

use serde::{Deserialize, Serialize};

use super::{AggregationInput, RoundUpdates, Strategy, StrategyError, StrategyState, robust};
use crate::server_opt::{ServerOptimizer, ServerOptimizerConfig};

/// Default fraction trimmed from each end by the trimmed mean.
pub const DEFAULT_TRIM_FRACTION: f64 = 0.1;
/// Default number of faulty clients Krum and Multi-Krum tolerate.
pub const DEFAULT_BYZANTINE: usize = 1;

/// How a round's updates are combined before the server step.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "rule")]
pub enum AggregationRule {
    /// The weighted mean (FedAvg). Works under secure aggregation and DP.
    #[default]
    Mean,
    /// Coordinate-wise median (FedMedian).
    Median,
    /// Coordinate-wise mean without the `trim_fraction` largest and smallest
    /// values of each coordinate.
    TrimmedMean {
        /// Fraction trimmed at each end, in [0, 0.5).
        trim_fraction: f64,
    },
    /// The one update closest to its neighbours, tolerating `byzantine`
    /// faulty clients.
    Krum {
        /// Faulty clients to tolerate.
        byzantine: usize,
    },
    /// The mean of the `keep` updates closest to their neighbours (default
    /// `n - byzantine`).
    MultiKrum {
        /// Faulty clients to tolerate.
        byzantine: usize,
        /// Updates averaged (default: `n - byzantine`).
        keep: Option<usize>,
    },
}

/// The rule names settings accept.
pub const AGGREGATION_NAMES: &[&str] = &["mean", "median", "trimmed-mean", "krum", "multi-krum"];

impl AggregationRule {
    /// The rule called `name` (one of [`AGGREGATION_NAMES`]) with the given
    /// parameters; those it does not use are ignored.
    ///
    /// ```
    /// use fedveil_proto::strategy::AggregationRule;
    /// let rule = AggregationRule::from_settings("krum", 0.1, 2, None).unwrap();
    /// assert_eq!(rule, AggregationRule::Krum { byzantine: 2 });
    /// assert!(AggregationRule::from_settings("trimmed-mean", 0.5, 1, None).is_err());
    /// ```
    pub fn from_settings(
        name: &str,
        trim_fraction: f64,
        byzantine: usize,
        keep: Option<usize>,
    ) -> Result<Self, StrategyError> {
        let rule = match name {
            "mean" => Self::Mean,
            "median" => Self::Median,
            "trimmed-mean" => Self::TrimmedMean { trim_fraction },
            "krum" => Self::Krum { byzantine },
            "multi-krum" => Self::MultiKrum { byzantine, keep },
            other => {
                return Err(StrategyError::BadSetting {
                    setting: "aggregation",
                    value: other.to_owned(),
                    expected: format!("one of {}", AGGREGATION_NAMES.join(", ")),
                });
            }
        };
        rule.validate()?;
        Ok(rule)
    }

    /// Checks the rule's parameters.
    pub fn validate(&self) -> Result<(), StrategyError> {
        match *self {
            Self::TrimmedMean { trim_fraction } if !(0.0..0.5).contains(&trim_fraction) => {
                Err(StrategyError::BadSetting {
                    setting: "trim_fraction",
                    value: trim_fraction.to_string(),
                    expected: "must be in [0, 0.5)".into(),
                })
            }
            Self::MultiKrum { keep: Some(0), .. } => Err(StrategyError::BadSetting {
                setting: "krum_keep",
                value: "0".into(),
                expected: "must keep at least one update".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The rule's name, as `--aggregation` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mean => "fedavg",
            Self::Median => "fedmedian",
            Self::TrimmedMean { .. } => "trimmed-mean",
            Self::Krum { .. } => "krum",
            Self::MultiKrum { .. } => "multi-krum",
        }
    }

    /// What the rule aggregates: the mean, or every update.
    pub fn input(&self) -> AggregationInput {
        match self {
            Self::Mean => AggregationInput::Mean,
            _ => AggregationInput::Individual,
        }
    }

    /// The fewest updates the rule can combine.
    pub fn min_updates(&self) -> usize {
        match *self {
            Self::Krum { byzantine } | Self::MultiKrum { byzantine, .. } => 2 * byzantine + 3,
            _ => 1,
        }
    }

    /// The strategy these settings describe, for a model of `dim` values:
    /// the rule followed by the server optimizer's step.
    pub fn strategy(self, optimizer: ServerOptimizerConfig, dim: usize) -> Box<dyn Strategy> {
        let optimizer = ServerOptimizer::new(optimizer, dim);
        match self {
            Self::Mean => Box::new(optimizer),
            rule => Box::new(Robust { rule, optimizer }),
        }
    }
}

/// A robust aggregation rule followed by a server optimizer step.
#[derive(Debug, Clone)]
pub struct Robust {
    /// How updates are combined.
    pub rule: AggregationRule,
    /// The step applied to the combined update.
    pub optimizer: ServerOptimizer,
}

impl Strategy for Robust {
    fn name(&self) -> String {
        format!("{} ({})", self.rule.name(), self.optimizer.name())
    }

    fn input(&self) -> AggregationInput {
        self.rule.input()
    }

    fn aggregate(
        &mut self,
        _round: u64,
        updates: RoundUpdates<'_>,
    ) -> Result<Vec<f32>, StrategyError> {
        let updates = match updates {
            RoundUpdates::Individual(u) => u,
            RoundUpdates::Mean { mean, .. } if self.rule == AggregationRule::Mean => {
                return Ok(mean.to_vec());
            }
            RoundUpdates::Mean { .. } => {
                return Err(StrategyError::NeedsIndividualUpdates {
                    strategy: self.name(),
                });
            }
        };
        let needed = self.rule.min_updates();
        if updates.len() < needed {
            return Err(StrategyError::TooFewUpdates {
                strategy: self.name(),
                got: updates.len(),
                needed,
            });
        }
        let values: Vec<&[f32]> = updates.iter().map(|u| u.values).collect();
        let n = updates.len();
        Ok(match self.rule {
            AggregationRule::Mean => super::weighted_mean(updates),
            AggregationRule::Median => robust::median(&values),
            AggregationRule::TrimmedMean { trim_fraction } => {
                robust::trimmed_mean(&values, (trim_fraction * n as f64).floor() as usize)
            }
            AggregationRule::Krum { byzantine } => robust::multi_krum(updates, byzantine, 1),
            AggregationRule::MultiKrum { byzantine, keep } => {
                robust::multi_krum(updates, byzantine, keep.unwrap_or(n - byzantine))
            }
        })
    }

    fn step(&mut self, round: u64, global: &mut [f32], aggregate: &[f32]) {
        Strategy::step(&mut self.optimizer, round, global, aggregate);
    }

    fn state(&self) -> StrategyState {
        Strategy::state(&self.optimizer)
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        Strategy::restore(&mut self.optimizer, state)
    }
}
