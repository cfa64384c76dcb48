"""Loads a model exported by `fedveil-server export --format safetensors`
into the equivalent PyTorch CNN (strict: every name and shape must match)
and evaluates it on the MNIST test set, to compare with the accuracy the
server reported for the same round.

    python benches/peers/load_export.py global.safetensors [MNIST_DIR]

Needs torch, numpy and safetensors (see cnn_step.py for the venv).
"""

import gzip
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file


class Cnn(torch.nn.Module):
    """fedveil's `cnn` (common/src/model/cnn.rs), in PyTorch."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3)
        self.conv2 = torch.nn.Conv2d(32, 64, 3)
        self.conv3 = torch.nn.Conv2d(64, 64, 3)
        self.fc1 = torch.nn.Linear(576, 64)
        self.fc2 = torch.nn.Linear(64, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    path = sys.argv[1]
    mnist = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.environ.get("FEDVEIL_DATA", "."), "mnist")
    model = Cnn()
    model.load_state_dict(load_file(path), strict=True)
    x = torch.tensor(idx(os.path.join(mnist, "t10k-images-idx3-ubyte.gz")), dtype=torch.float32)
    y = torch.tensor(idx(os.path.join(mnist, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))
    with torch.no_grad():
        logits = model(x.unsqueeze(1) / 255.0)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    print(f"loaded {sum(p.numel() for p in model.parameters())} parameters strictly; MNIST test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
