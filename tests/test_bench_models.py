"""``benchmarks/bench_models_cpu.py``: its baselines are the architectures they stand for, and a memory-only
run on the micro family prints one row per variant and setting."""
import sys
from pathlib import Path

import timm
import torch

import kromhc_vision  # noqa: F401  (registers the models)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_models_cpu  # noqa: E402


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
