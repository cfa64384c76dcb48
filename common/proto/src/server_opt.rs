//! Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR
//! 2021, Algorithm 2): the round's aggregated mean update is a
//! pseudo-gradient, and the server takes an optimizer step with it.
//!
//! - FedAvg: `x += lr * delta` (lr 1 is plain federated averaging).
//! - FedAvgM: `m = momentum * m + delta; x += lr * m` (Hsu et al. 2019).
//! - FedAdagrad / FedYogi / FedAdam: `m = b1 m + (1 - b1) delta`, then
//!   - Adagrad: `v = v + delta^2`
//!   - Yogi:    `v = v - (1 - b2) delta^2 sign(v - delta^2)`
//!   - Adam:    `v = b2 v + (1 - b2) delta^2`
//!
//!   and `x += lr * m / (sqrt(v) + tau)`, with `m` starting at 0 and `v` at
//!   `tau^2`, without bias correction, as in the paper's Algorithm 2.
//!
//! Arithmetic is in f32, element by element, in a fixed order: the same
//! inputs give the same bits on every machine, which resuming relies on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::strategy::{Strategy, StrategyError, StrategyState};

/// First-moment decay (Reddi et al.'s default).
pub const DEFAULT_BETA1: f64 = 0.9;
/// Adam's second-moment decay (Reddi et al.'s default).
pub const DEFAULT_BETA2: f64 = 0.99;
/// The adaptive optimizers' epsilon (Reddi et al.'s default).
pub const DEFAULT_TAU: f64 = 1e-3;
/// FedAvgM's default server momentum.
pub const DEFAULT_SERVER_MOMENTUM: f64 = 0.9;
/// Default server learning rate of FedAvg and FedAvgM.
pub const DEFAULT_SERVER_LR: f64 = 1.0;
/// Default server learning rate of the adaptive optimizers (Reddi et al.
/// tune it per task; 1e-2 is a common middle of their grids).
pub const DEFAULT_ADAPTIVE_SERVER_LR: f64 = 1e-2;

/// The server optimizers of Reddi et al., "Adaptive Federated Optimization" (2021).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerOptimizerKind {
    /// Plain FedAvg: the global model moves by the mean update times the server learning rate.
    FedAvg,
    /// FedAvg with server momentum.
    FedAvgM,
    /// Adagrad on the server.
    FedAdagrad,
    /// Yogi on the server.
    FedYogi,
    /// Adam on the server.
    FedAdam,
}

impl std::str::FromStr for ServerOptimizerKind {
    type Err = StrategyError;
    fn from_str(s: &str) -> Result<Self, StrategyError> {
        Ok(match s {
            "fedavg" => Self::FedAvg,
            "fedavgm" => Self::FedAvgM,
            "fedadagrad" => Self::FedAdagrad,
            "fedyogi" => Self::FedYogi,
            "fedadam" => Self::FedAdam,
            other => {
                return Err(StrategyError::BadSetting {
                    setting: "server_optimizer",
                    value: other.to_owned(),
                    expected: "one of fedavg, fedavgm, fedadagrad, fedyogi, fedadam".into(),
                });
            }
        })
    }
}

impl ServerOptimizerKind {
    /// The optimizer's name, as `--server-optimizer` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedAvgM => "fedavgm",
            Self::FedAdagrad => "fedadagrad",
            Self::FedYogi => "fedyogi",
            Self::FedAdam => "fedadam",
        }
    }

    /// Whether it keeps second moments (Adagrad, Yogi, Adam).
    pub fn is_adaptive(self) -> bool {
        matches!(self, Self::FedAdagrad | Self::FedYogi | Self::FedAdam)
    }

    /// Its default server learning rate.
    pub fn default_lr(self) -> f64 {
        if self.is_adaptive() {
            DEFAULT_ADAPTIVE_SERVER_LR
        } else {
            DEFAULT_SERVER_LR
        }
    }
}

/// The operator's choice of server optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerOptimizerConfig {
    /// Which optimizer.
    pub kind: ServerOptimizerKind,
    /// Server learning rate.
    pub lr: f64,
    /// Momentum (FedAvgM).
    pub momentum: f64,
    /// First-moment decay (adaptive optimizers).
    pub beta1: f64,
    /// Second-moment decay (FedYogi, FedAdam).
    pub beta2: f64,
    /// Adaptivity epsilon (adaptive optimizers).
    pub tau: f64,
}

