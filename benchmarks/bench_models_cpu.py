"""Whole timm models with every connection variant against timm's residual model: memory and step time,
with and without ``hc_recompute``.

Models: ``vit_tiny_patch16_224_<variant>`` against timm's ``vit_tiny_patch16_224``,
``convnext_atto_<variant>`` against timm's ``convnext_atto``, and (``micro``) the digits configs' model,
``vit_micro_patch4_32_<variant>`` at 16 px with 10 classes, against timm's VisionTransformer of the same shape
(``vit_tiny_patch16_224`` with ``patch_size=4, embed_dim=64, depth=6, num_heads=4``), where a connection's
fixed cost per call shows (17 tokens of width 64 per image); float32, training mode, default init.
Reported per variant and ``hc_recompute`` setting (``off`` = False, ``on`` = the default True):

- ``saved``: bytes autograd keeps at the end of the forward pass (unique storages, parameters excluded;
  :func:`kromhc_vision.memory.saved_activation_bytes`), over the residual model's;
- ``peak``: the largest total of live tensor storage during the backward pass, recomputed tensors,
  gradients and temporaries included (:func:`kromhc_vision.memory.peak_step_bytes`; on CUDA the allocator's
  ``max_memory_allocated`` over the step), over the residual model's;
- ``step``: forward + backward time (median over interleaved rounds of the paired ratio to the residual
  step in the same round, quartiles beside it; the ``ms`` column is the median time);
- ``rc cost``: the paired ratio of the step with recompute to the step without (same round);
- ``infer``: inference images/s (eval mode, no grad) over the residual model's;
- ``MAC x res``: the forward pass's multiply-adds over the residual model's (machine-independent, the same for
  both settings): timm's ops as ``torch.utils.flop_counter`` counts them (the branches, the same in both models),
  plus the connections' projections, ``tokens x nC x (2n + m)`` each (inside the kernels, which it cannot see;
  the backward does twice that of both). Roughly the floor of the step ratio, for kernels that ran the projections
  as fast as the branches' GEMMs run: at ViT-Micro's width (C = 64) they are a large part of the arithmetic.

    python benchmarks/bench_models_cpu.py [--models vit convnext micro] [--streams 4 8] [--rounds 5] [--batch 16]
        [--variants hc mhc mhclite kromhc] [--threads 2] [--cpu-malloc retain|default] [--no-time] [--write-section]

``--cpu-malloc`` is train.py's setting (default ``retain``: glibc keeps freed activation memory for the next
step, :mod:`kromhc_vision.cpu_allocator`; hyper-connected models page-fault more without it).
``--write-section`` writes the printed table into BENCHMARKS.md's ``bench_models`` section, with the
command, the commit and the CPU.
"""
import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import timm
import torch

import kromhc_vision as kv
from kromhc_vision.cli.sections import write_command_section
from kromhc_vision.cpu_allocator import CPU_MALLOC_CHOICES, configure_cpu_malloc
from kromhc_vision.memory import peak_step_bytes, saved_activation_bytes

ROOT = Path(__file__).resolve().parents[1]
_MICRO = dict(img_size=16, num_classes=10)
# family -> (hyper-connected model's base name, its kwargs, timm's residual model, its kwargs, image size)
BASES = {
    "vit": ("vit_tiny_patch16_224", {}, "vit_tiny_patch16_224", {}, 224),
    "convnext": ("convnext_atto", {}, "convnext_atto", {}, 224),
    "micro": ("vit_micro_patch4_32", _MICRO, "vit_tiny_patch16_224",
              dict(_MICRO, patch_size=4, embed_dim=64, depth=6, num_heads=4), 16),
}


def cpu_name() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo`` if lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def numba_vectors() -> str:
    """The vector width the numba stream kernels ask LLVM for (``KROMHC_NUMBA_VECTOR_WIDTH``), as headers print it."""
    from kromhc_vision.ops.numba._common import vector_width
    bits = vector_width()
    return f"{bits}-bit" if bits else "LLVM's choice"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "kromhc_vision"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (kromhc_vision modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add_pair_arguments(parser, steps: int) -> None:
    """The options of the scripts that study one pair of :data:`BASES` (``profile_step_cpu.py``,
    ``time_ops_in_model.py``): ``--model --variant --streams --steps --batch --threads --cpu-malloc``."""
    parser.add_argument("--model", choices=list(BASES), default="vit")
    parser.add_argument("--variant", choices=[v for v in kv.CONNECTIONS if v != "residual"], default="kromhc")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="train.py's allocator setting (kromhc_vision.cpu_allocator)")


