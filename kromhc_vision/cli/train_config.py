"""train.py's options: timm train.py's arguments, YAML configs and their validation before any work.

Config keys are timm train.py's argument names with underscores (``batch_size``, ``model_kwargs``, ...), with
timm's meanings, so a config runs unchanged under timm's own train.py given ``device_modules: [kromhc_vision]``.
"""
import argparse
import difflib
import importlib
import inspect
import os
import re
import warnings
from pathlib import Path

import timm
import torch
import yaml
from PIL import Image
from timm.data import auto_augment, resolve_data_config
from timm.data import dataset_factory as timm_datasets
from timm.data import transforms as timm_transforms
from timm.models import parse_model_name
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ParseKwargs

from ..cpu_allocator import CPU_MALLOC_CHOICES
from ..data import DatasetIntegrityError, DatasetUnavailableError, digits_folder, torch_dataset_root
from ..optim import check_opt_name
from . import ConfigError, check_device, checkpoint_not_found, read_checkpoint
from .run_folder import check_run_dir, choose_run_dir, resumes_in, unmade_copies

# timm train.py options this train.py does not implement; named as such instead of "unknown key".
TIMM_UNSUPPORTED = (
    'data', 'torchscript', 'fuser', 'fast_norm', 'amp_impl', 'model_dtype', 'no_ddp_bb', 'synchronize_step',
    'local_rank', 'aug_splits', 'jsd_loss', 'split_bn', 'drop_connect', 'recovery_interval', 'save_images', 'tta',
    'use_multi_epochs_loader', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',
)



# timm 1.0.31's create_scheduler_v2 names ('none': no schedule); it raises on any other, but only after the model
# and data are built.
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant', 'plateau', 'none')
# Value ranges checked before any work (timm takes these unchecked).
NON_NEGATIVE = ('weight_decay', 'warmup_epochs', 'cooldown_epochs', 'patience_epochs', 'workers', 'warmup_lr',
                'min_lr', 'momentum', 'mixup', 'cutmix', 'epoch_repeats', 'aug_repeats', 'layer_decay_min_scale',
                'lr_noise_std', 'color_jitter', 'recount', 'mixup_off_epoch', 'slow_loss_weight')
POSITIVE_IF_SET = ('lr', 'lr_base', 'clip_grad', 'layer_decay', 'validation_batch_size', 'lr_base_size')
# Names timm takes as strings and refuses (KeyError, AssertionError) only when the data is built. Interpolations:
# timm's own table (private: where a timm release lacks it, the name is left to timm); the rest are written in timm
# 1.0.31's code, not exported.
INTERPOLATIONS = tuple(getattr(timm_transforms, '_str_to_pil_interpolation', ()))
TRAIN_CROP_MODES = ('rrc', 'rkrc', 'rkrr')  # transforms_imagenet_train; unset = 'rrc'
RANDOM_ERASING_MODES = ('const', 'rand', 'pixel')  # RandomErasing
AUTO_AUGMENT_POLICIES = ('v0', 'v0r', 'original', 'originalr', '3a')  # auto_augment_policy
DATASET_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')  # create_dataset; no prefix: folder (or tar)
_TORCH_BASIC_DATASETS = getattr(timm_datasets, '_TORCH_BASIC_DS', None)  # private: where absent, names unchecked
TORCH_DATASETS = (*_TORCH_BASIC_DATASETS, 'inaturalist', 'inat', 'places365', 'qmnist', 'imagenet', 'image_folder',
                  'folder') if _TORCH_BASIC_DATASETS else ()
ITERABLE = ('hfids', 'tfds', 'wds')  # prefixes of timm's iterable datasets
NOT_DOWNLOADED = ('imagenet', 'image_folder', 'folder')  # torch/ datasets timm builds without torchvision's download
# Options of two values (min, max); argparse's nargs='+' takes any number.
PAIRS = ('scale', 'ratio', 'cutmix_minmax')
FRACTIONS = ('smoothing', 'drop', 'drop_path', 'drop_block', 'reprob', 'hflip', 'vflip', 'mixup_prob',
             'mixup_switch_prob', 'model_ema_decay', 'color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob',
             'lr_noise_pct')


