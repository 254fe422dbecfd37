"""Forward+backward step time of a ViT-Tiny trunk for every connection variant against residual.

12 blocks of timm's Attention and Mlp (two branches per block), C = 192, 3 heads, 197 tokens,
batch 16, float32. Runs are interleaved (one step of each variant per round). Reported per variant:
the median step time; ``x residual``, the median over rounds of the step time divided by the residual
trunk's step in the same round (paired, so that the machine's slow drifts cancel), with its
quartiles; and the activation memory of a step (bytes autograd saves for backward, see
``kromhc_vision.memory``) with its ratio.

The row ``streams`` is a yardstick, not a variant: n streams carried with no coefficients at all
(``u = mean(X)``, ``X_next = X + y`` on every stream), i.e. the memory traffic of an unfused
n-stream connection with none of its maths. What a variant costs above that row is its projection,
its ``H_res`` and its mixing; what ``streams`` costs above residual is the price of n streams in eager PyTorch.

``--recompute`` runs the connections inside :func:`kromhc_vision.recompute.session` (what a model's
``hc_recompute`` does): ``on`` picks ``L_r = round(sqrt(n L / (n + 2)))`` for the trunk's 24 connections.

    python benchmarks/bench_trunk_cpu.py [--streams 4] [--rounds 7] [--threads 2] [--variants hc kromhc]
                                         [--backend auto|numba|torch] [--recompute off|on|L_r]
"""
import argparse
import contextlib
import statistics
import time

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

import kromhc_vision as kv
from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc
from kromhc_vision.memory import saved_activation_bytes


class StreamsOnly(nn.Module):
    """n streams, no coefficients: ``u = mean_i X_i``, ``X_next = X + y`` on every stream."""

    def forward(self, X, branch):
        return X + branch(X.mean(-2)).unsqueeze(-2)


class Trunk(nn.Module):
    """``depth`` blocks; each block's attention and MLP branch wrapped by a connection."""

    def __init__(self, variant, num_streams, dim=192, depth=12, heads=3, backend=None):
        super().__init__()
        self.num_streams = num_streams
        self.branches = nn.ModuleList()
        self.conns = nn.ModuleList()
        for i in range(2 * depth):
            body = Attention(dim, heads, qkv_bias=True) if i % 2 == 0 else Mlp(dim, 4 * dim)
            self.branches.append(nn.Sequential(nn.LayerNorm(dim), body))
            self.conns.append(StreamsOnly() if variant == "streams" else
                              kv.build_connection(variant, num_streams, dim, layer_index=i, backend=backend))

    recompute_length = 0  # segment length of kromhc_vision.recompute (0: off)

    def forward(self, x):
        X = kv.expand_streams(x, self.num_streams)
        with kv.recompute.session(self.recompute_length) if self.recompute_length else contextlib.nullcontext():
            for conn, branch in zip(self.conns, self.branches):
                X = conn(X, branch)
        return kv.reduce_streams(X)


def step_time(model, x):
    start = time.perf_counter()
    model(x).square().mean().backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    hyper = [v for v in kv.CONNECTIONS if v != "residual"]
    parser.add_argument("--variants", nargs="+", choices=hyper, default=hyper, help="timed against residual")
    parser.add_argument("--backend", choices=["auto", "numba", "torch"], default="auto",
                        help="the connections' CPU path (auto: the numba kernels where numba imports)")
    parser.add_argument("--recompute", default="off", help="off, on (L_r from the depth) or an int L_r")
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="as train.py's (kromhc_vision.cpu_allocator)")
    args = parser.parse_args()
    configure_cpu_malloc(args.cpu_malloc, "cpu")
    value = {"off": False, "on": True}.get(args.recompute) if args.recompute in ("off", "on") else int(args.recompute)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants, refused = {}, {}
    for v in ["residual", "streams", *args.variants]:
        try:
            variants[v] = Trunk(v, 1 if v == "residual" else args.streams, backend=args.backend)
            if v not in ("residual", "streams"):
                variants[v].recompute_length = kv.recompute.segment_length(value, 24, args.streams)
        except ValueError as e:  # mHC-lite beyond n = 6
            refused[v] = str(e).split(".")[0]
    x = torch.randn(args.batch, 197, 192)
    times = {v: [] for v in variants}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for v, model in variants.items():
            model.zero_grad(set_to_none=True)
            t = step_time(model, x)
            if round_:
                times[v].append(t)
    saved = {v: saved_activation_bytes(model, x) for v, model in variants.items()}
    from bench_models_cpu import cpu_name
    print(f"ViT-Tiny trunk fwd+bwd, batch {args.batch}, n = {args.streams}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, backend {args.backend}, recompute {args.recompute}, "
          f"cpu malloc {args.cpu_malloc}; CPU: {cpu_name()}")
    print(f"{'variant':<10}{'ms/step':>10}{'x residual':>12}{'quartiles':>13}{'saved MiB':>11}{'x residual':>12}")
    for v, ts in times.items():
        ratios = sorted(t / r for t, r in zip(ts, times["residual"]))  # paired: same round, so slow drifts cancel
        quartiles = f"{ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f}"
        print(f"{v:<10}{statistics.median(ts) * 1e3:>10.1f}{statistics.median(ratios):>12.2f}{quartiles:>13}"
              f"{saved[v] / 2**20:>11.1f}{saved[v] / saved['residual']:>12.2f}")
    for v, why in refused.items():
        print(f"{v:<10}refused: {why}")


if __name__ == "__main__":
    main()
