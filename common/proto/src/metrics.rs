//! Per-round metrics: what the server reports and writes to results files.
//!
//! The files keep the run's outcome apart from what it cost on this
//! machine. `metrics.jsonl` / `metrics.csv` hold what the seed determines
//! (accuracy, loss, cohort, epsilon...), so a seeded simulation reproduces
//! them byte for byte. `costs.jsonl` / `costs.csv` hold wall time and bytes
//! on the wire, which vary between runs: timing does, and so do TLS
//! certificates and ECDSA signatures, by a byte or two.

use serde::{Deserialize, Serialize};

/// The task's metrics of one evaluation, besides its loss: accuracy for a
/// classification, mean squared and mean absolute error for a regression.
/// A metric the task does not have is `None`. (It travels in the wire's
/// `Evaluation`, so no field may be skipped when serialized.)
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskScores {
    /// Fraction of examples classified correctly, 0..=1.
    pub accuracy: Option<f32>,
    /// Mean squared error of the predictions.
    pub mse: Option<f32>,
    /// Mean absolute error of the predictions.
    pub mae: Option<f32>,
}

impl TaskScores {
    /// A classification's scores.
    pub fn classification(accuracy: f32) -> Self {
        Self {
            accuracy: Some(accuracy),
            ..Self::default()
        }
    }

    /// A regression's scores.
    pub fn regression(mse: f32, mae: f32) -> Self {
        Self {
            mse: Some(mse),
            mae: Some(mae),
            ..Self::default()
        }
    }

    /// Whether every score present is in its range: accuracy in 0..=1,
    /// errors finite and non-negative. What a server checks before it
    /// counts a client's report.
    ///
    /// ```
    /// use fedveil_proto::metrics::TaskScores;
    /// assert!(TaskScores::classification(0.9).is_valid());
    /// assert!(!TaskScores::classification(1.5).is_valid());
    /// assert!(!TaskScores::regression(f32::INFINITY, 1.0).is_valid());
    /// ```
    pub fn is_valid(&self) -> bool {
        let error = |e: Option<f32>| e.is_none_or(|e| e.is_finite() && e >= 0.0);
        self.accuracy.is_none_or(|a| (0.0..=1.0).contains(&a)) && error(self.mse) && error(self.mae)
    }

    /// The scores as (name, value) pairs, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f32)> + '_ {
        [
            ("accuracy", self.accuracy),
            ("mse", self.mse),
            ("mae", self.mae),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
    }
}

impl std::fmt::Display for TaskScores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (name, value) in self.iter() {
            if !first {
                f.write_str(" ")?;
            }
            write!(f, "{name} {value:.4}")?;
            first = false;
        }
        Ok(())
    }
}

/// One completed round.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round number.
    pub round: u64,
    /// Server-side test accuracy of the new global model, 0..1
    /// (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f32>,
    /// Server-side test loss of the new global model (the model's loss:
    /// mean cross-entropy for the built-in classifiers, MSE for
    /// regression).
    pub loss: f32,
    /// Server-side test errors of the new global model (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse: Option<f32>,
    /// Server-side mean absolute error of the new global model (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mae: Option<f32>,
    /// Bytes received by the server during the round (all clients).
    /// A cost: written to `costs.jsonl`, not `metrics.jsonl`.
    #[serde(default, skip_serializing)]
    pub bytes_up: u64,
    /// Bytes sent by the server during the round (all clients). A cost.
    #[serde(default, skip_serializing)]
    pub bytes_down: u64,
    /// Wall time from round start to the new global model being evaluated.
    /// A cost.
    #[serde(default, skip_serializing)]
    pub round_secs: f64,
    /// How busy the machine's cores were, from the previous round's end to
    /// this one's: the server process's CPU time over wall time times cores
    /// (1 = every core all the time; in a simulation the clients are in the
    /// process too). None where the platform does not say. A cost.
    #[serde(default, skip_serializing)]
    pub cpu_busy: Option<f64>,
    /// Clients sampled.
    pub cohort: usize,
    /// Clients whose update is in the aggregate.
    pub contributors: usize,
    /// Cohort members that left, timed out or were refused.
    pub dropped: usize,
    /// Whether the round ended at its deadline.
    pub timed_out: bool,
    /// Examples behind the aggregate (sum of FedAvg weights).
    pub examples: u64,
    /// Example-weighted mean of the clients' last-epoch training loss
    /// (absent under secure aggregation, which hides per-client values).
    pub train_loss: Option<f32>,
    /// Whether the round was aggregated through SecAgg+.
    pub secure: bool,
    /// Example-weighted accuracy of the incoming global model on the
    /// clients' own data (federated evaluation), when reported.
    pub client_accuracy: Option<f32>,
    /// Example-weighted loss of the incoming global model on the clients' own data, when reported.
    pub client_loss: Option<f32>,
    /// Regression: example-weighted errors of the incoming global model on
    /// the clients' own data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_mse: Option<f32>,
    /// Regression: the clients' mean absolute error, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_mae: Option<f32>,
    /// Privacy spent so far (epsilon at the run's delta), with DP on.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// The clip bound the round used, with DP on (it moves under adaptive
    /// clipping).
    #[serde(default)]
    pub clip_norm: Option<f64>,
}

/// What one round cost on this machine (`costs.jsonl`, `costs.csv`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundCosts {
    /// The round number.
    pub round: u64,
    /// Wall time of the round.
    pub round_secs: f64,
    /// Bytes the server received.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
    /// Share of the cores kept busy (see [`RoundMetrics::cpu_busy`]).
    #[serde(default)]
    pub cpu_busy: Option<f64>,
}

