//! `fedveil-sim privacy` prints a bare number on its last line: epsilon,
//! or the noise multiplier for a target epsilon.

use std::process::Command;

fn last_line(args: &[&str]) -> f64 {
    let out = Command::new(env!("CARGO_BIN_EXE_fedveil-sim"))
        .arg("privacy")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim_end().lines().last().unwrap().parse().unwrap()
}

#[test]
fn epsilon_and_noise_multiplier_round_trip() {
    // dp_accounting 0.6.0: 5.63201 for q 0.01, z 1.1, T 10000, delta 1e-5.
    let eps = last_line(&[
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.1",
        "--rounds",
        "10000",
        "--delta",
        "1e-5",
    ]);
    assert!((eps / 5.632010670081592 - 1.0).abs() < 0.01, "{eps}");
    let z = last_line(&[
        "--sampling-rate",
        "0.01",
        "--target-epsilon",
        &eps.to_string(),
        "--rounds",
        "10000",
        "--delta",
        "1e-5",
    ]);
    assert!((z - 1.1).abs() < 1e-3, "{z}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedveil-sim"))
        .args([
            "privacy",
            "--sampling-rate",
            "0",
            "--noise-multiplier",
            "1",
            "--rounds",
            "5",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling rate"));
}
