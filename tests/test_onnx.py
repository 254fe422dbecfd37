"""ONNX export (``torch.onnx.export``, torch's default exporter on torch.export): a hyper-connected model exports
with its default backend and computes in ONNX Runtime what it computes in PyTorch.

While the exporter traces, backend ``auto`` runs PyTorch's ops (:func:`kromhc_vision.ops.dispatch.backend_for`):
the kernel backends' custom ops have no ONNX translation (the export failed in its last step, naming
``kromhc_vision.cpu_stream_pre_fwd``).
"""
import numpy as np
import pytest
import timm
import torch

import kromhc_vision  # noqa: F401  registers the models

onnx = pytest.importorskip("onnx")  # the test extra installs them: CI runs these
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name, kwargs", [
    ("vit_micro_patch4_32_kromhc", dict(depth=2)),
    ("vit_micro_patch4_32_mhc", dict(depth=2)),  # Sinkhorn's iterations unrolled
    ("convnext_micro_mhclite", dict(depths=(1, 1, 1, 1))),  # the streams through the downsamples
])
def test_a_model_exports_to_onnx_and_computes_the_same_with_a_dynamic_batch(name, kwargs, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    for p in model.parameters():  # away from the init (zero projections), so that the mixing matters
        p.data.add_(0.05 * torch.randn_like(p))
    program = torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), dynamo=True, dynamic_shapes=({0: "batch"},))
    program.save(str(tmp_path / "model.onnx"))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard operators only
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # another batch size than traced
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
