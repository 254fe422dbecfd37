"""ConvNeXt with hyper-connection streams (HC, mHC, mHC-lite, KromHC, and the residual baseline).

timm's :class:`~timm.models.convnext.ConvNeXt` with every block's body (dwconv, norm, MLP, layer scale,
drop path) as the branch of one connection (``layer_index`` = block index over all stages)::

    stem -> NHWC (B, H, W, C) --expand--> X (B, H, W, n, C) --stages--> --reduce--> NCHW --norm_pre/head

Streams are channels last; the branch converts ``u (B, H, W, C)`` to NCHW for the depthwise conv and back.

Stage transitions: all n streams go through the stage's downsample (norm + 2x2 stride-2 conv) with shared
weights, the streams folded into the batch (``(B, H, W, n, C) -> (B*n, C, H, W)``). Reducing and re-expanding
at each transition is cheaper, but it collapses the streams to identical copies at every stage boundary, so the
connections could only mix within a stage (2 blocks in three of convnext_atto's four stages), whereas the spec
expands once before the first block and reduces once after the last. Both choices upcycle residual weights
exactly. Cost of the fold: n times the downsample work. The downsamples are 3.9 % of convnext_tiny's MACs at
224px (5.5 % of convnext_atto's), so at n = 4 the backbone does +11.7 % (+16.5 %) MACs over reduce/re-expand.
Measured on a shared 2-core CPU (forward + backward, n = 4, median of 15, over reduce/re-expand): +5 to +15 %
for convnext_atto_kromhc (128px batch 4, 64px batch 8) and +9 % for convnext_micro_kromhc (32px batch 16) in
the quietest run; repeated runs under load ranged from -13 % to +32 %, so the MAC count is the firmer number.

Parameter names are timm's (``stages.i.blocks.j.conv_dw``, ``head.fc``) plus ``stages.i.blocks.j.hc.*``.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models import checkpoint_seq, register_model
from timm.models._features import feature_take_indices  # no public name in timm 1.0.31
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, _cfg, checkpoint_filter_fn

from .. import recompute
from ..streams import expand_streams, reduce_streams
from ._hc_common import DEFAULT_HC_RECOMPUTE, HcModelMixin, HcSpec, create_hc_model, hc_default_cfgs, upcycled_cfg

__all__ = ['ConvNeXtHC', 'ConvNeXtBlockHC']


class ConvNeXtBlockHC(nn.Module):
    """A timm ConvNeXt block's body as the branch of connection ``hc`` on streams ``X (B, H, W, n, C)``."""

    def __init__(self, block: ConvNeXtBlock, connection: nn.Module):
        """Takes over ``block``'s modules (same names); its shortcut must be the identity."""
        super().__init__()
        if not isinstance(block.shortcut, nn.Identity):
            raise ValueError('hyper-connections need identity shortcuts (no in-block stride or channel change)')
        self.use_conv_mlp = block.use_conv_mlp
        self.conv_dw, self.norm, self.mlp, self.gamma = block.conv_dw, block.norm, block.mlp, block.gamma
        self.drop_path = block.drop_path
        self.hc = connection

    def _branch(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        x = self.conv_dw(u.permute(0, 3, 1, 2))
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x)).permute(0, 2, 3, 1)
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1)))
        if self.gamma is not None:
            x = x * self.gamma
        return self.drop_path(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``X (B, H, W, n, C) -> (B, H, W, n, C)``."""
        return self.hc(x, self._branch)


def _fold_streams(x: torch.Tensor) -> torch.Tensor:
    """Streams ``(B, H, W, n, C)`` -> ``(B*n, C, H, W)`` in channels-last memory (a copy): the streams as images."""
    return x.permute(0, 3, 1, 2, 4).flatten(0, 1).permute(0, 3, 1, 2)  # no size arithmetic: ONNX's tracer keeps B


def _unfold_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """``(B*n, C, H, W)`` -> streams ``(B, H, W, n, C)``, contiguous: :func:`_fold_streams` undone."""
    x = x.permute(0, 2, 3, 1)  # sizes read one by one (torch.fx) and no unflatten (ONNX's tracer keeps B dynamic)
    return x.reshape(-1, num_streams, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 3, 1, 4).contiguous()


def _fold_then_downsample(downsample: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return downsample(_fold_streams(x))


def _stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One ConvNeXt stage on streams ``(B, H, W, n, C) -> (B, H', W', n, C')``; the downsample sees B*n images.

    Under ``hc_recompute`` the downsample (norm and conv) is checkpointed (``torch.utils.checkpoint``,
    non-reentrant: it saves its input through autograd, where ``saved_activation_bytes`` counts it), so that it
    keeps one tensor of ``n C`` values per token where its norm and conv would keep two (the norm's input and the
    normalised one). The streams are folded into the batch before the checkpoint, which keeps the folded copy: the
    fold saves nothing, so the stream state is freed once the stage no longer holds it, and the backward pass runs
    the norm again, not the fold too (BENCHMARKS.md ``convnext_fold_outside``). Where the fold is a view (B = 1
    or n = 1) the checkpoint keeps a view of the state instead: the same bytes. A state broadcast over the
    streams (stride 0, ``C`` values per token: the stem's output, where a stage 0 downsamples) is folded inside
    the checkpoint, so that only the broadcast view is kept.
    """
    if not isinstance(stage.downsample, nn.Identity):
        num_streams = x.shape[-2]
        if recompute.active_session() is None:
            x = stage.downsample(_fold_streams(x))
        elif x.stride(-2) == 0:
            x = checkpoint(_fold_then_downsample, stage.downsample, x, use_reentrant=False)
        else:
            x = checkpoint(stage.downsample, _fold_streams(x), use_reentrant=False)
        x = _unfold_streams(x, num_streams)
    if stage.grad_checkpointing and not torch.jit.is_scripting():
        with HcModelMixin._hc_suspended():
            return checkpoint_seq(stage.blocks, x)
    return stage.blocks(x)


class ConvNeXtHC(HcModelMixin, ConvNeXt):
    """ConvNeXt whose blocks carry ``num_streams`` hyper-connection streams per position."""
    timm_filter_fn = staticmethod(checkpoint_filter_fn)

    def __init__(
            self,
            hc_variant: str = 'residual',
            num_streams: Optional[int] = None,
            hc_init: str = 'published',
            hc_backend: Optional[str] = None,
            hc_kwargs: Optional[Dict[str, Any]] = None,
            hc_recompute: Union[bool, int] = DEFAULT_HC_RECOMPUTE,
            **kwargs,
    ):
        """``hc_*`` / ``num_streams``: see :mod:`kromhc_vision.models._hc_common`; the rest is ConvNeXt's."""
        hc = HcSpec.create(hc_variant, num_streams, hc_init, hc_backend, hc_kwargs, hc_recompute)
        super().__init__(**kwargs)
        layer_index = 0
        for stage in self.stages:
            for j, block in enumerate(stage.blocks):
                conn = hc.connection(block.conv_dw.out_channels, layer_index, device=block.conv_dw.weight.device,
                                     dtype=block.conv_dw.weight.dtype)
                stage.blocks[j] = ConvNeXtBlockHC(block, conn)
                layer_index += 1
        self._init_hc(hc)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C_in, H, W)`` -> streams ``(B, H/p, W/p, n, C)``, ``p`` the stem's patch size (4; 1 for
        convnext_micro)."""
        return expand_streams(self.stem(x).permute(0, 2, 3, 1), self.num_streams)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Streams ``(B, H, W, n, C)`` -> ``(B, C, H, W)``."""
        return reduce_streams(x).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C, H/s, W/s)``, as timm's: ``s`` the total stride (32; 8 for convnext_micro)."""
        x = self._embed(x)
        with self._hc_session():
            for stage in self.stages:
                x = _stage_forward(stage, x)
        return self.norm_pre(self._reduce(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates``; each intermediate is the stage's stream state reduced to NCHW."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self._embed(x)
        with self._hc_session():
            for feat_idx, stage in enumerate(stages):
                x = _stage_forward(stage, x)
                if feat_idx in take_indices:
                    y = self._reduce(x)
                    intermediates.append(self.norm_pre(y) if norm and feat_idx == last_idx else y)
        if intermediates_only:
            return intermediates
        x = self._reduce(x)
        return (self.norm_pre(x) if feat_idx == last_idx else x), intermediates


_BASE_ARGS = {
    'convnext_micro': dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), conv_mlp=True, patch_size=1),
    'convnext_atto': dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    'convnext_nano': dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    'convnext_tiny': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    'convnext_small': dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    'convnext_base': dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
}