def build_parser() -> argparse.ArgumentParser:
    """timm train.py's arguments (the supported subset), same names, meanings and defaults unless noted."""
    p = argparse.ArgumentParser(
        description='Train a timm model (hyper-connected or not). Config keys = these options with underscores.',
        allow_abbrev=False)
    flag = dict(action=argparse.BooleanOptionalAction, default=False)  # --x / --no-x
    neg = dict(action='store_true', default=False)  # options named no-*
    kw = dict(nargs='*', default={}, action=ParseKwargs)
    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', default=None,
                   help='dataset root; ImageNet-style folder with train/validation subfolders for the folder '
                        'dataset (default here: the embedded digits dataset, see kromhc_vision.data)')
    g.add_argument('--dataset', default='', help='"<type>/<name>", e.g. hfds/..., torch/cifar10; empty = folder')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--train-num-samples', type=int, default=None,
                   help="samples per epoch of an iterable dataset (hfids/, tfds/, wds/), as timm's")
    g.add_argument('--val-num-samples', type=int, default=None,
                   help="samples of an iterable validation dataset (hfids/, tfds/, wds/), as timm's")
    g.add_argument('--dataset-download', **flag)
    g.add_argument('--class-map', default='')
    g.add_argument('--input-img-mode', default=None)
    g.add_argument('--input-key', default=None)
    g.add_argument('--target-key', default=None)
    g.add_argument('--dataset-trust-remote-code', **flag)
    g = p.add_argument_group('Model')
    g.add_argument('--model', default='vit_micro_patch4_32_kromhc', help='timm model name (default differs: timm '
                   'uses resnet50)')
    g.add_argument('--pretrained', **flag)
    g.add_argument('--pretrained-path', default=None)
    g.add_argument('--initial-checkpoint', default='')
    g.add_argument('--resume', default='', help='checkpoint to continue from (model, EMA, optimizer, scheduler, '
                   'scaler, epoch, step)')
    g.add_argument('--no-resume-opt', **neg)
    g.add_argument('--num-classes', type=int, default=None)
    g.add_argument('--gp', default=None)
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--in-chans', type=int, default=None)
    g.add_argument('--input-size', type=int, nargs=3, default=None)
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('-b', '--batch-size', type=int, default=128)
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--channels-last', **flag)
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--grad-checkpointing', **flag)
    g.add_argument('--model-kwargs', **kw)
    g.add_argument('--head-init-scale', type=float, default=None)
    g.add_argument('--head-init-bias', type=float, default=None)
    g.add_argument('--torchcompile', nargs='?', default=None, const='inductor')
    g.add_argument('--torchcompile-mode', default=None)
    g = p.add_argument_group('Device & distributed (launch with torchrun for DDP)')
    g.add_argument('--device', default=None, help="default: 'cuda' when available, else 'cpu' (timm: 'cuda')")
    g.add_argument('--amp', **flag)
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--cpu-malloc', default='retain', choices=CPU_MALLOC_CHOICES,
                   help="on CPU: 'retain' keeps freed activation memory in glibc's heap for the next step "
                        "(kromhc_vision.cpu_allocator); 'default' leaves malloc as it is")
    g.add_argument('--device-modules', nargs='+', default=None, help='modules to import first, e.g. kromhc_vision')
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--layer-decay-min-scale', type=float, default=0.)
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None)
    g.add_argument('--opt-kwargs', **kw)
    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', choices=SCHEDULERS)
    g.add_argument('--sched-on-updates', **flag)
    g.add_argument('--lr', type=float, default=None)
    g.add_argument('--lr-base', type=float, default=0.1)
    g.add_argument('--lr-base-size', type=int, default=256)
    g.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'))
    g.add_argument('--lr-noise', type=float, nargs='+', default=None)
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--lr-cycle-mul', type=float, default=1.0)
    g.add_argument('--lr-cycle-decay', type=float, default=0.5)
    g.add_argument('--lr-cycle-limit', type=int, default=1)
    g.add_argument('--lr-k-decay', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0.)
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--epoch-repeats', type=float, default=0.)
    g.add_argument('--start-epoch', type=int, default=None)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-prefix', **flag)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--patience-epochs', type=int, default=10)
    g.add_argument('--decay-rate', type=float, default=0.1)
    g = p.add_argument_group('Augmentation & regularization')
    g.add_argument('--no-aug', **neg)
    g.add_argument('--train-crop-mode', default=None)
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--color-jitter-prob', type=float, default=None)
    g.add_argument('--grayscale-prob', type=float, default=None)
    g.add_argument('--gaussian-blur-prob', type=float, default=None)
    g.add_argument('--aa', default=None, help='auto augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--aug-repeats', type=float, default=0)
    g.add_argument('--bce-loss', **flag)
    g.add_argument('--bce-sum', **flag)
    g.add_argument('--bce-target-thresh', type=float, default=None)
    g.add_argument('--bce-pos-weight', type=float, default=None)
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--resplit', **flag)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    g.add_argument('--mixup-off-epoch', type=int, default=0)
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--slow-loss-weight', type=float, default=1.0,
                   help='weight of model.slow_loss() in the loss, for models that have one (Terminator); not in timm')
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--drop', type=float, default=0.0)
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--drop-block', type=float, default=None)
    g = p.add_argument_group('Batch norm')
    g.add_argument('--bn-momentum', type=float, default=None)
    g.add_argument('--bn-eps', type=float, default=None)
    g.add_argument('--sync-bn', **flag)
    g.add_argument('--dist-bn', default='reduce', choices=('broadcast', 'reduce', ''))
    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', **flag)
    g.add_argument('--model-ema-force-cpu', **flag)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', **flag)
    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--worker-seeding', default='all', choices=('all', 'part'))
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--pin-mem', **flag)
    g.add_argument('--no-prefetcher', **neg)
    g.add_argument('--output', default='', help='output root (default ./output/train)')
    g.add_argument('--experiment', default='', help='run folder name under output (default: time-model-size)')
    g.add_argument('--overwrite', **dict(flag, help='replace the run in an existing run folder (not in timm; '
                                               'default: refuse, naming --resume and --experiment)'))
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    return p


def _close(key, known):
    matches = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ''


