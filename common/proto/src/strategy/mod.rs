//! Server strategies: how a round's cohort is chosen, how its updates are
//! combined, how the combination moves the global model, and how the
//! clients' evaluation reports become one figure.
//!
//! The [`round::Coordinator`](crate::round::Coordinator) runs the protocol
//! and a [`Strategy`] makes these four decisions. The five server
//! optimizers ([`ServerOptimizer`]: FedAvg, FedAvgM, FedAdagrad, FedYogi,
//! FedAdam) are strategies over the round's mean; [`Robust`] adds FedMedian,
//! trimmed mean, Krum and Multi-Krum, which need every update on its own.
//!
//! Privacy is not the strategy's to weaken:
//! - Under secure aggregation the server only ever holds the sum, so a
//!   strategy that asks for [`AggregationInput::Individual`] is refused
//!   when the run is configured ([`check_fits`]).
//! - Under central or distributed DP the noise is calibrated to the sum of
//!   clipped, unweighted updates over a fixed denominator. The coordinator
//!   computes that noisy mean itself and hands the strategy only the result
//!   (post-processing keeps the guarantee); strategies that need the
//!   individual updates are refused. Local DP noises every update on its
//!   node, so robust aggregation of those updates is allowed.
//! - With DP on, cohorts are Poisson-sampled by the coordinator, as the
//!   accountant assumes: [`Strategy::select_cohort`] is not called.
//!
//! A user strategy implements the trait; every method but
//! [`Strategy::name`] and [`Strategy::step`] has a default:
//!
//! ```
//! use fedveil_proto::strategy::{Strategy, StrategyState, StrategyError};
//!
//! /// Plain averaging with a server learning rate that decays each round.
//! #[derive(Debug)]
//! struct Decaying { lr: f32, steps: u64 }
//!
//! impl Strategy for Decaying {
//!     fn name(&self) -> String { "decaying-fedavg".into() }
//!     fn step(&mut self, _round: u64, global: &mut [f32], mean: &[f32]) {
//!         let lr = self.lr / (1.0 + self.steps as f32);
//!         for (x, d) in global.iter_mut().zip(mean) { *x += lr * d; }
//!         self.steps += 1;
//!     }
//!     // The step count must survive a server restart.
//!     fn state(&self) -> StrategyState {
//!         StrategyState { step: self.steps, ..Default::default() }
//!     }
//!     fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
//!         self.steps = state.step;
//!         Ok(())
//!     }
//! }
//!
//! let mut s = Decaying { lr: 1.0, steps: 0 };
//! let mut model = vec![0.0f32; 2];
//! s.step(1, &mut model, &[1.0, -1.0]);
//! s.step(2, &mut model, &[1.0, -1.0]);
//! assert_eq!(model, vec![1.5, -1.5]);
//! ```

mod builtin;
pub mod robust;

use std::collections::BTreeMap;
use std::fmt;

use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use crate::aggregate::{ExactSum, MAX_WEIGHTED_MAGNITUDE, WeightedMean};
use crate::dp::Mechanism;
use crate::metrics::TaskScores;
use crate::round::ClientId;

pub use crate::server_opt::ServerOptimizer;
pub use builtin::{
    AGGREGATION_NAMES, AggregationRule, DEFAULT_BYZANTINE, DEFAULT_TRIM_FRACTION, Robust,
};

/// The generator cohort selection draws from. It is seeded from the run's
/// seed and saved in every checkpoint, so a restarted server continues the
/// same sequence of cohorts.
pub type SamplingRng = rand_chacha::ChaCha20Rng;

/// What a strategy needs to see of a round's updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregationInput {
    /// Only their (weighted) mean: works under secure aggregation and DP.
    Mean,
    /// Every update on its own: plaintext rounds only.
    Individual,
}

/// An admitted client the cohort may be drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The client's id.
    pub id: ClientId,
    /// The node's name (from its enrolled certificate when mTLS is on).
    pub node_name: &'a str,
}

/// One client's update, as the server received and checked it: the right
/// length, finite, and (under central DP) clipped.
#[derive(Debug, Clone, Copy)]
pub struct ClientUpdate<'a> {
    /// The client it came from.
    pub client: ClientId,
    /// The update (the model delta).
    pub values: &'a [f32],
    /// Its FedAvg weight: the examples it trained on, or 1 under DP.
    pub weight: f64,
}

/// A round's updates, as the strategy's [`AggregationInput`] asked.
#[derive(Debug, Clone, Copy)]
pub enum RoundUpdates<'a> {
    /// The contributors' mean. Under DP: the noisy sum over the plan's
    /// fixed denominator.
    Mean {
        /// The mean update.
        mean: &'a [f32],
        /// Clients whose update is in it.
        contributors: usize,
        /// Sum of their weights (under DP: the fixed denominator).
        total_weight: f64,
    },
    /// Every accepted update, sorted by client id.
    Individual(&'a [ClientUpdate<'a>]),
}

