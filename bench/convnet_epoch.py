"""The book's MNIST convnet (Conv2D 32 -> MaxPool -> Conv2D 64 -> MaxPool -> Conv2D 64 -> Flatten -> Dense 64 ->
Dense 10, RMSprop, batch 64): seconds per training epoch in dlcli and in PyTorch CPU (2 threads), in one run.

    DLCLI_DATA_DIR=../shared/datasets python bench/convnet_epoch.py [--batches 40] [--rounds 3] [--memory]

The epoch time is extrapolated: each peer trains `--batches` batches per round (forward, backward, optimizer
step), rounds alternate between peers, the best round counts, and that is scaled to 60,000 / 64 = 938 batches.
`--memory` also trains one real epoch on all 60,000 images through the CLI in a child process and reports its
peak resident memory (target: under 2 GiB).
"""
import argparse
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(__file__))
from common import child_peak_rss_mib, interleaved_rounds, mnist_train, report_ratio, torch_or_none  # noqa: E402

BATCH = 64
EPOCH_BATCHES = -(-60000 // BATCH)


def dlcli_runner(x, y, batch=BATCH):
    from dlcli.builder import build_model
    from dlcli.config import load_config

    model = build_model(load_config("configs/mnist_cnn.yaml").to_dict())

    def run():
        for i in range(0, len(x), batch):
            model.train_step([x[i:i + batch]], [y[i:i + batch]])
    return run


def torch_net(torch):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(576, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def torch_runner(torch, x, y, batch=BATCH):
    nn = torch.nn
    net = torch_net(torch)
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)  # Keras' RMSprop defaults
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # PyTorch is channels-first
    ty = torch.from_numpy(y)

    def run():
        for i in range(0, len(tx), batch):
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(net(tx[i:i + batch]), ty[i:i + batch])
            loss.backward()
            opt.step()
    return run


def runners_for(x, y, batch=BATCH) -> dict:
    """{peer: one pass of training steps over x, y}; PyTorch only when installed."""
    runs = {"dlcli": dlcli_runner(x, y, batch)}
    torch = torch_or_none()
    if torch is not None:
        runs["pytorch"] = torch_runner(torch, x, y, batch)
    return runs


def runners(batches=40) -> dict:
    return runners_for(*mnist_train((28, 28, 1), limit=batches * BATCH))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    runs = runners(args.batches)
    for fn in runs.values():  # warm-up
        fn()
    times = interleaved_rounds(runs, args.rounds)
    best = {name: min(t) for name, t in times.items()}
    for name, sec in best.items():
        print(f"{name:8s} {sec / args.batches * 1000:7.1f} ms/batch  -> {sec / args.batches * EPOCH_BATCHES:6.1f} "
              f"s/epoch (extrapolated from {args.batches} batches x best of {args.rounds} rounds)")
    report_ratio(best, "<= 0.8x", times)
    if args.memory:
        with tempfile.TemporaryDirectory() as runs_dir:
            code, mib = child_peak_rss_mib([sys.executable, "-m", "dlcli.cli", "train", "configs/mnist_cnn.yaml",
                                            "--set", "train.epochs=1", "--runs-dir", runs_dir, "--quiet"])
        print(f"peak resident memory, one epoch on all 60,000 images: {mib:,.0f} MiB (target < 2048 MiB)"
              + ("" if code == 0 else f"  [the run failed: exit {code}]"))


if __name__ == "__main__":
    main()
