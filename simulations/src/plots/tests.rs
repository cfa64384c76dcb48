use super::*;

fn metrics(rounds: u64, dp: bool) -> Vec<RoundMetrics> {
    (1..=rounds)
        .map(|round| RoundMetrics {
            round,
            accuracy: Some(0.5 + 0.04 * round as f32),
            loss: 2.0 / round as f32,
            bytes_up: 1_000_000 * round,
            bytes_down: 2_000_000,
            round_secs: 1.5,
            cpu_busy: None,
            cohort: 10,
            contributors: 9,
            dropped: 1,
            timed_out: false,
            examples: 600,
            train_loss: None,
            secure: true,
            epsilon: dp.then_some(0.5 * round as f64),
            ..RoundMetrics::default()
        })
        .collect()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-plots-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_run_gets_every_chart_as_png_and_svg_with_titles_and_units() {
    let dir = temp_dir("one");
    let run = Run {
        name: "mnist-fedavg-iid".into(),
        metrics: metrics(5, true),
    };
    let files = plot_runs(&dir, &[run]).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for chart in ["accuracy", "loss", "epsilon", "bytes", "round_time"] {
        assert!(names.contains(&format!("{chart}.png")), "{names:?}");
        assert!(names.contains(&format!("{chart}.svg")), "{names:?}");
    }
    let png = std::fs::read(dir.join("accuracy.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "a blank image compresses smaller");
    let svg = std::fs::read_to_string(dir.join("accuracy.svg")).unwrap();
    assert!(svg.contains("mnist-fedavg-iid: test accuracy"), "title");
    assert!(svg.contains("round") && svg.contains("accuracy (fraction of the test set)"));
    assert!(svg.contains("<polyline"), "a line is drawn");
    let bytes = std::fs::read_to_string(dir.join("bytes.svg")).unwrap();
    assert!(bytes.contains("up (clients to server)") && bytes.contains("MB per round"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runs_without_dp_skip_the_epsilon_chart_and_compare_draws_both_runs() {
    let dir = temp_dir("two");
    let a = Run {
        name: "fedavg".into(),
        metrics: metrics(4, false),
    };
    let mut b_metrics = metrics(6, false);
    b_metrics[2].accuracy = Some(f32::NAN); // a bad point is left out, not drawn
    let b = Run {
        name: "fedadam".into(),
        metrics: b_metrics,
    };
    let files = plot_runs(&dir, &[a, b]).unwrap();
    assert!(!dir.join("epsilon.png").exists());
    assert_eq!(files.len(), 8);
    let svg = std::fs::read_to_string(dir.join("accuracy.svg")).unwrap();
    assert!(svg.contains("fedavg vs fedadam: test accuracy"));
    assert!(
        svg.contains("\nfedavg\n") && svg.contains("\nfedadam\n"),
        "legend"
    );
    assert!(!svg.contains("NaN"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runs_load_from_a_results_directory() {
    let dir = temp_dir("load");
    let run_dir = dir.join("my-run");
    std::fs::create_dir_all(&run_dir).unwrap();
    // Written as the server writes them: outcome and costs apart.
    let mut files = fedveil_server::setup::MetricsFiles::create(&run_dir).unwrap();
    for m in metrics(3, true) {
        files.write(&m).unwrap();
    }
    drop(files);
    let run = Run::load(&run_dir).unwrap();
    assert_eq!(run.name, "my-run");
    assert_eq!(run.metrics, metrics(3, true));
    std::fs::write(run_dir.join("costs.jsonl"), "{\"round\": 1}\n").unwrap();
    let err = format!("{:#}", Run::load(&run_dir).unwrap_err());
    assert!(err.contains("costs.jsonl:1"), "{err}");
    std::fs::write(run_dir.join("metrics.jsonl"), "{\"round\": 1}\n").unwrap();
    let err = format!("{:#}", Run::load(&run_dir).unwrap_err());
    assert!(err.contains("metrics.jsonl:1"), "{err}");
    let err = format!("{:#}", Run::load(&dir.join("missing")).unwrap_err());
    assert!(err.contains("results directory"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