/// One client's evaluation of the round's incoming global model on its own
/// data, as reported (checked: a finite loss, scores in range).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientEvaluation {
    /// The client.
    pub client: ClientId,
    /// Examples it evaluated on.
    pub num_examples: u64,
    /// Mean loss.
    pub loss: f32,
    /// The task's scores.
    pub scores: TaskScores,
}

/// The federated evaluation of one round: the clients' reports combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientEvalSummary {
    /// Examples evaluated, over all clients.
    pub examples: u64,
    /// Example-weighted mean loss.
    pub loss: f32,
    /// Example-weighted mean scores.
    pub scores: TaskScores,
}

/// What a strategy carries across a server restart: a step count and named
/// vectors (an optimizer's moments, control variates...). The coordinator
/// puts it in every checkpoint and hands it back through
/// [`Strategy::restore`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    /// Steps taken.
    pub step: u64,
    /// Named vectors, each as long as the model.
    pub buffers: BTreeMap<String, Vec<f32>>,
}

/// Why a strategy could not run, aggregate or resume.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    /// The round has fewer updates than the rule needs.
    #[error("{strategy} needs at least {needed} updates, the round has {got}")]
    TooFewUpdates {
        /// The strategy.
        strategy: String,
        /// Updates in the round.
        got: usize,
        /// Updates needed.
        needed: usize,
    },
    /// The strategy needs every update but got their mean.
    #[error("{strategy} aggregates individual updates but was given only their mean")]
    NeedsIndividualUpdates {
        /// The strategy.
        strategy: String,
    },
    /// The aggregate has the wrong length.
    #[error("the aggregate has {got} values, the model has {expected}")]
    WrongLength {
        /// Its length.
        got: usize,
        /// The model's.
        expected: usize,
    },
    /// The aggregate has a non-finite value.
    #[error("the aggregate has a non-finite value at index {index}")]
    NonFinite {
        /// Where.
        index: usize,
    },
    /// The step would make the model non-finite.
    #[error("the step would make parameter {index} non-finite; the model is left as it was")]
    StepNonFinite {
        /// The first parameter it would break.
        index: usize,
    },
    /// A setting of the strategy is invalid.
    #[error("{setting} = {value}: {expected}")]
    BadSetting {
        /// The setting.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        expected: String,
    },
    /// Saved state does not fit the strategy.
    #[error("saved strategy state does not fit {strategy}: {detail}")]
    StateMismatch {
        /// The strategy.
        strategy: String,
        /// What does not fit.
        detail: String,
    },
}

/// A server strategy. See the [module docs](self) for what the coordinator
/// guarantees around it.
pub trait Strategy: Send + fmt::Debug {
    /// Shown in logs and errors.
    fn name(&self) -> String;

    /// Whether the strategy needs each update or only their mean.
    fn input(&self) -> AggregationInput {
        AggregationInput::Mean
    }

    /// Chooses `target` clients from `candidates` (sorted by node name).
    /// Ids that are not candidates are ignored, and so are repeats. Not
    /// called with DP on. The default samples uniformly without
    /// replacement.
    fn select_cohort(
        &mut self,
        round: u64,
        candidates: &[Candidate<'_>],
        target: usize,
        rng: &mut SamplingRng,
    ) -> Vec<ClientId> {
        let _ = round;
        candidates.sample(rng, target).map(|c| c.id).collect()
    }

    /// Combines the round's updates into one vector of the model's length:
    /// the pseudo-gradient [`Strategy::step`] applies. The default returns
    /// the mean (the weighted mean of individual updates).
    fn aggregate(
        &mut self,
        round: u64,
        updates: RoundUpdates<'_>,
    ) -> Result<Vec<f32>, StrategyError> {
        let _ = round;
        match updates {
            RoundUpdates::Mean { mean, .. } => Ok(mean.to_vec()),
            RoundUpdates::Individual(updates) => Ok(weighted_mean(updates)),
        }
    }

    /// Moves the global model by the round's aggregate.
    fn step(&mut self, round: u64, global: &mut [f32], aggregate: &[f32]);

    /// Combines the clients' evaluation reports (sorted by client id). The
    /// default weighs each by its examples, exactly, so the figure does not
    /// depend on the order in which reports arrived.
    fn aggregate_evaluations(&self, reports: &[ClientEvaluation]) -> Option<ClientEvalSummary> {
        example_weighted(reports)
    }

    /// The state to save in a checkpoint. The default: none.
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }

    /// Continues from a saved state. The default accepts only an empty one.
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        if state == StrategyState::default() {
            Ok(())
        } else {
            Err(StrategyError::StateMismatch {
                strategy: self.name(),
                detail: "it keeps no state, the checkpoint holds some".into(),
            })
        }
    }
}

/// Refuses a strategy the run's privacy settings do not allow: one that
/// needs individual updates, under secure aggregation or under central or
/// distributed DP (`dp` is the run's mechanism, if any).
///
/// ```
/// use fedveil_proto::dp::Mechanism;
/// use fedveil_proto::strategy::{check_fits, AggregationInput::*};
///
/// assert!(check_fits("fedmedian", Individual, true, None).is_err());
/// assert!(check_fits("fedmedian", Individual, false, Some(Mechanism::Central)).is_err());
/// assert!(check_fits("fedmedian", Individual, false, Some(Mechanism::Local)).is_ok());
/// assert!(check_fits("fedadam", Mean, true, Some(Mechanism::Distributed)).is_ok());
/// ```
pub fn check_fits(
    strategy: &str,
    input: AggregationInput,
    secure_aggregation: bool,
    dp: Option<Mechanism>,
) -> Result<(), StrategyFitError> {
    if input == AggregationInput::Mean {
        return Ok(());
    }
    if secure_aggregation {
        return Err(StrategyFitError::SecureAggregation(strategy.to_owned()));
    }
    match dp {
        Some(Mechanism::Central | Mechanism::Distributed) => {
            Err(StrategyFitError::SumCalibratedDp(strategy.to_owned()))
        }
        Some(Mechanism::Local) | None => Ok(()),
    }
}

/// A strategy the run's privacy settings rule out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyFitError {
    /// Secure aggregation is on: the server only sees the sum (the strategy's name).
    #[error(
        "{0} aggregates each client's update, but under secure aggregation the server only sees their sum: turn secure aggregation off (--secagg false) or use a strategy over the mean"
    )]
    SecureAggregation(String),
    /// Central or distributed DP is on (the strategy's name).
    #[error(
        "{0} aggregates each client's update, but central and distributed DP calibrate their noise to the sum of clipped updates: use local DP (--dp local) or a strategy over the mean"
    )]
    SumCalibratedDp(String),
}

/// The weighted mean of `updates`, exactly (see [`WeightedMean`]).
///
/// # Panics
/// If the updates differ in length or a weight is not positive; the
/// coordinator checked both before.
pub fn weighted_mean(updates: &[ClientUpdate<'_>]) -> Vec<f32> {
    let len = updates.first().map_or(0, |u| u.values.len());
    let mut mean = WeightedMean::new(len);
    for u in updates {
        mean.add(u.values, u.weight)
            .expect("updates were checked when they arrived");
    }
    mean.mean().unwrap_or_default()
}

/// Example-weighted means of the reports' loss and of each score, or
/// `None` when no report covers an example. A score is averaged over the
/// reports that carry it; a report whose weighted values leave the exact
/// range is left out whole.
pub fn example_weighted(reports: &[ClientEvaluation]) -> Option<ClientEvalSummary> {
    /// An exact weighted sum and the examples behind it.
    #[derive(Default)]
    struct Mean(ExactSum, u64);
    impl Mean {
        fn value(&self) -> Option<f32> {
            (self.1 > 0).then(|| (self.0.value() / self.1 as f64) as f32)
        }
    }
    let [mut loss, mut accuracy, mut mse, mut mae] = std::array::from_fn(|_| Mean::default());
    for r in reports {
        let n = r.num_examples as f64;
        let terms = [
            (Some(r.loss), &mut loss),
            (r.scores.accuracy, &mut accuracy),
            (r.scores.mse, &mut mse),
            (r.scores.mae, &mut mae),
        ];
        let in_range = |v: Option<f32>| {
            v.is_none_or(|v| {
                let x = f64::from(v) * n;
                x.is_finite() && x.abs() < MAX_WEIGHTED_MAGNITUDE
            })
        };
        if r.num_examples == 0 || !terms.iter().all(|(v, _)| in_range(*v)) {
            continue;
        }
        for (v, mean) in terms {
            if let Some(v) = v {
                mean.0.add(f64::from(v) * n);
                mean.1 += r.num_examples;
            }
        }
    }
    Some(ClientEvalSummary {
        examples: loss.1,
        loss: loss.value()?,
        scores: TaskScores {
            accuracy: accuracy.value(),
            mse: mse.value(),
            mae: mae.value(),
        },
    })
}

#[cfg(test)]
mod tests;