def constructor_keywords(cls) -> list:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s named parameters, and its bases' for as long as
    each passes ``**kwargs`` on (a VisionTransformerHC's own ``hc_*`` and then timm's VisionTransformer's)."""
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None or klass is torch.nn.Module:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name != 'self' and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


_UNEXPECTED_KEYWORD = re.compile(r"got an unexpected keyword argument '([^']+)'")


def unexpected_model_keyword(args, error: Exception) -> str:
    """For timm's ``... got an unexpected keyword argument 'x'`` from building ``args.model``: what the model takes
    instead (it is built once more on the meta device without ``x``, to read its class); '' where that fails."""
    match = _UNEXPECTED_KEYWORD.search(str(error))
    if not isinstance(error, TypeError) or match is None:
        return ''
    key = match.group(1)
    kwargs = {k: v for k, v in model_kwargs(args).items() if k != key}
    try:
        with torch.device('meta'):
            cls = type(timm.create_model(args.model, pretrained=False, **kwargs))
    except Exception:  # another problem in the settings, or a model whose config cannot be read: the plain message
        return ''
    names = constructor_keywords(cls)
    option = MODEL_OPTIONS.get(key)
    source = (f"model_kwargs {key}={args.model_kwargs[key]!r}" if key in args.model_kwargs else
              f"{option}={getattr(args, option)!r} (passed as {key})" if option else f"argument {key!r}")
    return (f"{source}: {cls.__name__} takes no argument {key!r}{_close(key, names)}; "
            f"its arguments: {', '.join(names)}")


def model_arch(name: str) -> str:
    """What names one architecture: a registered name without its pretrained tag (``.augreg_in21k``); a name with a
    source prefix (``hf-hub:``, ``local-dir:``) whole."""
    try:
        prefixed = parse_model_name(name)[0] is not None
    except ValueError:
        prefixed = False
    return name if prefixed else name.split('.')[0]


def check_model_name(name: str) -> None:
    """Refuse (:class:`ConfigError`) a model name timm's ``create_model`` cannot resolve, naming the closest
    registered ones; names with a source prefix (``hf-hub:<repo>``, ``local-dir:<folder>``) pass, their files are
    read (and their errors named) where the model is built."""
    try:
        source, _ = parse_model_name(name)
    except ValueError as e:  # a path or repo id without its prefix, an unknown prefix: timm's message names both
        raise ConfigError(f"model: {e}") from None
    if source is None and not timm.is_model(name):
        raise ConfigError(f"model: unknown model {name!r}{_close(name.split('.')[0], timm.list_models())}")


def _unknown(key: str, known, where: str) -> ConfigError:
    if key in TIMM_UNSUPPORTED:
        return ConfigError(f"{where}: timm train.py option {key!r} is not supported by this train.py")
    return ConfigError(f"{where}: unknown key {key!r}{_close(key, known)}")


def _check_value(action: argparse.Action, key: str, value, where: str):
    """YAML values must already have the option's type (as timm's train.py uses them unconverted)."""
    def bad(expected):
        hint = ''
        if action.type in (int, float) and isinstance(value, str):
            try:
                float(value)
                hint = ' (YAML reads numbers like 5e-4 as strings; write 5.0e-4)'
            except ValueError:
                pass
        return ConfigError(f"{where}: {key}: expected {expected}, got {value!r} ({type(value).__name__}){hint}")

    if value is None and action.default is None:  # the option's "not set"; null (`key:`) for another is refused below
        return
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise bad('true or false')
        return
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise bad('a mapping')
        return
    items = value
    if action.nargs is not None and action.nargs != '?':
        if not isinstance(value, list):
            raise bad('a list')
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise bad(f'a list of {action.nargs} values')
    else:
        items = [value]
    types = {int: (int,), float: (int, float), None: (str,)}[action.type]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, types):
            raise bad({int: 'an integer', float: 'a number', None: 'a string'}[action.type])
        if action.choices is not None and item not in action.choices:
            raise ConfigError(f"{where}: {key}: {item!r} is not one of {list(action.choices)}")


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config and check every key and value against ``parser``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    for key, value in cfg.items():
        if key not in actions:
            raise _unknown(key, list(actions), str(path))
        _check_value(actions[key], key, value, str(path))
    return cfg


def parse_args(argv=None):
    """``-c config.yaml`` then options; the command line overrides the config (``--model-kwargs k=v`` overrides
    the config's ``model_kwargs`` key by key, the others stay). Returns ``(args, args_text)``.

    With ``--resume``, the settings of the run it continues (the checkpoint's args, else its folder's args.yaml)
    are the defaults under the config and the command line, which must not contradict them in :data:`RESUME_FIXED`.
    """
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_help = 'YAML config; its keys are the options below, underscored'
    config_parser.add_argument('-c', '--config', default='', help=config_help)
    cfg_args, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    parser.add_argument('-c', '--config', default='', help=config_help)
    cfg = load_config(cfg_args.config, parser) if cfg_args.config else {}
    parser.set_defaults(**cfg)
    args, unknown = parser.parse_known_args(remaining)
    for item in unknown:
        if item.startswith('-'):
            key = item.lstrip('-').split('=')[0].replace('-', '_')
            raise _unknown(key, [a.dest for a in parser._actions], 'command line')
        raise ConfigError(f"command line: unexpected argument {item!r}")
    del args.config
    for action in parser._actions:  # key=value options: the command line's keys over the config's, not instead
        if isinstance(action, ParseKwargs) and isinstance(cfg.get(action.dest), dict):
            setattr(args, action.dest, {**cfg[action.dest], **getattr(args, action.dest)})
    if args.resume:
        restore_run_args(args, set(cfg) | given_on_command_line(remaining))
    return args, yaml.safe_dump(vars(args), default_flow_style=False)


def given_on_command_line(argv) -> set:
    """The options ``argv`` sets, in any spelling (``--batch-size=5``, ``-b5``, ``-b 5``): it is parsed again with
    every default replaced by a sentinel, and the options whose value is no longer the sentinel were given."""
    unset = object()
    parser = build_parser()
    for action in parser._actions:
        if action.default is not argparse.SUPPRESS:
            action.default = unset
    args, _ = parser.parse_known_args(argv)
    return {key for key, value in vars(args).items() if value is not unset}


