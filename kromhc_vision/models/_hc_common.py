"""What the hyper-connected timm families share: settings, the model mixin, cfgs, upcycling.

A hyper-connected model is named ``{base}_{variant}`` (variant one of :data:`VARIANTS`) and takes
the model arguments ``num_streams`` (default 4, 1 for ``residual``), ``hc_init``
(``'published'`` | ``'identity'``), ``hc_backend`` (None | ``'auto'`` | ``'triton'`` | ``'numba'`` | ``'torch'``)
``hc_kwargs`` (extra connection arguments, e.g. ``{'sinkhorn_iters': 10}``) and ``hc_recompute``
(``False`` | ``True`` | an int ``L_r``: recompute the connections' saved tensors in the backward pass, keeping
the stream state every ``L_r`` connections; see :mod:`kromhc_vision.recompute`). ``hc_backend`` and
``hc_recompute`` are runtime settings: they change neither the parameters nor the state dict.
"""
import contextlib
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Set, Union

import huggingface_hub
import huggingface_hub.constants
import safetensors
import timm.models
import timm.models._factory
import timm.models._helpers
import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, load_state_dict, \
    resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source  # no public names in timm 1.0.31
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
from timm.models._input import update_model_args

from .. import recompute
from ..connections import CONNECTIONS, HyperConnection, ResidualConnection, build_connection, connection_class

__all__ = [
    'VARIANTS', 'DEFAULT_NUM_STREAMS', 'PAPER_IDS', 'HcSpec', 'HcModelMixin', 'TorchScriptUnsupportedError',
    'CheckpointMismatchError', 'CheckpointFileError', 'PretrainedWeightsUnavailableError', 'hc_model_args',
    'upcycle_residual_state_dict', 'load_residual_weights',
    'create_hc_model', 'upcycled_cfg', 'hc_default_cfgs', 'check_local_dir', 'check_weights_file',
]

VARIANTS = tuple(CONNECTIONS)  # ('residual', 'hc', 'mhc', 'mhclite', 'kromhc')
DEFAULT_NUM_STREAMS = 4
# hc_recompute when a model is created without it: True (L_r from the model's depth). A user training on a GPU
# wants the activation memory of the stream state gone at the price of re-running the mixing (see README).
DEFAULT_HC_RECOMPUTE = True
PAPER_IDS = {
    'residual': (),
    'hc': ('arXiv:2409.19606',),
    'mhc': ('arXiv:2512.24880',),
    'mhclite': ('arXiv:2601.05732',),
    'kromhc': ('arXiv:2601.21579',),
}
# Pretrained tags of this prefix name timm's own residual weights, mapped into the model by upcycling.
UPCYCLED_TAG_PREFIX = 'upcycled'


# How the connections' arguments are spelled as model arguments, in the messages of their checks.
MODEL_ARGUMENT_NAMES = {'init': 'hc_init', 'backend': 'hc_backend', 'options': 'hc_kwargs'}


class TorchScriptUnsupportedError(RuntimeError):
    """Raised by ``torch.jit.script`` on a model of this zoo that TorchScript cannot compile (the hyper-connected
    models, Terminator), with what to use instead."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes disagree with the model; the message lists every disagreement."""


class CheckpointFileError(ValueError):
    """A weights file or ``local-dir:`` folder that cannot be read; the message names the file and the fault."""


class PretrainedWeightsUnavailableError(FileNotFoundError):
    """``pretrained=True`` needs the Hugging Face Hub, which is unreachable or switched off, and the weights
    are not in the local cache; the message names ``HF_HUB_OFFLINE`` and the local ways to load weights."""


