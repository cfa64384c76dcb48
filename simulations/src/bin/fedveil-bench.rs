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
use fedveil_common::secagg::local::{Drops, run_round};
use fedveil_common::secagg::{SecAggParams, prg};
use std::collections::BTreeMap;

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
    /// ChaCha20 mask expansion throughput (one core).
    MaskThroughput {
        #[arg(long, default_value_t = 10_000_000)]
        values: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// One SecAgg+ round in memory: client and server time, bytes per client.
    SecaggRound {
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        dim: usize,
        /// Fraction of clients that drop out (half before the masked input,
        /// half before the unmask step).
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
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
        Command::MaskThroughput { values, repeats } => {
            let mut acc = vec![0u32; values];
            let start = Instant::now();
            for r in 0..repeats {
                prg::apply_mask(&mut acc, &[r as u8; 32], true, 32);
            }
            let secs = start.elapsed().as_secs_f64();
            let gbps = (values * 4 * repeats) as f64 / secs / 1e9;
            println!(
                "{{\"bench\":\"mask-throughput\",\"values\":{values},\"repeats\":{repeats},\"gb_per_s\":{gbps:.3}}}"
            );
        }
        Command::SecaggRound {
            clients,
            dim,
            dropout,
            seed,
        } => {
            use rand::{RngExt, SeedableRng};
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let inputs: BTreeMap<u64, (Vec<f32>, u64)> = (1..=clients as u64)
                .map(|i| {
                    (
                        i,
                        (
                            (0..dim).map(|_| rng.random_range(-0.1f32..0.1)).collect(),
                            600,
                        ),
                    )
                })
                .collect();
            let params = SecAggParams::recommended(clients, dropout.max(0.1));
            let n_drop = (clients as f64 * dropout).round() as u64;
            let drops = Drops {
                before_masked: (1..=n_drop / 2).collect(),
                before_unmask: (n_drop / 2 + 1..=n_drop).collect(),
                ..Drops::default()
            };
            let start = Instant::now();
            let run = run_round(&params, 1, &inputs, &drops, seed);
            let wall = start.elapsed().as_secs_f64();
            let ok = run.result.is_ok();
            println!(
                "{{\"bench\":\"secagg-round\",\"clients\":{clients},\"dim\":{dim},\"dropout\":{dropout},\"degree\":{},\"threshold\":{},\"ok\":{ok},\"client_ms\":{:.1},\"server_ms\":{:.1},\"wall_ms\":{:.1},\"bytes_per_client\":{:.0},\"model_bytes\":{}}}",
                params.degree.min(clients as u32 - 1),
                params.threshold,
                run.client_time.as_secs_f64() * 1000.0 / clients as f64,
                run.server_time.as_secs_f64() * 1000.0,
                wall * 1000.0,
                run.bytes_per_client,
                dim * 4
            );
        }
    }
    Ok(())
}
