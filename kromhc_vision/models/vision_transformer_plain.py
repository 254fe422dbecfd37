"""Residual-free Vision Transformers: ``vit_*_plain`` and ``vit_*_orthogonal`` (orthogonal maps trained by projUNN).

timm's :class:`~timm.models.vision_transformer.VisionTransformer` whose blocks drop the residual adds::

    x -> attn(norm1(x)) -> mlp(norm2(·))          (timm's Block: x + attn(norm1(x)), then x + mlp(norm2(x)))

the control that shows what residual connections (and hyper-connection streams) buy at depth. In
``vit_*_orthogonal`` the block's linear maps are orthogonal (:class:`OrthogonalLinear`, tagged with
:func:`kromhc_vision.optim.mark_orthogonal`, initialised orthogonal) and stay orthogonal when trained with
``--opt projunn<base>`` (:class:`kromhc_vision.optim.ProjUNN`):

- ``attn.qkv`` (3C×C): three orthogonal C×C maps ``W_q, W_k, W_v`` (row blocks); ``attn.proj`` (C×C): orthogonal.
- the MLP's rectangular maps, as the paper's CNN widens channels (its ``FullWidthConv2d`` repeats the input
  channels and applies a square orthogonal map): ``mlp.fc1`` (mC×C) is ``m`` orthogonal C×C row blocks, i.e. the
  input repeated ``m`` times through a block-diagonal orthogonal map, scaled by ``1/√m`` so that it is an isometry
  (``‖fc1 x‖ = ‖x‖``); ``mlp.fc2`` (C×mC) is ``m`` orthogonal column blocks scaled by ``1/√m`` (all its singular
  values are 1: ``fc2 fc2ᵀ = I``). ``mlp_ratio`` must be an integer.
- norms, biases, patch embedding, position embedding and head stay unconstrained (the paper's CNN keeps its
  BatchNorm and leaves the input layer and classifier unconstrained); the norms are timm's pre-norm LayerNorms,
  so the plain and orthogonal models differ only in the constraint on the weights.

The parameter names and shapes are timm's (``blocks.i.attn.qkv.weight``, ...), so plain, orthogonal and timm's
residual checkpoints load into one another (ProjUNN projects loaded weights onto the orthogonal group at start).
Stochastic depth (``drop_path_rate``) is refused: without the residual it would zero whole samples.
"""
import math
from functools import partial
from typing import Optional, Set

import torch
from torch import nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, _cfg, checkpoint_filter_fn

from ..optim import mark_orthogonal, square_blocks

__all__ = ['OrthogonalLinear', 'PlainBlock', 'VisionTransformerPlain', 'orthogonal_init_']