@dataclass(frozen=True)
class HcSpec:
    """Validated hyper-connection settings of one model; builds its connections."""
    variant: str
    num_streams: int
    init: str = 'published'
    backend: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    recompute: Union[bool, int] = DEFAULT_HC_RECOMPUTE

    @classmethod
    def create(cls, variant: str, num_streams: Optional[int] = None, hc_init: str = 'published',
               hc_backend: Optional[str] = None, hc_kwargs: Optional[Mapping[str, Any]] = None,
               hc_recompute: Union[bool, int] = DEFAULT_HC_RECOMPUTE) -> 'HcSpec':
        if variant not in VARIANTS:
            raise ValueError(f"unknown hyper-connection variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
        if num_streams is None:
            num_streams = 1 if variant == 'residual' else DEFAULT_NUM_STREAMS
        if hc_kwargs is not None and not isinstance(hc_kwargs, Mapping):
            raise ValueError(f"hc_kwargs must be a mapping of connection options (e.g. {{'sinkhorn_iters': 10}}), "
                             f"got {hc_kwargs!r}")
        hc_kwargs = dict(hc_kwargs or {})
        recompute.check_recompute(hc_recompute)
        connection_class(variant).check_option_names(hc_kwargs, MODEL_ARGUMENT_NAMES)
        connection_class(variant).check(num_streams, init=hc_init, backend=hc_backend, names=MODEL_ARGUMENT_NAMES,
                                        **hc_kwargs)
        return cls(variant, num_streams, hc_init, hc_backend, hc_kwargs, hc_recompute)

    def connection(self, dim: int, layer_index: int, device=None, dtype=None) -> nn.Module:
        """A connection for streams ``(..., n, dim)``, its parameters created on ``device`` in ``dtype``."""
        return build_connection(self.variant, self.num_streams, dim, layer_index, init=self.init, backend=self.backend,
                                device=device, dtype=dtype, **self.kwargs)

    def model_args(self) -> Dict[str, Any]:
        """The model arguments that rebuild these settings (the backend and recomputation are runtime choices,
        left out)."""
        args = dict(num_streams=self.num_streams, hc_init=self.init)
        if self.kwargs:
            args['hc_kwargs'] = dict(self.kwargs)
        return args


def _connection_prefixes(model: nn.Module):
    return [name for name, m in model.named_modules() if isinstance(m, (HyperConnection, ResidualConnection))]


def _under(key: str, prefixes) -> bool:
    return any(key.startswith(p + '.') for p in prefixes)


class HcModelMixin:
    """Stream bookkeeping shared by the hyper-connected model classes (placed before the timm class)."""
    hc_spec: HcSpec  # the model's hyper-connection settings (its connections are modules named hc*)

    def _init_hc(self, hc: HcSpec) -> None:
        self.hc_spec = hc
        self.num_streams = hc.num_streams
        update_model_args(self, **hc.model_args())  # recorded for save_for_hf / push_to_hf_hub
        self.set_hc_recompute(hc.recompute)

    @torch.jit.ignore
    def hc_connections(self):
        """The model's connections in the order its forward pass runs them."""
        return [m for m in self.modules() if isinstance(m, (HyperConnection, ResidualConnection))]

    @torch.jit.ignore
    def set_hc_recompute(self, value: Union[bool, int] = True) -> None:
        """Set ``hc_recompute`` (``False`` | ``True`` | an int ``L_r >= 1``) at runtime; ``hc_recompute_length``
        becomes the segment length in force (0: off; residual models have no stream state and stay at 0)."""
        length = recompute.segment_length(value, len(self.hc_connections()), self.num_streams)
        self.hc_recompute = value
        self.hc_recompute_length = 0 if self.hc_spec.variant == 'residual' else length

    @torch.jit.ignore
    def prune_intermediate_layers(self, *args, **kwargs):
        """timm's, then ``hc_recompute``'s segment length again for the connections left (``True`` follows the
        depth)."""
        out = super().prune_intermediate_layers(*args, **kwargs)
        self.set_hc_recompute(self.hc_recompute)
        return out

    def _hc_session(self):
        """The recomputation session of one forward pass (a null context when it does not apply: eval mode,
        no grad, torch.compile, torch.fx tracing; see :func:`kromhc_vision.recompute.session`)."""
        if not self.hc_recompute_length or not self.training or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return recompute.session(self.hc_recompute_length)

    @staticmethod
    def _hc_suspended():
        """Around timm's grad-checkpointed blocks, which recompute the connections with everything else."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else recompute.suspended()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's set plus every hyper-connection parameter (full names)."""
        prefixes = _connection_prefixes(self)
        hc_params = {n for n, _ in self.named_parameters() if _under(n, prefixes)}
        base = getattr(super(), 'no_weight_decay', None)  # ConvNeXt has none
        return (set(base()) if base else set()) | hc_params

    def __prepare_scriptable__(self):
        raise TorchScriptUnsupportedError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: each hyper-connection calls its "
            "branch (attention, MLP, ConvNeXt block body) as a Python closure, which TorchScript cannot type. "
            "Use torch.compile or torch.export instead.")


