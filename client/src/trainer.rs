//! Local training for one round: load the global model, evaluate it on the
//! local data, train E epochs of minibatch SGD, return the delta.

use burn::prelude::Device;
use fedveil_common::data::Shard;
use fedveil_common::model::{self, DataShape, ModelError, ModelSpec, TrainPlan};
use fedveil_common::wire::{Evaluation, RoundConfig, Update};

/// What the client driver needs from local training. [`Trainer`] is the
/// real one; wrappers (recording, DP, faults) implement it around another.
pub trait LocalTrainer: Send + Sync + 'static {
    fn spec(&self) -> &ModelSpec;
    fn num_examples(&self) -> usize;
    /// Trains from `global_model`; returns the update and the global model's
    /// evaluation on the local data.
    fn train_round(
        &self,
        round: u64,
        config: &RoundConfig,
        global_model: &[f32],
    ) -> Result<(Update, Evaluation), ModelError>;
}

/// Trains one node's model on its shard.
///
/// The model is built per round rather than kept, so an idle client holds
/// only its shard's index list (simulations run thousands of them).
pub struct Trainer {
    model_name: String,
    shape: DataShape,
    device: Device,
    shard: Shard,
    spec: ModelSpec,
    /// Mixed into shuffling seeds so clients shuffle differently.
    node_seed: u64,
}

impl Trainer {
    pub fn new(
        model_name: &str,
        shard: Shard,
        device: Device,
        node_seed: u64,
    ) -> Result<Self, ModelError> {
        let shape = DataShape::of(&shard.data);
        let spec = model::build(model_name, &shape, &device)?.spec().clone();
        Ok(Self {
            model_name: model_name.to_owned(),
            shape,
            device,
            shard,
            spec,
            node_seed,
        })
    }
}

impl LocalTrainer for Trainer {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn num_examples(&self) -> usize {
        self.shard.len()
    }

    fn train_round(
        &self,
        round: u64,
        config: &RoundConfig,
        global_model: &[f32],
    ) -> Result<(Update, Evaluation), ModelError> {
        let mut model = model::build(&self.model_name, &self.shape, &self.device)?;
        model.set_params(global_model)?;
        // Under a step cap, score the global model on as many examples as
        // training may see, not the whole shard, which could cost more
        // than the capped training itself.
        let eval = match config.max_local_steps {
            Some(steps) => {
                let n = steps as usize * config.batch_size as usize;
                let seed = mix_seed(&[config.seed, round, self.node_seed, EVAL_SAMPLE_SEED]);
                model.evaluate(&self.shard.sample(n, seed))
            }
            None => model.evaluate(&self.shard),
        };
        let plan = TrainPlan {
            epochs: config.local_epochs,
            batch_size: config.batch_size as usize,
            max_steps: config.max_local_steps.map(|s| s as usize),
            learning_rate: f64::from(config.learning_rate),
            shuffle_seed: mix_seed(&[config.seed, round, self.node_seed]),
            prox_mu: f64::from(config.prox_mu),
            optimizer: config.local_optimizer,
        };
        let stats = model.train(&self.shard, &plan)?;
        let mut delta = model.params();
        for (d, g) in delta.iter_mut().zip(global_model) {
            *d -= g;
        }
        Ok((
            Update {
                round,
                num_examples: stats.examples as u64,
                train_loss: stats.last_epoch_loss,
                delta,
            },
            Evaluation {
                round,
                num_examples: eval.examples as u64,
                loss: eval.loss,
                accuracy: eval.accuracy,
            },
        ))
    }
}

/// Separates the evaluation sample's seed from the shuffling seed.
const EVAL_SAMPLE_SEED: u64 = 0x6576_616c;

/// Combines seeds (SplitMix64 steps), so nearby inputs give unrelated outputs.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}