# What a resumed run takes from the run it continues and may not change: what the weights are, and what the
# checkpoint restores (timm's optimizer and scheduler state, whose t_initial etc. would silently override a new
# value: a longer --epochs would train its extra epochs at the schedule's end learning rate).
RESUME_FIXED = {
    'model': 'the weights', 'num_classes': 'the weights', 'img_size': 'the weights', 'input_size': 'the weights',
    'in_chans': 'the weights', 'gp': 'the weights', 'opt': 'the optimizer state',
    'model_ema': 'the EMA weights (dropped, or begun anew from the weights of the resumed epoch)',
    'eval_metric': 'the best checkpoint, the checkpoint history and a plateau schedule, ranked by the metric',
    **{k: 'the learning-rate schedule' for k in (
        'epochs', 'sched', 'sched_on_updates', 'lr', 'lr_base', 'lr_base_size', 'lr_base_scale', 'warmup_epochs',
        'warmup_lr', 'warmup_prefix', 'min_lr', 'cooldown_epochs', 'decay_epochs', 'decay_milestones',
        'decay_rate', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay', 'lr_noise', 'lr_noise_pct',
        'lr_noise_std', 'patience_epochs')},
}
# Restored with the optimizer state (torch's load_state_dict takes the param groups' settings from the checkpoint):
# a new value would be ignored, or (another layer decay: other groups) fail; free with --no-resume-opt, as is `opt`.
OPTIMIZER_SETTINGS = ('weight_decay', 'momentum', 'opt_eps', 'opt_betas', 'layer_decay', 'layer_decay_min_scale',
                      'layer_decay_no_opt_scale', 'opt_kwargs')
RESUME_FIXED.update({k: 'the optimizer state' for k in OPTIMIZER_SETTINGS})
# Which OptimInfo flag says the optimizer reads a setting (the others are read by every optimizer timm makes).
_OPTIMIZER_FLAGS = {'momentum': 'has_momentum', 'opt_betas': 'has_betas', 'opt_eps': 'has_eps'}


def _optimizer_info(opt: str):
    """timm's ``OptimInfo`` of optimizer ``opt`` (a ``lookahead_`` prefix allowed: lookahead_adamw is adamw), or None
    for a name timm does not know."""
    try:
        return get_optimizer_info(opt.lower().split('_')[-1])
    except ValueError:
        return None


def _optimizer_reads(opt: str, key: str) -> bool:
    """Whether timm's optimizer ``opt`` reads setting ``key``: a setting it ignores may change on resume."""
    return getattr(_optimizer_info(opt), _OPTIMIZER_FLAGS.get(key, ''), True)


def _free_on_resume(args, key: str) -> bool:
    """Whether a resume may change ``key`` of :data:`RESUME_FIXED`: the optimizer and its settings with
    --no-resume-opt (a fresh optimizer), and a setting the optimizer does not read."""
    return (args.no_resume_opt and key in ('opt', *OPTIMIZER_SETTINGS)) or (
        key in OPTIMIZER_SETTINGS and not _optimizer_reads(args.opt, key))


# model_kwargs that change how a model computes, not what it holds: a resumed run may set them anew.
RUNTIME_MODEL_KWARGS = ('hc_backend', 'hc_recompute')
# Not taken from the recorded run: where this invocation reads and writes, and how it starts.
NOT_RESTORED = ('resume', 'no_resume_opt', 'start_epoch', 'output', 'experiment', 'overwrite', 'device',
                'pretrained', 'initial_checkpoint', 'pretrained_path')


def read_resume_checkpoint(path) -> dict:
    """``path``'s entries; a :class:`ConfigError` unless it is a train.py (timm training) checkpoint."""
    checkpoint = read_checkpoint(path, 'resume')
    if 'epoch' not in checkpoint or not ({'state_dict', 'model'} & set(checkpoint)):
        raise ConfigError(f'resume: {path} is not a train.py checkpoint (it has no epoch and training state, e.g. '
                          'a plain state dict of weights); to start a new run from its weights, use '
                          f'--initial-checkpoint {path}')
    return checkpoint


def recorded_run_args(path) -> dict:
    """The args of the run ``path`` (a train.py checkpoint) belongs to: the checkpoint's, else its args.yaml's."""
    recorded = read_resume_checkpoint(path).get('args')
    if recorded is not None:
        return dict(vars(recorded))
    args_yaml = os.path.join(os.path.dirname(os.path.abspath(path)), 'args.yaml')
    if os.path.isfile(args_yaml):
        try:
            return dict(yaml.safe_load(open(args_yaml)) or {})
        except (yaml.YAMLError, TypeError, ValueError) as e:
            raise ConfigError(f'resume: cannot read {args_yaml}: {e}') from None
    return {}


