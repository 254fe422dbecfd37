"""``python -m kromhc_vision check-kernels``: compile every Triton kernel for real GPU targets, no GPU needed.

For each target architecture (``sm_80``, ``sm_90``, ...), each launch the models can make (variant, stream
count ``n``, width ``C`` from the model registry, stream and parameter dtypes, token count a multiple of 16
or not) and each autotune config that survives the kernels' own pruning for that architecture, the kernel
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (Triton's NVIDIA
pipeline down to a cubin, with the ``ptxas`` in the Triton wheel). Reported per kernel: shared memory
(Triton's dynamic allocation plus the cubin's static) against the architecture's opt-in limit per block,
registers per thread and the stack frame per thread (non-zero: ptxas spilled registers to local memory),
from the wheel's ``cuobjdump --dump-resource-usage``.

Fails (non-zero exit) when a compile raises, or when a launch has no surviving config that fits: that
launch would raise ``OutOfResources`` on such a GPU. Must run without ``TRITON_INTERPRET=1``.
"""
import concurrent.futures
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

# The opt-in shared memory per block (bytes), by compute capability: what a launch may use.
SHARED_LIMITS = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
QUICK_ARCHS = (80, 90)
FULL_ARCHS = (80, 90, 100)
STREAM_COUNTS = tuple(range(2, 9)) + (16,)
# KromHC's further stream counts up to 16, for permutation_mix alone: its tiles grow with the factorisation
# (n = 15: 3! x 5! = 720 combined permutations, 126 logits), not with the width.
MIXTURE_STREAM_COUNTS = (9, 10, 12, 15)
DTYPES = ("fp32", "bf16")
SINKHORN_ITERS = 20


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of one kernel: shapes, dtypes and where it comes from."""
    kernel: str
    n: int
    C: int
    K: int  # 2n + m coefficient columns (0 for kernels without a projection)
    x_dtype: str
    p_dtype: str
    t16: bool  # token count a multiple of 16 (Triton specialises integer arguments on it)
    variant: str
    arch: int


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel at fixed signature, constexprs, attributes, warps and stages, for one arch."""
    kernel: str
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...); tl dtypes as their names
    divisible: tuple  # names of arguments specialised as multiples of 16
    num_warps: int
    num_stages: int
    arch: int


@dataclasses.dataclass
class Result:
    shared: int = 0  # bytes per block: Triton's dynamic shared memory plus the cubin's static
    regs: int = 0  # registers per thread
    stack: int = 0  # stack frame bytes per thread (spilled registers)
    error: Optional[str] = None
    out_of_resources: bool = False


def triton_version() -> str:
    import triton
    return triton.__version__


def model_widths():
    """``{"vit": [...], "convnext": [...]}``: the stream widths C of the registered models."""
    from ...models import convnext_hc, vision_transformer_hc
    vit = sorted({a["embed_dim"] for a in vision_transformer_hc._BASE_ARGS.values()})
    convnext = sorted({d for a in convnext_hc._BASE_ARGS.values() for d in a["dims"]})
    return {"vit": vit, "convnext": convnext}


def variant_streams(stream_counts=STREAM_COUNTS):
    """``[(variant, n, m, ops)]`` for every hyper-connection variant and each ``n`` it accepts."""
    from ...connections import CONNECTIONS
    out = []
    for name, cls in CONNECTIONS.items():
        if name == "residual":
            continue
        for n in stream_counts:
            try:
                cls.check(n, backend="torch")
            except ValueError:
                continue
            out.append((name, n, cls.num_res_logits(n), tuple(cls.OPS)))
    return out


def _kernels():
    """The autotuned kernels by name (the package's ``stream_pre`` etc. are the ops, not the modules)."""
    import importlib
    mods = {m: importlib.import_module(f"{__package__}.{m}")
            for m in ("stream_pre", "stream_post", "sinkhorn", "permutation_mix")}
    return {
        "stream_pre_fwd": mods["stream_pre"]._stream_pre_fwd_kernel,
        "stream_pre_bwd": mods["stream_pre"]._stream_pre_bwd_kernel,
        "stream_pre_dw": mods["stream_pre"]._stream_pre_dw_kernel,
        "stream_post_fwd": mods["stream_post"]._stream_post_fwd_kernel,
        "stream_post_bwd": mods["stream_post"]._stream_post_bwd_kernel,
        "sinkhorn_fwd": mods["sinkhorn"]._sinkhorn_fwd_kernel,
        "sinkhorn_bwd": mods["sinkhorn"]._sinkhorn_bwd_kernel,
        "permutation_mix_fwd": mods["permutation_mix"]._permutation_mix_fwd_kernel,
        "permutation_mix_bwd": mods["permutation_mix"]._permutation_mix_bwd_kernel,
    }


