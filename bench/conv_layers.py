"""Per-layer times of one training step, dlcli against PyTorch CPU (2 threads), for the book convnet or the
resnet config: each layer's forward and backward and the optimizer update, timed inside whole training steps that
alternate between the peers, the best of `--steps` steps per layer.

    DLCLI_DATA_DIR=../shared/datasets python bench/conv_layers.py convnet|resnet [--steps 20] [--batch 64]
        [--threads 2] [--cpu | --main]

`--cpu` times each layer in process CPU seconds instead of wall seconds; with `--threads 1` (both peers on one
thread) that is the work each layer does, which a machine shared with other jobs does not inflate as it does
wall times (there two threads wait for each other's turn on a core). `--main` times the calling thread's CPU
alone: with 2 threads, a layer whose work is split evenly shows about half its `--cpu` time, one left on the
calling thread all of it (the critical path on a shared machine, where wall times wait for a core).

PyTorch's layers are timed with module hooks (forward pre/post, full backward pre/post), so a torch layer's backward
includes autograd's bookkeeping between its hooks; its convolutions are split into Conv2d and the ReLU or
BatchNorm2d after it where dlcli fuses them (the book convnet's Conv2D carries its relu).

Each peer's whole step also counts the process's minor page faults and system CPU (getrusage), medians printed
apart: memory the allocator hands back to the kernel and takes again faults on every touch.
"""
import argparse
import os
import resource
import sys
import time
from collections import defaultdict

from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(__file__))
import convnet_epoch  # noqa: E402
import resnet_epoch  # noqa: E402
from common import IDLE_SECONDS, config_model, keras_rmsprop, mnist_train, torch_or_none  # noqa: E402

clock = time.perf_counter  # --cpu: time.process_time


def dlcli_step_timer(config, x, y):
    """(one timed train_step, {layer name: [forward s, backward s]} of the last step)."""
    model = config_model(config)
    last = defaultdict(lambda: [0.0, 0.0])

    def wrap(layer):
        forward, backward = layer.forward, layer.backward

        def timed_forward(*a, **k):
            start = clock()
            out = forward(*a, **k)
            last[layer.name][0] = clock() - start
            return out

        def timed_backward(*a, **k):
            start = clock()
            out = backward(*a, **k)
            last[layer.name][1] = clock() - start
            return out
        layer.forward, layer.backward = timed_forward, timed_backward

    for layer in model.layers:
        wrap(layer)
    apply = model.optimizer.apply

    def timed_apply(params):
        start = clock()
        apply(params)
        last["optimizer"][0] = clock() - start
    model.optimizer.apply = timed_apply

    def step():
        last.clear()
        start, usage = clock(), resource.getrusage(resource.RUSAGE_SELF)
        model.train_step([x], [y])
        last["step"][0] = clock() - start
        return dict(last), kernel_use(usage)
    return step


def kernel_use(before):
    """(minor page faults, system CPU seconds) of the process since getrusage gave `before`."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return now.ru_minflt - before.ru_minflt, now.ru_stime - before.ru_stime


def torch_step_timer(torch, net, opt, x, y):
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = torch.from_numpy(y)
    last = defaultdict(lambda: [0.0, 0.0])
    marks = {}
    names = {}
    for name, module in net.named_modules():
        if list(module.children()) or isinstance(module, torch.nn.Identity):
            continue
        key = f"{name}:{type(module).__name__}"
        names[module] = key
        module.register_forward_pre_hook(lambda m, i: marks.__setitem__((m, "f"), clock()))
        module.register_forward_hook(
            lambda m, i, o: last[names[m]].__setitem__(0, clock() - marks[(m, "f")]))
        module.register_full_backward_pre_hook(lambda m, g: marks.__setitem__((m, "b"), clock()))
        module.register_full_backward_hook(
            lambda m, gi, go: last[names[m]].__setitem__(1, clock() - marks[(m, "b")]))

    def step():
        last.clear()
        net.train()
        start, usage = clock(), resource.getrusage(resource.RUSAGE_SELF)
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(net(tx), ty)
        loss.backward()
        t = clock()
        opt.step()
        last["optimizer"][0] = clock() - t
        last["step"][0] = clock() - start
        return dict(last), kernel_use(usage)
    return step


def best_of(records):
    """Per name, the least forward and the least backward over steps."""
    out = {}
    for record in records:
        for name, (f, b) in record.items():
            old = out.get(name, (f, b))
            out[name] = (min(old[0], f), min(old[1], b))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("net", choices=("convnet", "resnet"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    clocks = parser.add_mutually_exclusive_group()
    clocks.add_argument("--cpu", action="store_true")
    clocks.add_argument("--main", action="store_true")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu else time.thread_time if args.main else time.perf_counter
    torch = torch_or_none()
    torch.set_num_threads(args.threads)
    if args.net == "convnet":
        x, y = mnist_train((28, 28, 1), limit=args.batch)
        config, net = convnet_epoch.CONFIG, convnet_epoch.torch_net(torch)
        opt = keras_rmsprop(torch, net.parameters())
    else:
        x, y = mnist_train((28, 28, 1), limit=args.batch, kind="fashion_mnist")
        config, net = resnet_epoch.CONFIG, resnet_epoch.torch_net(torch)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    peers = {"dlcli": dlcli_step_timer(config, x, y), "pytorch": torch_step_timer(torch, net, opt, x, y)}
    records = {name: [] for name in peers}
    with threadpool_limits(args.threads, user_api="blas"):
        for name, step in peers.items():  # warm-up
            step()
        for _ in range(args.steps):
            for name, step in peers.items():
                time.sleep(IDLE_SECONDS)
                records[name].append(step())
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); best of {args.steps} alternating steps, "
          f"{'CPU' if args.cpu else 'main-thread CPU' if args.main else 'wall'} ms (forward / backward)")
    for name in peers:
        best = best_of(layer_times for layer_times, _ in records[name])
        faults, system = (sorted(column)[len(column) // 2] for column in zip(*(use for _, use in records[name])))
        print(f"--- {name} (a step's median: {faults} minor page faults, {system * 1e3:.2f} ms system CPU)")
        for layer, (f, b) in best.items():
            print(f"  {layer:28s} {f * 1e3:7.2f} / {b * 1e3:7.2f}")


if __name__ == "__main__":
    main()
