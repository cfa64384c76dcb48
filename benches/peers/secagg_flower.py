#!/usr/bin/env python3
"""One SecAgg+ round: fedveil vs Flower, side by side, at equal n, d, dropout.

Usage (from the repository root, after `cargo build --release -p fedveil-sim`):
    python3 -m venv .venv && .venv/bin/pip install flwr numpy
    .venv/bin/python benches/peers/secagg_flower.py \
        [--clients 10 50 100] [--dims 100000 1000000] [--dropouts 0 0.1 0.3]

Both sides run every client and the server in one process with messages
handed over in memory, so the numbers are protocol compute, not network:

- fedveil: `fedveil-bench secagg-round` (release build), the sans-IO
  `SecAggClient` / `SecAggServer` state machines.
- Flower (the installed `flwr`): the client side is Flower's own SecAgg+ mod
  stage functions (`_setup`, `_share_keys`, `_collect_masked_vectors`,
  `_unmask` from `flwr.client.mod.secure_aggregation.secaggplus_mod`); the
  server side follows `SecAggPlusWorkflow` stage by stage (ring neighbours,
  share routing, summing, share reconstruction, mask removal, dequantisation)
  with Flower's own primitives. Flower's Grid and gRPC layers are left out,
  which only flatters Flower.

Same degree k and threshold t on both sides (fedveil's defaults for n and
the dropout rate; Flower counts a client among its own `num_shares`, so it
gets k + 1). Dropouts: the first half of the dropped clients leave before
sending their masked vector, the second half before the unmask step, as in
the fedveil bench. Client time is the total client compute divided by n.
The result is checked against the plaintext weighted mean.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
    _setup,
    _share_keys,
    _unmask,
)
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

# Flower's SecAggPlusWorkflow defaults.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 4194304
MODULUS_RANGE = 4294967296
MAX_WEIGHT = 1000.0
EXAMPLES_PER_CLIENT = 600  # as in the fedveil bench


def fedveil_round(binary, n, d, dropout, seed):
    out = subprocess.run(
        [binary, "secagg-round", "--clients", str(n), "--dim", str(d),
         "--dropout", str(dropout), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def flower_round(n, d, k, t, dropout, seed):
    """One Flower SecAgg+ round; returns (ok, client_ms, server_ms, max_err)."""
    rng = np.random.default_rng(seed)
    random.seed(seed)
    updates = {nid: rng.uniform(-0.1, 0.1, d).astype(np.float32) for nid in range(1, n + 1)}
    n_drop = round(n * dropout)
    drop_before_masked = set(range(1, n_drop // 2 + 1))
    drop_before_unmask = set(range(n_drop // 2 + 1, n_drop + 1))
    num_shares = min(k + 1, n)  # Flower counts the client itself
    client_s = 0.0
    server_s = 0.0

    def timed_client(fn, *args):
        nonlocal client_s
        start = time.perf_counter()
        out = fn(*args)
        client_s += time.perf_counter() - start
        return out

    states = {nid: SecAggPlusState() for nid in updates}
    for nid, st in states.items():
        st.nid = nid
    setup_cfg = {
        Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: t,
        Key.CLIPPING_RANGE: CLIPPING_RANGE, Key.TARGET_RANGE: QUANTIZATION_RANGE,
        Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT,
    }

    # Stage 0: setup (server: ring neighbours as SecAggPlusWorkflow builds them).
    start = time.perf_counter()
    ids = list(updates)
    random.shuffle(ids)
    half = num_shares >> 1
    neighbours = {
        nid: {ids[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(ids)
    }
    server_s += time.perf_counter() - start
    pubkeys = {}
    for nid, st in states.items():
        res = timed_client(_setup, st, dict(setup_cfg))
        pubkeys[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]

    # Stage 1: share keys; the server routes ciphertexts.
    fwd = {nid: ([], []) for nid in updates}
    for nid, st in states.items():
        cfg = {str(j): pubkeys[j] for j in neighbours[nid]}
        res = timed_client(_share_keys, st, cfg)
        start = time.perf_counter()
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            fwd[dst][0].append(ct)
            fwd[dst][1].append(nid)
        server_s += time.perf_counter() - start

    # Stage 2: masked vectors (training output = the update), summed by the server.
    active = set(updates) - drop_before_masked
    masked_sum = None
    for nid in sorted(active):
        cts, srcs = fwd[nid]
        cfg = {Key.CIPHERTEXT_LIST: cts, Key.SOURCE_LIST: srcs}
        params = ndarrays_to_parameters([updates[nid]])
        res = timed_client(_collect_masked_vectors, states[nid], cfg, EXAMPLES_PER_CLIENT, params)
        start = time.perf_counter()
        vec = [bytes_to_ndarray(b) for b in res[Key.MASKED_PARAMETERS]]
        masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
        server_s += time.perf_counter() - start
    start = time.perf_counter()
    masked_sum = parameters_mod(masked_sum, MODULUS_RANGE)
    dead = set(updates) - active
    server_s += time.perf_counter() - start

    # Stage 3: unmask; survivors answer for their neighbours.
    answering = active - drop_before_unmask
    collected = {nid: [] for nid in updates}
    for nid in sorted(answering):
        cfg = {
            Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active),
            Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead),
        }
        try:
            res = timed_client(_unmask, states[nid], cfg)
        except ValueError:
            continue  # too few active neighbours: Flower's client refuses
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST]):
            collected[owner].append(share)
    start = time.perf_counter()
    ok = True
    for nid, shares in collected.items():
        if len(shares) < t:
            ok = False
            break
        secret = combine_shares(shares)
        shape = get_parameters_shape(masked_sum)
        if nid in active:
            masked_sum = parameters_subtraction(masked_sum, pseudo_rand_gen(secret, MODULUS_RANGE, shape))
        else:
            for peer in neighbours[nid] - {nid}:
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pubkeys[peer][0]))
                mask = pseudo_rand_gen(key, MODULUS_RANGE, shape)
                if nid > peer:
                    masked_sum = parameters_addition(masked_sum, mask)
                else:
                    masked_sum = parameters_subtraction(masked_sum, mask)
    max_err = float("nan")
    if ok:
        recon = parameters_mod(masked_sum, MODULUS_RANGE)
        q_total, recon = factor_extract(recon)
        agg = dequantize(recon, CLIPPING_RANGE, QUANTIZATION_RANGE)
        agg[0] += -(len(active) - 1) * CLIPPING_RANGE
        agg[0] *= QUANTIZATION_RANGE / q_total
    server_s += time.perf_counter() - start
    if ok:
        expected = np.mean([updates[nid] for nid in active], axis=0)
        max_err = float(np.max(np.abs(agg[0] - expected)))
    return ok, client_s * 1000 / n, server_s * 1000, max_err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bench", default=os.environ.get(
        "FEDVEIL_BENCH", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "fedveil-bench")))
    args = ap.parse_args()
    if not os.path.exists(args.bench):
        sys.exit(f"{args.bench} not found: run `cargo build --release -p fedveil-sim` first")

    print("| clients | d | dropout | k / t | fedveil client ms | Flower client ms | "
          "fedveil server ms | Flower server ms | round speed-up | Flower max error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        for d in args.dims:
            for p in args.dropouts:
                fv = fedveil_round(args.bench, n, d, p, args.seed)
                k, t = fv["degree"], fv["threshold"]
                ok, fl_client, fl_server, err = flower_round(n, d, k, t, p, args.seed)
                fv_total = fv["client_ms"] + fv["server_ms"]
                speedup = (fl_client + fl_server) / fv_total
                status = "" if fv["ok"] and ok else f" (fedveil ok={fv['ok']}, Flower ok={ok})"
                print(f"| {n} | {d // 1000}k | {p:.0%} | {k}/{t} | {fv['client_ms']:.1f} | "
                      f"{fl_client:.1f} | {fv['server_ms']:.1f} | {fl_server:.1f} | "
                      f"{speedup:.1f}x{status} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