def restore_run_args(args, given):
    """Fill ``args`` from the resumed run's recorded args where the user did not set a key; refuse contradictions."""
    recorded = recorded_run_args(args.resume)
    problems = []

    def differ(key, here, there, why):
        problems.append(f'{key} is {here!r} here but {there!r} in the run being resumed ({why} of that run)')

    for key, there in recorded.items():
        if not hasattr(args, key) or key in NOT_RESTORED:
            continue
        here = getattr(args, key)
        if key == 'model_kwargs':
            merged = dict(there or {})
            for k, v in (here.items() if key in given else ()):
                if k not in RUNTIME_MODEL_KWARGS and merged.get(k, '<not set>') != v:
                    differ(f'model_kwargs {k}', v, merged.get(k, '<not set>'), 'the weights')
                merged[k] = v
            args.model_kwargs = merged
        elif key not in given:
            if key in ('train_num_samples', 'val_num_samples', 'epoch_repeats') \
                    and dataset_prefix(recorded.get('dataset')) not in ITERABLE:
                there = getattr(args, key)  # ignored by timm in that run (a map-style dataset; refused since)
            setattr(args, key, there)
        elif key in RESUME_FIXED and not _free_on_resume(args, key):
            same = model_arch(here) == model_arch(there) if key == 'model' and there else here == there
            if not same and not (key == 'lr' and here is None):
                differ(key, here, there, RESUME_FIXED[key])
    if args.sched_on_updates and args.sched != 'none':  # its position is the update count: the same updates per epoch
        world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun's; train.py records it in args.world_size
        for key, here in (('batch_size', args.batch_size), ('grad_accum_steps', args.grad_accum_steps),
                          ('world_size', world_size)):
            if key in recorded and recorded[key] != here:
                differ(key, here, recorded[key], 'updates per epoch, which --sched-on-updates fixes in the '
                       'learning-rate schedule')
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        # with the prefetcher timm's FastCollateMixup draws in the loader workers, from each worker's RNG, without it
        # timm's Mixup in the main process: another worker count, or the other one, draws other mixes (a run is
        # reproducible with its own)
        for key in ('no_prefetcher',) + (() if args.no_prefetcher else ('workers',)):
            if key in recorded and recorded[key] != getattr(args, key):
                differ(key, getattr(args, key), recorded[key], 'the mixup / cutmix draws, made in the loader '
                       'workers with the prefetcher')
    if problems:
        raise ConfigError(f'resume: {args.resume}: ' + '; '.join(problems) + '. Leave these out to continue the '
                          'run as recorded, or start a new run (e.g. from its weights: --initial-checkpoint '
                          f'{args.resume} --experiment NEW_NAME)')


def probe_schedule(args) -> int:
    """Build the schedule on a one-parameter optimizer (timm checks its arguments only when it is built, after the
    model and data otherwise); returns the run's length in epochs, as train.py counts it (cooldown, cycles, warmup
    prefix). One update per epoch: timm scales every length by the updates per epoch alike."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr or 1.)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # the plateau schedule's deprecation, said in train.py
            scheduler, num_epochs = create_scheduler_v2(probe, **scheduler_kwargs(args), updates_per_epoch=1)
            for t in (0, num_epochs - 1) if scheduler is not None else ():  # the warmup's lr, and the decay's
                scheduler.step_update(t) if args.sched_on_updates else scheduler.step(t)
    except (ValueError, TypeError, AssertionError, ArithmeticError) as e:
        raise ConfigError(f'sched {args.sched!r} with these settings (epochs {args.epochs}, warmup_epochs '
                          f'{args.warmup_epochs}, decay_epochs {args.decay_epochs}, cooldown_epochs '
                          f'{args.cooldown_epochs}) cannot be built: {e}') from None
    return num_epochs


def check_resume(args, num_epochs: int, folder):
    """Only a train.py checkpoint resumes; a finished run (``num_epochs``: the run's length,
    :func:`probe_schedule`) has nothing left to resume: say so, and how to train longer. Unless the run continues
    in ``folder`` and was killed in its last epoch after writing last.pth.tar, before its copies: the resume makes
    them, and trains no epoch."""
    checkpoint = read_resume_checkpoint(args.resume)
    if args.start_epoch is not None:
        return
    next_epoch = checkpoint['epoch'] + (1 if checkpoint.get('version', 1) > 1 else 0)
    if next_epoch >= num_epochs and not (resumes_in(args, folder) and unmade_copies(
            args.resume, checkpoint.get('saver'), args.checkpoint_hist, decreasing=args.eval_metric == 'loss')):
        raise ConfigError(
            f'resume: {args.resume} is the end of a finished run ({next_epoch} of {num_epochs} epochs); '
            'its schedule is spent (a longer --epochs cannot extend it: the epochs so far followed the recorded '
            f'schedule). To train longer, start a new run from its weights: --initial-checkpoint {args.resume} '
            '--epochs N --experiment NEW_NAME')


def import_device_modules(args):
    """Import ``device_modules`` (e.g. kromhc_vision, which registers its models with timm)."""
    for name in args.device_modules or ():
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"device_modules: cannot import {name!r}: {e}") from None


# Options passed to create_model, by the keyword it takes (timm's create_model drops those left None).
MODEL_OPTIONS = dict(num_classes='num_classes', drop_rate='drop', drop_path_rate='drop_path',
                     drop_block_rate='drop_block', global_pool='gp', bn_momentum='bn_momentum', bn_eps='bn_eps')


def model_kwargs(args) -> dict:
    """``create_model`` keyword arguments, as timm's train.py builds them."""
    in_chans = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    kwargs = dict(in_chans=in_chans, **{key: getattr(args, option) for key, option in MODEL_OPTIONS.items()},
                  **args.model_kwargs)
    if args.pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    return kwargs


def is_folder_dataset(args) -> bool:
    return '/' not in (args.dataset or '')


