"""What the script tests share: the root scripts (train.py, eval.py) loaded as modules, the tiny training recipe,
the end of the tests' own DDP scripts."""
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


# Script code defining gloo_threads(): the names of the running process's threads that are gloo's (Linux: /proc).
GLOO_THREADS = """
import os


def gloo_threads():
    names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]
    return [n for n in names if 'gloo' in n]
"""


# The end of a test's own DDP script (one that holds its DistributedDataParallel wrapper as the global ``ddp``).
# The wrapper holds the process group, so destroy_process_group alone leaves gloo's worker threads running into
# interpreter shutdown; one of them releasing a finished collective's tensors there takes the GIL and aborts the
# process ("terminate called without an active exception", exit -6: a few runs in a hundred on 2 cores). Dropped
# first, the group goes with destroy_process_group, which joins its threads; the assert proves they are gone.
END_DDP_SCRIPT = GLOO_THREADS + """
import gc
del ddp
gc.collect()
dist.destroy_process_group()
if os.path.isdir('/proc/self/task'):
    assert not gloo_threads(), f'gloo threads outlive the process group: {gloo_threads()}'
"""