impl RoundCosts {
    /// Column names of [`RoundCosts::csv_row`].
    pub const CSV_HEADER: &'static str = "round,round_secs,bytes_up,bytes_down,cpu_busy";

    /// The round as a line of `costs.csv`.
    pub fn csv_row(&self) -> String {
        format!(
            "{},{:.3},{},{},{}",
            self.round,
            self.round_secs,
            self.bytes_up,
            self.bytes_down,
            self.cpu_busy.map(|b| format!("{b:.3}")).unwrap_or_default()
        )
    }
}

impl RoundMetrics {
    /// The server-side test scores.
    pub fn scores(&self) -> TaskScores {
        TaskScores {
            accuracy: self.accuracy,
            mse: self.mse,
            mae: self.mae,
        }
    }

    /// The round's test scores as text, for logs and progress lines:
    /// `accuracy 0.9825`, or `mse 2980.5 mae 44.1`.
    ///
    /// ```
    /// use fedveil_proto::metrics::TaskScores;
    /// assert_eq!(TaskScores::regression(2.5, 1.25).to_string(), "mse 2.5000 mae 1.2500");
    /// ```
    pub fn score_text(&self) -> String {
        self.scores().to_string()
    }

    /// Sets the server-side test scores.
    pub fn set_scores(&mut self, scores: TaskScores) {
        (self.accuracy, self.mse, self.mae) = (scores.accuracy, scores.mse, scores.mae);
    }

    /// Column names of [`RoundMetrics::csv_row`].
    pub const CSV_HEADER: &'static str = "round,accuracy,loss,cohort,contributors,dropped,timed_out,examples,train_loss,client_accuracy,client_loss,secure,epsilon,clip_norm,mse,mae,client_mse,client_mae";

    /// The round's costs.
    pub fn costs(&self) -> RoundCosts {
        RoundCosts {
            round: self.round,
            round_secs: self.round_secs,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            cpu_busy: self.cpu_busy,
        }
    }

    /// The whole record, costs included, as one JSON object (the server's
    /// round history keeps both; it reads back as an equal value).
    pub fn to_json_with_costs(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("metrics serialize");
        let costs = serde_json::to_value(self.costs()).expect("costs serialize");
        if let (Some(record), serde_json::Value::Object(costs)) = (value.as_object_mut(), costs) {
            record.extend(costs);
        }
        value
    }

    /// Fills in the costs (read back from `costs.jsonl`).
    pub fn set_costs(&mut self, costs: &RoundCosts) {
        self.round_secs = costs.round_secs;
        self.bytes_up = costs.bytes_up;
        self.bytes_down = costs.bytes_down;
        self.cpu_busy = costs.cpu_busy;
    }

    /// The round as a line of `metrics.csv`.
    pub fn csv_row(&self) -> String {
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.round,
            opt(self.accuracy),
            self.loss,
            self.cohort,
            self.contributors,
            self.dropped,
            self.timed_out,
            self.examples,
            opt(self.train_loss),
            opt(self.client_accuracy),
            opt(self.client_loss),
            self.secure,
            self.epsilon.map(|e| e.to_string()).unwrap_or_default(),
            self.clip_norm.map(|c| c.to_string()).unwrap_or_default(),
            opt(self.mse),
            opt(self.mae),
            opt(self.client_mse),
            opt(self.client_mae),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_row_matches_header() {
        let m = RoundMetrics {
            round: 1,
            accuracy: Some(0.5),
            loss: 1.0,
            mse: None,
            mae: None,
            bytes_up: 10,
            bytes_down: 20,
            round_secs: 1.5,
            cpu_busy: Some(0.75),
            cohort: 3,
            contributors: 2,
            dropped: 1,
            timed_out: false,
            examples: 100,
            train_loss: Some(0.7),
            secure: false,
            client_accuracy: None,
            client_loss: Some(0.9),
            client_mse: None,
            client_mae: None,
            epsilon: Some(1.25),
            clip_norm: Some(0.5),
        };
        let cols = RoundMetrics::CSV_HEADER.split(',').count();
        assert_eq!(m.csv_row().split(',').count(), cols);
        let cols = RoundCosts::CSV_HEADER.split(',').count();
        assert_eq!(m.costs().csv_row().split(',').count(), cols);
        // The metrics line carries no costs; the costs line puts them back.
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            !json.contains("round_secs") && !json.contains("bytes"),
            "{json}"
        );
        let mut back = serde_json::from_str::<RoundMetrics>(&json).unwrap();
        assert_ne!(back, m);
        let costs = serde_json::to_string(&m.costs()).unwrap();
        back.set_costs(&serde_json::from_str(&costs).unwrap());
        assert_eq!(back, m);
        // The full record keeps both.
        let full = m.to_json_with_costs();
        assert_eq!(full["round_secs"], 1.5);
        assert_eq!(serde_json::from_value::<RoundMetrics>(full).unwrap(), m);
        // A classification line has no regression keys, and the reverse.
        assert!(
            !json.contains("mse") && json.contains("\"accuracy\":0.5"),
            "{json}"
        );
        let mut r = RoundMetrics {
            client_accuracy: None,
            client_mse: Some(3.0),
            client_mae: Some(1.5),
            ..m
        };
        r.set_scores(TaskScores::regression(2.0, 1.0));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains("\"mse\":2.0,\"mae\":1.0") && !json.contains("\"accuracy\""),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<RoundMetrics>(&json)
                .unwrap()
                .scores(),
            r.scores()
        );
        assert!(r.csv_row().ends_with(",2,1,3,1.5"), "{}", r.csv_row());
    }
}
