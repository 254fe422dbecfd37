"""How the numba backend is chosen: by ``auto`` on CPU tensors, and not where numba does not import."""
import pytest
import torch

from kromhc_vision import backend


def test_auto_runs_numba_on_cpu_and_falls_back_without_it(monkeypatch):
    cpu = torch.device("cpu")
    assert backend.use_numba("auto", cpu) and not backend.use_numba("torch", cpu)
    assert not backend.use_numba("auto", torch.device("cuda"))
    monkeypatch.setattr(backend, "_numba_import_error", lambda: "the numba kernels cannot be imported (test)")
    assert not backend.use_numba("auto", cpu)
    with pytest.raises(RuntimeError, match=r"backend 'numba' was requested but cannot run: .*\(test\)"):
        backend.use_numba("numba", cpu)
    with pytest.raises(RuntimeError, match="tensors are on 'cuda'"):
        backend.use_numba("numba", torch.device("cuda"))
