"""What the hyper-connected timm families share: settings, the model mixin, cfgs, upcycling.

A hyper-connected model is named ``{base}_{variant}`` (variant one of :data:`VARIANTS`) and takes
the model arguments ``num_streams`` (default 4, 1 for ``residual``), ``hc_init``
(``'published'`` | ``'identity'``), ``hc_backend`` (None | ``'auto'`` | ``'triton'`` | ``'torch'``)
and ``hc_kwargs`` (extra connection arguments, e.g. ``{'sinkhorn_iters': 10}``).
"""
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Set, Union

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, load_state_dict, \
    resolve_pretrained_cfg
from timm.models._input import update_model_args  # no public name in timm 1.0.31

from ..connections import CONNECTIONS, HyperConnection, ResidualConnection, build_connection, connection_class

__all__ = [
    'VARIANTS', 'DEFAULT_NUM_STREAMS', 'PAPER_IDS', 'HcSpec', 'HcModelMixin', 'TorchScriptUnsupportedError',
    'CheckpointMismatchError', 'hc_model_args', 'upcycle_residual_state_dict', 'load_residual_weights',
    'create_hc_model', 'upcycled_cfg', 'hc_default_cfgs',
]

VARIANTS = tuple(CONNECTIONS)  # ('residual', 'hc', 'mhc', 'mhclite', 'kromhc')
DEFAULT_NUM_STREAMS = 4
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
    """Raised by ``torch.jit.script`` on a hyper-connected model."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes disagree with the model; the message lists every disagreement."""


@dataclass(frozen=True)
class HcSpec:
    """Validated hyper-connection settings of one model; builds its connections."""
    variant: str
    num_streams: int
    init: str = 'published'
    backend: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, variant: str, num_streams: Optional[int] = None, hc_init: str = 'published',
               hc_backend: Optional[str] = None, hc_kwargs: Optional[Mapping[str, Any]] = None) -> 'HcSpec':
        if variant not in VARIANTS:
            raise ValueError(f"unknown hyper-connection variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
        if num_streams is None:
            num_streams = 1 if variant == 'residual' else DEFAULT_NUM_STREAMS
        if hc_kwargs is not None and not isinstance(hc_kwargs, Mapping):
            raise ValueError(f"hc_kwargs must be a mapping of connection options (e.g. {{'sinkhorn_iters': 10}}), "
                             f"got {hc_kwargs!r}")
        hc_kwargs = dict(hc_kwargs or {})
        connection_class(variant).check(num_streams, init=hc_init, backend=hc_backend, names=MODEL_ARGUMENT_NAMES,
                                        **hc_kwargs)
        return cls(variant, num_streams, hc_init, hc_backend, hc_kwargs)

    def connection(self, dim: int, layer_index: int, device=None, dtype=None) -> nn.Module:
        """A connection for streams ``(..., n, dim)``, its parameters created on ``device`` in ``dtype``."""
        return build_connection(self.variant, self.num_streams, dim, layer_index, init=self.init, backend=self.backend,
                                device=device, dtype=dtype, **self.kwargs)

    def model_args(self) -> Dict[str, Any]:
        """The model arguments that rebuild these settings (the backend is a runtime choice, left out)."""
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
    hc: HcSpec

    def _init_hc(self, hc: HcSpec) -> None:
        self.hc = hc
        self.num_streams = hc.num_streams
        update_model_args(self, **hc.model_args())  # recorded for save_for_hf / push_to_hf_hub

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
    return model.hc.model_args()


def _mismatch_report(state_dict: Mapping[str, torch.Tensor], model: nn.Module, optional=(), ignore=()) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` covers the model by name and shape.

    ``optional``: model keys the checkpoint may lack; ``ignore``: keys not compared at all.
    """
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    given = {k: v for k, v in state_dict.items() if k not in ignore}
    missing = sorted(k for k in own if k not in given and k not in optional)
    unexpected = sorted(k for k in given if k not in own)
    shapes = sorted(
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in given.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f'{name} ({len(items)}): {", ".join(items)}' for name, items in
                 (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)) if items]
        hc = getattr(model, 'hc', None)
        what = f'{type(model).__name__}' + (f' (variant {hc.variant!r}, num_streams={hc.num_streams})' if hc else '')
        raise CheckpointMismatchError(f'checkpoint does not match {what}: ' + '; '.join(parts))


def _classifier_keys(model: nn.Module):
    names = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return {f'{n}.{p}' for n in names for p in ('weight', 'bias')}


def upcycle_residual_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                                ignore_classifier: bool = False) -> Dict[str, torch.Tensor]:
    """Map a timm residual checkpoint onto a hyper-connected ``model`` built with ``hc_init='identity'``.

    Every checkpoint key maps by name; the connection parameters keep the model's identity init, so the
    result computes what the residual network computes. ``ignore_classifier``: head keys of another shape
    (class count) are not errors; the model keeps its own head for them. Raises :class:`CheckpointMismatchError` listing missing,
    unexpected and mis-shaped keys.
    """
    prefixes = _connection_prefixes(model)
    not_identity = [p for p in prefixes if getattr(model.get_submodule(p), 'init', 'identity') != 'identity']
    if not_identity:
        raise ValueError(
            "upcycling residual weights needs a model built with hc_init='identity' (got "
            f"{model.get_submodule(not_identity[0]).init!r} in {', '.join(not_identity[:3])}...)")
    own = model.state_dict()
    ignore = _classifier_keys(model) if ignore_classifier else ()
    _mismatch_report(state_dict, model, optional={k for k in own if _under(k, prefixes)}, ignore=ignore)
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


def _hc_filter_fn(state_dict, model, base_filter: Callable):
    """``pretrained_filter_fn``: timm's family filter, then upcycling if the checkpoint has no connection keys."""
    state_dict = base_filter(state_dict, model)
    prefixes = _connection_prefixes(model)
    own_hc = [k for k in model.state_dict() if _under(k, prefixes)]
    if own_hc and not any(_under(k, prefixes) for k in state_dict):
        return upcycle_residual_state_dict(state_dict, model, ignore_classifier=True)
    _mismatch_report(state_dict, model, ignore=_classifier_keys(model))
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


def create_hc_model(model_cls, base: str, variant: str, pretrained: bool, base_filter: Callable,
                    feature_cfg: Dict[str, Any], base_args: Dict[str, Any], **kwargs) -> nn.Module:
    """Build ``{base}_{variant}`` through ``build_model_with_cfg``.

    An ``upcycled_*`` pretrained tag loads timm's residual weights and therefore forces ``hc_init='identity'``.
    """
    name = f'{base}_{variant}'
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        from_timm_hub = not (cfg.file or cfg.state_dict or cfg.source)  # no local file / own Hub repo override
        if (cfg.tag or '').startswith(UPCYCLED_TAG_PREFIX) and from_timm_hub:
            if kwargs.get('hc_init', 'identity') != 'identity':
                raise ValueError(f"{name}.{cfg.tag} upcycles residual weights and needs hc_init='identity', "
                                 f"got {kwargs['hc_init']!r}")
            kwargs['hc_init'] = 'identity'
    return build_model_with_cfg(
        model_cls, name, pretrained,
        pretrained_filter_fn=partial(_hc_filter_fn, base_filter=base_filter),
        feature_cfg=dict(feature_cfg, feature_cls='getter'),
        hc_variant=variant,
        **dict(base_args, **kwargs),
    )
