"""``benchmarks/bench_models_cpu.py``: its baselines are the architectures they stand for, and a memory-only
run on the micro family prints one row per variant and setting; the scripts built on its model table
(``profile_step_cpu.py``, ``time_ops_in_model.py``), ``bench_projection_gemms.py``, ``bench_connection_cpu.py``,
``bench_permutation_mix.py``, ``bench_numba_cache.py``, ``bench_pre_scaling_cpu.py``, ``ab_numba_kernels.py``,
``bench_compile_cpu.py`` and ``bench_convnext_downsample_cpu.py`` run."""
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import timm
import torch

import kromhc_vision  # noqa: F401  (registers the models)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_numba_kernels  # noqa: E402
import bench_compile_cpu  # noqa: E402
import bench_connection_cpu  # noqa: E402
import bench_models_cpu  # noqa: E402
import bench_numba_cache  # noqa: E402
import bench_permutation_mix  # noqa: E402
import bench_pre_scaling_cpu  # noqa: E402
import bench_projection_gemms  # noqa: E402
import profile_step_cpu  # noqa: E402
import time_ops_in_model  # noqa: E402


def test_micro_baseline_is_timms_vit_of_the_hyper_connected_models_shape():
    """timm's VisionTransformer with the micro overrides has exactly the parameters of the project's residual
    ViT-Micro, the one the digits results compare with."""
    base, kwargs, residual, residual_kwargs, _ = bench_models_cpu.BASES["micro"]
    ours = timm.create_model(f"{base}_residual", **kwargs).state_dict()
    timms = timm.create_model(residual, **residual_kwargs).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in timms.items()}


def test_memory_only_run_prints_a_row_per_variant_and_setting(capsys):
    # the script sets torch's thread count and malloc for the whole process: ask for what is in force (a test
    # that left one thread behind made later in-process training runs round differently from subprocess ones)
    threads = torch.get_num_threads()
    bench_models_cpu.main(["--models", "micro", "--streams", "2", "--variants", "hc", "kromhc", "--batch", "2",
                           "--no-time", "--threads", str(threads), "--cpu-malloc", "default"])
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "vit_micro_patch4_32_<variant> vs timm's vit_tiny_patch16_224, img_size=16" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["residual"], ["hc"], ["kromhc"])]
    assert [r[:2] for r in rows] == [["residual", "-"], ["hc", "off"], ["hc", "on"], ["kromhc", "off"],
                                     ["kromhc", "on"]]
    saved = {tuple(r[:2]): float(r[3]) for r in rows}  # x res
    assert saved[("hc", "on")] < saved[("hc", "off")] and saved[("residual", "-")] == 1.0
    macs = {tuple(r[:2]): float(r[6]) for r in rows}  # MAC x res: the projections on top, the same in both settings
    assert macs[("residual", "-")] == 1.0 and macs[("hc", "on")] == macs[("hc", "off")] > macs[("kromhc", "on")] > 1


