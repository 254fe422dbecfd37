"""ONNX export: a hyper-connected model exports with either of torch's exporters (the default one on torch.export,
and the TorchScript one, ``dynamo=False``, which timm's ``onnx_export`` uses by default), whatever its backend,
and computes in ONNX Runtime what it computes in PyTorch, with a dynamic batch.

While an exporter traces, every backend runs the plain definitions of :mod:`kromhc_vision.ops.reference`
(:func:`kromhc_vision.ops.dispatch._run`): the kernel backends' custom ops have no ONNX translation (the export
failed in its last step, naming ``kromhc_vision.cpu_stream_pre_fwd``), and the TorchScript exporter cannot inline
the PyTorch backend's autograd Functions (``aten::_unsafe_view``: they stayed in the graph as ``PythonOp``s).
"""
import numpy as np
import pytest
import timm
import torch

import kromhc_vision  # noqa: F401  registers the models

onnx = pytest.importorskip("onnx")  # the test extra installs them: CI runs these
ort = pytest.importorskip("onnxruntime")


MODELS = [
    ("vit_micro_patch4_32_kromhc", dict(depth=2)),
    ("vit_micro_patch4_32_mhc", dict(depth=2)),  # Sinkhorn's iterations unrolled
    ("convnext_micro_mhclite", dict(depths=(1, 1, 1, 1))),  # the streams through the downsamples
    ("convnext_micro_hc", dict(depths=(1, 1, 1, 1), hc_backend="numba")),  # a named kernel backend
]


def _model(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    for p in model.parameters():  # away from the init (zero projections), so that the mixing matters
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def _export(model, path, exporter):
    x = torch.randn(2, 3, 32, 32)
    if exporter == "dynamo":
        torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: "batch"},)).save(str(path))
    elif exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    else:  # timm's own, which runs the TorchScript exporter and checks the graph and ONNX Runtime's output
        from timm.utils.onnx import onnx_export
        onnx_export(model, str(path), example_input=x, check=True, check_forward=True)


@pytest.mark.parametrize("name, kwargs, exporter", [
    *[(name, kwargs, exporter) for name, kwargs in MODELS for exporter in ("dynamo", "torchscript")],
    # the per-sample depthwise convolution without groups = B*C (no symbolic groups in ONNX); the TorchScript
    # exporter has no translation of its global convolution's FFT
    ("terminator_micro", {}, "dynamo"),
])
def test_a_model_exports_to_onnx_and_computes_the_same_with_a_dynamic_batch(name, kwargs, exporter, tmp_path):
    model = _model(name, kwargs)
    _export(model, tmp_path / "model.onnx", exporter)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard operators only
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # another batch size than traced
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_timm_onnx_export_takes_a_model(tmp_path):
    """``timm.utils.onnx.onnx_export`` (timm's ``onnx_export.py``), TorchScript exporter by default."""
    model = _model("vit_micro_patch4_32_kromhc", dict(depth=1))
    _export(model, tmp_path / "model.onnx", "timm")
    assert (tmp_path / "model.onnx").stat().st_size > 0