def hc_model_args(model: nn.Module) -> Dict[str, Any]:
    """``model_args`` for ``timm.models.save_for_hf`` / ``push_to_hf_hub``: num_streams, hc_init, hc_kwargs."""
    spec = getattr(model, 'hc_spec', None)
    if spec is None:
        raise ValueError(f"hc_model_args takes a hyper-connected model (one of timm.list_models('*_<variant>') for "
                         f"the variants {', '.join(CONNECTIONS)}); {type(model).__name__} has no stream settings to "
                         "save: call save_for_hf without them")
    return spec.model_args()


def _input_conv_key(model: nn.Module) -> Optional[str]:
    """The weight of the model's first convolution (``pretrained_cfg['first_conv']``), or None."""
    first_conv = getattr(model, 'pretrained_cfg', {}).get('first_conv')
    return f'{first_conv}.weight' if isinstance(first_conv, str) else None


def _same_but_input_channels(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) >= 2 and a[0] == b[0] and a[2:] == b[2:]


def _mismatch_report(state_dict: Mapping[str, torch.Tensor], model: nn.Module, optional=(), ignore=(),
                     adapt_input_conv: bool = False, strict: bool = True) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` covers the model by name and shape.

    ``optional``: model keys the checkpoint may lack; ``ignore``: keys not compared at all;
    ``adapt_input_conv``: the first convolution's weight may differ in its input channels (timm's
    ``load_pretrained`` adapts it to ``in_chans`` after the filter has run); ``strict=False``: only the shapes of
    the keys both have are compared (missing and unexpected keys pass, as ``load_state_dict(strict=False)`` lets
    them; it refuses other shapes).
    """
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    given = {k: v for k, v in state_dict.items() if k not in ignore}
    missing = sorted(k for k in own if k not in given and k not in optional) if strict else []
    unexpected = sorted(k for k in given if k not in own) if strict else []
    input_conv = _input_conv_key(model) if adapt_input_conv else None
    shapes = sorted(
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in given.items() if k in own and v.shape != own[k].shape
        and not (k == input_conv and _same_but_input_channels(v.shape, own[k].shape)))
    if missing or unexpected or shapes:
        parts = [f'{name} ({len(items)}): {", ".join(items)}' for name, items in
                 (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)) if items]
        hc = getattr(model, 'hc_spec', None)
        what = f'{type(model).__name__}' + (f' (variant {hc.variant!r}, num_streams={hc.num_streams})' if hc else '')
        raise CheckpointMismatchError(f'checkpoint does not match {what}: ' + '; '.join(parts))


def _classifier_keys(model: nn.Module):
    names = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return {f'{n}.{p}' for n in names for p in ('weight', 'bias')}


def upcycle_residual_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                                ignore_classifier: bool = False, adapt_input_conv: bool = False,
                                strict: bool = True) -> Dict[str, torch.Tensor]:
    """Map a timm residual checkpoint onto a hyper-connected ``model`` built with ``hc_init='identity'``.

    Every checkpoint key maps by name; the connection parameters keep the model's identity init, so the
    result computes what the residual network computes. ``ignore_classifier``: head keys of another shape
    (class count) are not errors; the model keeps its own head for them. ``adapt_input_conv``: the first
    convolution's weight may have other input channels (see :func:`_mismatch_report`). Raises
    :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys (``strict=False``: only
    mis-shaped ones; the rest is left to ``load_state_dict(strict=False)``).
    """
    prefixes = _connection_prefixes(model)
    own = model.state_dict()
    ignore = _classifier_keys(model) if ignore_classifier else ()
    # first: another architecture's checkpoint (it has no connection keys either) is named as a mismatch
    _mismatch_report(state_dict, model, optional={k for k in own if _under(k, prefixes)}, ignore=ignore,
                     adapt_input_conv=adapt_input_conv, strict=strict)
    not_identity = [p for p in prefixes if getattr(model.get_submodule(p), 'init', 'identity') != 'identity']
    if not_identity:
        raise ValueError(
            "upcycling residual weights needs a model built with hc_init='identity' (got "
            f"{model.get_submodule(not_identity[0]).init!r} in {', '.join(not_identity[:3])}...)")
    out = {k: v for k, v in own.items() if _under(k, prefixes) or k in ignore}
    out.update({k: v for k, v in state_dict.items() if k not in ignore or (k in own and v.shape == own[k].shape)})
    return out


def load_residual_weights(model: nn.Module, source: Union[nn.Module, Mapping, str, Path],
                          ignore_classifier: bool = False) -> nn.Module:
    """Load a timm residual model, state dict or checkpoint file into a hyper-connected ``model`` (in place).

    The checkpoint passes timm's filter for the family first (e.g. ViT pos-embed resampling).
    """
    if isinstance(source, nn.Module):
        state_dict = source.state_dict()
    elif isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        state_dict = load_state_dict(str(source))
    state_dict = model.timm_filter_fn(state_dict, model)
    model.load_state_dict(upcycle_residual_state_dict(state_dict, model, ignore_classifier))
    return model


def _with_metadata(state_dict, metadata):
    """``state_dict`` carrying the ``_metadata`` of the dict it was made from (where each connection records its
    variant, which :meth:`HyperConnection._load_from_state_dict` checks); ``state_dict`` itself without any."""
    if metadata is None or getattr(state_dict, '_metadata', None) is not None:
        return state_dict
    out = OrderedDict(state_dict)  # a plain dict takes no attributes
    out._metadata = metadata
    return out


_WRAPPER_PREFIXES = ('_orig_mod.', 'module.')  # what timm's clean_state_dict strips (DDP, torch.compile)


def _keep_metadata(clean):
    """timm's ``clean_state_dict`` keeping the state dict's ``_metadata`` (its keys stripped of the same wrapper
    prefixes), which it dropped: every timm loader of a torch file (``load_checkpoint``, ``create_model(
    checkpoint_path=...)``, ``pretrained=True`` from a file or a ``local-dir:``) passed another variant's weights of
    the same shapes (HC and mHC) into a model, where ``load_state_dict`` on ``torch.load``'s result refuses them."""
    if getattr(clean, '_kromhc_checked', False):
        return clean

    @wraps(clean)
    def cleaned(state_dict):
        out = clean(state_dict)
        metadata = getattr(state_dict, '_metadata', None)
        if metadata is None:
            return out
        kept = OrderedDict()
        for key, value in metadata.items():
            while key.startswith(_WRAPPER_PREFIXES) or key in ('module', '_orig_mod'):
                key = '' if key in ('module', '_orig_mod') else key.split('.', 1)[1]
            kept.setdefault(key, value)
        return _with_metadata(out, kept)

    cleaned._kromhc_checked = True
    return cleaned


# timm's load_state_dict (and so load_checkpoint, create_model's checkpoint_path and load_pretrained) calls it by name;
# a timm without it (a later private layout) keeps its own, and only direct load_state_dict calls see the variants
if callable(getattr(timm.models._helpers, 'clean_state_dict', None)):
    timm.models._helpers.clean_state_dict = _keep_metadata(timm.models._helpers.clean_state_dict)
    if hasattr(timm.models, 'clean_state_dict'):
        timm.models.clean_state_dict = timm.models._helpers.clean_state_dict


def _hc_filter_fn(state_dict, model, base_filter: Callable, strict: bool = True):
    """``pretrained_filter_fn``: timm's family filter, then upcycling if the checkpoint has no connection keys.
    The first convolution's weight passes with other input channels than the model's: timm's ``load_pretrained``
    adapts it to ``in_chans`` after this filter. ``strict``: timm's ``pretrained_strict`` (False: missing and
    unexpected keys pass, other shapes are still refused)."""
    metadata = getattr(state_dict, '_metadata', None)  # the connections' variants (the family filter drops it)
    state_dict = _with_metadata(base_filter(state_dict, model), metadata)
    prefixes = _connection_prefixes(model)
    own_hc = [k for k in model.state_dict() if _under(k, prefixes)]
    if own_hc and not any(_under(k, prefixes) for k in state_dict):
        return upcycle_residual_state_dict(state_dict, model, ignore_classifier=True, adapt_input_conv=True,
                                           strict=strict)
    _mismatch_report(state_dict, model, ignore=_classifier_keys(model), adapt_input_conv=True, strict=strict)
    return state_dict


def upcycled_cfg(timm_name_tag: str) -> Dict[str, Dict[str, Any]]:
    """``{'base.upcycled_tag': cfg}``: timm's cfg for ``timm_name_tag`` loading its residual Hub weights."""
    cfg = get_pretrained_cfg(timm_name_tag).to_dict(remove_source=True)
    base, tag = cfg.pop('architecture'), cfg.pop('tag')
    cfg.update(hf_hub_id=f'timm/{timm_name_tag}', custom_load=False)
    return {f'{base}.{UPCYCLED_TAG_PREFIX}_{tag}': cfg}


def hc_default_cfgs(base_cfgs: Dict[str, Dict[str, Any]], paper_id: str):
    """``generate_default_cfgs`` for ``{base}_{variant}[.tag]`` of every ``base[.tag]`` key and variant.

    ``paper_ids`` of each cfg: the family's ``paper_id`` and the variant's (see :data:`PAPER_IDS`).
    """
    out = {}
    for key, cfg in base_cfgs.items():
        base, _, tag = key.partition('.')
        for variant in VARIANTS:
            out[f'{base}_{variant}' + (f'.{tag}' if tag else '')] = dict(
                cfg, paper_ids=(paper_id, *PAPER_IDS[variant]))
    return generate_default_cfgs(out)


# ---------------------------------------------------------------------------------------------------------------
# Checks of where pretrained weights come from, before any model is built

# Seconds a reachability probe of the Hub may take before ``pretrained=True`` counts the Hub as unreachable.
HUB_PROBE_TIMEOUT_S = 3.0
# Files timm's Hub loader tries when a cfg names no ``hf_hub_filename`` (safetensors first).
_HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors',
                     'open_clip_pytorch_model.bin')
_LOCAL_OPTIONS = (
    "Set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache (it fails at once when the files are not "
    "there), or load weights from disk: timm.create_model(name, pretrained=True, "
    "pretrained_cfg_overlay=dict(file='model.safetensors')), timm.create_model('local-dir:<folder>', "
    "pretrained=True) for a folder written by timm.models.save_for_hf, or "
    "kromhc_vision.load_residual_weights(model, <timm residual model, state dict or file>) to upcycle.")


def check_weights_file(path: Union[str, Path]) -> Path:
    """Raise :class:`CheckpointFileError` unless ``path`` is a complete weights file, without reading its tensors.

    safetensors: its header and length agree. ``.npz`` (a JAX checkpoint, which timm reads with ``custom_load=True``):
    a zip archive with its central directory and ``.npy`` members. Anything else is read as a torch checkpoint: the
    zip format of ``torch.save`` must have its central directory (at the end of the file: a truncated file has none)
    and a ``data.pkl``; the legacy format must start as a pickle does.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f'weights file {path} does not exist or is not a file')
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f'weights file {path} is empty (0 bytes)')
    if path.suffix == '.safetensors':
        try:
            with safetensors.safe_open(str(path), 'pt'):  # reads and checks the header and the file's length
                pass
        except Exception as e:  # SafetensorError: garbage, truncated
            raise CheckpointFileError(f'weights file {path} is not a complete safetensors file '
                                      f'(garbage or truncated; {size} bytes): {e}') from e
        return path
    if path.suffix == '.npz':
        try:
            with zipfile.ZipFile(path) as archive:
                complete = any(n.endswith('.npy') for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            complete = False
        if not complete:
            raise CheckpointFileError(f'weights file {path} is not a complete .npz archive (no zip directory or no '
                                      f'.npy arrays: garbage or truncated? {size} bytes)')
        return path
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):
        try:
            with zipfile.ZipFile(path) as archive:
                complete = any(n == 'data.pkl' or n.endswith('/data.pkl') for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            complete = False
        if not complete:
            raise CheckpointFileError(f'weights file {path} is not a complete torch checkpoint (a zip archive '
                                      f'without its directory or data.pkl: truncated? {size} bytes)')
    elif not head.startswith(b'\x80'):  # pickle protocol 2+: torch's legacy format
        raise CheckpointFileError(f'weights file {path} is not a torch checkpoint (neither the zip format of '
                                  f'torch.save nor a pickle) or a .safetensors file')
    return path


def _local_dir_weights(folder: Path) -> Optional[Path]:
    """The checkpoint timm's ``local-dir:`` loader picks in ``folder`` (its order of names, then extensions)."""
    for name in _PREFERRED_FILES:
        if (folder / name).exists():
            return folder / name
    for ext in _EXT_PRIORITY:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0]
    return None


def check_local_dir(folder: Union[str, Path], weights: bool = True) -> Path:
    """Raise :class:`CheckpointFileError` unless ``folder`` holds what ``local-dir:<folder>`` reads.

    ``config.json``: a JSON object naming the ``architecture`` (as :func:`timm.models.save_for_hf` writes);
    with ``weights``, a checkpoint (e.g. ``model.safetensors``) checked by :func:`check_weights_file`.
    Returns the checkpoint's path (``weights``) or the config's.
    """
    folder = Path(folder)
    hint = 'local-dir: expects a folder written by timm.models.save_for_hf'
    if not folder.is_dir():
        raise CheckpointFileError(f'{folder} is not a folder ({hint})')
    cfg_file = folder / 'config.json'
    if not cfg_file.is_file():
        raise CheckpointFileError(f'{cfg_file} is missing ({hint})')
    try:
        cfg = json.loads(cfg_file.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f'{cfg_file} is not valid JSON ({cfg_file.stat().st_size} bytes; garbage, empty '
                                  f'or truncated): {e}') from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get('architecture'), str):
        raise CheckpointFileError(f'{cfg_file} does not name the model: expected a JSON object with an '
                                  f"'architecture' string, got {str(cfg)[:200]!r} ({hint})")
    if 'pretrained_cfg' in cfg and not isinstance(cfg['pretrained_cfg'], dict):
        raise CheckpointFileError(f"{cfg_file}: 'pretrained_cfg' must be a JSON object, got "
                                  f"{str(cfg['pretrained_cfg'])[:200]!r}")
    if not weights:
        return cfg_file
    found = _local_dir_weights(folder)
    if found is None:
        raise CheckpointFileError(f'{folder} holds no checkpoint (expected model.safetensors, or another of '
                                  f"{', '.join(_PREFERRED_FILES)}, or a file ending in {', '.join(_EXT_PRIORITY)})")
    return check_weights_file(found)


def _wrap_local_dir_config(load):
    """timm's ``load_model_config_from_path`` with :func:`check_local_dir`'s config check first."""
    if getattr(load, '_kromhc_checked', False):
        return load

    @wraps(load)
    def checked(model_path, *args, **kwargs):
        check_local_dir(model_path, weights=False)
        return load(model_path, *args, **kwargs)

    checked._kromhc_checked = True
    return checked


# ``timm.create_model('local-dir:...')`` reads config.json before any model function runs: check it there.
timm.models._factory.load_model_config_from_path = _wrap_local_dir_config(
    timm.models._factory.load_model_config_from_path)


def _wrap_hf_hub_config(load):
    """timm's ``load_model_config_from_hf`` (``create_model('hf-hub:<repo>')``) that fails at once with
    :class:`PretrainedWeightsUnavailableError` when ``config.json`` is not cached and the Hub cannot be reached,
    instead of after huggingface_hub's retries."""
    if getattr(load, '_kromhc_checked', False):
        return load

    @wraps(load)
    def checked(model_id, cache_dir=None, *args, **kwargs):
        if not _hub_cached(model_id, ('config.json',), cache_dir):
            reason = _hub_unreachable_reason()
            if reason is not None:
                raise PretrainedWeightsUnavailableError(
                    f"hf-hub:{model_id} reads config.json from the Hugging Face Hub repository {model_id}, which "
                    f"is not in the local cache, and {reason}. " + _LOCAL_OPTIONS)
        return load(model_id, cache_dir, *args, **kwargs)

    checked._kromhc_checked = True
    return checked


timm.models._factory.load_model_config_from_hf = _wrap_hf_hub_config(timm.models._factory.load_model_config_from_hf)


def _hub_cached(repo: str, filenames, cache_dir=None) -> bool:
    repo_id, _, revision = repo.partition('@')
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f, cache_dir=cache_dir,
                                                                 revision=revision or None), str)
               for f in filenames)


def _hub_unreachable_reason() -> Optional[str]:
    """Why the Hub cannot be reached now (``HF_HUB_OFFLINE``, or a failed short probe), or None."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return 'HF_HUB_OFFLINE is set, so huggingface_hub reads only its local cache'
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # DNS, refused connection, timeout: any answer at all means reachable
        return (f'{endpoint} cannot be reached ({type(e).__name__}: {e}; probed with a {HUB_PROBE_TIMEOUT_S:g} s '
                "timeout, instead of waiting through huggingface_hub's retries)")
    return None


def _check_pretrained_source(name: str, cfg, cache_dir=None) -> None:
    """Before a model is built: a local weights file must be readable, and Hub weights reachable or cached."""
    cfg_dict = cfg.to_dict()
    load_from, location = _resolve_pretrained_source(cfg_dict)
    if load_from == 'file':
        if Path(location).suffix == '.npz' and not cfg.custom_load:
            raise CheckpointFileError(
                f"weights file {location} is a NumPy .npz archive (a JAX checkpoint), which timm reads with the "
                f"model's load_pretrained only: pass pretrained_cfg_overlay=dict(file=..., custom_load=True)")
        check_weights_file(location)
    elif load_from == 'local-dir':
        check_local_dir(location)
    elif load_from == 'hf-hub':
        repo, files = location if isinstance(location, tuple) else (location, _HUB_WEIGHT_FILES)
        files = (files,) if isinstance(files, str) else files
        if _hub_cached(repo, files, cache_dir):
            return
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise PretrainedWeightsUnavailableError(
                f"pretrained=True for {name}{'.' + cfg.tag if cfg.tag else ''} downloads {', '.join(files)} from "
                f"the Hugging Face Hub repository {repo}, which is not in the local cache, and {reason}. "
                + _LOCAL_OPTIONS)


def create_hc_model(model_cls, base: str, variant: str, pretrained: bool, base_filter: Callable,
                    feature_cfg: Dict[str, Any], base_args: Dict[str, Any], **kwargs) -> nn.Module:
    """Build ``{base}_{variant}`` through ``build_model_with_cfg``.

    An ``upcycled_*`` pretrained tag loads timm's residual weights and therefore forces ``hc_init='identity'``.
    With ``pretrained``, where the weights come from is checked before the model is built: a local file or
    ``local-dir:`` folder must be readable (:class:`CheckpointFileError`), Hub weights cached or the Hub
    reachable (:class:`PretrainedWeightsUnavailableError`, at once when offline instead of after retries).
    """
    name = f'{base}_{variant}'
    feature_cls = kwargs.get('feature_cls', 'getter')
    if kwargs.get('features_only') and isinstance(feature_cls, str) and feature_cls != 'getter':
        raise ValueError(
            f"features_only=True with feature_cls={feature_cls!r}: {name}'s blocks (or stages) output the stream "
            "state (..., n, C), which the module-output wrappers ('hook', 'fx', 'dict') would return as it is; "
            "valid choice: 'getter' (the default), whose features are forward_intermediates', the streams reduced. "
            "For other nodes, timm.models.create_feature_extractor(model, return_nodes) traces the model")
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        _check_pretrained_source(name, cfg, kwargs.get('cache_dir'))
        hc_init = kwargs.get('hc_init', 'published')
        if cfg.custom_load and variant != 'residual' and hc_init != 'identity':
            # timm's load_custom_pretrained (e.g. a JAX .npz) fills the blocks, not the connections: upcycling
            raise ValueError(f"{name} with custom_load=True loads residual weights through the model's "
                             f"load_pretrained and needs hc_init='identity', got {hc_init!r}")
        from_timm_hub = not (cfg.file or cfg.state_dict or cfg.source)  # no local file / own Hub repo override
        if (cfg.tag or '').startswith(UPCYCLED_TAG_PREFIX) and from_timm_hub:
            if kwargs.get('hc_init', 'identity') != 'identity':
                raise ValueError(f"{name}.{cfg.tag} upcycles residual weights and needs hc_init='identity', "
                                 f"got {kwargs['hc_init']!r}")
            kwargs['hc_init'] = 'identity'
    return build_model_with_cfg(
        model_cls, name, pretrained,
        pretrained_filter_fn=partial(_hc_filter_fn, base_filter=base_filter,
                                     strict=kwargs.get('pretrained_strict', True)),
        feature_cfg=dict(feature_cfg, feature_cls='getter'),
        hc_variant=variant,
        **dict(base_args, **kwargs),
    )
