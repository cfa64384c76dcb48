#!/usr/bin/env python3
"""fedveil's RDP accountant against Google's `dp_accounting`, side by side.

Usage (from the repository root, after `cargo build --release -p fedveil-sim`):
    python3 -m venv .venv && .venv/bin/pip install dp-accounting
    .venv/bin/python benches/peers/dp_accounting_compare.py [--write-fixture]

For a grid of sampling rate q, noise multiplier z, rounds T and delta, it
prints epsilon from `dp_accounting.rdp.RdpAccountant` (Poisson-sampled
Gaussian, add-or-remove-one neighbours, default orders) next to epsilon from
`fedveil-sim privacy`, with the relative difference. `--write-fixture`
rewrites `common/src/dp/fixtures/dp_accounting_epsilon.csv`, which the Rust
unit tests check to 1% relative.
"""
import argparse
import importlib.metadata
import os
import subprocess
import sys

import dp_accounting

FIXTURE = os.path.join("common", "src", "dp", "fixtures", "dp_accounting_epsilon.csv")
QS = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0]
ZS = [0.5, 0.8, 1.0, 1.3, 2.0, 5.0]
ROUNDS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-6]
MAX_EPSILON = 1000.0  # beyond this nobody cares, and the grid is big enough


def reference(q, z, t, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
    return float(acc.get_epsilon(delta))


def ours(binary, q, z, t, delta):
    out = subprocess.run(
        [binary, "privacy", "--sampling-rate", repr(q), "--noise-multiplier", repr(z),
         "--rounds", str(t), "--delta", repr(delta)],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-fixture", action="store_true")
    ap.add_argument("--sim", default=os.environ.get("FEDVEIL_SIM", os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "fedveil-sim")))
    args = ap.parse_args()
    rows = []
    for q in QS:
        for z in ZS:
            for t in ROUNDS:
                for delta in DELTAS:
                    eps = reference(q, z, t, delta)
                    if 0 < eps <= MAX_EPSILON:
                        rows.append((q, z, t, delta, eps))
    if args.write_fixture:
        with open(FIXTURE, "w") as f:
            version = importlib.metadata.version("dp-accounting")
            f.write(f"# dp_accounting {version} RdpAccountant, "
                    "PoissonSampledDpEvent(q, GaussianDpEvent(z)) composed `rounds` times\n")
            f.write("q,noise_multiplier,rounds,delta,epsilon\n")
            for q, z, t, delta, eps in rows:
                f.write(f"{q!r},{z!r},{t},{delta!r},{eps!r}\n")
        print(f"wrote {len(rows)} rows to {FIXTURE}", file=sys.stderr)
    if not os.path.exists(args.sim):
        sys.exit(f"{args.sim} not found: run `cargo build --release -p fedveil-sim` first")
    print("| q | z | rounds | delta | dp_accounting epsilon | fedveil epsilon | relative difference |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for q, z, t, delta, eps in rows:
        mine = ours(args.sim, q, z, t, delta)
        rel = (mine - eps) / eps
        worst = max(worst, abs(rel))
        print(f"| {q} | {z} | {t} | {delta:g} | {eps:.6g} | {mine:.6g} | {rel:+.2e} |")
    print(f"\n{len(rows)} points, largest relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
