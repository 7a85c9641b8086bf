"""A TransformerEncoder training step against torch.nn.TransformerEncoderLayer with the same sizes: batch 32,
length 256, d_model 128, 4 heads, feed-forward 256, dropout 0.1, post-norm (KerasHub's and PyTorch's default),
ReLU; mean squared error to a fixed target, Adam. dlcli runs Model.train_step (forward, loss, backward, update);
PyTorch the same loop on 2 threads. Neither computes a gradient for the input.

    python bench/transformer_step.py [--rounds 5] [--batches 3] [--batch 32] [--length 256]

Each round trains `--batches` batches; rounds alternate between peers and the best round counts.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import compare, peers, report_ratio  # noqa: E402

D_MODEL, HEADS, FEEDFORWARD = 128, 4, 256


def data(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, length, D_MODEL)).astype(np.float32),
            rng.normal(size=(batch, length, D_MODEL)).astype(np.float32))


def dlcli_runner(x, y, batches):
    from dlcli import layers, models

    model = models.Sequential([layers.TransformerEncoder(FEEDFORWARD, HEADS, dropout=0.1,
                                                         input_shape=x.shape[1:])])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="adam", loss="mse")

    def run():
        for _ in range(batches):
            model.train_step([x], [y])
    return run


def torch_runner(torch, x, y, batches):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEEDFORWARD, dropout=0.1, batch_first=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, eps=1e-7)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def run():
        layer.train()
        for _ in range(batches):
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.mse_loss(layer(tx), ty)
            loss.backward()
            opt.step()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    x, y = data(args.batch, args.length)
    times, best = compare(peers(lambda: dlcli_runner(x, y, args.batches),
                                lambda t: torch_runner(t, x, y, args.batches)), args.rounds)
    for name, sec in best.items():
        print(f"{name:8s} {sec / args.batches * 1000:8.1f} ms per training step (TransformerEncoder d_model "
              f"{D_MODEL}, {HEADS} heads, feed-forward {FEEDFORWARD}, batch {args.batch} x length {args.length}, "
              f"best of {args.rounds} rounds of {args.batches})")
    report_ratio(best, "<= 1.0x", times)


if __name__ == "__main__":
    main()
