//! Local training for one round: load the global model, evaluate it on the
//! local data, train E epochs of minibatch SGD, return the delta.

use std::sync::{Arc, Mutex};

use burn::data::dataset::{Dataset, DatasetError};
use burn::prelude::Device;

use crate::data::Shard;
use crate::model::{
    self, DataShape, Example, FlModel, ModelError, ModelFactory, ModelSpec, TrainPlan,
};
use fedveil_proto::wire::{DataSpec, Evaluation, RoundConfig, Update};

/// What the client driver needs from local training. [`Trainer`] is the
/// real one; wrappers (recording, DP, faults) implement it around another.
pub trait LocalTrainer: Send + Sync + 'static {
    /// The model this node trains.
    fn spec(&self) -> &ModelSpec;
    /// Examples in the node's training data.
    fn num_examples(&self) -> usize;
    /// What the local data is, for the server's check at join (default:
    /// unspecified, which a server that expects some data refuses).
    fn data_spec(&self) -> DataSpec {
        DataSpec::default()
    }
    /// Trains from `global_model`; returns the update and the global model's
    /// evaluation on the local data.
    fn train_round(
        &self,
        round: u64,
        config: &RoundConfig,
        global_model: &[f32],
    ) -> Result<(Update, Evaluation), ModelError>;
}

/// Model instances shared by the trainers of one process. A simulation's
/// thousand clients train a few at a time, so they share as many instances
/// as train at once, instead of each holding (or building and randomly
/// initialising, every round) its own. An instance is overwritten with the
/// global model before each use, so which one a client gets changes
/// nothing.
pub struct ModelPool<I = Example> {
    factory: ModelFactory<I>,
    shape: DataShape,
    device: Device,
    spec: ModelSpec,
    idle: Mutex<Vec<Instance<I>>>,
    built: std::sync::atomic::AtomicUsize,
    threads_per_training: Option<usize>,
}

/// A model instance, and the threads its training runs on when the pool
/// gives each training its own (see [`ModelPool::with_threads_per_training`]).
struct Instance<I> {
    model: Box<dyn FlModel<I>>,
    threads: Option<Arc<rayon::ThreadPool>>,
}

impl ModelPool<Example> {
    /// A pool of the built-in model `name`.
    pub fn new(name: &str, shape: DataShape, device: Device) -> Result<Arc<Self>, ModelError> {
        Self::of(model::builtin(name)?, shape, device)
    }
}

impl<I: 'static> ModelPool<I> {
    /// A pool of the models `factory` builds for data of `shape` on
    /// `device` (one is built at once, to check the shape and learn the
    /// spec).
    pub fn of(
        factory: ModelFactory<I>,
        shape: DataShape,
        device: Device,
    ) -> Result<Arc<Self>, ModelError> {
        let first = factory.build(&shape, &device)?;
        Ok(Arc::new(Self {
            factory,
            shape,
            device,
            spec: first.spec().clone(),
            idle: Mutex::new(vec![Instance {
                model: first,
                threads: None,
            }]),
            built: 1.into(),
            threads_per_training: None,
        }))
    }

    /// Runs each training on its own `threads` threads instead of the
    /// process's shared rayon pool. On a CPU device, trainings at once then
    /// split the cores between them rather than queueing every operation on
    /// one pool: a simulation training 2 clients at once on 2 cores gives
    /// each 1 thread.
    ///
    /// # Panics
    /// If the pool is already shared (set this before handing it out).
    pub fn with_threads_per_training(mut self: Arc<Self>, threads: usize) -> Arc<Self> {
        Arc::get_mut(&mut self)
            .expect("threads per training are set before the pool is shared")
            .threads_per_training = Some(threads.max(1));
        self
    }

    /// The model the pool's instances are.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The data shape the pool's models are built for.
    pub fn shape(&self) -> &DataShape {
        &self.shape
    }

    /// Instances built so far: the most that were in use at once.
    pub fn instances(&self) -> usize {
        self.built.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An idle instance (built if none is), returned to the pool on drop.
    fn take(self: &Arc<Self>) -> Result<PooledModel<I>, ModelError> {
        let idle = self.idle.lock().expect("pool lock").pop();
        let mut instance = match idle {
            Some(instance) => instance,
            None => {
                self.built
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Instance {
                    model: self.factory.build(&self.shape, &self.device)?,
                    threads: None,
                }
            }
        };
        if let (Some(n), None) = (self.threads_per_training, &instance.threads) {
            let threads = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("fedveil-train-{i}"))
                .build()
                .map_err(|e| ModelError::Threads(e.to_string()))?;
            instance.threads = Some(Arc::new(threads));
        }
        Ok(PooledModel {
            instance: Some(instance),
            pool: Arc::clone(self),
        })
    }
}

/// A model on loan from a [`ModelPool`].
struct PooledModel<I: 'static> {
    instance: Option<Instance<I>>,
    pool: Arc<ModelPool<I>>,
}

