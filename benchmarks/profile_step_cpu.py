"""Where a hyper-connected model's extra training-step time goes: a per-op profile diff against timm's residual model.

Profiles forward + backward steps of ``<base>_<variant>`` and of timm's residual ``<base>`` (the same pairs as
``bench_models_cpu.py``) with ``torch.profiler``, in one process, and prints per op (``--by shape``: per op and
input shapes) the self CPU time per step of each model and the difference, largest difference first. The
profiler slows every op, so its step times are not the benchmark's: read the differences, not the totals, and
time the step with ``bench_models_cpu.py``.

    python benchmarks/profile_step_cpu.py [--model vit|convnext|micro] [--variant kromhc] [--streams 4] [--steps 2]
        [--batch 16] [--by op|shape] [--top 25] [--threads 2] [--cpu-malloc retain|default]
"""
import argparse
import collections

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from bench_models_cpu import add_pair_arguments, build_pair, commit, cpu_name, loss_of


def self_ms_per_step(model, x, steps: int, by_shape: bool):
    """``{op key: self CPU ms per step}`` over ``steps`` profiled steps, after one warm-up step."""
    loss_of(model(x)).backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        for _ in range(steps):
            loss_of(model(x)).backward()
            model.zero_grad(set_to_none=True)
    times = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=by_shape):
        key = f"{event.key} {event.input_shapes}" if by_shape else event.key
        times[key] += event.self_cpu_time_total / 1e3 / steps
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(parser, steps=2)
    parser.add_argument("--by", choices=("op", "shape"), default="op")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    hyper, residual, x, title = build_pair(parser, args, positive=("top",))
    by_shape = args.by == "shape"
    times_res = self_ms_per_step(residual, x, args.steps, by_shape)
    times_hc = self_ms_per_step(hyper, x, args.steps, by_shape)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; "
          f"commit {commit()}; cpu malloc: {args.cpu_malloc}; profiled (op times inflated by the profiler)")
    print(f"{title}: self CPU ms per step")
    print(f"{'residual':>9} {args.variant:>9} {'diff':>8}  op")
    keys = sorted(set(times_res) | set(times_hc), key=lambda k: -(times_hc[k] - times_res[k]))
    for key in keys[:args.top]:
        print(f"{times_res[key]:9.1f} {times_hc[key]:9.1f} {times_hc[key] - times_res[key]:+8.1f}  {key[:110]}")
    total_res, total_hc = sum(times_res.values()), sum(times_hc.values())
    print(f"{total_res:9.1f} {total_hc:9.1f} {total_hc - total_res:+8.1f}  all ops (x {total_hc / total_res:.2f})")


if __name__ == "__main__":
    main()
