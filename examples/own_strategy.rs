//! A server strategy of your own: half the hospitals take part in each
//! round, in turn, and the server's step size decays with every step it
//! takes. It runs on the built-in MLP and the breast cancer recipe's
//! settings, through SecAgg+: a strategy over the mean works under secure
//! aggregation, and the coordinator keeps its step count across restarts
//! through [`Strategy::state`].
//!
//! ```sh
//! FEDVEIL_DATA=../shared/data cargo run --release -p fedveil-examples --example own_strategy
//! ```

use fedveil::round::ClientId;
use fedveil::sim::{Federation, QuietObserver, SimConfig, load_data, run_federation};
use fedveil::strategy::{Candidate, SamplingRng, Strategy, StrategyError, StrategyState};

/// Cohorts in turn over the candidates (sorted by node name), and FedAvg
/// with a server learning rate of `1 / (1 + decay * steps)`.
#[derive(Debug)]
struct TakeTurnsDecaying {
    decay: f32,
    steps: u64,
}

impl Strategy for TakeTurnsDecaying {
    fn name(&self) -> String {
        "take-turns-decaying".into()
    }

    fn select_cohort(
        &mut self,
        round: u64,
        candidates: &[Candidate<'_>],
        target: usize,
        _rng: &mut SamplingRng,
    ) -> Vec<ClientId> {
        let start = (round as usize - 1) * target;
        (0..target)
            .map(|i| candidates[(start + i) % candidates.len()].id)
            .collect()
    }

    fn step(&mut self, _round: u64, global: &mut [f32], mean: &[f32]) {
        let lr = 1.0 / (1.0 + self.decay * self.steps as f32);
        for (x, d) in global.iter_mut().zip(mean) {
            *x += lr * d;
        }
        self.steps += 1;
    }

    fn state(&self) -> StrategyState {
        StrategyState {
            step: self.steps,
            ..StrategyState::default()
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        self.steps = state.step;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The recipe's settings, half of the ten hospitals per round.
    let recipe = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../simulations/recipes/breast-cancer-mlp.toml"
    );
    let (mut cfg, _) = SimConfig::from_toml_file(recipe.as_ref())?;
    cfg.run.fraction = 0.5;
    let loaded = load_data(&cfg, true)?;
    let mut federation = Federation::builtin(&cfg, &loaded.split)?;
    federation.strategy = Some(Box::new(TakeTurnsDecaying {
        decay: 0.1,
        steps: 0,
    }));
    let report = run_federation(&cfg, federation, &mut QuietObserver).await?;
    let failed = report.clients.iter().filter(|c| c.is_err()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} hospitals failed: {:?}",
        report.clients
    );
    let last = report
        .server
        .metrics
        .last()
        .ok_or_else(|| anyhow::anyhow!("no round completed"))?;
    println!(
        "own strategy (take turns, decaying server lr), {} rounds of {} hospitals through SecAgg+: test accuracy {:.4}",
        report.server.rounds_completed,
        last.cohort,
        last.accuracy.unwrap_or(f32::NAN)
    );
    Ok(())
}
