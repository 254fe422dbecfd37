"""Evaluation shared by train.py, eval.py and compare.py: a trained model from a checkpoint, eval loaders, metrics."""
import os
import sys
import time

import torch
from timm.data import create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint

from ..data import digits_folder
from ..models import CheckpointFileError, PretrainedWeightsUnavailableError
from . import ConfigError, read_checkpoint
from .train_config import check_model_name, create_dataset, image_mode, model_arch, model_kwargs


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


def check_checkpoint(model_name: str, checkpoint, use_ema=False) -> dict:
    """A checkpoint's entries, refused (:class:`ConfigError`) when unreadable, of another model, or without the EMA
    weights ``use_ema`` asks for. Reads only metadata (tensors memory-mapped): cheap, before any model is built."""
    meta = read_checkpoint(checkpoint, 'checkpoint')
    train_args = meta.get('args')
    if train_args is not None and model_arch(train_args.model) != model_arch(model_name):
        raise ConfigError(f'{checkpoint} was trained as {train_args.model!r}, not {model_name!r}')
    if use_ema and not meta.get('state_dict_ema'):
        raise ConfigError(f'--use-ema: {checkpoint} holds no EMA weights (its run did not use --model-ema); '
                          'evaluate its weights without --use-ema')
    return meta


def checkpoint_classes(meta: dict):
    """The class-name -> index map of a train.py checkpoint's training data (None when it does not record one)."""
    return (meta.get('task_state') or {}).get('class_to_idx')


def load_trained_model(model_name: str, checkpoint=None, use_ema=False, num_classes=None):
    """``(model, data_config)``: ``model_name`` with a train.py checkpoint's weights, or its pretrained weights.

    A train.py checkpoint supplies the model settings it was trained with (num_classes, model_kwargs) and its data
    config (image size, interpolation, crop, mean / std); a plain state dict needs ``num_classes``.
    Raises :class:`ConfigError` for a missing or unreadable file, a checkpoint of another model, or ``use_ema``
    on a checkpoint without EMA weights.
    """
    check_model_name(model_name)
    if checkpoint is None:
        try:
            model = create_model(model_name, pretrained=True, num_classes=num_classes)
        except (PretrainedWeightsUnavailableError, CheckpointFileError) as e:
            raise ConfigError(f'pretrained weights of {model_name}: {e}') from None
        except RuntimeError as e:  # timm's, for a name without weights
            if not str(e).startswith('No pretrained weights exist'):
                raise
            raise ConfigError(f'{model_name} has no pretrained weights (give a --checkpoint, or a name with a '
                              f"pretrained tag: timm.list_pretrained('{model_name.split('.')[0]}*'))") from None
        return model, resolve_data_config({}, model=model)
    meta = check_checkpoint(model_name, checkpoint, use_ema)
    train_args = meta.get('args')
    data_config = None
    try:
        if train_args is None:
            model = create_model(model_name, num_classes=num_classes)
        else:
            model = create_model(model_name, **model_kwargs(train_args))
            data_config = (meta.get('task_state') or {}).get('data_config')
            img_mode = getattr(train_args, 'input_img_mode', None)
            if data_config is not None and img_mode:  # the images as the run read them
                data_config = dict(data_config, input_img_mode=img_mode)
    except (CheckpointFileError, OSError) as e:  # a local-dir: / hf-hub: model whose config cannot be read
        raise ConfigError(f'model {model_name!r}: {e}') from None
    if train_args is not None and num_classes is not None and num_classes != model.num_classes:
        raise ConfigError(f'--num-classes {num_classes}: {checkpoint} is a train.py checkpoint of '
                          f'{model.num_classes} classes (the model is built with its run\'s settings; --num-classes is '
                          'for plain state dicts): leave it out')
    try:
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    except RuntimeError as e:  # torch's load_state_dict: every mismatched key, one per line
        if 'Error(s) in loading state_dict' not in str(e):
            raise
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        more = f' (and {len(lines) - 3} more)' if len(lines) > 3 else ''
        raise ConfigError(f"{checkpoint} does not fit {model_name!r}{_head_hint(model, meta, num_classes)}: "
                          f"{' '.join(lines[:3])}{more}") from None
    return model, data_config or resolve_data_config({}, model=model)


