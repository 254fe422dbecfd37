"""What the scripts at the repository root are built from; the library (``import kromhc_vision``) never imports it.

- :mod:`.train_config`: train.py's options (timm train.py's names), YAML configs, their up-front validation.
- :mod:`.train_state`: what a train.py checkpoint keeps besides the weights (:class:`~.train_state.TrainTask`),
  per-epoch seeding, ``steps.csv``.
- :mod:`.evaluation`: a trained model and its data config from a checkpoint, eval loaders, the evaluation loop
  (train.py, eval.py and compare.py).
- :mod:`.compare`: compare.py, every variant side by side (runs, statistics, figures, report).
"""
import json
import os

from timm.utils import load_checkpoint_metadata


class ConfigError(ValueError):
    """A config, command line or input file that cannot run; raised before any work starts."""


def check_device(name):
    """``--device`` as a ``torch.device``, or a :class:`ConfigError` naming it: a string torch cannot read, or CUDA
    where there is none (torch's own errors come as tracebacks once the model is built)."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {name!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r}, but CUDA is not available here (torch {torch.__version__}); "
                          "use --device cpu")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def write_json(path, obj):
    """Write JSON atomically."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def checkpoint_not_found(path, what: str) -> ConfigError:
    """The error for a checkpoint path that is no file; for a run folder, naming the checkpoint in it."""
    if os.path.isdir(path):
        inside = os.path.join(path, 'last.pth.tar')
        hint = f'; its last checkpoint is {inside}' if os.path.isfile(inside) else ''
        return ConfigError(f'{what}: {path} is a folder, not a checkpoint file{hint}')
    return ConfigError(f'{what}: checkpoint file not found: {path}')


def read_checkpoint(path, what: str) -> dict:
    """A checkpoint's entries (tensors memory-mapped, ``weights_only``), or a :class:`ConfigError` naming the file."""
    if not os.path.isfile(path):
        raise checkpoint_not_found(path, what)
    try:
        checkpoint = load_checkpoint_metadata(path)
    except Exception as e:  # empty, truncated, not a torch file, or pickled objects weights_only refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f'{what}: {path} is not a readable checkpoint (empty, truncated or not a torch '
                          f'checkpoint: {reason[:300]})') from None
    return checkpoint if isinstance(checkpoint, dict) else {}