impl Default for ServerOptimizerConfig {
    fn default() -> Self {
        Self::new(ServerOptimizerKind::FedAvg)
    }
}

impl ServerOptimizerConfig {
    /// `kind` with its documented defaults.
    pub fn new(kind: ServerOptimizerKind) -> Self {
        Self {
            kind,
            lr: kind.default_lr(),
            momentum: DEFAULT_SERVER_MOMENTUM,
            beta1: DEFAULT_BETA1,
            beta2: DEFAULT_BETA2,
            tau: DEFAULT_TAU,
        }
    }

    /// From command-line style settings: a name, an optional learning rate
    /// (else the optimizer's default) and the rest; validated.
    pub fn from_settings(
        name: &str,
        lr: Option<f64>,
        momentum: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    ) -> Result<Self, StrategyError> {
        let kind: ServerOptimizerKind = name.parse()?;
        let c = Self {
            lr: lr.unwrap_or(kind.default_lr()),
            momentum,
            beta1,
            beta2,
            tau,
            ..Self::new(kind)
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings are in range.
    pub fn validate(&self) -> Result<(), StrategyError> {
        let bad = |setting: &'static str, v: f64, expected: &str| {
            Err(StrategyError::BadSetting {
                setting,
                value: v.to_string(),
                expected: expected.to_owned(),
            })
        };
        let positive = |setting, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                bad(setting, v, "must be positive and finite")
            }
        };
        let unit = |setting, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                bad(setting, v, "must be in [0, 1)")
            }
        };
        positive("server_lr", self.lr)?;
        match self.kind {
            ServerOptimizerKind::FedAvg => Ok(()),
            ServerOptimizerKind::FedAvgM => unit("server_momentum", self.momentum),
            _ => {
                unit("beta1", self.beta1)?;
                unit("beta2", self.beta2)?;
                positive("tau", self.tau)
            }
        }
    }
}

/// A server optimizer and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptimizer {
    config: ServerOptimizerConfig,
    /// Steps taken (rounds that changed the model).
    step: u64,
    /// First moment (FedAvgM: the momentum buffer); empty for FedAvg.
    m: Vec<f32>,
    /// Second moment; empty unless adaptive.
    v: Vec<f32>,
}

/// Names of the moments in [`StrategyState::buffers`].
const FIRST_MOMENT: &str = "m";
const SECOND_MOMENT: &str = "v";

