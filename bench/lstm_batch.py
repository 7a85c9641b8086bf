"""LSTM(32) over sequences of 100 steps x 32 features, batch 64: forward + backward per batch in dlcli and in
PyTorch CPU (2 threads, torch.nn.LSTM), in one run, best of interleaved rounds, and the ratio (target <= 2x).

    python bench/lstm_batch.py [--rounds 20]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_best, torch_or_none  # noqa: E402

BATCH, STEPS, FEATURES, UNITS = 64, 100, 32, 32


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (BATCH, STEPS, FEATURES)).astype(np.float32)
    grad_out = rng.normal(0, 1, (BATCH, UNITS)).astype(np.float32)

    from dlcli import layers

    lstm = layers.LSTM(UNITS)
    lstm.ensure_built((STEPS, FEATURES))
    lstm.input_grad_needed = True

    def dlcli_step():
        lstm.forward(x, training=True)
        lstm.backward(grad_out)

    runs = {"dlcli": dlcli_step}
    torch = torch_or_none()
    if torch is not None:
        net = torch.nn.LSTM(FEATURES, UNITS, batch_first=True)
        tx = torch.from_numpy(x).requires_grad_(True)
        tg = torch.from_numpy(grad_out)

        def torch_step():
            out, _ = net(tx)
            out[:, -1].backward(tg)
        runs["pytorch"] = torch_step
    for fn in runs.values():
        fn()
    best = interleaved_best(runs, args.rounds)
    for name, sec in best.items():
        print(f"{name:8s} {sec * 1000:7.2f} ms per batch (forward + backward, best of {args.rounds})")
    if "pytorch" in best:
        print(f"ratio dlcli/pytorch: {best['dlcli'] / best['pytorch']:.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
