"""Timing and reporting shared by the kernel benchmarks (``bench_stream_pre.py`` etc.).

Each benchmark times one op's forward and backward for three implementations: the Triton kernel,
the PyTorch reference (eager) and ``torch.compile`` of the reference. It reports the Triton time,
the achieved bandwidth against the op's memory-traffic floor (the bytes it must move at least),
``x floor`` = Triton time / (floor bytes / measured device-copy bandwidth), and the speedups.
Before timing, the Triton values and gradients are checked against the reference.

On CUDA timings use ``triton.testing.do_bench`` (median). Without a GPU the kernels run in
Triton's interpreter (imported after ``TRITON_INTERPRET=1`` is set here), on tiny shapes, as a
correctness smoke run: those timings are meaningless.
"""
import os
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kromhc_vision.kernels)
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

torch._dynamo.config.recompile_limit = 256  # one compiled graph per benchmarked shape
torch._functorch.config.donated_buffer = False  # the compiled reference's backward is timed with retain_graph


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` on CUDA, three timed calls after a warm-up on CPU."""
    if GPU:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[1]


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical memory-bandwidth ceiling."""
    numel = (1 << 28) if GPU else (1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _forward_backward(op, inputs, args, cotangents=None):
    """``(forward closure, backward closure, outputs, gradients)`` of ``op`` at ``inputs``."""
    leaves = [t for t in inputs if t.requires_grad]
    outputs = _as_tuple(op(*inputs, *args))
    cotangents = cotangents or [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True)
    return (lambda: op(*inputs, *args),
            lambda: torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True),
            outputs, grads, cotangents)


def _check(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        tol = 2e-2 if e.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{what} {i}: {m}")


def run(title: str, cases, op, reference, bandwidth: float):
    """Time and print each case: ``(label, inputs, args, floor_fwd_bytes, floor_bwd_bytes)``."""
    compiled = torch.compile(reference)
    print(f"\n{title}  (device {DEVICE}, copy bandwidth {bandwidth / 1e9:.0f} GB/s)")
    if not GPU:
        print("NOTE: no GPU, kernels run in Triton's CPU interpreter: timings below are meaningless (smoke run).")
    print(f"{'shape':<36}{'pass':<5}{'triton ms':>11}{'GB/s':>9}{'x floor':>11}{'vs eager':>10}{'vs compile':>11}")
    for label, inputs, args, floor_fwd, floor_bwd in cases:
        fwd, bwd, outputs, grads, cot = _forward_backward(op, inputs, args)
        ref_fwd, ref_bwd, ref_outputs, ref_grads, _ = _forward_backward(reference, inputs, args, cot)
        comp_fwd, comp_bwd, *_ = _forward_backward(compiled, inputs, args, cot)
        _check(outputs, ref_outputs, f"{label}: output")
        _check(grads, ref_grads, f"{label}: gradient")
        for name, floor, impls in (("fwd", floor_fwd, (fwd, ref_fwd, comp_fwd)),
                                   ("bwd", floor_bwd, (bwd, ref_bwd, comp_bwd))):
            ms, ref_ms, comp_ms = (bench_ms(f) for f in impls)
            print(f"{label:<36}{name:<5}{ms:>11.4f}{floor / ms / 1e6:>9.1f}{ms / (1e3 * floor / bandwidth):>11.3g}"
                  f"{ref_ms / ms:>10.2f}{comp_ms / ms:>11.2f}")


def shapes(kind: str):
    """``(family, tokens, C)``: ViT-S/B/L-ish (197 tokens per image) and the four ConvNeXt stages at 224 px."""
    if not GPU:
        return [("tiny", 6, 40), ("tiny", 17, 72)]
    vit = [("vit", 64 * 197, c) for c in (192, 384, 768, 1024)]
    convnext = [("convnext", 64 * s * s, c) for s, c in ((56, 96), (28, 192), (14, 384), (7, 768), (7, 1024))]
    return {"vit": vit, "convnext": convnext, "all": vit + convnext}[kind]


def base_parser(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--streams", "-n", type=int, nargs="+", default=[4])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stream dtype (coefficients fp32)")
    parser.add_argument("--shapes", choices=("vit", "convnext", "all"), default="all", help="ignored without a GPU")
    return parser
