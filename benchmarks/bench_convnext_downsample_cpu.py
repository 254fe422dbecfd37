"""ConvNeXt's stage downsamples on the stream state: forward and backward time, with and without ``hc_recompute``.

A hyper-connected ConvNeXt runs each stage's downsample (norm and 2x2 stride-2 conv) on every stream, the streams
folded into the batch (``B n`` images, :func:`kromhc_vision.models.convnext_hc._stage_forward`). This times that
part alone, at ``convnext_atto``'s three downsamples (56 -> 28 -> 14 -> 7 px at 224 px), forward and backward
of the three together, ``off`` (plain autograd) and ``on`` (inside a recomputation session, where the
downsample is checkpointed and its backward runs the norm again), interleaved round by round, medians printed
with the paired ratio ``on / off``; it refuses to time unless both give the same gradients (inputs and
parameters) bitwise. The residual model's downsamples (``B`` images) are timed in the same rounds for scale.

    python benchmarks/bench_convnext_downsample_cpu.py [--rounds 12] [--batch 16] [--streams 4] [--threads 2]

Run from the checkout (or with another commit's package on ``PYTHONPATH`` for an A/B).
"""
import argparse
import statistics
import time
import types
from pathlib import Path

import timm
import torch
from torch import nn

import kromhc_vision  # noqa: F401  (registers the models)
from kromhc_vision import recompute
from kromhc_vision.models import convnext_hc
from bench_models_cpu import commit, cpu_name


def _holder(stage):
    """A stage with the downsample alone: :func:`_stage_forward` runs it, and no block."""
    return types.SimpleNamespace(downsample=stage.downsample, blocks=nn.Identity(), grad_checkpointing=False)


def _time(fn, inputs, grads, recompute_on: bool, params, got=None):
    """Seconds of ``fn`` over ``inputs`` forward (together), then backward (together), the gradients of
    ``params`` reset first (as ``zero_grad``); the inputs' and the parameters' gradients appended to ``got`` where
    given."""
    for p in params:
        p.grad = None
    xs = [x.detach().requires_grad_() for x in inputs]
    start = time.perf_counter()
    with recompute.session(1 if recompute_on else 0):
        outs = [fn(i, x) for i, x in enumerate(xs)]
    middle = time.perf_counter()
    torch.autograd.backward(outs, grads)
    end = time.perf_counter()
    if got is not None:
        got.extend([x.grad for x in xs] + [p.grad for p in params])
    return middle - start, end - middle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hyper = timm.create_model("convnext_atto_hc", num_streams=args.streams).train()
    residual = timm.create_model("convnext_atto").train()
    holders = [_holder(stage) for stage in hyper.stages[1:]]
    dims, sizes = (40, 80, 160), (56, 28, 14)
    B, n = args.batch, args.streams
    streams = [torch.randn(B, s, s, n, c) for c, s in zip(dims, sizes)]
    images = [torch.randn(B, c, s, s).contiguous(memory_format=torch.channels_last) for c, s in zip(dims, sizes)]

    def hyper_fn(i, x):
        return convnext_hc._stage_forward(holders[i], x)

    def residual_fn(i, x):
        return residual.stages[i + 1].downsample(x)

    stream_grads = [torch.randn_like(hyper_fn(i, x)) for i, x in enumerate(streams)]
    image_grads = [torch.randn_like(residual_fn(i, x)) for i, x in enumerate(images)]
    hyper_params = [p for h in holders for p in h.downsample.parameters()]
    residual_params = [p for stage in residual.stages[1:] for p in stage.downsample.parameters()]
    cases = {"off": (hyper_fn, streams, stream_grads, False, hyper_params),
             "on": (hyper_fn, streams, stream_grads, True, hyper_params),
             "residual": (residual_fn, images, image_grads, False, residual_params)}
    times = {name: [] for name in cases}
    warm = {name: [] for name in cases}
    for name, case in cases.items():  # warm-up, and the same gradients with recomputation as without
        _time(*case, warm[name])
    for i, (a, b) in enumerate(zip(warm["off"], warm["on"], strict=True)):
        if not torch.equal(a, b):
            what = f"input {i}" if i < len(streams) else f"parameter {i - len(streams)}"
            raise RuntimeError(f"the gradient of {what} with recomputation differs by {(a - b).abs().max().item():.3g}")
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            times[name].append(_time(*cases[name]))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; "
          f"commit {commit()}; package {Path(kromhc_vision.__file__).parent}")
    print(f"convnext_atto's three downsamples, batch {B}, n = {n}, float32; median of {args.rounds} interleaved rounds")
    print(f"{'case':>9} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9}")
    for name, rows in times.items():
        fwd, bwd = (statistics.median(r[k] for r in rows) * 1e3 for k in (0, 1))
        total = statistics.median(sum(r) for r in rows) * 1e3
        print(f"{name:>9} {fwd:8.2f} {bwd:8.2f} {total:9.2f}")
    ratios = [sum(a) / sum(b) for a, b in zip(times["on"], times["off"])]
    print(f"on / off (paired, median): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