def test_forward_macs_adds_each_connections_projection_to_the_branches():
    """ViT-Micro's hyper-connected model: the residual model's multiply-adds (its branches are the same) plus,
    per connection, tokens x nC x (2n + m); the count also leaves the model's hooks as they were."""
    base, kwargs, residual, residual_kwargs, size = bench_models_cpu.BASES["micro"]
    x = torch.randn(3, 3, size, size)
    hc = timm.create_model(f"{base}_hc", num_streams=2, **kwargs)
    tokens = 3 * (1 + (size // 4) ** 2)  # class token + patches, per image
    n, C, k = 2, hc.embed_dim, 2 * 2 + 2 * 2
    connections = 2 * len(hc.blocks)
    projections = connections * tokens * n * C * k
    expected = bench_models_cpu.forward_macs(timm.create_model(residual, **residual_kwargs), x) + projections
    assert bench_models_cpu.forward_macs(hc, x) == expected
    assert not any(m._forward_pre_hooks for m in hc.modules()) and hc.training
    # PyTorch's backend runs the projection as a GEMM the counter sees (and the mixing as small batched products,
    # fewer multiply-adds): the projection is counted once, not twice
    on_torch = timm.create_model(f"{base}_hc", num_streams=2, hc_backend="torch", **kwargs)
    assert expected + projections <= bench_models_cpu.forward_macs(on_torch, x) < expected + 2 * projections


def test_profile_diff_runs_on_the_model_table(capsys):
    """profile_step_cpu reads bench_models_cpu's BASES (it broke when their entries grew from 2 to 5 fields)."""
    threads = torch.get_num_threads()
    profile_step_cpu.main(["--model", "micro", "--variant", "kromhc", "--steps", "1", "--batch", "2", "--top", "3",
                           "--threads", str(threads), "--cpu-malloc", "default"])
    lines = capsys.readouterr().out.splitlines()
    assert any("vit_micro_patch4_32_kromhc (n = 4) vs vit_tiny_patch16_224, img_size=16" in line for line in lines)
    assert lines[-1].endswith(")") and "all ops" in lines[-1]


def test_projection_gemm_spellings_agree_and_print(capsys):
    """The spellings timed for each GEMM are the same product (a faster wrong one would mislead)."""
    for fns in bench_projection_gemms.layouts(64, 32, 8).values():
        values = [fn().clone() for fn in fns.values()]  # addmm_ accumulates: one spelling, one call
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=1e-5, atol=1e-5)
    bench_projection_gemms.main(["--tokens", "64", "--width", "32", "--columns", "8", "--rounds", "2",
                                 "--repeats", "1", "--threads", str(torch.get_num_threads())])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["8"]]
    assert len(rows) == 5


def test_in_model_timers_see_every_part_and_are_undone(capsys):
    import importlib
    from kromhc_vision import recompute
    from kromhc_vision.ops.numba.stream_pre import StreamPre
    pre, post, sinkhorn, mix = (importlib.import_module(f"kromhc_vision.ops.numba.{m}")
                                for m in ("stream_pre", "stream_post", "sinkhorn", "permutation_mix"))
    patched = [(StreamPre.__dict__, "forward"), (pre.__dict__, "_kernels"), (post.__dict__, "_run"),
               (sinkhorn.__dict__, "_run"), (mix.__dict__, "_run"),
               (recompute.__dict__, "_unpack"), (recompute._Segment.__dict__, "_pack")]
    before = [owner[name] for owner, name in patched]
    time_ops_in_model.main(["--model", "micro", "--variant", "mhc", "--steps", "1", "--batch", "2",
                            "--threads", str(torch.get_num_threads()), "--cpu-malloc", "default"])
    assert [owner[name] for owner, name in patched] == before
    rows = {line[26:] for line in capsys.readouterr().out.splitlines()[3:]}
    # 12 connections: one pre and one post step each, forward and backward; segments of 3 recomputed
    assert {"Function numba StreamPre.forward", "Function numba StreamPre.backward", "Phi", "recompute",
            "op numba.stream_post._stream_post_bwd", "op numba.stream_pre._stream_pre_fwd",
            "kernel numba.stream_pre.forward", "kernel numba.stream_pre.backward",
            "kernel numba.stream_post.forward",
            "kernel numba.sinkhorn.forward", "recompute: pack", "recompute: unpack",
            "recompute: form_res_matrix"} <= rows


def test_kernel_codes_survives_dead_weak_proxies():
    """The dispatchers are found among all of the collector's objects, which can hold a weak proxy whose referent is
    gone (one such failed this benchmark's test in a full run): isinstance on it raised ReferenceError."""
    class Referent:
        pass

    referent = Referent()
    proxy = weakref.proxy(referent)
    holder = [proxy]  # a tracked container keeps the proxy among gc's objects
    del referent
    bench_connection_cpu.kernel_codes()
    assert len(holder) == 1