default_cfgs = hc_default_cfgs({
    'convnext_micro': _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
    **upcycled_cfg('convnext_atto.d2_in1k'),
    **upcycled_cfg('convnext_nano.in12k_ft_in1k'),
    **upcycled_cfg('convnext_tiny.in12k_ft_in1k'),
    **upcycled_cfg('convnext_tiny.fb_in1k'),
    **upcycled_cfg('convnext_small.in12k_ft_in1k'),
    **upcycled_cfg('convnext_small.fb_in1k'),
    **upcycled_cfg('convnext_base.fb_in22k_ft_in1k'),
    **upcycled_cfg('convnext_base.fb_in1k'),
}, paper_id='arXiv:2201.03545')


def _create(base: str, variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', (0, 1, 2, 3)))
    return create_hc_model(ConvNeXtHC, base, variant, pretrained, checkpoint_filter_fn, feature_cfg,
                           _BASE_ARGS[base], **kwargs)


@register_model
def convnext_micro_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Micro (1x1 stem, total stride 8 -> 4x4 at 32px, 32-256 wide), plain residual (one stream)."""
    return _create('convnext_micro', 'residual', pretrained, **kwargs)


@register_model
def convnext_micro_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Micro for 32px inputs with Hyper-Connections."""
    return _create('convnext_micro', 'hc', pretrained, **kwargs)


@register_model
def convnext_micro_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Micro for 32px inputs with mHC."""
    return _create('convnext_micro', 'mhc', pretrained, **kwargs)


@register_model
def convnext_micro_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Micro for 32px inputs with mHC-lite."""
    return _create('convnext_micro', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_micro_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Micro for 32px inputs with KromHC."""
    return _create('convnext_micro', 'kromhc', pretrained, **kwargs)


@register_model
def convnext_atto_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Atto, plain residual (one stream)."""
    return _create('convnext_atto', 'residual', pretrained, **kwargs)


@register_model
def convnext_atto_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Atto with Hyper-Connections."""
    return _create('convnext_atto', 'hc', pretrained, **kwargs)


@register_model
def convnext_atto_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Atto with mHC."""
    return _create('convnext_atto', 'mhc', pretrained, **kwargs)


@register_model
def convnext_atto_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Atto with mHC-lite."""
    return _create('convnext_atto', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_atto_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Atto with KromHC."""
    return _create('convnext_atto', 'kromhc', pretrained, **kwargs)


@register_model
def convnext_nano_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Nano, plain residual (one stream)."""
    return _create('convnext_nano', 'residual', pretrained, **kwargs)


@register_model
def convnext_nano_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Nano with Hyper-Connections."""
    return _create('convnext_nano', 'hc', pretrained, **kwargs)


@register_model
def convnext_nano_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Nano with mHC."""
    return _create('convnext_nano', 'mhc', pretrained, **kwargs)


@register_model
def convnext_nano_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Nano with mHC-lite."""
    return _create('convnext_nano', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_nano_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Nano with KromHC."""
    return _create('convnext_nano', 'kromhc', pretrained, **kwargs)


@register_model
def convnext_tiny_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Tiny, plain residual (one stream)."""
    return _create('convnext_tiny', 'residual', pretrained, **kwargs)


@register_model
def convnext_tiny_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Tiny with Hyper-Connections."""
    return _create('convnext_tiny', 'hc', pretrained, **kwargs)


@register_model
def convnext_tiny_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Tiny with mHC."""
    return _create('convnext_tiny', 'mhc', pretrained, **kwargs)


@register_model
def convnext_tiny_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Tiny with mHC-lite."""
    return _create('convnext_tiny', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_tiny_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Tiny with KromHC."""
    return _create('convnext_tiny', 'kromhc', pretrained, **kwargs)


@register_model
def convnext_small_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Small, plain residual (one stream)."""
    return _create('convnext_small', 'residual', pretrained, **kwargs)


@register_model
def convnext_small_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Small with Hyper-Connections."""
    return _create('convnext_small', 'hc', pretrained, **kwargs)


@register_model
def convnext_small_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Small with mHC."""
    return _create('convnext_small', 'mhc', pretrained, **kwargs)


@register_model
def convnext_small_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Small with mHC-lite."""
    return _create('convnext_small', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_small_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Small with KromHC."""
    return _create('convnext_small', 'kromhc', pretrained, **kwargs)


@register_model
def convnext_base_residual(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Base, plain residual (one stream)."""
    return _create('convnext_base', 'residual', pretrained, **kwargs)


@register_model
def convnext_base_hc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Base with Hyper-Connections."""
    return _create('convnext_base', 'hc', pretrained, **kwargs)


@register_model
def convnext_base_mhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Base with mHC."""
    return _create('convnext_base', 'mhc', pretrained, **kwargs)


@register_model
def convnext_base_mhclite(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Base with mHC-lite."""
    return _create('convnext_base', 'mhclite', pretrained, **kwargs)


@register_model
def convnext_base_kromhc(pretrained: bool = False, **kwargs) -> ConvNeXtHC:
    """ConvNeXt-Base with KromHC."""
    return _create('convnext_base', 'kromhc', pretrained, **kwargs)