def build_pair(parser, args, positive=(), **hyper_kwargs):
    """Check the options of :func:`add_pair_arguments` (and those named in ``positive``) are >= 1, set the threads
    and the allocator, and build the pair in training mode: ``(hyper, residual, images, title)``, the title
    naming both models, the batch and the steps."""
    for name in ("streams", "steps", "batch", "threads", *positive):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    base, kwargs, residual_name, residual_kwargs, size = BASES[args.model]
    torch.set_num_threads(args.threads)
    configure_cpu_malloc(args.cpu_malloc, "cpu")
    hyper = timm.create_model(f"{base}_{args.variant}", num_streams=args.streams, **kwargs, **hyper_kwargs).train()
    residual = timm.create_model(residual_name, **residual_kwargs).train()
    overrides = "".join(f", {k}={v}" for k, v in residual_kwargs.items())
    settings = "".join(f", {k} {v}" for k, v in hyper_kwargs.items())
    title = (f"{base}_{args.variant} (n = {args.streams}{settings}) vs {residual_name}{overrides}, "
             f"batch {args.batch}, {args.steps} steps")
    return hyper, residual, torch.randn(args.batch, 3, size, size), title


def seconds_per_call(fn, calls: int) -> float:
    """Mean wall-clock seconds of ``fn()`` over ``calls`` calls in a row (the small-op benchmarks' timer)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def loss_of(out):
    return out.float().square().mean()


def step(model, x):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss_of(model(x)).backward()
    return time.perf_counter() - start


@torch.no_grad()
def infer(model, x):
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def memory(model, x):
    """``(saved, peak)`` bytes of one training step."""
    model.train()
    saved = saved_activation_bytes(model, x)
    if x.device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_of(model(x)).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    else:
        peak = peak_step_bytes(model, x, loss=loss_of)[1]
    return saved, peak


def forward_macs(model, x):
    """Multiply-adds of one forward pass of ``model`` on ``x``: ``torch.utils.flop_counter``'s count of its
    PyTorch ops (GEMMs, convolutions, attention) plus, for each hyper-connection, its projection ``X W_g``
    (``tokens x nC x (2n + m)``) where the numba or Triton kernels run it, unseen by the counter (PyTorch's
    backend runs it as a GEMM, which the counter counts). Eval mode, no grad; the model's mode is restored."""
    from torch.utils.flop_counter import FlopCounterMode

    from kromhc_vision.ops import dispatch

    projection = []

    def count(conn, args):
        X = args[0]
        nC, k = conn.proj_weight.shape
        if dispatch.backend_for(conn.backend, X.device, "stream_pre", conn.num_streams, k) != "torch":
            projection.append(X[..., 0, 0].numel() * nC * k)

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, kv.HyperConnection)]
    training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return counter.get_total_flops() // 2 + sum(projection)


def quart(ratios):
    ratios = sorted(ratios)
    return f"{ratios[len(ratios) // 4]:.2f}-{ratios[(3 * len(ratios)) // 4]:.2f}"