OP_KERNELS = {"stream_pre": ("stream_pre_fwd", "stream_pre_bwd", "stream_pre_dw"),
              "stream_post": ("stream_post_fwd", "stream_post_bwd"), "sinkhorn": ("sinkhorn_fwd", "sinkhorn_bwd"),
              "permutation_mix": ("permutation_mix_fwd", "permutation_mix_bwd")}


def mixture_factors(variant: str, n: int) -> tuple:
    """The factor sizes of ``variant``'s ``permutation_mix`` at ``n`` streams (mHC-lite: one, of size n)."""
    from ...permutations import kronecker_factors
    return (n,) if variant == "mhclite" else kronecker_factors(n)


def launches(archs, widths, dtypes=DTYPES, t16=(True, False), stream_counts=STREAM_COUNTS):
    """Every kernel launch of every variant / n / width / dtype combination, deduplicated."""
    from ..dispatch import unsupported_reason
    from .permutation_mix import runs_kernel
    seen = set()
    for variant, n, m, ops in variant_streams(tuple(stream_counts) + MIXTURE_STREAM_COUNTS):
        for op in ops:
            if n in MIXTURE_STREAM_COUNTS and n not in stream_counts and op != "permutation_mix":
                continue
            if unsupported_reason("triton", op, n) is not None:
                continue
            if op == "permutation_mix" and not runs_kernel(mixture_factors(variant, n)):
                continue  # PyTorch's ops run these shapes
            for kernel, C, xd, pd, t, arch in itertools.product(OP_KERNELS[op], widths, dtypes, dtypes, t16, archs):
                K = {"stream_pre": 2 * n + m, "permutation_mix": m}.get(op, 0)
                C_ = 0 if op in ("sinkhorn", "permutation_mix") else C
                pd_ = pd if op == "stream_pre" else "fp32"  # coefficients are float32 whatever the params
                xd_ = "fp32" if op == "sinkhorn" else xd
                if op == "permutation_mix":  # logits are float32 (float64 in float64 models; half: taken in float32)
                    xd_ = "fp64" if xd == "bf16" else "fp32"
                factors = (mixture_factors(variant, n),) if op == "permutation_mix" else ()
                key = (kernel, n, C_, K, xd_, pd_, t, arch) + factors
                if key not in seen:
                    seen.add(key)
                    yield Launch(kernel, n, C_, K, xd_, pd_, t, variant, arch)


class _Fake:
    """What a pruner sees of a tensor argument: its dtype and device (the check's target limits)."""

    def __init__(self, dtype):
        self.dtype = dtype


def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "i32": torch.int32}[name]


