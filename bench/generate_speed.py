"""dlcli generate's key/value cache against PyTorch running the same weights with a cache: tokens per second, and the
time per token as the prompt grows (flat with a cache; dlcli without its cache, re-running the whole prefix per
token, for contrast).

The model is configs/imdb_gpt.yaml's architecture (token + position embedding 128, two post-norm
TransformerDecoder blocks of 4 heads and feed-forward 256, softmax over 2,048 tokens) with a context of --context
positions and seeded random weights (speed does not depend on training). Both peers decode one sequence greedily
(argmax: no sampling noise in the timing) on one thread, as dlcli generate does (batch-1 products are too small
to split), PyTorch in inference mode; their next-token probabilities are checked to agree within 1e-4 first.

    python bench/generate_speed.py [--context 512] [--tokens 32] [--rounds 3] [--prompts 16,64,128,256,448]
"""
import argparse
import os
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from common import torch_or_none  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dlcli_model(context: int):
    from dlcli.builder import build_model
    from dlcli.config import parse_config

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "imdb_gpt.yaml")))
    config["model"]["input_shape"] = [context]
    config["model"]["layers"][0]["sequence_length"] = context
    model = build_model(parse_config(yaml.safe_dump(config), "bench"))
    rng = np.random.default_rng(0)
    for p in model.weights:  # LayerNormalization's gamma and beta away from 1 and 0 too
        p.value = (p.value + rng.normal(0, 0.05, p.value.shape)).astype(np.float32)
    return model


class TorchDecoder:
    """The same network in PyTorch with a key/value cache: KerasHub's post-norm decoder block, x = norm(x +
    attention(x)), x = norm(x + feedforward(x)), then the softmax layer."""

    def __init__(self, torch, model, context: int):
        from dlcli.generation import decoder_layers

        self.torch, self.context = torch, context
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
        embedding, *blocks, dense = decoder_layers(model)
        self.tokens = t(embedding.token_embedding.embeddings.value)
        self.positions = t(embedding.position_embedding.embeddings.value)
        self.blocks = []
        for block in blocks:
            w = {k: v.value for k, v in block.params.items()}
            heads, key_dim = w["self_attention/query/kernel"].shape[1:]
            features = w["self_attention/query/kernel"].shape[0]
            qkv = np.concatenate([w[f"self_attention/{p}/kernel"].reshape(features, -1)
                                  for p in ("query", "key", "value")], 1)
            qkv_bias = np.concatenate([w[f"self_attention/{p}/bias"].reshape(-1) for p in ("query", "key", "value")])
            self.blocks.append({
                "heads": heads, "key_dim": key_dim, "qkv": t(qkv), "qkv_bias": t(qkv_bias),
                "out": t(w["self_attention/attention_output/kernel"].reshape(heads * key_dim, -1)),
                "out_bias": t(w["self_attention/attention_output/bias"]),
                "norm1": (t(w["self_attention_layer_norm/gamma"]), t(w["self_attention_layer_norm/beta"])),
                "ff1": t(w["feedforward_intermediate_dense/kernel"]),
                "ff1_bias": t(w["feedforward_intermediate_dense/bias"]),
                "ff2": t(w["feedforward_output_dense/kernel"]), "ff2_bias": t(w["feedforward_output_dense/bias"]),
                "norm2": (t(w["feedforward_layer_norm/gamma"]), t(w["feedforward_layer_norm/beta"])),
                "epsilon": block.layer_norm_epsilon})
        self.head, self.head_bias = t(dense.params["kernel"].value), t(dense.params["bias"].value)

    def reset(self):
        torch = self.torch
        self.length = 0
        self.caches = [(torch.zeros(1, b["heads"], self.context, b["key_dim"]),
                        torch.zeros(1, b["heads"], self.context, b["key_dim"])) for b in self.blocks]

    def feed(self, ids):
        torch, F = self.torch, self.torch.nn.functional
        n, start = ids.shape[1], self.length
        x = self.tokens[ids] + self.positions[start:start + n]
        for b, (keys, values) in zip(self.blocks, self.caches):
            h, d = b["heads"], b["key_dim"]
            q, k, v = (torch.addmm(b["qkv_bias"], x.reshape(n, -1), b["qkv"]).reshape(1, n, 3, h, d)
                       .permute(2, 0, 3, 1, 4))
            keys[:, :, start:start + n], values[:, :, start:start + n] = k, v
            scores = (q * d ** -0.5) @ keys[:, :, :start + n].transpose(-1, -2)
            if n > 1:
                future = torch.arange(start, start + n)[:, None] < torch.arange(start + n)[None, :]
                scores = scores.masked_fill(future, float("-inf"))
            context = (scores.softmax(-1) @ values[:, :, :start + n]).transpose(1, 2).reshape(n, h * d)
            x = F.layer_norm(x.reshape(n, -1) + torch.addmm(b["out_bias"], context, b["out"]), (x.shape[-1],),
                             *b["norm1"], b["epsilon"])
            ff = torch.addmm(b["ff2_bias"], torch.relu(torch.addmm(b["ff1_bias"], x, b["ff1"])), b["ff2"])
            x = F.layer_norm(x + ff, (x.shape[-1],), *b["norm2"], b["epsilon"]).reshape(1, n, -1)
        self.length += n
        return torch.softmax(torch.addmm(self.head_bias, x[:, -1], self.head), -1)


