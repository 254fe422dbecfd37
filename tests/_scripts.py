"""What the script tests share: the root scripts (train.py, eval.py) loaded as modules, the tiny training recipe."""
import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A one-block ViT-Micro on 16px digits: a few hundred milliseconds per epoch on a CPU.
TINY = ['--model', 'vit_micro_patch4_32_kromhc', '--model-kwargs', 'depth=1', 'img_size=16', '--img-size', '16',
        '--num-classes', '10', '--batch-size', '8', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0',
        '--workers', '0', '--log-interval', '1', '--seed', '3']


@functools.cache
def load_script(name: str):
    """``ROOT/<name>.py`` as a module (one per process, shared by the test files)."""
    spec = importlib.util.spec_from_file_location(f'{name}_script', ROOT / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
