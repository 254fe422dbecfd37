"""Timing and reporting shared by the kernel benchmarks (``bench_stream_pre.py`` etc.).

Each benchmark times one op's forward and backward for three implementations: the kernel (Triton,
or with ``--backend numba`` the CPU kernel), the PyTorch reference (eager) and ``torch.compile`` of
the reference. It reports the kernel time, the achieved bandwidth against the op's memory-traffic
floor (the bytes it must move at least), ``x floor`` = kernel time / (floor bytes / measured
device-copy bandwidth), and the speedups. Before timing, the kernel's values and gradients are
checked against the reference.

Triton on CUDA: timings by ``triton.testing.do_bench`` (median). Triton without a GPU runs in
Triton's interpreter (imported after ``TRITON_INTERPRET=1`` is set here), on tiny shapes, as a
correctness smoke run: those timings are meaningless. numba: CPU tensors of the ViT-Tiny trunk's
size (batch 16), median of 15 calls after a warm-up.
"""
import os
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kromhc_vision.ops.triton)
DEVICE = torch.device("cuda" if GPU else "cpu")
BACKEND = "triton"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

torch._dynamo.config.recompile_limit = 256  # one compiled graph per benchmarked shape
torch._functorch.config.donated_buffer = False  # the compiled reference's backward is timed with retain_graph


def configure(backend: str):
    """Time the ``backend`` kernels (``triton`` or ``numba``); call before building the cases.

    On CPU, glibc's malloc is set as ``train.py`` sets it (``--cpu-malloc retain``): otherwise every output
    above the mmap threshold comes from fresh pages, and the timings measure page faults (ConvNeXt's 38 MB
    stream state: 7-10x the copy-bandwidth floor instead of the kernel's own cost)."""
    global BACKEND, DEVICE
    from kromhc_vision.cpu_allocator import configure_cpu_malloc

    BACKEND = backend
    DEVICE = torch.device("cpu") if backend == "numba" else DEVICE
    configure_cpu_malloc("retain", DEVICE)


def kernel(name: str):
    """The op ``name`` of the configured backend."""
    from kromhc_vision.ops import dispatch

    return getattr(dispatch.backend_module(BACKEND), name)


def _triton_on_gpu() -> bool:
    return BACKEND == "triton" and GPU


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` for Triton on CUDA, else timed calls after warm-up calls
    (one was not enough on CPU: a shape's first timings came out up to 1.8x slow)."""
    if _triton_on_gpu():
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(15 if BACKEND == "numba" else 3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical memory-bandwidth ceiling."""
    numel = (1 << 28) if DEVICE.type == "cuda" else (1 << 24)
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
    """Elementwise within ``tol`` relative, or ``tol`` of the tensor's largest entry absolute: the parameter
    gradients are sums over all T tokens, whose small entries carry the rounding of the large ones."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        tol = 2e-2 if e.dtype == torch.bfloat16 else 1e-4
        atol = tol * max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=tol, atol=atol, msg=lambda m: f"{what} {i}: {m}")


def run(title: str, cases, op, reference, bandwidth: float):
    """Time and print each case: ``(label, inputs, args, floor_fwd_bytes, floor_bwd_bytes)``."""
    compiled = torch.compile(reference)
    print(f"\n{title}  (device {DEVICE}, copy bandwidth {bandwidth / 1e9:.0f} GB/s)")
    if BACKEND == "triton" and not GPU:
        print("NOTE: no GPU, kernels run in Triton's CPU interpreter: timings below are meaningless (smoke run).")
    print(f"{'shape':<36}{'pass':<5}{BACKEND + ' ms':>11}{'GB/s':>9}{'x floor':>11}{'vs eager':>10}{'vs compile':>11}")
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
    """``(family, tokens, C)``: ViT-S/B/L-ish (197 tokens per image) and the four ConvNeXt stages at 224 px
    (batch 64) on CUDA; ViT-Tiny/Small and a ConvNeXt-T stage at batch 16 for numba; tiny ones in the interpreter."""
    if BACKEND == "numba":
        return [("vit", 16 * 197, 192), ("vit", 16 * 197, 384), ("convnext", 16 * 28 * 28, 192)]
    if not GPU:
        return [("tiny", 6, 40), ("tiny", 17, 72)]
    vit = [("vit", 64 * 197, c) for c in (192, 384, 768, 1024)]
    convnext = [("convnext", 64 * s * s, c) for s, c in ((56, 96), (28, 192), (14, 384), (7, 768), (7, 1024))]
    return {"vit": vit, "convnext": convnext, "all": vit + convnext}[kind]


def base_parser(description: str, backends=("triton", "numba")):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=backends, default="triton", help="whose kernels to time")
    parser.add_argument("--streams", "-n", type=int, nargs="+", default=[4])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stream dtype (coefficients fp32)")
    parser.add_argument("--shapes", choices=("vit", "convnext", "all"), default="all",
                        help="Triton on CUDA only")
    return parser