def _head_hint(model, state_dict: dict, num_classes) -> str:
    """For a plain state dict whose classifier has another class count than the model: the --num-classes to give."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    for key in ('state_dict', 'model'):  # where timm's load_checkpoint looks, and DataParallel's 'module.' prefix
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    weight = next((state_dict.get(f'{prefix}{classifier}.weight') for prefix in ('', 'module.')
                   if f'{prefix}{classifier}.weight' in state_dict), None) if isinstance(classifier, str) else None
    if not isinstance(weight, torch.Tensor) or weight.shape[0] == getattr(model, 'num_classes', weight.shape[0]):
        return ''
    given = f'--num-classes {num_classes}' if num_classes is not None else f'{model.num_classes} classes (its default)'
    return f' with {given}: its classifier has {weight.shape[0]} outputs (give --num-classes {weight.shape[0]})'


# timm's create_dataset looks for these folder names too (and, failing all, reads the whole root folder)
SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))


def split_folder(data_dir, split: str) -> str:
    """The subfolder of ``data_dir`` that timm's folder dataset reads for ``split``; refused when there is none
    (timm would read the whole folder, every split together)."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f'data folder not found: {data_dir}')
    name = split.split('[')[0]
    candidates = [name] + next((list(s) for s in SPLIT_SYNONYMS if name in s), [])
    for candidate in candidates:
        if os.path.isdir(os.path.join(data_dir, candidate)):
            return os.path.join(data_dir, candidate)
    found = sorted(d.name for d in os.scandir(data_dir) if d.is_dir())
    raise ConfigError(f"split {split!r}: no such subfolder in {data_dir}; it has: {', '.join(found) or 'none'}")


def check_classes(dataset, class_to_idx: dict, where: str):
    """The evaluated data's class indices must be the checkpoint's (a missing class shifts every later label)."""
    actual = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if actual is None or class_to_idx is None or dict(actual) == dict(class_to_idx):
        return
    missing, extra = sorted(set(class_to_idx) - set(actual)), sorted(set(actual) - set(class_to_idx))
    detail = '; '.join(part for part in (f'missing: {", ".join(map(str, missing))}' if missing else '',
                                         f'not in the checkpoint: {", ".join(map(str, extra))}' if extra else '')
                       if part) or 'the same names in another order'
    raise ConfigError(f"the classes of {where} are not the checkpoint's ({detail}): its labels would not be the "
                      "model's outputs")


def eval_loader(data_config, data_dir=None, dataset='', split='validation', batch_size=128, workers=2,
                device=torch.device('cpu'), class_to_idx=None, download=False):
    """timm's eval loader over ``split`` of ``data_dir`` (default: the embedded digits) with ``data_config``.

    For a folder dataset the split's subfolder must exist and, given ``class_to_idx`` (a checkpoint's), hold the
    same classes. ``download``: a ``torch/<name>`` dataset may be downloaded by torchvision."""
    folder = '/' not in dataset
    data_dir = data_dir or (str(digits_folder()) if folder else None)
    if folder:
        split_folder(data_dir, split)
    img_mode = image_mode(data_config.get('input_img_mode'), data_config['input_size'][0])  # as train.py read them
    ds = create_dataset(dataset, root=data_dir, split=split, input_img_mode=img_mode, download=download)
    if folder and class_to_idx is not None:
        check_classes(ds, class_to_idx, f'{split_folder(data_dir, split)}')
    return create_loader(ds, input_size=data_config['input_size'], batch_size=batch_size,
                         interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
                         crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'], num_workers=workers,
                         device=device)
