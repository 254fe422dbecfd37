"""Evaluation shared by train.py, eval.py and compare.py: a trained model from a checkpoint, eval loaders, metrics."""
import os
import sys
import time

import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint
from timm.utils import load_checkpoint_metadata

from ..data import digits_folder
from . import ConfigError
from .train_config import model_kwargs


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal, else the iterable itself (callers log plain lines)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


@torch.no_grad()
def evaluate(model, loader, device, autocast, evaluator, distributed=False, desc='Eval', log=True,
             channels_last=False) -> dict:
    """loss / top1 / top5 (timm's ClassificationEvaluator) and images/s over ``loader``."""
    model.eval()
    evaluator.reset()
    start, count = time.perf_counter(), 0
    bar = progress(loader, len(loader), desc, log)
    for input, target in bar:
        input, target = input.to(device), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(input)
        evaluator.update(output, target)
        count += input.shape[0]
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    metrics = evaluator.compute(distributed=distributed)
    metrics['img_per_sec'] = count * (torch.distributed.get_world_size() if distributed else 1) / max(
        time.perf_counter() - start, 1e-9)
    return dict(metrics)


def load_trained_model(model_name: str, checkpoint=None, use_ema=False, num_classes=None):
    """``(model, data_config)``: ``model_name`` with a train.py checkpoint's weights, or its pretrained weights.

    A train.py checkpoint supplies the model settings it was trained with (num_classes, model_kwargs) and its data
    config (image size, interpolation, crop, mean / std); a plain state dict needs ``num_classes``.
    Raises :class:`ConfigError` for a missing file or a checkpoint of another model.
    """
    if checkpoint is None:
        model = create_model(model_name, pretrained=True, num_classes=num_classes)
        return model, resolve_data_config({}, model=model)
    if not os.path.isfile(checkpoint):
        raise ConfigError(f'checkpoint not found: {checkpoint}')
    meta = load_checkpoint_metadata(checkpoint)
    train_args = meta.get('args') if isinstance(meta, dict) else None
    data_config = None
    if train_args is None:
        model = create_model(model_name, num_classes=num_classes)
    else:
        if train_args.model.split('.')[0] != model_name.split('.')[0]:
            raise ConfigError(f'{checkpoint} was trained as {train_args.model!r}, not {model_name!r}')
        model = create_model(model_name, **model_kwargs(train_args))
        data_config = (meta.get('task_state') or {}).get('data_config')
    load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model, data_config or resolve_data_config({}, model=model)


def eval_loader(data_config, data_dir=None, dataset='', split='validation', batch_size=128, workers=2,
                device=torch.device('cpu')):
    """timm's eval loader over ``split`` of ``data_dir`` (default: the embedded digits) with ``data_config``."""
    data_dir = data_dir or str(digits_folder())
    if not os.path.isdir(data_dir) and '/' not in dataset:
        raise ConfigError(f'data folder not found: {data_dir}')
    ds = create_dataset(dataset, root=data_dir, split=split)
    return create_loader(ds, input_size=data_config['input_size'], batch_size=batch_size,
                         interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
                         crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'], num_workers=workers,
                         device=device)