def launch_args(launch: Launch):
    """``(signature, constexprs, divisible, tensor args)`` of ``launch``'s kernel, as its launcher passes them."""
    import triton
    import triton.language as tl
    from ._common import dot_precision
    import torch
    x, p, f = launch.x_dtype, launch.p_dtype, "fp32"
    n, C, K = launch.n, launch.C, launch.K
    KP = max(16, triton.next_power_of_2(K)) if K else 0
    NP = triton.next_power_of_2(n)
    prec = dot_precision(torch.float32)
    name = launch.kernel
    if name == "stream_pre_fwd":
        ptrs = dict(X=x, G=p, W=p, S=p, B=p, U=x, COEF=f)
        scalars = dict(T="i32", eps="fp32")
        const = dict(n=n, C=C, K=K, KP=KP, CD=tl.float32, PREC=prec)
    elif name == "stream_pre_bwd":
        ptrs = dict(X=x, G=p, W=p, S=p, B=p, DU=x, DCOEF=f, DX=x, DR=f, PART=f)
        scalars = dict(T="i32", eps="fp32")
        const = dict(n=n, C=C, K=K, KP=KP, CD=tl.float32, PREC=prec)
    elif name == "stream_pre_dw":
        ptrs = dict(X=x, DR=f, PART=f)
        scalars = dict(T="i32")
        const = dict(D=n * C, KP=KP, CD=tl.float32, PREC=prec)
    elif name == "stream_post_fwd":
        ptrs = dict(X=x, Y=x, H=f, HP=f, OUT=x)
        scalars = dict(T="i32")
        const = dict(n=n, C=C, NP=NP, CD=tl.float32)
    elif name == "stream_post_bwd":
        ptrs = dict(X=x, Y=x, H=f, HP=f, DZ=x, DX=x, DY=x, DH=f, DHP=f)
        scalars = dict(T="i32")
        const = dict(n=n, C=C, NP=NP, CD=tl.float32)
    elif name in ("sinkhorn_fwd", "sinkhorn_bwd"):
        ptrs = dict(LOGITS=f, OUT=f) if name == "sinkhorn_fwd" else dict(LOGITS=f, DOUT=f, DLOGITS=f)
        scalars = dict(T="i32", num_iters="i32")
        const = dict(n=n, NP=NP, BLOCK_T=max(1, 1024 // (NP * NP)))
    elif name in ("permutation_mix_fwd", "permutation_mix_bwd"):
        from .permutation_mix import padded_sizes
        ptrs = dict(LOGITS=f, IDX="i32", STARTS="i32", MIX="fp64")
        ptrs |= dict(OUT=f) if name == "permutation_mix_fwd" else dict(SEL="fp64", DOUT=f, DLOGITS=f)
        scalars = dict(T="i32")
        const = padded_sizes(mixture_factors(launch.variant, n))
    else:
        raise KeyError(name)
    signature = {k: "*" + v for k, v in ptrs.items()} | scalars
    divisible = tuple(ptrs) + (("T",) if launch.t16 else ())
    tensors = {k: _Fake(_torch_dtype(v)) for k, v in ptrs.items()}
    return signature, const, divisible, tensors


def surviving_configs(launch: Launch):
    """The autotune configs the kernel's own pruner keeps for ``launch`` on its architecture."""
    from ._common import target_limits
    kernel = _kernels()[launch.kernel]
    signature, const, _, tensors = launch_args(launch)
    configs = kernel.configs
    if kernel.early_config_prune is not None:
        with target_limits(SHARED_LIMITS[launch.arch]):
            configs = kernel.early_config_prune(configs, dict(tensors), **const)
    return configs


def jobs_for(launch: Launch):
    signature, const, divisible, _ = launch_args(launch)
    out = []
    for cfg in surviving_configs(launch):
        allc = {**const, **cfg.kwargs}
        sig = tuple(signature.items()) + tuple((k, "constexpr") for k in allc)
        constexprs = tuple((k, str(v) if not isinstance(v, (int, str)) else v) for k, v in allc.items())
        out.append(Job(launch.kernel, sig, constexprs, divisible, cfg.num_warps, cfg.num_stages, launch.arch))
    return out


_TOOLS = {}


def _cuobjdump():
    if "cuobjdump" not in _TOOLS:
        import triton
        _TOOLS["cuobjdump"] = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return _TOOLS["cuobjdump"]


def _constexpr_value(v):
    import triton.language as tl
    if isinstance(v, str) and v in ("fp32", "fp64", "bf16", "fp16"):
        return {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}[v]
    return v


def compile_job(job: Job) -> Result:
    """Compile ``job`` for its architecture and read the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.errors import OutOfResources
    fn = _kernels()[job.kernel].fn
    signature = dict(job.signature)
    constexprs = {k: _constexpr_value(v) for k, v in job.constexprs}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job.divisible}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    except OutOfResources as e:
        return Result(error=f"{type(e).__name__}: {e}", out_of_resources=True)
    except Exception as e:  # a compile error in Triton, LLVM or ptxas
        msg = str(e).strip().splitlines()
        return Result(error=f"{type(e).__name__}: {msg[0] if msg else ''}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        return Result(error=f"cuobjdump gave no resource usage: {usage.strip()[:200]}")
    regs, stack, static_shared, local = map(int, m.groups())
    return Result(shared=compiled.metadata.shared + static_shared, regs=regs, stack=stack + local)


def _describe(job: Job) -> str:
    c = dict(job.constexprs)
    blocks = ",".join(f"{k}={c[k]}" for k in c if k.startswith("BLOCK_"))
    return f"{blocks} w{job.num_warps} s{job.num_stages}"


def _shape(launch: Launch) -> str:
    s = f"n={launch.n}"
    if launch.C:
        s += f" C={launch.C}"
    if launch.K:
        s += f" K={launch.K}"
    return s + f" X={launch.x_dtype} P={launch.p_dtype} T%16{'=' if launch.t16 else '!'}=0"


# Shapes where spills must not happen: ViT-B (C = 768) and ConvNeXt-T (C = 96 ... 768), n <= 8.
NO_SPILL_WIDTHS = (96, 192, 384, 768)
# Above these padded K the pre kernels keep (BLOCK_T, KP) float32 accumulators (three in the backward) that no
# tile size fits in 255 registers: they launch, but spill (kilobytes per thread at K = 732).
SPILL_FREE_KP = {"stream_pre_fwd": 256, "stream_pre_bwd": 128, "stream_pre_dw": 256}
SMALL_FRAME = 16  # bytes per thread: a value or two in local memory


def spill_reason(launch: Launch, result: Result):
    """Why a config's stack frame is known and accepted, or None for a spill the pruner should have avoided."""
    import triton
    kp = max(16, triton.next_power_of_2(launch.K)) if launch.K else 0
    if launch.kernel in SPILL_FREE_KP and kp > SPILL_FREE_KP[launch.kernel]:
        return (f"K = {launch.K} pads to {kp} > {SPILL_FREE_KP[launch.kernel]} columns: the per-token "
                "accumulators exceed the register file at any tile; PyTorch's stream_pre is the better choice")
    if result.stack <= SMALL_FRAME:
        return f"a frame of at most {SMALL_FRAME} B"
    return None


def run_check(launch_list, jobs=1, out=sys.stdout, verbose=False, json_path=None):
    """Compile every job of ``launch_list``; print the report (and write every compile's figures to
    ``json_path``, if given); return the number of failures."""
    per_launch = {la: jobs_for(la) for la in launch_list}
    unique = sorted({j for js in per_launch.values() for j in js}, key=lambda j: (j.arch, j.kernel, str(j)))
    print(f"Triton {triton_version()}: {len(launch_list)} launches, {len(unique)} distinct compiles, "
          f"{jobs} worker(s)", file=out, flush=True)
    results = {}
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=_mp_context()) as pool:
            for job, res in zip(unique, pool.map(compile_job, unique, chunksize=4)):
                results[job] = res
    else:
        for job in unique:
            results[job] = compile_job(job)
    if json_path:
        import json
        rows = [dict(launch=dataclasses.asdict(la), config=_describe(j), **dataclasses.asdict(results[j]))
                for la, js in per_launch.items() for j in js]
        with open(json_path, "w") as f:
            json.dump(dict(triton=triton_version(), compiles=rows), f, indent=0)
    return report(per_launch, results, out, verbose)


def _mp_context():
    import multiprocessing
    return multiprocessing.get_context("spawn")


def report(per_launch, results, out=sys.stdout, verbose=False):
    """Per kernel and arch: compiles, worst shared memory vs the limit, registers, spills; the failures."""
    failures = []
    spills_hot, spills_known = [], []
    rows = {}
    for launch, jobs in per_launch.items():
        limit = SHARED_LIMITS[launch.arch]
        res = [(j, results[j]) for j in jobs]
        errors = [(j, r) for j, r in res if r.error and not r.out_of_resources]
        fitting = [(j, r) for j, r in res if r.error is None and r.shared <= limit]
        for j, r in errors:
            failures.append(f"compile failed: {launch.kernel} sm_{launch.arch} {_shape(launch)} {_describe(j)}: "
                            f"{r.error}")
        if not fitting:
            worst = min((r.shared for _, r in res if r.error is None), default=None)
            failures.append(f"no fitting config: {launch.kernel} sm_{launch.arch} {_shape(launch)} "
                            f"({launch.variant}); smallest shared memory {worst} B > {limit} B")
        elif len(fitting) < len(res):
            rows.setdefault((launch.kernel, launch.arch), {}).setdefault("dropped", set()).update(
                _describe(j) for j, r in res if (j, r) not in fitting)
        if (launch.C in NO_SPILL_WIDTHS or launch.C == 0) and launch.n <= 8:  # C = 0: per-token kernels
            for j, r in fitting:
                if r.stack:
                    why = spill_reason(launch, r)
                    line = f"{launch.kernel} sm_{launch.arch} {_shape(launch)} {_describe(j)}: {r.regs} regs, " \
                           f"{r.stack} B stack"
                    (spills_known if why else spills_hot).append(f"{line} ({why})" if why else line)
        row = rows.setdefault((launch.kernel, launch.arch), {})
        row["launches"] = row.get("launches", 0) + 1
        for j, r in res:
            if r.error is None:
                row["compiles"] = row.get("compiles", set()) | {j}
                if r.shared > row.get("shared", (-1,))[0]:
                    row["shared"] = (r.shared, f"{_shape(launch)} {_describe(j)}")
                row["regs"] = max(row.get("regs", 0), r.regs)
                if r.stack:
                    row["spilling"] = row.get("spilling", set()) | {j}
    print("\n| kernel | arch | launches | compiles | max shared memory (B) / limit | at | max regs | "
          "spilling compiles |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for (kernel, arch), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        shared, at = row.get("shared", (0, "-"))
        print(f"| {kernel} | sm_{arch} | {row.get('launches', 0)} | {len(row.get('compiles', ()))} | "
              f"{shared:,} / {SHARED_LIMITS[arch]:,} | {at} | {row.get('regs', 0)} | "
              f"{len(row.get('spilling', ()))} |", file=out)
    dropped = {k: v["dropped"] for k, v in rows.items() if v.get("dropped")}
    if dropped:
        print("\nConfigs the pruner kept that do not fit (the autotuner skips them; the estimate is loose):",
              file=out)
        for (kernel, arch), ds in sorted(dropped.items()):
            print(f"- {kernel} sm_{arch}: {', '.join(sorted(ds))}", file=out)
    if spills_known:
        print(f"\nConfigs with a stack frame at ViT-B / ConvNeXt-T widths or per token, n <= 8, for a stated reason "
              f"({len(spills_known)}):", file=out)
        for line in spills_known[: None if verbose else 12]:
            print(f"- {line}", file=out)
    print(f"\nUnexplained spills at ViT-B / ConvNeXt-T widths or per token, n <= 8 ({len(spills_hot)}):",
              file=out)
    for line in spills_hot[: None if verbose else 30]:
        print(f"- {line}", file=out)
    if failures:
        print(f"\nFAILED ({len(failures)}):", file=out)
        for line in failures:
            print(f"- {line}", file=out)
    else:
        print("\nOK: every compile succeeded and every launch has a config that fits.", file=out)
    out.flush()
    return len(failures)


QUICK_WIDTH = 768  # ViT-B's width and ConvNeXt-T / -S's widest stage


def matrix(full: bool, archs=None):
    """The launches to check. Quick (CI): every variant, n, kernel and surviving config on sm_80 and sm_90 at
    C = 768 (ViT-B, and ConvNeXt-T / -S's last stage), bfloat16 streams with float32 parameters (mixed-precision
    training), a token count not a multiple of 16. Full: also sm_100, every registered width, every pair of
    float32 / bfloat16 streams and parameters, and token counts that are multiples of 16."""
    archs = tuple(archs or (FULL_ARCHS if full else QUICK_ARCHS))
    if full:
        widths = model_widths()
        return list(launches(archs, sorted(set(widths["vit"]) | set(widths["convnext"]))))
    return [la for la in launches(archs, (QUICK_WIDTH,), t16=(False,))
            if (la.x_dtype, la.p_dtype) == ("bf16", "fp32") or la.kernel.startswith(("sinkhorn", "permutation_mix"))]


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m kromhc_vision check-kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser):
    parser.add_argument("--archs", default=None,
                        help=f"comma-separated compute capabilities (quick: {','.join(map(str, QUICK_ARCHS))}; "
                             f"full: {','.join(map(str, FULL_ARCHS))})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--full", action="store_true", help="every width, dtype pair and token case")
    parser.add_argument("--verbose", action="store_true", help="list every spilling config")
    parser.add_argument("--json", default=None, help="write every compile's shared memory, registers, stack here")


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("check-kernels compiles for real GPUs: unset TRITON_INTERPRET (it is 1 here)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.archs.split(",")] if args.archs else None
    unknown = [a for a in archs or () if a not in SHARED_LIMITS]
    if unknown:
        print(f"unknown arch(s) {unknown}; known: {sorted(SHARED_LIMITS)}", file=sys.stderr)
        return 2
    failures = run_check(matrix(args.full, archs), jobs=max(1, args.jobs), verbose=args.verbose, json_path=args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