def test_connection_benchmark_finds_the_kernels_inside_the_step(capsys):
    """Kernel time is read from the numba dispatchers' profile entries: none for the residual connection, some
    for KromHC's (whose step makes more Python calls); a key that stopped matching would print 0 for both."""
    bench_connection_cpu.main(["--variants", "hc", "kromhc", "--tokens", "8", "--rounds", "1", "--steps", "2",
                               "--threads", str(torch.get_num_threads()), "--cpu-malloc", "default"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["residual"], ["hc"], ["kromhc"])}
    step, kernel, calls = (lambda v: float(rows[v][1]), lambda v: float(rows[v][2]), lambda v: float(rows[v][5]))
    assert set(rows) == {"residual", "hc", "kromhc"}
    assert kernel("residual") == 0 and 0 < kernel("kromhc") and 0 < kernel("hc")
    assert calls("kromhc") > calls("hc") > calls("residual") > 0 and step("kromhc") > 0
    aten, detach = (lambda v: int(rows[v][6])), (lambda v: int(rows[v][7]))
    assert aten("hc") > aten("residual") > 0 and aten("hc") >= detach("hc") > detach("residual")
    pre, post, phi = (lambda v, i=i: float(rows[v][i]) for i in (8, 9, 10))  # kernel time by op: HC has no Phi kernel
    assert pre("hc") > 0 and post("hc") > 0 and phi("hc") == 0 and phi("kromhc") > 0
    assert pre("hc") + post("hc") == pytest.approx(kernel("hc"), abs=1.5) and rows["residual"][11:] == ["-", "-"]
    assert float(rows["hc"][12]) > 0