def run_family(family, n, args, device, lines):
    base, kwargs, residual, residual_kwargs, size = BASES[family]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, device=device)
    models = {"residual": timm.create_model(residual, **residual_kwargs).to(device)}
    refused = {}
    for v in args.variants:
        try:
            models[v] = timm.create_model(f"{base}_{v}", num_streams=n, **kwargs).to(device)
        except ValueError as e:  # mHC-lite beyond n = 6
            refused[v] = str(e).split(";")[0]
    macs = {v: forward_macs(model, x) for v, model in models.items()}
    mem = {("residual", "-"): memory(models["residual"], x)}
    for v in models:
        if v != "residual":
            for setting in ("off", "on"):
                models[v].set_hc_recompute(setting == "on")
                mem[(v, setting)] = memory(models[v], x)
    times = {key: [] for key in mem}
    inference = {v: [] for v in models}
    if not args.no_time:
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for (v, setting) in times:
                model = models[v].train()
                if v != "residual":
                    model.set_hc_recompute(setting == "on")
                t = step(model, x)
                if round_:
                    times[(v, setting)].append(t)
            for v, model in models.items():
                t = infer(model.eval(), x)
                if round_:
                    inference[v].append(t)
    res_saved, res_peak = mem[("residual", "-")]
    default = kv.models._hc_common.DEFAULT_HC_RECOMPUTE
    spelled = "".join(f", {k}={v}" for k, v in residual_kwargs.items())
    lines.append(f"{base}_<variant> vs timm's {residual}{spelled}, n = {n}, batch {args.batch}, {size}px, float32, "
                 f"{device}; "
                 f"recompute on = hc_recompute=True (the default is {default}); L_r = "
                 f"{next((m.hc_recompute_length for v, m in models.items() if v != 'residual'), '-')}")
    head = (f"{'variant':<10}{'recompute':>10}{'saved MiB':>10}{'x res':>7}{'peak MiB':>10}{'x res':>7}"
            f"{'MAC x res':>10}")
    if not args.no_time:
        head += f"{'ms/step':>9}{'x res':>7}{'quartiles':>11}{'rc cost':>9}{'infer img/s':>12}{'x res':>7}"
    lines.append(head)
    for (v, setting), (saved, peak) in mem.items():
        row = (f"{v:<10}{setting:>10}{saved / 2**20:>10.1f}{saved / res_saved:>7.2f}{peak / 2**20:>10.1f}"
               f"{peak / res_peak:>7.2f}{macs[v] / macs['residual']:>10.3f}")
        if not args.no_time:
            ts = times[(v, setting)]
            ratios = [t / r for t, r in zip(ts, times[("residual", "-")])]
            cost = "-"
            if setting == "on":
                cost = f"{statistics.median(a / b for a, b in zip(ts, times[(v, 'off')])):.3f}"
            ips = args.batch / statistics.median(inference[v])
            ips_res = args.batch / statistics.median(inference["residual"])
            infer_cols = f"{ips:>12.1f}{ips / ips_res:>7.2f}" if setting != "on" else f"{'':>12}{'':>7}"
            row += (f"{statistics.median(ts) * 1e3:>9.0f}{statistics.median(ratios):>7.2f}{quart(ratios):>11}"
                    f"{cost:>9}{infer_cols}")
        lines.append(row)
    for v, why in refused.items():
        lines.append(f"{v:<10}refused: {why}")
    lines.append("")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(BASES), default=list(BASES))
    parser.add_argument("--streams", nargs="+", type=int, default=[4, 8])
    hyper = [v for v in kv.CONNECTIONS if v != "residual"]
    parser.add_argument("--variants", nargs="+", choices=hyper, default=hyper)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-malloc", choices=CPU_MALLOC_CHOICES, default="retain",
                        help="as train.py's (kromhc_vision.cpu_allocator); 'default' writes the section "
                             "bench_models_malloc_default")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--write-section", action="store_true", help="write BENCHMARKS.md's bench_models section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    retained = configure_cpu_malloc(args.cpu_malloc, device)
    lines = [f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; "
             f"commit {commit()}; cpu malloc: {'retain' if retained else 'default'}; numba vectors: {numba_vectors()}",
             ""]
    print("\n".join(lines), flush=True)
    for family in args.models:
        for n in args.streams:
            start = len(lines)
            run_family(family, n, args, device, lines)
            print("\n".join(lines[start:]), flush=True)
    if args.write_section:
        name, title = "bench_models", "Whole models: memory and step time with and without `hc_recompute`"
        if args.cpu_malloc == "default":
            name, title = name + "_malloc_default", title + ", glibc's malloc left as it is"
        write_command_section(ROOT / "BENCHMARKS.md", name, title,
                              "benchmarks/bench_models_cpu.py", argv, lines)


if __name__ == "__main__":
    main()