def greedy(feed, reset, prompt, tokens, argmax):
    """Seconds for the prompt pass and for `tokens` one-token steps after it."""
    reset()
    start = time.perf_counter()
    probs = feed(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        probs = feed(argmax(probs))
    return prefill, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", default="16,64,128,256,448")
    args = parser.parse_args()
    from dlcli.engine import blas
    from dlcli.generation import CachedDecoder

    model = dlcli_model(args.context)
    decoder = CachedDecoder(model, args.context)
    rng = np.random.default_rng(1)
    prompts = [int(p) for p in args.prompts.split(",")]
    if max(prompts) + args.tokens > args.context:
        sys.exit(f"bench: a prompt of {max(prompts)} + {args.tokens} tokens exceeds the context of {args.context}")
    peers = {"dlcli": (lambda ids: decoder.feed(ids), lambda: decoder.reset(1),
                       lambda p: np.asarray(p).argmax(-1)[:, None].astype(np.int32))}

    def uncached_feed(ids):  # the whole prefix through the ordinary forward, every token
        uncached.ids = ids if uncached.ids is None else np.concatenate([uncached.ids, ids], 1)
        return model.graph.forward([uncached.ids])[0][:, -1]

    uncached = type("Prefix", (), {"ids": None})
    peers["dlcli, no cache"] = (uncached_feed, lambda: setattr(uncached, "ids", None), peers["dlcli"][2])
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(1)
        torch_decoder = TorchDecoder(torch, model, args.context)
        ids = rng.integers(2, 2048, (1, 24)).astype(np.int32)
        decoder.reset(1)
        torch_decoder.reset()
        with torch.inference_mode():
            difference = np.abs(decoder.feed(ids) - torch_decoder.feed(torch.from_numpy(ids).long()).numpy()).max()
        print(f"dlcli and PyTorch next-token probabilities differ by at most {difference:.2g}")

        def torch_feed(ids):
            with torch.inference_mode():
                return torch_decoder.feed(torch.as_tensor(ids).long())
        peers["pytorch"] = (torch_feed, torch_decoder.reset, lambda p: p.argmax(-1, keepdim=True))
    print(f"time per generated token (ms) after a prompt of P tokens, {args.tokens} tokens, best of {args.rounds} "
          f"rounds alternating peers; context {args.context}")
    print(f"{'P':>5} " + " ".join(f"{name:>16}" for name in peers))
    per_token = {name: [] for name in peers}
    with blas.one_thread():
        for length in prompts:
            prompt = rng.integers(2, 2048, (1, length)).astype(np.int32)
            best = {name: float("inf") for name in peers}
            for _ in range(args.rounds):
                for name, (feed, reset, argmax) in peers.items():
                    time.sleep(0.3)
                    best[name] = min(best[name], greedy(feed, reset, prompt, args.tokens, argmax)[1] / args.tokens)
            for name in peers:
                per_token[name].append(best[name])
            print(f"{length:>5} " + " ".join(f"{best[name] * 1000:16.2f}" for name in peers))
    for name in peers:
        print(f"{name}: {1 / np.mean(per_token[name]):.0f} tokens/s (mean over the prompt lengths)")
    if "pytorch" in peers:
        print(f"tokens/s ratio dlcli/pytorch: {np.mean(per_token['pytorch']) / np.mean(per_token['dlcli']):.2f}x "
              f"(target >= 1.0x)")


if __name__ == "__main__":
    main()
