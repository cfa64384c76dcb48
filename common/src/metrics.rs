//! Per-round metrics: what the server reports and simulations write to
//! `metrics.jsonl` and `metrics.csv`.

use serde::{Deserialize, Serialize};

/// One completed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub round: u64,
    /// Server-side test accuracy of the new global model, 0..1.
    pub accuracy: f32,
    /// Server-side test loss (mean cross-entropy) of the new global model.
    pub loss: f32,
    /// Bytes received by the server during the round (all clients).
    pub bytes_up: u64,
    /// Bytes sent by the server during the round (all clients).
    pub bytes_down: u64,
    /// Wall time from round start to the new global model being evaluated.
    pub round_secs: f64,
    pub cohort: usize,
    pub contributors: usize,
    pub dropped: usize,
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
    pub client_loss: Option<f32>,
    /// Privacy spent so far (epsilon at the run's delta), with DP on.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// The clip bound the round used, with DP on (it moves under adaptive
    /// clipping).
    #[serde(default)]
    pub clip_norm: Option<f64>,
}

impl RoundMetrics {
    /// Column names of [`RoundMetrics::csv_row`].
    pub const CSV_HEADER: &'static str = "round,accuracy,loss,bytes_up,bytes_down,round_secs,cohort,contributors,dropped,timed_out,examples,train_loss,client_accuracy,client_loss,secure,epsilon,clip_norm";

    pub fn csv_row(&self) -> String {
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{},{},{:.3},{},{},{},{},{},{},{},{},{},{},{}",
            self.round,
            self.accuracy,
            self.loss,
            self.bytes_up,
            self.bytes_down,
            self.round_secs,
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
            self.clip_norm.map(|c| c.to_string()).unwrap_or_default()
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
            accuracy: 0.5,
            loss: 1.0,
            bytes_up: 10,
            bytes_down: 20,
            round_secs: 1.5,
            cohort: 3,
            contributors: 2,
            dropped: 1,
            timed_out: false,
            examples: 100,
            train_loss: Some(0.7),
            secure: false,
            client_accuracy: None,
            client_loss: Some(0.9),
            epsilon: Some(1.25),
            clip_norm: Some(0.5),
        };
        let cols = RoundMetrics::CSV_HEADER.split(',').count();
        assert_eq!(m.csv_row().split(',').count(), cols);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<RoundMetrics>(&json).unwrap(), m);
    }
}
