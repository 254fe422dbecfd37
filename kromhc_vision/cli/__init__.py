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


class ConfigError(ValueError):
    """A config, command line or input file that cannot run; raised before any work starts."""


def write_json(path, obj):
    """Write JSON atomically."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
