//! `fedveil-bench`: micro-benchmarks whose numbers go into docs/BENCHMARKS.md.
//!
//! `fedveil-bench train-step --batch 64 --steps 50` times one local SGD step
//! of the CNN (forward, loss, backward, optimizer update, batch assembly and
//! loss read-back: everything a client does per minibatch). With `--model
//! transformer-cls` (or `-lm`) the inputs are random token sequences of
//! `--seq-len` ids from a `--vocab`-word vocabulary. Threads follow
//! `RAYON_NUM_THREADS`. Prints one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_ml::data::{Dataset, Shard};
use fedveil_ml::model::{self, DataShape, DeviceSpec, TrainPlan};
use fedveil_proto::secagg::local::{Drops, run_round};
use fedveil_proto::secagg::{SecAggParams, prg};
use fedveil_proto::wire::LocalOptimizer;
use std::collections::BTreeMap;

/// As in the other binaries: mimalloc reuses Burn's per-step buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Transformers: tokens per sequence.
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        /// Transformers: vocabulary size (SST-2 and AG News give about 13,400).
        #[arg(long, default_value_t = 13_400)]
        vocab: usize,
        /// Transformers: classes.
        #[arg(long, default_value_t = 2)]
        classes: usize,
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
    /// One client's signature work in a SecAgg+ round with enrolled
    /// identities: signing its keys and checking its neighbours' (chain and
    /// signature), then signing the survivor set and checking its
    /// neighbours' signatures over it (the consistency check); and the
    /// server's check of every survivor's two signatures.
    AttestCost {
        /// Neighbours k.
        #[arg(long, default_value_t = 20)]
        neighbours: usize,
        /// Clients in the survivor set each signature covers.
        #[arg(long, default_value_t = 100)]
        survivors: u64,
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
    /// The server's per-round commit: a checkpoint of the CNN with FedAdam
    /// moments and a DP ledger, written to a state database in DIR.
    Checkpoint {
        #[arg(long, default_value_t = 50)]
        commits: usize,
        #[arg(long, default_value = "results/bench-checkpoint")]
        dir: std::path::PathBuf,
    },
}

/// Random token sequences (no padding) and labels, for timing.
fn random_tokens(n: usize, seq_len: usize, vocab: usize, classes: usize) -> Dataset {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    Dataset {
        features: (0..n * seq_len)
            .map(|_| rng.random_range(2..vocab as u32) as f32)
            .collect(),
        example_shape: vec![seq_len],
        labels: (0..n)
            .map(|_| rng.random_range(0..classes as u32))
            .collect(),
        num_classes: classes,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: vocab,
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::TrainStep {
            batch,
            steps,
            warmup,
            model: name,
            device,
            seq_len,
            vocab,
            classes,
        } => {
            let spec = device;
            let device = device.device()?;
            let examples = batch * steps.max(warmup);
            let data = if name.starts_with("transformer") {
                Arc::new(random_tokens(examples, seq_len, vocab, classes))
            } else {
                SyntheticConfig {
                    train_examples: examples,
                    test_examples: 1,
                    ..Default::default()
                }
                .generate(1)
                .train
            };
            let shape = DataShape::of(&data);
            let mut m = model::build(&name, &shape, &device)?;
            let plan = |n: usize| TrainPlan {
                epochs: 1,
                batch_size: batch,
                max_steps: None,
                learning_rate: 0.01,
                shuffle_seed: n as u64,
                prox_mu: 0.0,
                optimizer: LocalOptimizer::Sgd,
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
                "{{\"bench\":\"train-step\",\"device\":\"{spec}\",\"model\":\"{name}\",\"params\":{},\"batch\":{batch},\"steps\":{},\"threads\":{},\"ms_per_step\":{:.3}}}",
                m.spec().param_count,
                stats.steps,
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
                    std::thread::available_parallelism()
                        .map_or(1, |n| n.get())
                        .to_string()
                }),
                secs * 1000.0 / stats.steps as f64
            );
        }
        Command::Checkpoint { commits, dir } => checkpoint(commits, &dir)?,
        Command::AttestCost {
            neighbours,
            survivors,
            repeats,
        } => attest_cost(neighbours, survivors, repeats)?,
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
            let run = run_round(&params, 1, &inputs, &drops, seed, Instant::now);
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

