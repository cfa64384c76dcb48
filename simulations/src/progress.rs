//! Progress bars and metrics files for a simulation run.

use std::collections::BTreeSet;
use std::time::Duration;

use fedveil_proto::metrics::RoundMetrics;
use fedveil_proto::round::{ClientId, Event};
use fedveil_proto::secagg::server::Stage;
use fedveil_server::Observer;
use fedveil_server::setup::MetricsFiles;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws an overall bar (rounds, with ETA) and a per-round bar (clients of
/// the cohort done and dropped, and the stage of secure aggregation), and
/// writes each round's metrics as it completes.
pub struct ProgressObserver {
    /// Progress bars cannot draw (no terminal): print round lines instead.
    plain: bool,
    overall: ProgressBar,
    round: ProgressBar,
    files: MetricsFiles,
    /// Every completed round's metrics so far.
    pub metrics: Vec<RoundMetrics>,
    status: RoundStatus,
}

/// The current round as the per-round bar shows it.
#[derive(Debug, Default)]
struct RoundStatus {
    cohort: BTreeSet<ClientId>,
    /// Updates accepted (in the clear), or masked inputs in (SecAgg+).
    done: usize,
    /// Cohort members that left or were refused.
    dropped: BTreeSet<ClientId>,
    stage: Option<String>,
}

impl RoundStatus {
    fn message(&self) -> String {
        let mut msg = format!("{} done  {} dropped", self.done, self.dropped.len());
        if let Some(stage) = &self.stage {
            msg.push_str("  ");
            msg.push_str(stage);
        }
        msg
    }
}

impl ProgressObserver {
    /// Progress over `rounds` rounds, writing `files`; `quiet` hides the bars.
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
                "{prefix:>6} [{bar:30.green/white}] {pos}/{len} clients  {msg}",
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
            status: RoundStatus::default(),
        }
    }

    /// Clears the progress bars.
    pub fn finish(&self) {
        self.round.finish_and_clear();
        self.overall.finish();
    }
}

impl Observer for ProgressObserver {
    fn on_event(&mut self, event: &Event) {
        let s = &mut self.status;
        match event {
            Event::RoundStarted { round, cohort } => {
                self.round.set_prefix(format!("r{round}"));
                self.round.set_length(cohort.len() as u64);
                *s = RoundStatus {
                    cohort: cohort.iter().copied().collect(),
                    stage: Some("training".into()),
                    ..RoundStatus::default()
                };
            }
            Event::UpdateAccepted { .. } => s.done += 1,
            Event::SecAggStage { stage, pending, .. } => {
                // Whoever the consistency check waits on sent a masked input.
                if *stage == Stage::ConsistencyCheck {
                    s.done = *pending;
                }
                s.stage = Some(format!(
                    "secure aggregation: {} ({pending} pending)",
                    stage.name()
                ));
            }
            Event::Left { id } | Event::Rejected { id, .. } if s.cohort.contains(id) => {
                s.dropped.insert(*id);
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
        self.round.set_position(self.status.done as u64);
        self.round.set_message(self.status.message());
        tracing::debug!(?event, "event");
    }

    fn on_round(&mut self, m: &RoundMetrics, _global_model: &[f32]) {
        self.overall.inc(1);
        self.overall
            .set_message(format!("{}  loss {:.4}", m.score_text(), m.loss));
        let mut line = format!(
            "round {:>4}  {}  loss {:.4}  clients {}/{}  up {}  down {}  {:.2}s",
            m.round,
            m.score_text(),
            m.loss,
            m.contributors,
            m.cohort,
            human_bytes(m.bytes_up),
            human_bytes(m.bytes_down),
            m.round_secs
        );
        if let Some(busy) = m.cpu_busy {
            line.push_str(&format!("  cores {:.0}% busy", busy * 100.0));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The round bar counts cohort members done and dropped: updates in
    /// the clear, masked inputs under SecAgg+ (the unmasking stage's wait
    /// list), and departures of cohort members only.
    #[test]
    fn the_round_bar_counts_clients_done_and_dropped() {
        let dir = std::env::temp_dir().join(format!("fedveil-progress-{}", std::process::id()));
        let mut obs = ProgressObserver::new(2, MetricsFiles::create(&dir).unwrap(), true);
        let started = |round| Event::RoundStarted {
            round,
            cohort: vec![1, 2, 3, 4, 5],
        };
        obs.on_event(&started(1));
        for id in [1, 4] {
            obs.on_event(&Event::UpdateAccepted {
                round: 1,
                id,
                num_examples: 10,
            });
        }
        obs.on_event(&Event::Left { id: 2 });
        obs.on_event(&Event::Left { id: 9 });
        obs.on_event(&Event::Rejected {
            id: 3,
            code: fedveil_proto::wire::ReasonCode::NonFinite,
            detail: String::new(),
        });
        assert_eq!(obs.status.message(), "2 done  2 dropped  training");
        assert_eq!(obs.round.position(), 2);

        obs.on_event(&started(2));
        obs.on_event(&Event::SecAggStage {
            round: 2,
            stage: Stage::MaskedInput,
            pending: 5,
        });
        obs.on_event(&Event::Left { id: 5 });
        obs.on_event(&Event::SecAggStage {
            round: 2,
            stage: Stage::ConsistencyCheck,
            pending: 4,
        });
        obs.on_event(&Event::SecAggStage {
            round: 2,
            stage: Stage::Unmask,
            pending: 4,
        });
        assert_eq!(
            obs.status.message(),
            "4 done  1 dropped  secure aggregation: unmask (4 pending)"
        );
        assert_eq!(obs.round.position(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