class OrthogonalLinear(nn.Linear):
    """``y = scale · W x + b`` with ``W`` (out×in) orthogonal: square, or ``m`` orthogonal square blocks stacked
    along rows (``out = m·in``) or columns (``in = m·out``); ``scale`` defaults to ``1/√m`` (an isometry / a map
    with all singular values 1). The weight is tagged for :class:`~kromhc_vision.optim.ProjUNN`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: Optional[float] = None,
                 init: bool = True, device=None, dtype=None):
        """``init=False`` leaves the weight to :func:`orthogonal_init_` of the model (one batched QR for all)."""
        small, large = sorted((in_features, out_features))
        if large % small:
            raise ValueError(f'OrthogonalLinear needs in_features and out_features of which one divides the other '
                             f'(square blocks), got {in_features} -> {out_features}')
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = 1.0 / math.sqrt(large // small) if scale is None else float(scale)
        mark_orthogonal(self, 'weight')
        if init:
            orthogonal_init_(self)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._tag_weight()  # to_empty (from meta) makes a new Parameter, without the tag
        return module

    def __setstate__(self, state):
        super().__setstate__(state)
        self._tag_weight()  # a deep copy's Parameter is new too

    def _tag_weight(self) -> None:
        """Tag ``weight`` for ProjUNN again where it is a Parameter; one that is no longer (torch's pruning and
        old ``weight_norm`` make it a plain attribute computed from others) is left alone, as ``.to()`` did."""
        if isinstance(self._parameters.get('weight'), nn.Parameter):
            mark_orthogonal(self, 'weight')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.scale == 1.0 else \
            F.linear(x * self.scale, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, scale={self.scale:.4g}'


@torch.no_grad()
def orthogonal_init_(module: nn.Module) -> None:
    """Every square block of every :class:`OrthogonalLinear` weight in ``module`` a random orthogonal matrix (the
    Q of a Gaussian matrix's QR, columns signed by diag(R), as ``nn.init.orthogonal_``), biases zero; one batched
    QR per block size (LAPACK calls are what a shared CPU makes slow)."""
    by_size = {}
    for m in module.modules():
        if isinstance(m, OrthogonalLinear) and not m.weight.is_meta:
            by_size.setdefault((min(m.weight.shape), m.weight.dtype, m.weight.device), []).append(m)
            if m.bias is not None:
                m.bias.zero_()
    for (n, dtype, device), mods in by_size.items():
        blocks = [square_blocks(m.weight) for m in mods]
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        q, r = torch.linalg.qr(torch.randn(sum(b.shape[0] for b in blocks), n, n, dtype=work, device=device))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        start = 0
        for b in blocks:
            b.copy_(q[start:start + b.shape[0]])
            start += b.shape[0]


def _orthogonal_like(linear: nn.Linear, scale: Optional[float] = None) -> OrthogonalLinear:
    w = linear.weight
    return OrthogonalLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, scale=scale,
                            init=False, device=w.device, dtype=w.dtype)


class PlainBlock(Block):
    """timm's pre-norm block without the residual adds: ``x -> attn(norm1(x)) -> mlp(norm2(·))``; with
    ``orthogonal=True`` its qkv, attention output and MLP maps are :class:`OrthogonalLinear`, initialised by the
    model (:func:`orthogonal_init_` in ``init_weights``)."""

    def __init__(self, dim: int, *args, orthogonal: bool = False, **kwargs):
        super().__init__(dim, *args, **kwargs)
        if orthogonal:
            attn, mlp = self.attn, self.mlp
            if not isinstance(getattr(attn, 'qkv', None), nn.Linear) or not isinstance(getattr(mlp, 'fc1', None),
                                                                                       nn.Linear):
                raise ValueError('orthogonal blocks need an attention with a fused qkv Linear and an Mlp of Linears')
            attn.qkv = _orthogonal_like(attn.qkv, scale=1.0)  # q, k and v each orthogonal
            attn.proj = _orthogonal_like(attn.proj)
            mlp.fc1 = _orthogonal_like(mlp.fc1)
            mlp.fc2 = _orthogonal_like(mlp.fc2)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``."""
        x = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformerPlain(VisionTransformer):
    """VisionTransformer of :class:`PlainBlock` (no residual adds); ``orthogonal=True``: orthogonal block maps."""

    def __init__(self, orthogonal: bool = False, **kwargs):
        if kwargs.get('drop_path_rate', 0.):
            raise ValueError(f"drop_path_rate={kwargs['drop_path_rate']} is not supported by residual-free blocks "
                             f"(stochastic depth would zero whole samples); use 0")
        mlp_ratio = kwargs.get('mlp_ratio', 4.)
        if orthogonal and float(mlp_ratio) != int(mlp_ratio):
            raise ValueError(f'orthogonal blocks need an integer mlp_ratio (square blocks), got {mlp_ratio}')
        if kwargs.get('block_fn') is not None:
            raise ValueError('VisionTransformerPlain builds its own blocks; block_fn is not accepted')
        self.orthogonal = orthogonal
        super().__init__(block_fn=partial(PlainBlock, orthogonal=orthogonal), **kwargs)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """timm's init (``trunc_normal_`` on every Linear), then the orthogonal maps orthogonal again."""
        super().init_weights(mode, needs_reset)
        orthogonal_init_(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's (position embedding, tokens) and the orthogonal weights (decay pulls them off the group)."""
        names = set(super().no_weight_decay())
        names |= {f'{n}.weight' for n, m in self.named_modules() if isinstance(m, OrthogonalLinear)}
        return names


_BASE_ARGS = {
    'vit_micro_patch4_32': dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.),
    'vit_tiny_patch16_224': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16_224': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16_224': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16_224': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
VARIANTS = ('plain', 'orthogonal')
PAPER_IDS = {'plain': ('arXiv:2010.11929',), 'orthogonal': ('arXiv:2010.11929', 'arXiv:2203.05483')}

default_cfgs = generate_default_cfgs({
    f'{base}_{variant}': _cfg(**(dict(input_size=(3, 32, 32), crop_pct=1.0) if 'micro' in base else {}),
                              paper_ids=PAPER_IDS[variant])
    for base in _BASE_ARGS for variant in VARIANTS
})


def _create(base: str, variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
    return build_model_with_cfg(VisionTransformerPlain, f'{base}_{variant}', pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg,
                                orthogonal=variant == 'orthogonal', **dict(_BASE_ARGS[base], **kwargs))


@register_model
def vit_micro_patch4_32_plain(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Micro/4 (64 wide, 6 deep, 32px), residual-free."""
    return _create('vit_micro_patch4_32', 'plain', pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_orthogonal(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Micro/4, residual-free, orthogonal block maps (train with ``--opt projunn<base>``)."""
    return _create('vit_micro_patch4_32', 'orthogonal', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_plain(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Tiny/16, residual-free."""
    return _create('vit_tiny_patch16_224', 'plain', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_orthogonal(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Tiny/16, residual-free, orthogonal block maps."""
    return _create('vit_tiny_patch16_224', 'orthogonal', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_plain(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Small/16, residual-free."""
    return _create('vit_small_patch16_224', 'plain', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_orthogonal(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Small/16, residual-free, orthogonal block maps."""
    return _create('vit_small_patch16_224', 'orthogonal', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_plain(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Base/16, residual-free."""
    return _create('vit_base_patch16_224', 'plain', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_orthogonal(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Base/16, residual-free, orthogonal block maps."""
    return _create('vit_base_patch16_224', 'orthogonal', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_plain(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Large/16, residual-free."""
    return _create('vit_large_patch16_224', 'plain', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_orthogonal(pretrained: bool = False, **kwargs) -> VisionTransformerPlain:
    """ViT-Large/16, residual-free, orthogonal block maps."""
    return _create('vit_large_patch16_224', 'orthogonal', pretrained, **kwargs)