impl ServerOptimizer {
    /// A fresh optimizer for a model of `dim` parameters.
    pub fn new(config: ServerOptimizerConfig, dim: usize) -> Self {
        let kind = config.kind;
        let m = if kind == ServerOptimizerKind::FedAvg {
            Vec::new()
        } else {
            vec![0.0; dim]
        };
        let v = if kind.is_adaptive() {
            vec![(config.tau * config.tau) as f32; dim]
        } else {
            Vec::new()
        };
        Self {
            config,
            step: 0,
            m,
            v,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ServerOptimizerConfig {
        &self.config
    }

    /// One server step with pseudo-gradient `delta` (the round's mean update).
    pub fn apply(&mut self, global: &mut [f32], delta: &[f32]) {
        debug_assert_eq!(global.len(), delta.len());
        let c = &self.config;
        let lr = c.lr as f32;
        self.step += 1;
        match c.kind {
            ServerOptimizerKind::FedAvg => {
                for (x, d) in global.iter_mut().zip(delta) {
                    *x += lr * d;
                }
            }
            ServerOptimizerKind::FedAvgM => {
                let beta = c.momentum as f32;
                for ((x, d), m) in global.iter_mut().zip(delta).zip(&mut self.m) {
                    *m = beta * *m + d;
                    *x += lr * *m;
                }
            }
            kind => {
                let (b1, b2, tau) = (c.beta1 as f32, c.beta2 as f32, c.tau as f32);
                let it = global
                    .iter_mut()
                    .zip(delta)
                    .zip(self.m.iter_mut().zip(&mut self.v));
                for ((x, &d), (m, v)) in it {
                    *m = b1 * *m + (1.0 - b1) * d;
                    let d2 = d * d;
                    *v = match kind {
                        ServerOptimizerKind::FedAdagrad => *v + d2,
                        ServerOptimizerKind::FedYogi => *v - (1.0 - b2) * d2 * sign(*v - d2),
                        _ => b2 * *v + (1.0 - b2) * d2,
                    };
                    *x += lr * *m / (v.sqrt() + tau);
                }
            }
        }
    }
}

impl Strategy for ServerOptimizer {
    fn name(&self) -> String {
        self.config.kind.name().to_owned()
    }

    fn step(&mut self, _round: u64, global: &mut [f32], aggregate: &[f32]) {
        self.apply(global, aggregate);
    }

    fn state(&self) -> StrategyState {
        let mut buffers = BTreeMap::new();
        for (name, values) in [(FIRST_MOMENT, &self.m), (SECOND_MOMENT, &self.v)] {
            if !values.is_empty() {
                buffers.insert(name.to_owned(), values.clone());
            }
        }
        StrategyState {
            step: self.step,
            buffers,
        }
    }

    /// Continues from saved moments; refused if their shape does not fit
    /// this optimizer and model.
    fn restore(&mut self, mut state: StrategyState) -> Result<(), StrategyError> {
        let mut take = |name: &str, expected: usize| {
            let values = state.buffers.remove(name).unwrap_or_default();
            if values.len() == expected {
                Ok(values)
            } else {
                Err(StrategyError::StateMismatch {
                    strategy: self.config.kind.name().to_owned(),
                    detail: format!(
                        "moment '{name}' has {} values, this model needs {expected}",
                        values.len()
                    ),
                })
            }
        };
        let m = take(FIRST_MOMENT, self.m.len())?;
        let v = take(SECOND_MOMENT, self.v.len())?;
        if let Some(extra) = state.buffers.keys().next() {
            return Err(StrategyError::StateMismatch {
                strategy: self.name(),
                detail: format!("it keeps no buffer named '{extra}'"),
            });
        }
        (self.step, self.m, self.v) = (state.step, m, v);
        Ok(())
    }
}

/// sign(0) = 0, as in the paper.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimizer's state, as tests look at it.
    struct Moments {
        step: u64,
        m: Vec<f32>,
        v: Vec<f32>,
    }

    impl Moments {
        fn of(opt: &ServerOptimizer) -> Self {
            let mut state = Strategy::state(opt);
            let mut take = |n: &str| state.buffers.remove(n).unwrap_or_default();
            Self {
                m: take(FIRST_MOMENT),
                v: take(SECOND_MOMENT),
                step: state.step,
            }
        }
    }

    fn run(kind: ServerOptimizerKind, deltas: &[[f32; 2]]) -> (Vec<f32>, Moments) {
        let mut config = ServerOptimizerConfig::new(kind);
        config.lr = 0.1;
        config.tau = 0.01;
        let mut opt = ServerOptimizer::new(config, 2);
        let mut x = vec![1.0f32, -1.0];
        for d in deltas {
            opt.apply(&mut x, d);
        }
        (x, Moments::of(&opt))
    }

    fn close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    const DELTAS: [[f32; 2]; 3] = [[0.5, -0.2], [0.3, 0.1], [-0.4, 0.0]];

    #[test]
    fn fedavg_is_a_plain_step() {
        let (x, s) = run(ServerOptimizerKind::FedAvg, &DELTAS);
        close(&x, &[1.0 + 0.1 * 0.4, -1.0 + 0.1 * -0.1]);
        assert_eq!(s.step, 3);
        assert!(s.m.is_empty() && s.v.is_empty());
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        // m1 = .5, m2 = .45 + .3 = .75, m3 = .675 - .4 = .275 (first value).
        // m1 = -.2, m2 = -.18 + .1 = -.08, m3 = -.072 (second value).
        let (x, s) = run(ServerOptimizerKind::FedAvgM, &DELTAS);
        close(&s.m, &[0.275, -0.072]);
        close(
            &x,
            &[
                1.0 + 0.1 * (0.5 + 0.75 + 0.275),
                -1.0 + 0.1 * (-0.2 - 0.08 - 0.072),
            ],
        );
    }

    /// Reference computed by hand (in f64) from Algorithm 2 of Reddi et al.
    fn reference(kind: ServerOptimizerKind) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (b1, b2, tau, lr) = (0.9, 0.99, 0.01, 0.1);
        let mut x = vec![1.0, -1.0];
        let mut m = vec![0.0; 2];
        let mut v = vec![tau * tau; 2];
        for d in DELTAS {
            for i in 0..2 {
                let d = f64::from(d[i]);
                m[i] = b1 * m[i] + (1.0 - b1) * d;
                v[i] = match kind {
                    ServerOptimizerKind::FedAdagrad => v[i] + d * d,
                    ServerOptimizerKind::FedYogi => {
                        v[i] - (1.0 - b2) * d * d * (v[i] - d * d).signum()
                    }
                    _ => b2 * v[i] + (1.0 - b2) * d * d,
                };
                x[i] += lr * m[i] / (v[i].sqrt() + tau);
            }
        }
        (x, m, v)
    }

