"""The numba kernels' helpers: tensors handed to kernels by address (``token_array``), the kernels' vector width."""
import os
import subprocess
import sys

import llvmlite.binding as ll
import numba
import numpy as np
import pytest
import torch

from kromhc_vision.ops.numba._common import KERNEL_SCALARS, token_array


@numba.njit(parallel=True)
def _scaled_copies(pa, pout1, pout2, n, like):
    """``out1 = 3 a`` (1-d) and ``out2[:, j] = j a`` (2-d), written in a ``prange`` and never read back."""
    a, out1, out2 = token_array(pa, like, (n,)), token_array(pout1, like, (n,)), token_array(pout2, like, (n, 2))
    for i in numba.prange(n):
        s = like
        for j in range(2):
            out2[i, j] = a[i] * j
            s += a[i] * (j + 1)
        out1[i] = s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_arrays_read_and_write_the_tensors(dtype):
    """Arrays over tensors' addresses, written inside a parallel loop: every store reaches the tensor (numba's
    dead-code elimination dropped the 1-d one's without the alias rule in ``_common``)."""
    a = torch.arange(9, dtype=dtype)
    out1, out2 = torch.full((9,), -1.0, dtype=dtype), torch.full((9, 2), -1.0, dtype=dtype)
    _scaled_copies(a.data_ptr(), out1.data_ptr(), out2.data_ptr(), 9, KERNEL_SCALARS[dtype])
    torch.testing.assert_close(out1, 3 * a, rtol=0, atol=0)
    torch.testing.assert_close(out2, torch.stack([0 * a, a], 1), rtol=0, atol=0)
    assert isinstance(KERNEL_SCALARS[dtype], np.floating)


