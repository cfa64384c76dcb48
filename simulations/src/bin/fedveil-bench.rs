//! `fedveil-bench`: micro-benchmarks whose numbers go into docs/BENCHMARKS.md.
//!
//! `fedveil-bench train-step --batch 64 --steps 50` times one local SGD step
//! of the CNN (forward, loss, backward, optimizer update, batch assembly and
//! loss read-back: everything a client does per minibatch). Threads follow
//! `RAYON_NUM_THREADS`. Prints one JSON line.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedveil_common::data::Shard;
use fedveil_common::data::synthetic::SyntheticConfig;
use fedveil_common::model::{self, DataShape, DeviceSpec, TrainPlan};

#[derive(Parser)]
#[command(name = "fedveil-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time CNN training steps on 28x28 inputs.
    TrainStep {
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value = "cnn")]
        model: String,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::TrainStep {
            batch,
            steps,
            warmup,
            model: name,
            device,
        } => {
            let device = device.device()?;
            let data = SyntheticConfig {
                train_examples: batch * steps.max(warmup),
                test_examples: 1,
                ..Default::default()
            }
            .generate(1)
            .train;
            let shape = DataShape {
                example_shape: data.example_shape.clone(),
                num_classes: data.num_classes,
            };
            let mut m = model::build(&name, &shape, &device)?;
            let plan = |n: usize| TrainPlan {
                epochs: 1,
                batch_size: batch,
                learning_rate: 0.01,
                shuffle_seed: n as u64,
            };
            let shard = |n: usize| Shard {
                data: Arc::clone(&data),
                indices: (0..n * batch).collect(),
            };
            m.train(&shard(warmup), &plan(warmup))?;
            let start = Instant::now();
            let stats = m.train(&shard(steps), &plan(steps))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"bench\":\"train-step\",\"model\":\"{name}\",\"batch\":{batch},\"steps\":{},\"threads\":{},\"ms_per_step\":{:.3}}}",
                stats.steps,
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
                    std::thread::available_parallelism()
                        .map_or(1, |n| n.get())
                        .to_string()
                }),
                secs * 1000.0 / stats.steps as f64
            );
        }
    }
    Ok(())
}