    #[test]
    fn adaptive_optimizers_follow_algorithm_2() {
        for kind in [
            ServerOptimizerKind::FedAdagrad,
            ServerOptimizerKind::FedYogi,
            ServerOptimizerKind::FedAdam,
        ] {
            let (x, s) = run(kind, &DELTAS);
            let (rx, rm, rv) = reference(kind);
            close(&x, &rx);
            close(&s.m, &rm);
            close(&s.v, &rv);
        }
        // First Adam step by hand: m = .05, v = 1e-4 * .99 + .01 * .25
        // = .002599, x = 1 + .1 * .05 / (sqrt(.002599) + .01).
        let (x, _) = run(ServerOptimizerKind::FedAdam, &DELTAS[..1]);
        let want = 1.0 + 0.1 * 0.05 / (0.002599f64.sqrt() + 0.01);
        close(&x[..1], &[want]);
    }

    #[test]
    fn the_three_adaptive_rules_differ() {
        let a = run(ServerOptimizerKind::FedAdagrad, &DELTAS).1.v;
        let y = run(ServerOptimizerKind::FedYogi, &DELTAS).1.v;
        let m = run(ServerOptimizerKind::FedAdam, &DELTAS).1.v;
        assert!(a != y && y != m && a != m);
    }

    #[test]
    fn resuming_continues_bit_for_bit() {
        let kind = ServerOptimizerKind::FedYogi;
        let (all, _) = run(kind, &DELTAS);
        let config = {
            let mut c = ServerOptimizerConfig::new(kind);
            c.lr = 0.1;
            c.tau = 0.01;
            c
        };
        let mut first = ServerOptimizer::new(config, 2);
        let mut x = vec![1.0f32, -1.0];
        first.apply(&mut x, &DELTAS[0]);
        let saved = Strategy::state(&first);
        assert_eq!(saved.buffers.len(), 2);
        let mut second = ServerOptimizer::new(config, 2);
        second.restore(saved).unwrap();
        second.apply(&mut x, &DELTAS[1]);
        second.apply(&mut x, &DELTAS[2]);
        assert_eq!(x, all);
        let mut larger = ServerOptimizer::new(config, 3);
        let err = larger.restore(Strategy::state(&second)).unwrap_err();
        assert!(err.to_string().contains("moment 'm' has 2 values"), "{err}");
        let mut plain =
            ServerOptimizer::new(ServerOptimizerConfig::new(ServerOptimizerKind::FedAvg), 2);
        assert!(
            plain.restore(Strategy::state(&second)).is_err(),
            "FedAvg keeps no moments"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = ServerOptimizerConfig::new(ServerOptimizerKind::FedAdam);
        c.beta2 = 1.0;
        assert!(c.validate().unwrap_err().to_string().contains("beta2"));
        c = ServerOptimizerConfig::new(ServerOptimizerKind::FedAvgM);
        c.lr = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("server_lr"));
        assert!("fedsgd".parse::<ServerOptimizerKind>().is_err());
        assert_eq!("fedyogi".parse(), Ok(ServerOptimizerKind::FedYogi));
    }
}