def test_ops_refuse_a_tensor_of_the_wrong_size_naming_it():
    """The kernels read each tensor by address, so a tensor of too few values must be refused before them, by name
    (it would otherwise be read past its end)."""
    import kromhc_vision  # noqa: F401  (registers the ops)
    ops = torch.ops.kromhc_vision
    X, n, C, T = torch.randn(5, 4, 8), 4, 8, 5
    cases = [
        (lambda: ops.cpu_stream_post_fwd(X, torch.randn(T - 1, C), torch.rand(T, n, n), torch.rand(T, n)),
         "stream_post: y of shape"),
        (lambda: ops.cpu_stream_post_bwd(X, torch.randn(T, C), torch.rand(T, n, n), torch.rand(T, n),
                                         torch.randn(T - 1, n, C)), "dout of shape"),
        (lambda: ops.cpu_stream_pre_fwd(X, torch.ones(n * C - 1), torch.zeros(n * C, 12), torch.ones(12),
                                        torch.zeros(12), 1e-6), "norm_weight of shape"),
        (lambda: ops.cpu_sinkhorn_bwd(torch.randn(T, n, n), 3, torch.randn(T - 1, n, n)), "sinkhorn backward: dout"),
        (lambda: ops.cpu_permutation_mix_bwd(torch.randn(T, 4), [2, 2], torch.randn(T - 1, n, n)),
         "permutation_mix backward: dout"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_vector_width_reads_its_setting_and_refuses_others(monkeypatch):
    """``KROMHC_NUMBA_VECTOR_WIDTH``: 256 / 512 as given; ``auto`` 512 only on CPUs with AVX-512 and AMX, else
    LLVM's choice (0); anything else refused with the value and the choices."""
    from kromhc_vision.ops.numba import _common
    for value, bits in (("256", 256), ("512", 512)):
        monkeypatch.setenv("KROMHC_NUMBA_VECTOR_WIDTH", value)
        assert _common.vector_width() == bits
    monkeypatch.delenv("KROMHC_NUMBA_VECTOR_WIDTH")
    for features, bits in (({"avx512f", "amx-tile", "avx2"}, 512), ({"avx512f", "avx2"}, 0), ({"avx2"}, 0)):
        monkeypatch.setattr(_common, "target_features", lambda features=features: features)
        assert _common.vector_width() == bits, features
    monkeypatch.setenv("KROMHC_NUMBA_VECTOR_WIDTH", "1024")
    with pytest.raises(ValueError, match=r"'1024'.*auto, 256, 512"):
        _common.vector_width()


def test_target_features_follow_numba_cpu_features(monkeypatch):
    """What ``auto`` looks at: the CPU numba compiles for (``NUMBA_CPU_FEATURES``), not the host, where set."""
    from kromhc_vision.ops.numba import _common
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,-avx512f,+amx-tile")
    assert _common.target_features() == {"avx2", "amx-tile"}


def _probe(tmp_path, script, **env_vars):
    """Run ``script`` in a fresh process with its own empty numba cache (compiled code can be inspected only
    there) and ``env_vars``; its last line of output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_DISABLE")}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / str(len(list(tmp_path.iterdir())))), **env_vars)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


_IR_PROBE = r"""
import importlib, re, numpy as np, torch, kromhc_vision
conn = kromhc_vision.build_connection("hc", 4, 8, backend="numba")
X = torch.randn(6, 4, 8, requires_grad=True)
conn(X, lambda u: 2 * u).square().sum().backward()
pre = importlib.import_module("kromhc_vision.ops.numba.stream_pre")
post = importlib.import_module("kromhc_vision.ops.numba.stream_post")
bodies = [pre._forward_body(4, WIDTH, np.float32), pre._backward_body(4, WIDTH, np.float32),
          pre._reduce_body(WIDTH, np.float32)]
bodies += [post._forward_body(4, WIDTH, np.float32), post._backward_body(4, WIDTH, np.float32)]
# the post bodies the step ran are these (the op reads the width once per stream count and dtype)
assert [post._body_address(b, 4, torch.float32) for b in (post._forward_body, post._backward_body)] == \
    [b.address for b in bodies[3:]]
irs = [body.inspect_llvm() for body in bodies]
counts = []
for ir in irs:
    groups = set(re.findall(r'^attributes #(\d+) = \{[^}]*"prefer-vector-width"="WIDTH"', ir, re.M))
    counts.append(sum(g in groups for g in re.findall(r"^define .*#(\d+) \{$", ir, re.M)))
print(*counts)
"""


def test_stream_kernels_carry_the_vector_width_attribute(tmp_path):
    """Every stream kernel carries LLVM's ``prefer-vector-width`` at the setting: the bodies of the pre step
    (forward, backward, the backward's sums) and of the post step (forward, backward), C functions
    (:mod:`kromhc_vision.ops.numba._launch`), each in its function: at least one function with the attribute per
    body. On any CPU."""
    out = _probe(tmp_path, _IR_PROBE.replace("WIDTH", "512"), KROMHC_NUMBA_VECTOR_WIDTH="512")
    counts = [int(c) for c in out.split()]
    assert len(counts) == 5 and min(counts) >= 1, counts


_ASM_PROBE = r"""
import importlib, re, numpy as np, torch
post = importlib.import_module("kromhc_vision.ops.numba.stream_post")  # (the package's name stream_post is the op)
post._stream_post_fwd(torch.randn(64, 4, 64), torch.randn(64, 64), torch.rand(64, 4, 4), torch.rand(64, 4))
body = post._forward_body(4, post.vector_width(), np.float32)
assert body.address == post._body_address(post._forward_body, 4, torch.float32)  # the body the op ran
asm = body._library.get_asm_str()
print(*(len(re.findall(r"^\s*v\w+\s.*%" + register, asm, re.M)) for register in ("zmm", "ymm")))
"""


def test_kernels_take_512_bit_vectors_where_llvm_would_pick_256(tmp_path):
    """Compiled for an Intel AVX-512 CPU (LLVM's ``sapphirerapids`` tuning, which prefers 256-bit vectors, with
    the host's features), the post kernel has instructions on 512-bit registers at the setting 512 and none at
    256: the kernels' own width decides, not LLVM's tuning."""
    features = ll.get_host_cpu_features()
    if not features.get("avx512f", False):
        pytest.skip("the host has no AVX-512: code for it compiles here but cannot run")
    counts = {setting: tuple(int(c) for c in _probe(
        tmp_path, _ASM_PROBE, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES=features.flatten(),
        KROMHC_NUMBA_VECTOR_WIDTH=setting).split()) for setting in ("512", "256")}
    assert counts["512"][0] > 0, counts
    assert counts["256"][0] == 0 and counts["256"][1] > 0, counts
