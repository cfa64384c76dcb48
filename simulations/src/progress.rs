//! Progress bars and metrics files for a simulation run.

use std::time::Duration;

use fedveil_common::metrics::RoundMetrics;
use fedveil_common::round::Event;
use fedveil_server::Observer;
use fedveil_server::setup::MetricsFiles;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws an overall bar (rounds, with ETA) and a per-round bar (updates in
/// from the cohort), and writes each round's metrics as it completes.
pub struct ProgressObserver {
    /// Progress bars cannot draw (no terminal): print round lines instead.
    plain: bool,
    overall: ProgressBar,
    round: ProgressBar,
    files: MetricsFiles,
    pub metrics: Vec<RoundMetrics>,
}

impl ProgressObserver {
    pub fn new(rounds: u64, files: MetricsFiles, quiet: bool) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let plain = !quiet && target.is_hidden();
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(rounds));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>6} [{bar:30.cyan/blue}] {pos}/{len} rounds  {msg}  eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        overall.set_prefix("run");
        let round = multi.add(ProgressBar::new(0));
        round.set_style(
            ProgressStyle::with_template(
                "{prefix:>6} [{bar:30.green/white}] {pos}/{len} updates  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        overall.enable_steady_tick(Duration::from_millis(500));
        Self {
            plain,
            overall,
            round,
            files,
            metrics: Vec::new(),
        }
    }

    pub fn finish(&self) {
        self.round.finish_and_clear();
        self.overall.finish();
    }
}

impl Observer for ProgressObserver {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::RoundStarted { round, cohort } => {
                self.round.set_prefix(format!("r{round}"));
                self.round.set_length(cohort.len() as u64);
                self.round.set_position(0);
                self.round.set_message("training");
            }
            Event::UpdateAccepted { .. } => self.round.inc(1),
            Event::SecAggStage { stage, pending, .. } => {
                self.round.set_message(format!(
                    "secure aggregation: {} ({pending} pending)",
                    stage.name()
                ));
            }
            Event::Left { id } => {
                self.round.set_message(format!("client {id} left"));
            }
            Event::Rejected { id, code, .. } => {
                self.round.inc(1);
                self.round
                    .set_message(format!("client {id} rejected: {code:?}"));
            }
            Event::RoundFailed { round, reason } => {
                self.overall
                    .println(format!("round {round} failed: {reason}"));
            }
            Event::BudgetExhausted(exceeded) => {
                self.overall
                    .println(format!("privacy budget exhausted: {exceeded}"));
            }
            _ => {}
        }
        tracing::debug!(?event, "event");
    }

    fn on_round(&mut self, m: &RoundMetrics, _global_model: &[f32]) {
        self.overall.inc(1);
        self.overall
            .set_message(format!("acc {:.4}  loss {:.4}", m.accuracy, m.loss));
        let mut line = format!(
            "round {:>4}  accuracy {:.4}  loss {:.4}  clients {}/{}  up {}  down {}  {:.2}s",
            m.round,
            m.accuracy,
            m.loss,
            m.contributors,
            m.cohort,
            human_bytes(m.bytes_up),
            human_bytes(m.bytes_down),
            m.round_secs
        );
        if let Some(eps) = m.epsilon {
            line.push_str(&format!("  epsilon {eps:.3}"));
        }
        if self.plain {
            eprintln!("{line}");
        } else {
            self.overall.println(line);
        }
        if let Err(err) = self.files.write(m) {
            tracing::error!(%err, "cannot write metrics");
        }
        self.metrics.push(m.clone());
    }
}

/// `1234567` → `1.2 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