impl<I> PooledModel<I> {
    /// Runs `work` on the instance's own threads, if it has them.
    fn run<T: Send>(&mut self, work: impl FnOnce(&mut dyn FlModel<I>) -> T + Send) -> T {
        let instance = self.instance.as_mut().expect("present until dropped");
        match &instance.threads {
            Some(threads) => threads.install(|| work(instance.model.as_mut())),
            None => work(instance.model.as_mut()),
        }
    }
}

impl<I> Drop for PooledModel<I> {
    fn drop(&mut self) {
        if let (Some(instance), Ok(mut idle)) = (self.instance.take(), self.pool.idle.lock()) {
            idle.push(instance);
        }
    }
}

/// Trains one node's model on its data, with a model instance borrowed
/// from a [`ModelPool`] for the round: an idle client holds only its data
/// handle (simulations run thousands of them, each a shard's index list).
pub struct Trainer<I: 'static = Example> {
    models: Arc<ModelPool<I>>,
    data: Arc<dyn Dataset<I>>,
    data_spec: DataSpec,
    /// Mixed into shuffling seeds so clients shuffle differently.
    node_seed: u64,
}

impl Trainer<Example> {
    /// A trainer of the built-in model `model_name` on a shard, with a
    /// pool of its own (one node per process).
    pub fn new(
        model_name: &str,
        shard: Shard,
        device: Device,
        node_seed: u64,
    ) -> Result<Self, ModelError> {
        let pool = ModelPool::new(model_name, DataShape::of(&shard.data), device)?;
        Self::pooled(pool, shard, node_seed)
    }

    /// A trainer on a shard that borrows its model from a shared `pool`.
    pub fn pooled(
        models: Arc<ModelPool<Example>>,
        shard: Shard,
        node_seed: u64,
    ) -> Result<Self, ModelError> {
        let shape = DataShape::of(&shard.data);
        if shape != models.shape {
            return Err(ModelError::IncompatibleData {
                model: models.factory.name().to_owned(),
                shape: shape.example_shape,
                reason: format!("the model pool was built for {:?}", models.shape),
            });
        }
        let data_spec = shard.data.spec();
        Ok(Self::with_data(models, Arc::new(shard), node_seed).describing(data_spec))
    }
}

impl<I: 'static> Trainer<I> {
    /// A trainer on any Burn dataset whose items the pool's models take
    /// (the pool was built for the data's shape).
    pub fn with_data(models: Arc<ModelPool<I>>, data: Arc<dyn Dataset<I>>, node_seed: u64) -> Self {
        Self {
            models,
            data,
            data_spec: DataSpec::default(),
            node_seed,
        }
    }

    /// Describes the data to the server (see [`LocalTrainer::data_spec`]).
    pub fn describing(mut self, data_spec: DataSpec) -> Self {
        self.data_spec = data_spec;
        self
    }
}

impl<I: 'static> LocalTrainer for Trainer<I> {
    fn spec(&self) -> &ModelSpec {
        self.models.spec()
    }

    fn num_examples(&self) -> usize {
        self.data.len()
    }

    fn data_spec(&self) -> DataSpec {
        self.data_spec.clone()
    }

    fn train_round(
        &self,
        round: u64,
        config: &RoundConfig,
        global_model: &[f32],
    ) -> Result<(Update, Evaluation), ModelError> {
        self.models
            .take()?
            .run(|model| self.train_with(model, round, config, global_model))
    }
}

impl<I: 'static> Trainer<I> {
    fn train_with(
        &self,
        model: &mut dyn FlModel<I>,
        round: u64,
        config: &RoundConfig,
        global_model: &[f32],
    ) -> Result<(Update, Evaluation), ModelError> {
        model.set_params(global_model)?;
        // Under a step cap, score the global model on as many examples as
        // training may see, not all the data, which could cost more than
        // the capped training itself.
        let eval = match config.max_local_steps {
            Some(steps) => {
                let n = steps as usize * config.batch_size as usize;
                let seed = mix_seed(&[config.seed, round, self.node_seed, EVAL_SAMPLE_SEED]);
                model.evaluate(&Sample::of(self.data.as_ref(), n, seed))?
            }
            None => model.evaluate(self.data.as_ref())?,
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
        let stats = model.train(self.data.as_ref(), &plan)?;
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
                scores: eval.scores,
            },
        ))
    }
}

/// At most `n` items of a dataset, drawn without replacement (seeded), in
/// the dataset's order of drawing; all of it when it has no more than `n`.
struct Sample<'a, I> {
    data: &'a dyn Dataset<I>,
    positions: Vec<usize>,
}

impl<'a, I> Sample<'a, I> {
    fn of(data: &'a dyn Dataset<I>, n: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        use rand::seq::IndexedRandom;
        let all: Vec<usize> = (0..data.len()).collect();
        let positions = if n >= all.len() {
            all
        } else {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            all.sample(&mut rng, n).copied().collect()
        };
        Self { data, positions }
    }
}