def check_ranges(args):
    """Numbers outside what they mean (a negative weight decay, warmup or worker count, a probability above 1) and
    lists of another length than timm reads (scale, ratio, cutmix_minmax, mean, std, opt_betas)."""
    for key in NON_NEGATIVE:
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(args, key)}")
    for key in POSITIVE_IF_SET:
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(args, key)}")
    for key in FRACTIONS:
        if getattr(args, key) is not None and not 0 <= getattr(args, key) <= 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {getattr(args, key)}")
    for key in PAIRS:
        if getattr(args, key) is not None and len(getattr(args, key)) != 2:
            raise ConfigError(f"{key} takes two values (min max), got {getattr(args, key)}")
    in_chans = args.input_size[0] if args.input_size else (args.in_chans if args.in_chans is not None else 3)
    for key in ('mean', 'std'):
        if getattr(args, key) is not None and len(getattr(args, key)) not in (1, in_chans):
            raise ConfigError(f"{key} takes 1 value or one per input channel ({in_chans}), got {getattr(args, key)}")
    try:
        check_opt_name(args.opt)  # lookahead_projunn*: timm's Lookahead breaks orthogonality
    except ValueError as e:
        raise ConfigError(f"opt: {e}") from None
    opt_info = _optimizer_info(args.opt)
    if opt_info is None:  # timm's factory would say only 'not found in registry'
        raise ConfigError(f"opt: unknown optimizer {args.opt!r}{_close(args.opt.lower(), list_optimizers())}; "
                          "timm.optim.list_optimizers() lists them (a 'lookahead_' prefix may precede one)")
    if args.opt_betas is not None and opt_info.has_betas and len(args.opt_betas) != opt_info.num_betas:
        raise ConfigError(f"opt_betas: optimizer {args.opt!r} takes {opt_info.num_betas} betas, got {args.opt_betas}")


def check_data_options(args):
    """The augmentation, interpolation and image-mode names timm takes unchecked until the data is built."""
    for key, extra in (('interpolation', ('', None)), ('train_interpolation', ('', None, 'random'))):
        if INTERPOLATIONS and getattr(args, key) not in (*extra, *INTERPOLATIONS):
            raise ConfigError(f"{key}: {getattr(args, key)!r} is not one of {[*extra[2:], *INTERPOLATIONS]}")
    if args.train_crop_mode and args.train_crop_mode not in TRAIN_CROP_MODES:
        raise ConfigError(f"train_crop_mode: {args.train_crop_mode!r} is not one of {list(TRAIN_CROP_MODES)}")
    if args.remode and args.remode.lower() not in RANDOM_ERASING_MODES:
        raise ConfigError(f"remode: {args.remode!r} is not one of {list(RANDOM_ERASING_MODES)}")
    if args.aa:  # timm's own parser of the spec, as its train transform calls it
        build = (auto_augment.rand_augment_transform if args.aa.startswith('rand') else
                 auto_augment.augment_and_mix_transform if args.aa.startswith('augmix') else
                 auto_augment.auto_augment_transform)
        try:
            build(args.aa)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"aa: {args.aa!r} is not an auto-augment spec timm can read "
                              f"({str(e) or type(e).__name__}); expected rand-<options> (e.g. rand-m9-mstd0.5-inc1), "
                              "augmix-<options> (e.g. augmix-m5-w4-d2) or an AutoAugment policy "
                              f"{list(AUTO_AUGMENT_POLICIES)}[-mstd<x>]") from None
    if args.input_img_mode is not None and args.input_img_mode not in Image.MODES:
        raise ConfigError(f"input_img_mode: {args.input_img_mode!r} is not one of PIL's modes {list(Image.MODES)}")
    for key in ('train_num_samples', 'val_num_samples'):  # timm's create_dataset hands them to iterable readers only
        value = getattr(args, key)
        if value is not None and (value < 1 or dataset_prefix(args.dataset) not in ITERABLE):
            raise ConfigError(f"{key}: {value} " + ("must be >= 1" if value < 1 else
                              f"applies to iterable datasets only (prefixes {', '.join(p + '/' for p in ITERABLE)}): "
                              f"the length of {args.dataset or 'an image folder'} is its number of images, and timm "
                              "would ignore it"))
    if args.epoch_repeats and dataset_prefix(args.dataset) not in ITERABLE:  # also handed to iterable readers only
        raise ConfigError(f"epoch_repeats: {args.epoch_repeats} applies to iterable datasets only (prefixes "
                          f"{', '.join(p + '/' for p in ITERABLE)}): timm would ignore it for "
                          f"{args.dataset or 'an image folder'}, whose epoch is each image once")
    single = int(os.environ.get('WORLD_SIZE', 1)) == 1
    if int(args.aug_repeats) and (single or dataset_prefix(args.dataset) in ITERABLE):
        raise ConfigError(f"aug_repeats: {args.aug_repeats} needs distributed training (torchrun, several processes) "
                          "on a map-style dataset (folder, torch/...): timm's repeated-augmentation sampler is "
                          "distributed only")


def check_torchcompile(backend, mode):
    """torch.compile's backend and mode, which torch checks when the model is compiled, after it and the data are
    built (a traceback in the run folder)."""
    import torch._dynamo  # noqa: F401 (slow to import: only for --torchcompile)
    try:
        torch.compile(torch.nn.Identity(), backend=backend, mode=mode)  # lazy: looks up the backend, reads the mode
    except RuntimeError as e:
        if isinstance(e, torch._dynamo.exc.InvalidBackend):
            backends = torch._dynamo.list_backends(exclude_tags=())
            raise ConfigError(f"torchcompile: {backend!r} is not a torch.compile backend{_close(backend, backends)}; "
                              f"torch._dynamo.list_backends() lists the usual ones: "
                              f"{torch._dynamo.list_backends()}") from None
        raise ConfigError(f"torchcompile_mode: {e}") from None