/// Times `commits` checkpoint commits of a CNN-sized state (FedAdam moments,
/// a DP ledger) plus the write-ahead ledger row each round makes.
fn checkpoint(commits: usize, dir: &std::path::Path) -> Result<()> {
    use fedveil_proto::dp::{DpConfig, Mechanism, NoiseLevel};
    use fedveil_proto::round::server::Durable;
    use fedveil_proto::round::{Coordinator, CoordinatorConfig};
    use fedveil_proto::server_opt::{ServerOptimizerConfig, ServerOptimizerKind};
    use fedveil_proto::wire::RoundConfig;
    use fedveil_server::store::{STATE_DB_FILE, Store};
    let device = burn::prelude::Device::flex();
    let shape = DataShape {
        example_shape: vec![1, 28, 28],
        num_classes: 10,
        vocab_size: 0,
    };
    let (spec, initial) = fedveil_server::setup::initial_model(
        &fedveil_ml::model::builtin("cnn")?,
        &shape,
        &device,
        1,
    )?;
    let dim = initial.len();
    let plan = DpConfig {
        mechanism: Mechanism::Central,
        clip_norm: 1.0,
        noise: NoiseLevel::NoiseMultiplier(1.0),
        delta: 1e-5,
        planned_rounds: commits as u64,
        budget: Some(1e9),
        min_contributors: None,
        adaptive: None,
    }
    .plan(0.1, 100, dim, 100, false)?;
    let config = CoordinatorConfig {
        rounds: commits as u64,
        min_clients: 1,
        fraction: 0.1,
        round_timeout: std::time::Duration::from_secs(60),
        max_clients: 100,
        max_examples_per_update: 1000,
        seed: 1,
        round: RoundConfig {
            batch_size: 10,
            learning_rate: 0.1,
            seed: 1,
            ..RoundConfig::default()
        },
        max_failed_rounds: 1,
        dp: Some(plan.clone()),
        server_optimizer: ServerOptimizerConfig::new(ServerOptimizerKind::FedAdam),
        ..CoordinatorConfig::default()
    };
    let coordinator = Coordinator::new(config, spec, initial, 1)?;
    let _ = std::fs::remove_dir_all(dir);
    let path = dir.join(STATE_DB_FILE);
    let mut store = Store::open(&path, "bench", "{}")?;
    let mut ledger = plan.ledger();
    // Every round also charges each node's spend over all runs.
    let population: Vec<String> = (0..100).map(|i| format!("node-{i:03}")).collect();
    let mut checkpoint = coordinator.checkpoint();
    let start = Instant::now();
    for round in 1..=commits as u64 {
        ledger.charge(round, &plan.rdp_per_round, plan.gate_per_round)?;
        store.persist(&Durable::Charged {
            round,
            ledger: ledger.clone(),
            population: population.clone(),
            step: plan.rdp_per_round.clone(),
            gate: plan.gate_per_round,
        })?;
        checkpoint.next_round = round + 1;
        checkpoint.rounds_completed = round;
        checkpoint.global_model[0] += 1e-3;
        checkpoint.ledger = Some(ledger.clone());
        store.persist(&Durable::Checkpoint(Box::new(checkpoint.clone())))?;
    }
    let secs = start.elapsed().as_secs_f64() / commits as f64;
    let blob_bytes = 4
        * (checkpoint.global_model.len()
            + checkpoint
                .strategy
                .buffers
                .values()
                .map(Vec::len)
                .sum::<usize>());
    let db_bytes: u64 = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "bench": "checkpoint",
            "params": dim,
            "commits": commits,
            "ms_per_round": secs * 1e3,
            "blob_bytes_per_commit": blob_bytes,
            "ledger_json_bytes": serde_json::to_string(&ledger)?.len(),
            "state_dir_bytes": db_bytes,
        })
    );
    Ok(())
}

/// See [`Command::AttestCost`]; prints milliseconds per client and round.
fn attest_cost(neighbours: usize, survivors: u64, repeats: usize) -> Result<()> {
    use fedveil_net::pki::{self, CertificateAuthority, NodeAttestor, NodeIdentity};
    use fedveil_proto::secagg::{KeyAttestor, SignatureCheck, keys_message, survivors_message};
    use fedveil_proto::wire::PeerKeys;
    let ca = CertificateAuthority::generate()?;
    let now = pki::unix_now();
    // Every survivor is a node: the server checks each one's signatures.
    let count = (neighbours + 1).max(survivors as usize);
    let nodes = (0..count)
        .map(|i| {
            let name = format!("node-{i}");
            let (key, csr) = pki::new_key_and_csr(&name)?;
            let issued = ca.issue_client(&csr, &name, now - 60, now + 86_400)?;
            Ok(NodeAttestor::new(NodeIdentity::new(
                key,
                issued.der,
                ca.cert_der().to_vec(),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let keys: Vec<PeerKeys> = nodes
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut k = PeerKeys {
                id: i as u64,
                enc_pk: [1; 32],
                mask_pk: [2; 32],
                round_digest: [3; 32],
                attestation: None,
            };
            k.attestation = Some(a.attest(1, &k));
            k
        })
        .collect();
    let set: Vec<u64> = (0..survivors).collect();
    let message = survivors_message(1, &[3; 32], &set);
    let signatures: Vec<Vec<u8>> = nodes.iter().map(|a| a.sign_survivors(&message)).collect();
    let me = &nodes[0];
    let (mut keys_time, mut check_time, mut server_time) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..repeats {
        let t = Instant::now();
        std::hint::black_box(me.attest(1, &keys[0]));
        for k in &keys[1..=neighbours] {
            me.verify(1, k)?;
        }
        keys_time += t.elapsed();
        let t = Instant::now();
        std::hint::black_box(me.sign_survivors(&message));
        for (k, sig) in keys[1..=neighbours].iter().zip(&signatures[1..]) {
            let cert = &k.attestation.as_ref().expect("signed").certificate;
            me.verify_survivors(cert, &message, sig)?;
        }
        check_time += t.elapsed();
        // The server: every survivor's key and survivor-set signatures.
        let t = Instant::now();
        for (k, sig) in keys.iter().zip(&signatures).take(survivors as usize) {
            let a = k.attestation.as_ref().expect("signed");
            let keys_ok =
                pki::NodeSignatures.verify(&a.certificate, &keys_message(1, k), &a.signature);
            let set_ok = pki::NodeSignatures.verify(&a.certificate, &message, sig);
            anyhow::ensure!(keys_ok && set_ok, "a signature did not verify");
        }
        server_time += t.elapsed();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / repeats as f64;
    println!(
        "{{\"bench\":\"attest-cost\",\"neighbours\":{neighbours},\"survivors\":{survivors},\"keys_ms\":{:.2},\"consistency_ms\":{:.2},\"server_ms\":{:.2}}}",
        ms(keys_time),
        ms(check_time),
        ms(server_time)
    );
    Ok(())
}
