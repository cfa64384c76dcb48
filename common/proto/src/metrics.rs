//! Per-round metrics: what the server reports and writes to results files.
//!
//! The files keep the run's outcome apart from what it cost on this
//! machine. `metrics.jsonl` / `metrics.csv` hold what the seed determines
//! (accuracy, loss, cohort, epsilon...), so a seeded simulation reproduces
//! them byte for byte. `costs.jsonl` / `costs.csv` hold wall time and bytes
//! on the wire, which vary between runs: timing does, and so do TLS
//! certificates and ECDSA signatures, by a byte or two.

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

/// What one round cost on this machine (`costs.jsonl`, `costs.csv`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundCosts {
    pub round: u64,
    pub round_secs: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl RoundCosts {
    /// Column names of [`RoundCosts::csv_row`].
    pub const CSV_HEADER: &'static str = "round,round_secs,bytes_up,bytes_down";

    pub fn csv_row(&self) -> String {
        format!(
            "{},{:.3},{},{}",
            self.round, self.round_secs, self.bytes_up, self.bytes_down
        )
    }
}

impl RoundMetrics {
    /// Column names of [`RoundMetrics::csv_row`].
    pub const CSV_HEADER: &'static str = "round,accuracy,loss,cohort,contributors,dropped,timed_out,examples,train_loss,client_accuracy,client_loss,secure,epsilon,clip_norm";

    pub fn costs(&self) -> RoundCosts {
        RoundCosts {
            round: self.round,
            round_secs: self.round_secs,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
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
    }

    pub fn csv_row(&self) -> String {
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.round,
            self.accuracy,
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
    }
}