def image_mode(input_img_mode, channels: int) -> str:
    """The PIL mode images are read in (timm's train.py rule): ``input_img_mode``, else 'RGB' for a 3-channel model
    and 'L' for any other."""
    return input_img_mode or ('RGB' if channels == 3 else 'L')


def check_image_mode(args, channels: int):
    """The images timm reads (:func:`image_mode`) must have the model's channel count: another fails at the first
    step. torchvision datasets (torch/) take no image mode."""
    if dataset_prefix(args.dataset) == 'torch':
        return
    mode = image_mode(args.input_img_mode, channels)
    bands = Image.getmodebands(mode)
    if bands != channels:
        how = f"input_img_mode {mode!r} reads {bands}" if args.input_img_mode else \
            f"input_img_mode {mode!r} (the default for {channels}) reads {bands}"
        modes = [m for m in Image.MODES if Image.getmodebands(m) == channels]
        key = 'input_img_mode' if args.input_img_mode else 'in_chans'
        raise ConfigError(f"{key}: the model takes {channels}-channel images but {how} (in_chans / input_size, "
                          f"input_img_mode); give --input-img-mode of {channels} channels"
                          + (f" ({', '.join(modes)})" if modes else ' (PIL has none: a model of fewer channels)'))


def dataset_prefix(dataset) -> str:
    """A dataset spec's reader prefix as timm reads it (lower case; '' for the folder dataset)."""
    prefix, sep, _ = (dataset or '').partition('/')
    return prefix.lower() if sep else ''


def check_torch_root(dataset, data_dir):
    """A ``torch/<name>`` dataset needs its root folder (after :func:`torch_dataset_root`, which supplies Fashion-
    MNIST's): torchvision would take None (or a default someone passed) as the place to read and download."""
    if dataset_prefix(dataset) == 'torch' and data_dir is None:
        raise ConfigError(f"dataset: {dataset} needs --data-dir, the torchvision root folder it is read from "
                          "(add --dataset-download to let torchvision download it there)")


def create_dataset(name, root=None, download=False, **kwargs):
    """timm's ``create_dataset``; a ``torch/<name>`` dataset that torchvision does not find in ``root`` (and may not
    download) is a :class:`ConfigError` naming the folder and ``--dataset-download`` (torchvision's RuntimeError
    suggested ``download=True``), and so is an image folder split without images (timm's RuntimeError names it)."""
    try:
        return timm_datasets.create_dataset(name, root=root, download=download, **kwargs)
    except (RuntimeError, OSError) as e:
        if not dataset_prefix(name) and isinstance(e, RuntimeError):  # timm's image folder reader: no images in it
            raise ConfigError(f"data: {e}") from None
        torch_name = name.split('/')[-1].lower()  # as timm reads it
        downloads = torch_name not in NOT_DOWNLOADED
        if dataset_prefix(name) != 'torch' or (download and downloads):
            raise
        how = 'or add --dataset-download to download them there' if downloads else \
            f'torchvision does not download {torch_name} (timm passes it no download)'
        raise ConfigError(f"dataset: torchvision finds no intact {name.partition('/')[2]} files in {root} ({e}); give "
                          f"the --data-dir that holds them, {how}") from None


def check_dataset(args):
    """The dataset name, its root and class map, as timm's create_dataset reads them (after torch_dataset_root)."""
    prefix, name = dataset_prefix(args.dataset), (args.dataset or '').partition('/')[2]
    if prefix and prefix not in DATASET_PREFIXES:
        raise ConfigError(f"dataset: {args.dataset!r}: {prefix!r} is not a timm dataset prefix"
                          f"{_close(prefix, DATASET_PREFIXES)}; expected <prefix>/<name> with a prefix of "
                          f"{list(DATASET_PREFIXES)}, or no prefix for an image folder")
    if prefix == 'torch':
        name = name.split('/')[-1].lower()  # as timm reads it
        if TORCH_DATASETS and name not in TORCH_DATASETS:
            raise ConfigError(f"dataset: {args.dataset!r}: {name!r} is not one of timm's torchvision datasets "
                              f"{list(TORCH_DATASETS)}{_close(name, TORCH_DATASETS)}")
        check_torch_root(args.dataset, args.data_dir)
    if args.class_map:  # timm looks for it as given, then (folder dataset) under each split's folder
        roots = [os.path.join(args.data_dir, split) for split in (args.train_split, args.val_split)
                 ] if args.data_dir is not None and is_folder_dataset(args) else []
        if not os.path.isfile(args.class_map) and not all(os.path.isfile(os.path.join(r, args.class_map))
                                                          for r in roots or ['']):
            raise ConfigError(f"class_map: file not found: {args.class_map}"
                              + (f" (nor under {' and '.join(roots)})" if roots else ''))
        if os.path.splitext(args.class_map)[1].lower() not in ('.txt', '.pkl'):
            raise ConfigError(f"class_map: {args.class_map}: timm reads a .txt (one class per line) or .pkl class map, "
                              f"not {os.path.splitext(args.class_map)[1] or 'a file without extension'}")