impl<I> Dataset<I> for Sample<'_, I> {
    fn get(&self, index: usize) -> Result<I, DatasetError> {
        let position = self.positions.get(index).ok_or_else(|| {
            DatasetError::new(std::io::Error::other(format!(
                "index {index} is outside a sample of {}",
                self.positions.len()
            )))
        })?;
        self.data.get(*position)
    }

    fn len(&self) -> usize {
        self.positions.len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::SyntheticConfig;
    use fedveil_proto::wire::LocalOptimizer;

    fn round_config() -> RoundConfig {
        RoundConfig {
            local_epochs: 1,
            batch_size: 10,
            max_local_steps: Some(3),
            learning_rate: 0.05,
            seed: 4,
            secure_aggregation: false,
            dp: None,
            prox_mu: 0.0,
            local_optimizer: LocalOptimizer::Sgd,
        }
    }

    #[test]
    fn a_sample_is_a_seeded_subset_without_repeats() {
        let data = SyntheticConfig {
            train_examples: 50,
            test_examples: 1,
            ..Default::default()
        }
        .generate(1)
        .train;
        let shard = Shard {
            data,
            indices: (10..40).collect(),
        };
        let drawn = |n, seed| -> Vec<usize> {
            let sample = Sample::of(&shard, n, seed);
            (0..sample.len())
                .map(|i| sample.get(i).unwrap().index())
                .collect()
        };
        let a = drawn(8, 3);
        assert_eq!(a.len(), 8);
        assert!(a.iter().all(|i| (10..40).contains(i)));
        let mut seen = a.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 8, "no repeats");
        assert_eq!(a, drawn(8, 3), "seeded");
        assert_ne!(a, drawn(8, 4));
        assert_eq!(drawn(30, 3), shard.indices);
        assert_eq!(drawn(99, 3), shard.indices);
        assert!(Sample::of(&shard, 8, 3).get(8).is_err());
    }

    /// A training on its own threads gives the update a training on the
    /// shared pool gives, bit for bit: the thread count splits work, not the
    /// order of any sum (the simulation's metrics stay reproducible).
    #[test]
    fn trainings_on_their_own_threads_match_the_shared_pool_bit_for_bit() {
        let data = SyntheticConfig {
            train_examples: 40,
            test_examples: 1,
            ..Default::default()
        }
        .generate(5)
        .train;
        let shape = DataShape::of(&data);
        let device = Device::flex();
        let global = model::build("cnn", &shape, &device).unwrap().params();
        let update = |pool: Arc<ModelPool>| {
            let trainer = Trainer::pooled(pool, Shard::whole(Arc::clone(&data)), 3).unwrap();
            let (update, _) = trainer.train_round(1, &round_config(), &global).unwrap();
            update.delta.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let shared = update(ModelPool::new("cnn", shape.clone(), device.clone()).unwrap());
        for threads in [1, 2, 3] {
            let own = ModelPool::new("cnn", shape.clone(), device.clone())
                .unwrap()
                .with_threads_per_training(threads);
            assert_eq!(update(own), shared, "{threads} threads");
        }
    }

    /// Clients sharing a pool train exactly as clients with models of their
    /// own, whichever instance they borrow and whatever it trained before;
    /// the pool holds only as many instances as were in use at once.
    #[test]
    fn pooled_trainers_train_like_their_own_models_and_share_instances() {
        let data = SyntheticConfig {
            train_examples: 120,
            test_examples: 1,
            ..Default::default()
        }
        .generate(2)
        .train;
        let shard = |i: usize| Shard {
            data: Arc::clone(&data),
            indices: (i * 40..(i + 1) * 40).collect(),
        };
        let device = Device::flex();
        let pool = ModelPool::new("cnn", DataShape::of(&data), device.clone()).unwrap();
        let pooled: Vec<Trainer> = (0..3)
            .map(|i| Trainer::pooled(Arc::clone(&pool), shard(i), i as u64).unwrap())
            .collect();
        let own: Vec<Trainer> = (0..3)
            .map(|i| Trainer::new("cnn", shard(i), device.clone(), i as u64).unwrap())
            .collect();
        let global = model::build("cnn", &DataShape::of(&data), &device)
            .unwrap()
            .params();
        let cfg = round_config();
        for round in 1..=2 {
            for (p, o) in pooled.iter().zip(&own) {
                let (a, a_eval) = p.train_round(round, &cfg, &global).unwrap();
                let (b, b_eval) = o.train_round(round, &cfg, &global).unwrap();
                assert_eq!(a, b, "round {round}");
                assert_eq!(a_eval, b_eval);
            }
        }
        assert_eq!(pool.instances(), 1, "one trained at a time");

        // Two at once need two instances, and no more afterwards.
        let first = pool.take().unwrap();
        let second = pool.take().unwrap();
        drop((first, second));
        let _again = pool.take().unwrap();
        assert_eq!(pool.instances(), 2);

        let text = crate::data::Dataset {
            example_shape: vec![8],
            vocab_size: 30,
            ..(*data).clone()
        };
        let err = Trainer::pooled(
            pool,
            Shard {
                data: Arc::new(text),
                indices: vec![0],
            },
            0,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("pool"), "{err}");
    }
}
