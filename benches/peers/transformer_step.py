#!/usr/bin/env python3
"""Transformer text-classifier training step, CPU: fedveil (Burn flex) vs PyTorch.

Usage (from the repository root; torch from PyPI in a venv):
    .venv/bin/python benches/peers/transformer_step.py [--steps 30] [--threads 1 2]

Both sides run the default `transformer-cls`: token + learned position
embeddings, 2 pre-norm encoder layers (d_model 128, 4 heads, ff 256, GELU,
no dropout), a final layer norm, mean pooling over non-padding tokens and a
linear head; plain SGD and cross-entropy on random token sequences, with the
same batch, length, vocabulary and thread counts. The parameter counts are
checked equal. The Rust side is `fedveil-bench train-step --model
transformer-cls` (release build); a step includes batch assembly, forward,
backward, the optimizer update and reading the loss back.
"""
import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn as nn


class TextTransformer(nn.Module):
    def __init__(self, vocab, max_len, classes, d=128, layers=2, heads=4, ff=256):
        super().__init__()
        self.token = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        pad = ids == 0
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.norm(self.encoder(self.token(ids) + self.position(pos), src_key_padding_mask=pad))
        keep = (~pad).float().unsqueeze(2)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def torch_step(args, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TextTransformer(args.vocab, args.seq_len, args.classes)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    n = args.batch * max(args.steps, args.warmup)
    data = torch.randint(2, args.vocab, (n, args.seq_len))
    labels = torch.randint(0, args.classes, (n,))

    def run(k):
        for i in range(k):
            x = data[i * args.batch:(i + 1) * args.batch]
            y = labels[i * args.batch:(i + 1) * args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            loss.item()

    run(args.warmup)
    start = time.perf_counter()
    run(args.steps)
    return (time.perf_counter() - start) * 1000 / args.steps, params


def fedveil_step(args, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "fedveil-sim", "--bin", "fedveil-bench", "--",
         "train-step", "--model", "transformer-cls", "--batch", str(args.batch),
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
         "--vocab", str(args.vocab), "--classes", str(args.classes)],
        env=env, check=True, capture_output=True, text=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    return line["ms_per_step"], line["params"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=13_400)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"torch {torch.__version__}; batch {args.batch}, length {args.seq_len}, vocab {args.vocab}; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'threads':>7}  {'fedveil ms/step':>15}  {'pytorch ms/step':>15}  {'ratio':>6}  params")
    for t in args.threads:
        ours, our_params = fedveil_step(args, t)
        theirs, their_params = torch_step(args, t)
        assert our_params == their_params, (our_params, their_params)
        print(f"{t:>7}  {ours:>15.2f}  {theirs:>15.2f}  {ours / theirs:>6.2f}  {our_params}")


if __name__ == "__main__":
    main()