def check_model_img_size(args, input_size, model=None):
    """The model is built for one image size (``model_kwargs`` img_size, else its default: a ViT's ``patch_embed``
    takes that size only), the data config (``img_size`` / ``input_size``, else the model's pretrained config)
    resizes the images to its own: a difference fails at the first step (unless the model takes any size:
    dynamic_img_size). Refused rather than guessing which one was meant."""
    if args.model_kwargs.get('dynamic_img_size'):
        return
    size = args.model_kwargs.get('img_size')
    from_kwargs = size is not None
    if not from_kwargs:  # the model's own size, where its patch embedding insists on one
        patch_embed = getattr(model, 'patch_embed', None)
        if getattr(patch_embed, 'img_size', None) is None or not getattr(patch_embed, 'strict_img_size', False):
            return
        size = patch_embed.img_size
    model_hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if model_hw != tuple(input_size[-2:]):
        way = f'--img-size {model_hw[0]}' if model_hw[0] == model_hw[1] else \
            f'--input-size {input_size[0]} {model_hw[0]} {model_hw[1]}'
        built = f"model_kwargs img_size={size} builds the model" if from_kwargs else \
            f"{args.model} is built (its default img_size; model_kwargs img_size=... builds it for another)"
        raise ConfigError(f"{built} for {model_hw[0]}x{model_hw[1]} images but the data are "
                          f"{input_size[-2]}x{input_size[-1]} (input_size {tuple(input_size)}, from img_size / "
                          f"input_size or the model's default); give {way}")


def validate(args) -> str:
    """Fail with a :class:`ConfigError` naming the problem before any work starts; returns the run folder.

    Builds the model and its optimizer on the ``meta`` device (no memory, no download), which runs the
    connections' own checks (e.g. a stream count the variant cannot take).
    """
    import_device_modules(args)
    if args.device is not None:
        check_device(args.device)
    check_model_name(args.model)
    for key in ('batch_size', 'epochs', 'grad_accum_steps', 'log_interval', 'checkpoint_hist'):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(args, key)}")
    check_ranges(args)
    check_data_options(args)
    if args.pretrained_path and not args.pretrained:  # timm's create_model reads it as the pretrained weights' file
        raise ConfigError(f"pretrained_path: read only with --pretrained (timm loads {args.pretrained_path} as the "
                          "model's pretrained weights, adapting the classifier); without it the run would start "
                          "from random weights. Add --pretrained, or load the file as it is with --initial-checkpoint")
    if args.torchcompile:
        check_torchcompile(args.torchcompile, args.torchcompile_mode)
    for key in ('resume', 'initial_checkpoint', 'pretrained_path'):
        if getattr(args, key) and not os.path.isfile(getattr(args, key)):
            raise checkpoint_not_found(getattr(args, key), key)
    for key in ('resume', 'initial_checkpoint'):
        if getattr(args, key):
            read_checkpoint(getattr(args, key), key)
    num_epochs = probe_schedule(args)
    model = None
    try:
        with torch.device('meta'):
            model = timm.create_model(args.model, pretrained=False, **model_kwargs(args))
            create_optimizer_v2(model, **dict(optimizer_kwargs(cfg=args), lr=args.lr or 0.), **args.opt_kwargs)
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        if model is not None:  # the optimizer's (SGD with opt_kwargs amsgrad=True)
            raise ConfigError(f"opt {args.opt!r} with these settings (opt_kwargs {args.opt_kwargs}) cannot be built: "
                              f"{e}") from None
        raise ConfigError(f"model {args.model!r} with these settings cannot be built: "
                          f"{unexpected_model_keyword(args, e) or e}") from None
    except OSError as e:  # an hf-hub: / local-dir: model whose config cannot be read (offline, no such repo)
        raise ConfigError(f"model {args.model!r}: {e}") from None
    try:  # torch/fashion_mnist without --data-dir: prepared from Debian's files (kromhc_vision.data)
        args.data_dir = torch_dataset_root(args.dataset, args.data_dir, args.dataset_download)
        if args.data_dir is None and is_folder_dataset(args):
            digits_folder()  # the default data, written now or checked (train() reads it)
    except (DatasetUnavailableError, DatasetIntegrityError) as e:
        raise ConfigError(str(e)) from None
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"data_dir: folder not found: {args.data_dir}")
    check_dataset(args)
    if args.data_dir is not None and is_folder_dataset(args):
        for split in (args.train_split, args.val_split):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                raise ConfigError(f"data_dir: no {split!r} subfolder in {args.data_dir} (train_split / val_split)")
        classes = [d for d in os.scandir(os.path.join(args.data_dir, args.train_split)) if d.is_dir()]
        if not classes:
            raise ConfigError(f"data_dir: {os.path.join(args.data_dir, args.train_split)} has no class subfolders "
                              "(expected <split>/<class>/<image>)")
        val_classes = {d.name for d in os.scandir(os.path.join(args.data_dir, args.val_split)) if d.is_dir()}
        if not args.class_map and val_classes != {d.name for d in classes}:
            missing = sorted({d.name for d in classes} - val_classes)
            extra = sorted(val_classes - {d.name for d in classes})
            raise ConfigError(f"data_dir: the {args.val_split!r} and {args.train_split!r} classes differ (missing in "
                              f"{args.val_split!r}: {missing or 'none'}, only there: {extra or 'none'}); timm numbers "
                              "each split's classes on its own, so every label after the difference would be wrong")
        if len(classes) > model.num_classes:
            raise ConfigError(f"num_classes: {args.data_dir} has {len(classes)} classes but the model has "
                              f"{model.num_classes} outputs")
    input_size = resolve_data_config(vars(args), model=model)['input_size']
    check_model_img_size(args, input_size, model)
    check_image_mode(args, input_size[0])
    folder = choose_run_dir(args, input_size)
    if args.resume:
        check_resume(args, num_epochs, folder)
    check_run_dir(args, folder)
    return folder

