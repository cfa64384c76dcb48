#!/usr/bin/env python3
"""The mnist-fedavg-iid recipe on Flower + PyTorch: seconds per round.

Usage (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch numpy 'flwr[simulation]'
    FEDVEIL_DATA=../shared/data .venv/bin/python benches/peers/flower_mnist.py --rounds 8

The same federated task as `simulations/recipes/mnist-fedavg-iid.toml`: MNIST
split IID over 100 clients, 10 sampled per round (C = 0.1), 5 local epochs of
plain SGD with batch 10 and learning rate 0.1, the Keras MNIST CNN (93,322
parameters), FedAvg, the new global model evaluated on the 10,000 test
images after each round. Flower's simulation engine (Ray) runs clients in
actors, one per core, each with one PyTorch thread, which is what gave Flower
its best round time here. Prints one JSON line per round, then the mean of
the rounds after the first (Ray and PyTorch warm up in round 1).
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

import flwr
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from cnn_step import keras_cnn  # the same model the step benchmark times


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(root):
    def images(name):
        return torch.tensor(idx(os.path.join(root, "mnist", name)), dtype=torch.float32).unsqueeze(1) / 255.0

    def labels(name):
        return torch.tensor(idx(os.path.join(root, "mnist", name)), dtype=torch.long)

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def get_weights(model):
    return [v.cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights):
    model.load_state_dict({k: torch.tensor(v) for k, v in zip(model.state_dict().keys(), weights)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--actors", type=int, default=os.cpu_count())
    args = ap.parse_args()
    root = os.environ.get("FEDVEIL_DATA", "../shared/data")
    train_x, train_y, test_x, test_y = load(root)
    shards = np.array_split(np.random.default_rng(1).permutation(len(train_x)), args.clients)

    class Client(NumPyClient):
        def __init__(self, shard):
            torch.set_num_threads(1)
            self.x, self.y = train_x[shard], train_y[shard]
            self.model = keras_cnn()

        def fit(self, parameters, config):
            set_weights(self.model, parameters)
            opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
            loss_fn = nn.CrossEntropyLoss()
            self.model.train()
            for _ in range(args.epochs):
                order = torch.randperm(len(self.x))
                for i in range(0, len(order), args.batch):
                    batch = order[i:i + args.batch]
                    opt.zero_grad()
                    loss = loss_fn(self.model(self.x[batch]), self.y[batch])
                    loss.backward()
                    opt.step()
            return get_weights(self.model), len(self.x), {"loss": float(loss.item())}

    def client_fn(context: Context):
        return Client(shards[int(context.node_config["partition-id"])]).to_client()

    marks = []

    def evaluate(server_round, parameters, config):
        torch.set_num_threads(os.cpu_count())
        model = keras_cnn()
        set_weights(model, parameters)
        model.eval()
        with torch.no_grad():
            logits = model(test_x)
            loss = float(nn.functional.cross_entropy(logits, test_y))
            accuracy = float((logits.argmax(1) == test_y).float().mean())
        now = time.perf_counter()
        if marks:
            line = {"peer": "flower", "round": server_round, "round_secs": round(now - marks[-1], 3),
                    "accuracy": round(accuracy, 4), "loss": round(loss, 4)}
            print(json.dumps(line), flush=True)
        marks.append(now)
        return loss, {"accuracy": accuracy}

    def server_fn(context: Context):
        torch.manual_seed(1)
        strategy = FedAvg(
            fraction_fit=args.fraction, fraction_evaluate=0.0,
            min_fit_clients=max(1, int(args.fraction * args.clients)),
            min_available_clients=args.clients,
            initial_parameters=ndarrays_to_parameters(get_weights(keras_cnn())),
            evaluate_fn=evaluate,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    print(f"flwr {flwr.__version__}, torch {torch.__version__}; {args.actors} actors of 1 thread", flush=True)
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": max(1, os.cpu_count() // args.actors), "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count()}},
    )
    times = np.diff(marks)
    if len(times) > 1:
        print(json.dumps({"peer": "flower", "rounds": len(times), "mean_round_secs_after_first":
                          round(float(times[1:].mean()), 3)}))


if __name__ == "__main__":
    main()
