#!/usr/bin/env python3
"""CNN training step, batch 64, CPU: fedveil (Burn flex) vs PyTorch, side by side.

Usage (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch numpy
    .venv/bin/python benches/peers/cnn_step.py [--steps 50] [--threads 1 2]

Both sides run the same Keras MNIST CNN (93,322 parameters), plain SGD,
cross-entropy, on random 28x28 inputs, with the same thread counts. The Rust
side is `fedveil-bench train-step` (release build); a step includes batch
assembly, forward, backward, the optimizer update and reading the loss back,
which is what a fedveil client does per minibatch. PyTorch does the same.
"""
import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn as nn


def keras_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def torch_step_ms(batch, steps, warmup, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = keras_cnn()
    assert sum(p.numel() for p in model.parameters()) == 93_322
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.rand(batch * max(steps, warmup), 1, 28, 28)
    labels = torch.randint(0, 10, (batch * max(steps, warmup),))

    def run(n):
        for i in range(n):
            x = data[i * batch:(i + 1) * batch]
            y = labels[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            loss.item()

    run(warmup)
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) * 1000 / steps


def fedveil_step_ms(batch, steps, warmup, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "fedveil-sim", "--bin", "fedveil-bench", "--",
         "train-step", "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)],
        env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"torch {torch.__version__}; batch {args.batch}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'threads':>7}  {'fedveil ms/step':>15}  {'pytorch ms/step':>15}  {'ratio':>6}")
    for t in args.threads:
        ours = fedveil_step_ms(args.batch, args.steps, args.warmup, t)
        theirs = torch_step_ms(args.batch, args.steps, args.warmup, t)
        print(f"{t:>7}  {ours:>15.2f}  {theirs:>15.2f}  {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