def test_permutation_mix_benchmark_compares_agreeing_backends(capsys):
    """Every factorisation's numba and PyTorch values and gradients agree before they are timed, and the
    ``auto`` column is dispatch's rule: numba for every factorisation."""
    bench_permutation_mix.main(["--tokens", "8", "--rounds", "1", "--threads", str(torch.get_num_threads()),
                                "--cpu-malloc", "default"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert {r[0]: r[-1] for r in rows} == {f: "numba" for f in ("2", "3", "4", "5", "6", "2x2", "2x3", "2x2x2")}


def test_permutation_mix_benchmark_times_the_triton_kernel(capsys):
    """``--backend triton`` (in Triton's interpreter here): the kernel's values and gradients agree with PyTorch's
    before they are timed, for every factorisation, and the output says the timings are a smoke run's."""
    bench_permutation_mix.main(["--tokens", "8", "--rounds", "1", "--backend", "triton", "--cpu-malloc", "default"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert "interpreter" in out and "triton ms" in out and len(rows) == 8


def test_numba_cache_benchmark_runs_kernels_compiled_here_against_the_packages(capsys):
    """Inside ``FreshKernels`` the op calls a new dispatcher of its launcher (compiled in this process, not the
    package's cached one) and computes the same values; outside, the package's is back; one row per op."""
    module = bench_numba_cache.MODULES["stream_post"]
    op = bench_numba_cache._custom_ops._IMPLEMENTATIONS[module._stream_post_fwd]
    X, y, h_res, h_post = torch.randn(5, 4, 8), torch.randn(5, 8), torch.rand(5, 4, 4), torch.rand(5, 4)
    package = module.launch
    expected = op(X, y, h_res, h_post)
    with bench_numba_cache.FreshKernels(module):
        assert module.launch is not package and module.launch.py_func is package.py_func
        assert torch.equal(op(X, y, h_res, h_post), expected) and module.launch.overloads
    assert module.launch is package
    bench_numba_cache.main(["--ops", "stream_post", "--tokens", "8", "--width", "8", "--rounds", "1",
                            "--threads", str(torch.get_num_threads())])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("stream_post")]
    assert [r[:2] for r in rows] == [["stream_post", "fwd"], ["stream_post", "bwd"]]


def test_compile_benchmark_compiles_in_an_empty_cache_and_loads_from_it(capsys):
    """One row per op and per connection variant asked for: the first process, on an empty numba cache, compiles
    (seconds); the second loads what the first cached (a kernel that compiled again would take as long as in the
    first)."""
    bench_compile_cpu.main(["--ops", "stream_post", "--variants", "hc", "--streams", "3"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.startswith("stream_post")]
    assert len(rows) == 1
    fwd_compile, bwd_compile, fwd_load, bwd_load = map(float, rows[0][1:])
    assert bwd_compile > 0.3 and bwd_load < bwd_compile / 5, rows
    step = [line.split() for line in out if line.startswith("hc connection")]  # pre and post, one process
    assert len(step) == 1
    fwd_compile, bwd_compile, fwd_load, bwd_load = map(float, step[0][2:])
    assert fwd_compile > 0.3 and fwd_load < fwd_compile / 3 and bwd_load < max(bwd_compile / 3, 0.1), step


def test_pre_scaling_benchmark_fits_time_against_coefficients(capsys):
    """The fit recovers a line; a run prints one row per ``k`` and the fitted rows; a ``k`` the pre step cannot
    have (``k <= 2n``) is refused before any work."""
    assert bench_pre_scaling_cpu.fit([12, 24, 32], [1 + 0.5 * k for k in (12, 24, 32)]) == pytest.approx((1, 0.5))
    bench_pre_scaling_cpu.main(["--coefficients", "9", "12", "--tokens", "8", "--width", "8", "--rounds", "1",
                                "--calls", "1", "--flush-mib", "1", "--threads", str(torch.get_num_threads())])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    k_rows = [r for r in rows if r[0].isdigit()]
    assert [r[0] for r in k_rows] == ["9", "12"] and all(len(r) == 5 for r in k_rows)  # kernels' and BLAS's times
    assert [r[0] for r in rows if r[0] in ("fwd", "bwd")] == ["fwd", "bwd"]
    with pytest.raises(SystemExit):
        bench_pre_scaling_cpu.main(["--coefficients", "8", "12", "--streams", "4"])
    assert "needs at least two distinct values > 2n = 8" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".git").exists(), reason="needs the git history")
def test_kernel_ab_loads_a_commits_ops_beside_the_trees(capsys):
    """The ops of a commit (here HEAD's sinkhorn) load beside the working tree's under their own op names, run on
    the same inputs and, where the code is the same, compute the same values; an unknown commit is refused."""
    ab_numba_kernels.main(["HEAD", "--ops", "sinkhorn", "--tokens", "8", "--width", "8", "--calls", "2",
                           "--flush-mib", "1", "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("sinkhorn")]
    assert [r[:2] for r in rows] == [["sinkhorn", "fwd"], ["sinkhorn", "bwd"]]
    root = Path(__file__).resolve().parents[1]
    edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kromhc_vision/ops/numba/sinkhorn.py"],
                            cwd=root).returncode
    assert edited or all(r[-1] == "yes" for r in rows)  # the same code computes the same values
    old = ab_numba_kernels.module_at("HEAD", "sinkhorn")
    assert old is not bench_numba_cache.MODULES["sinkhorn"] and old._sinkhorn_fwd is not \
        bench_numba_cache.MODULES["sinkhorn"]._sinkhorn_fwd
    with pytest.raises(SystemExit):
        ab_numba_kernels.main(["no-such-commit-xyz", "--ops", "sinkhorn"])
    assert "no-such-commit-xyz" in capsys.readouterr().err


def test_convnext_downsample_benchmark_times_both_settings_with_equal_gradients(capsys):
    import bench_convnext_downsample_cpu
    bench_convnext_downsample_cpu.main(["--rounds", "1", "--batch", "1", "--streams", "2"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if len(line.split()) == 4 and line.split()[0] in ("off", "on", "residual")}
    assert set(rows) == {"off", "on", "residual"} and all(float(v) > 0 for r in rows.values() for v in r)
    assert "on / off (paired, median)" in out and "CPU: " in out
