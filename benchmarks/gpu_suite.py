"""The GPU suite: correctness of the compiled Triton kernels, per-op benchmarks, a ViT-B/16 training step.

    python benchmarks/gpu_suite.py [--out DIR] [--no-report] [--stages correctness,ops,vit]

Stages, each written to ``DIR/<stage>.json`` (and its text to ``DIR/<stage>.txt``) as soon as it finishes,
so that a run cut off keeps what it measured:

1. ``correctness``: one connection per variant (hc, mhc, mhclite, kromhc), n in {2, 4, 6, 8} where the
   variant takes it, streams and parameters in float32 and in bfloat16: ``X_next = conn(X, branch)`` and the
   gradients wrt X and every parameter, Triton backend against the PyTorch backend (same parameters).
2. ``ops``: ``bench_stream_pre.py``, ``bench_stream_post.py``, ``bench_sinkhorn.py`` (time, GB/s, ratio to the
   memory-traffic floor at the measured copy bandwidth) and ``bench_permutation_mix.py --backend triton`` (the
   Triton kernel against PyTorch's ops at ViT-B's token counts), their output verbatim.
3. ``vit``: a ViT-B/16 bf16-autocast training step (forward, backward, AdamW step) at batch 128, residual and
   every variant at n = 4: milliseconds per step and peak memory, and both as ratios to residual.

Then (unless ``--no-report``) the section ``gpu_suite`` of BENCHMARKS.md is rewritten with the device, date,
command, commit and results (:func:`_report.write_section`; other sections are kept).

Without a GPU it runs only the correctness stage, in Triton's interpreter on tiny shapes (a smoke test, run
by ``tests/ops/test_gpu_suite_smoke.py``), and does not touch BENCHMARKS.md unless ``--report`` is given.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by kromhc_vision.ops.triton)

import kromhc_vision as kv  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from kromhc_vision.cli import sections as _report  # noqa: E402

VARIANTS = ("hc", "mhc", "mhclite", "kromhc")
STREAMS = (2, 4, 6, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (rtol, atol) of the Triton path against the PyTorch path, by stream dtype: fp32 sums in another order
# (tf32x3 dots); bf16 streams round u and X_next to bf16 at different points.
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2)}
SECTION = "gpu_suite"
OPS_TIMEOUT_S = 240  # per benchmark script of the ops stage


def _device_name() -> str:
    if GPU:
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({os.cpu_count()} cores), Triton interpreter"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _accepts(variant: str, n: int) -> bool:
    try:
        kv.connection_num_params(variant, n, 8)
    except ValueError:
        return False
    return True


def _connection_case(variant, n, dtype, T, C, device):
    """``(max error ratio over outputs and gradients, names of the failing tensors)`` for one case; an error
    ratio is ``max |triton - torch| / (atol + rtol |torch|)``, at most 1 when within tolerance."""
    rtol, atol = TOLERANCES[dtype]
    torch.manual_seed(0)
    conns = {b: kv.build_connection(variant, n, C, layer_index=1, backend=b) for b in ("triton", "torch")}
    with torch.no_grad():
        for p in conns["triton"].parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the init, so that every gradient path carries signal
    conns["torch"].load_state_dict(conns["triton"].state_dict())
    lin = torch.nn.Linear(C, C).to(device=device, dtype=dtype)
    X0 = torch.randn(T, n, C, device=device, dtype=dtype)
    dZ = torch.randn(T, n, C, device=device, dtype=dtype)
    tensors = {}
    for backend, conn in conns.items():
        conn.to(device=device, dtype=dtype)
        X = X0.clone().requires_grad_()
        out = conn(X, lambda u: torch.nn.functional.gelu(lin(u)))
        grads = torch.autograd.grad(out, [X, *conn.parameters()], dZ, allow_unused=True)
        names = ["X_next", "dX"] + [f"d{name}" for name, _ in conn.named_parameters()]
        tensors[backend] = dict(zip(names, [out, *grads]))
    worst, bad = 0.0, []
    for name, expected in tensors["torch"].items():
        actual = tensors["triton"][name]
        if expected is None or actual is None:
            if (expected is None) != (actual is None):
                bad.append(f"{name} (None on one backend)")
            continue
        e, a = expected.float(), actual.float()
        ratio = ((a - e).abs() / (atol + rtol * e.abs())).max().item() if e.numel() else 0.0
        worst = max(worst, ratio)
        if not ratio <= 1:
            bad.append(f"{name} ({ratio:.2f}x tolerance)")
    return worst, bad


def stage_correctness(smoke: bool):
    device = torch.device("cuda" if GPU else "cpu")
    T, C = (256 * 3 + 5, 768) if not smoke else (5, 24)
    streams = STREAMS if not smoke else (2, 4)
    rows, lines = [], [f"Triton vs PyTorch backend, connection forward + all gradients, T={T} tokens, C={C}"]
    for variant in VARIANTS:
        for n in streams:
            if not _accepts(variant, n):
                lines.append(f"{variant:8s} n={n}  refused by the variant")
                continue
            for dname, dtype in DTYPES.items():
                try:
                    worst, bad = _connection_case(variant, n, dtype, T, C, device)
                    status = "ok" if not bad else "FAIL " + ", ".join(bad)
                except Exception as e:  # a kernel that does not compile or launch: recorded, the stage goes on
                    worst, status = float("nan"), f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(dict(variant=variant, n=n, dtype=dname, worst_error_ratio=worst, status=status))
                lines.append(f"{variant:8s} n={n} {dname}  max error / tolerance {worst:6.3f}  {status}")
    failed = [r for r in rows if r["status"] != "ok"]
    lines.append(f"{len(rows) - len(failed)} of {len(rows)} cases within tolerance")
    return rows, "\n".join(lines), not failed


def stage_ops(smoke: bool):
    outputs = {}
    for script, extra in (("bench_stream_pre.py", ["--variant", "kromhc"]), ("bench_stream_post.py", []),
                          ("bench_sinkhorn.py", []),
                          ("bench_permutation_mix.py", ["--backend", "triton", "--tokens", "12608", "25216"])):
        cmd = [sys.executable, str(HERE / script), *extra]
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=OPS_TIMEOUT_S, cwd=ROOT)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:  # recorded as a failure (rc 124, as timeout(1)); the stage goes on
            rc, stdout = 124, (e.stdout or b"").decode(errors="replace")
            stderr = (e.stderr or b"").decode(errors="replace") + f"\n(killed after {OPS_TIMEOUT_S} s)"
        outputs[script] = dict(command=" ".join(["python", f"benchmarks/{script}", *extra]), rc=rc,
                               seconds=round(time.time() - start, 1), output=stdout + stderr[-2000:])
    text = "\n\n".join(f"$ {o['command']}\n{o['output'].rstrip()}" for o in outputs.values())
    return outputs, text, all(o["rc"] == 0 for o in outputs.values())


def _vit_step(variant: str, batch: int):
    import timm
    torch.manual_seed(0)
    kwargs = {} if variant == "residual" else dict(num_streams=4)
    model = timm.create_model(f"vit_base_patch16_224_{variant}", **kwargs).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile the kernels, autotune, allocate the optimiser state
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    peak = torch.cuda.max_memory_allocated() / 2**20
    model = opt = None  # released (step's closure shares these cells; `del` would read as undefined to pyflakes)
    torch.cuda.empty_cache()
    return ms, peak


def stage_vit(smoke: bool, batch: int = 128):
    rows, lines = [], [f"ViT-B/16, bf16 autocast, batch {batch}, AdamW step, n = 4, mean of 10 steps after 3"]
    base = None
    lines.append(f"{'variant':10s} {'ms/step':>9s} {'x resid':>8s} {'peak MiB':>9s} {'x resid':>8s}")
    for variant in ("residual",) + VARIANTS:
        try:
            ms, peak = _vit_step(variant, batch)
        except Exception as e:
            rows.append(dict(variant=variant, error=f"{type(e).__name__}: {e}"[:300]))
            lines.append(f"{variant:10s} ERROR {rows[-1]['error']}")
            continue
        base = base or (ms, peak)
        rows.append(dict(variant=variant, ms=ms, peak_mib=peak, time_ratio=ms / base[0], memory_ratio=peak / base[1]))
        lines.append(f"{variant:10s} {ms:9.1f} {ms / base[0]:8.3f} {peak:9.0f} {peak / base[1]:8.3f}")
    return rows, "\n".join(lines), all("error" not in r for r in rows)


STAGES = {"correctness": stage_correctness, "ops": stage_ops, "vit": stage_vit}


def report_body(meta, texts) -> str:
    lines = ["## GPU suite (`python benchmarks/gpu_suite.py`)", "",
             f"Device: {meta['device']}; date: {meta['date']}; commit `{meta['commit']}`; torch {meta['torch']}, "
             f"Triton {meta['triton']}; command: `{meta['command']}`.", ""]
    if not GPU:
        lines += ["GPU figures: not yet measured (this run had no GPU: the correctness stage ran in Triton's "
                  "interpreter on tiny shapes).", ""]
    for stage, text in texts.items():
        lines += [f"### {stage}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu_suite"), help="directory for the stage files")
    parser.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md's section")
    parser.add_argument("--report", action="store_true", help="rewrite the section even without a GPU")
    parser.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"), help="the file holding the section")
    args = parser.parse_args(argv)
    smoke = not GPU
    stages = args.stages.split(",") if args.stages else (list(STAGES) if GPU else ["correctness"])
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    import triton
    meta = dict(device=_device_name(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=_commit(), torch=torch.__version__, triton=triton.__version__,
                command="python benchmarks/gpu_suite.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                            if (argv if argv is not None else sys.argv[1:]) else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    texts, ok = {}, True
    for stage in stages:
        start = time.time()
        rows, text, passed = STAGES[stage](smoke)
        text += f"\n({time.time() - start:.0f} s)"
        (out / f"{stage}.json").write_text(json.dumps(dict(meta=meta, rows=rows, passed=passed), indent=1))
        (out / f"{stage}.txt").write_text(text + "\n")
        print(f"== {stage}\n{text}", flush=True)
        texts[stage] = text
        ok &= passed
    if (GPU and not args.no_report) or args.report:
        _report.write_section(args.benchmarks, SECTION, report_body(meta, texts))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
