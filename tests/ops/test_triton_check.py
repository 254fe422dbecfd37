"""``python -m kromhc_vision check-kernels``: real compiles (in a subprocess without TRITON_INTERPRET, which
the other tests set) on a tiny matrix, and the report's verdicts on made-up results."""
import io
import os
import subprocess
import sys
import textwrap

import pytest

from kromhc_vision.ops.triton import check


def _run_uninterpreted(code: str, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_refuses_to_run_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert check.main([]) == 2


def test_matrix_covers_every_variant_stream_count_and_kernel():
    launches = check.matrix(full=False)
    assert {la.arch for la in launches} == {80, 90}
    pre = {(la.variant, la.n) for la in launches if la.kernel == "stream_pre_bwd"}
    assert ("mhclite", 6) in pre and ("mhclite", 7) not in pre and ("kromhc", 16) in pre and ("hc", 16) in pre
    assert {la.n for la in launches if la.kernel == "sinkhorn_fwd"} == set(range(2, 9)) | {16}
    assert {la.kernel for la in launches} == set(check._kernels())
    assert check.model_widths()["vit"][0] == 64 and check.model_widths()["convnext"][-1] == 1024


def _fake_launch(kernel="stream_post_fwd", arch=80):
    return check.Launch(kernel, 2, 64, 0, "bf16", "fp32", False, "hc", arch)


def _fake_job(warps, arch=80):
    return check.Job("stream_post_fwd", (), (("BLOCK_T", 4),), (), warps, 3, arch)


def test_report_fails_without_a_fitting_config_or_on_a_compile_error():
    la, a, b = _fake_launch(), _fake_job(4), _fake_job(8)
    fits = {a: check.Result(shared=1000, regs=40), b: check.Result(shared=200_000, regs=40)}
    assert check.report({la: [a, b]}, fits, out=open(os.devnull, "w")) == 0  # one fits: the autotuner skips b
    over = {a: check.Result(shared=170_000, regs=40), b: check.Result(shared=200_000, regs=40)}
    assert check.report({la: [a, b]}, over, out=open(os.devnull, "w")) == 1
    broken = {a: check.Result(shared=1000, regs=40), b: check.Result(error="CompilationError: x")}
    assert check.report({la: [a, b]}, broken, out=open(os.devnull, "w")) == 1


def test_report_lists_spills_of_the_per_token_kernels():
    """Kernels without a width (Sinkhorn, permutation_mix: C = 0) are held to the no-spill rule too."""
    la = check.Launch("permutation_mix_bwd", 8, 0, 6, "fp32", "fp32", False, "kromhc", 90)
    job = check.Job("permutation_mix_bwd", (), (("BLOCK_T", 64),), (), 8, 3, 90)
    out = io.StringIO()
    check.report({la: [job]}, {job: check.Result(shared=1000, regs=255, stack=400)}, out=out)
    assert "or per token, n <= 8 (1):" in out.getvalue()


def test_compiles_for_sm80_and_sm90_and_reports():
    """Real compiles of one small launch per arch, through the CLI's code path, with the report printed."""
    proc = _run_uninterpreted("""
        import sys
        from kromhc_vision.ops.triton import check
        launches = [check.Launch("stream_post_fwd", 2, 64, 0, "bf16", "fp32", False, "hc", arch) for arch in (80, 90)]
        sys.exit(check.run_check(launches, jobs=1))
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton 3." in proc.stdout and "| stream_post_fwd | sm_80 |" in proc.stdout and "OK:" in proc.stdout


@pytest.mark.parametrize("arch", [80, 90])
def test_mhclite_six_streams_fits(arch):
    """mHC-lite n = 6 (K = 732, padded 1024): every pre kernel keeps a config that compiles within the arch's
    shared memory (3-stage configs needed 199,808 - 399,360 B)."""
    proc = _run_uninterpreted(f"""
        import sys
        from kromhc_vision.ops.triton import check
        launches = [check.Launch(k, 6, 768, 732, "bf16", "fp32", False, "mhclite", {arch})
                    for k in ("stream_pre_fwd", "stream_pre_bwd", "stream_pre_dw")]
        sys.exit(check.run_check(launches, jobs=2))
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mhclite_six_streams_forward_fits_a_101_kb_gpu():
    """sm_86 / sm_89 / sm_120 (101,376 B per block): no config of the mHC-lite n = 6 forward fits by the estimate,
    and the pruner's fallback, least estimated shared memory, was a tie (BLOCK_C = 32 and 16 at 1 stage) that the
    first config won: 131,072 B, which does not fit, where BLOCK_C = 16 takes 65,536 B. Ties go to fewer registers."""
    proc = _run_uninterpreted("""
        import sys
        from kromhc_vision.ops.triton import check
        la = check.Launch("stream_pre_fwd", 6, 768, 732, "bf16", "fp32", False, "mhclite", 86)
        assert [c.kwargs["BLOCK_C"] for c in check.surviving_configs(la)] == [16], check.surviving_configs(la)
        sys.exit(check.run_check([la], jobs=1))
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
