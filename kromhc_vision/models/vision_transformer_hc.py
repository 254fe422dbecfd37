"""Vision Transformers with hyper-connection streams (HC, mHC, mHC-lite, KromHC, and the residual baseline).

timm's :class:`~timm.models.vision_transformer.VisionTransformer` with every block's attention and MLP wrapped
by a connection (``layer_index = 2 * block + {0, 1}``)::

    tokens (B, N, C) --expand--> X (B, N, n, C) --blocks--> (B, N, n, C) --reduce--> (B, N, C) --norm--> head

Branches: ``u -> drop_path(ls1(attn(norm1(u))))`` and ``u -> drop_path(ls2(mlp(norm2(u))))`` on ``u (B, N, C)``.
Class / register tokens are tokens like the patches. Streams expand after pos-embed and ``norm_pre`` and
reduce (mean) before the final ``norm``. Parameter names are timm's (``blocks.i.attn...``, ``head``) plus
``blocks.i.hc_attn.*`` and ``blocks.i.hc_mlp.*``, so timm's residual checkpoints load by name.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.models import checkpoint, checkpoint_seq, register_model
from timm.models._features import feature_take_indices  # no public name in timm 1.0.31
from timm.models.vision_transformer import Block, VisionTransformer, _cfg, checkpoint_filter_fn

from ..streams import expand_streams, reduce_streams
from ._hc_common import DEFAULT_HC_RECOMPUTE, HcModelMixin, HcSpec, create_hc_model, hc_default_cfgs, upcycled_cfg

__all__ = ['VisionTransformerHC', 'BlockHC']


class BlockHC(Block):
    """timm's pre-norm block on streams ``X (B, N, n, C)``; the connections are ``hc_attn`` and ``hc_mlp``."""

    def __init__(self, dim: int, *args, depth: int = 0, hc: HcSpec = None, **kwargs):
        super().__init__(dim, *args, depth=depth, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))  # timm's factory arguments
        self.hc_attn = hc.connection(dim, 2 * depth, **dd)
        self.hc_mlp = hc.connection(dim, 2 * depth + 1, **dd)

    def _attn_branch(self, u: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.drop_path1(self.ls1(self.attn(self.norm1(u), attn_mask=attn_mask, is_causal=is_causal)))

    def _mlp_branch(self, u: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(u))))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """``X (B, N, n, C) -> (B, N, n, C)``."""
        x = self.hc_attn(x, partial(self._attn_branch, attn_mask=attn_mask, is_causal=is_causal))
        return self.hc_mlp(x, self._mlp_branch)


class VisionTransformerHC(HcModelMixin, VisionTransformer):
    """VisionTransformer whose blocks carry ``num_streams`` hyper-connection streams per token."""
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
        """``hc_*`` / ``num_streams``: see :mod:`kromhc_vision.models._hc_common`; the rest is VisionTransformer's."""
        hc = HcSpec.create(hc_variant, num_streams, hc_init, hc_backend, hc_kwargs, hc_recompute)
        super().__init__(block_fn=partial(BlockHC, hc=hc), **kwargs)
        self._init_hc(hc)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C_in, H, W)`` -> streams ``(B, N, n, C)``."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return expand_streams(x, self.num_streams)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, N, C)`` (normed tokens, as timm's)."""
        x = self._embed(x)
        with self._hc_session():
            if attn_mask is not None or is_causal:
                for blk in self.blocks:
                    x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                with self._hc_suspended():
                    x = checkpoint_seq(self.blocks, x)
            else:
                x = self.blocks(x)
        return self.norm(reduce_streams(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``; each intermediate is the block's stream state reduced to ``(B, N, C)``."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        intermediates = []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        with self._hc_session():
            for i, blk in enumerate(blocks):
                if attn_mask is not None or is_causal:
                    x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
                elif self.grad_checkpointing:
                    with self._hc_suspended():
                        x = checkpoint(blk, x)
                else:
                    x = blk(x)
                if i in take_indices:
                    y = reduce_streams(x)
                    intermediates.append(self.norm(y) if norm else y)

        prefix_tokens = None
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            out = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                out['image_features'] = self.norm(reduce_streams(x))
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(reduce_streams(x)), intermediates


_BASE_ARGS = {
    'vit_micro_patch4_32': dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.),
    'vit_tiny_patch16_224': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16_224': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16_224': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16_224': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}

default_cfgs = hc_default_cfgs({
    'vit_micro_patch4_32': _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    **upcycled_cfg('vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    **upcycled_cfg('vit_small_patch16_224.augreg_in21k_ft_in1k'),
    **upcycled_cfg('vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    **upcycled_cfg('vit_base_patch16_224.augreg_in21k_ft_in1k'),
    **upcycled_cfg('vit_large_patch16_224.augreg_in21k_ft_in1k'),
}, paper_id='arXiv:2010.11929')


def _create(base: str, variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3))
    return create_hc_model(VisionTransformerHC, base, variant, pretrained, checkpoint_filter_fn, feature_cfg,
                           _BASE_ARGS[base], **kwargs)


@register_model
def vit_micro_patch4_32_residual(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Micro/4 (64 wide, 6 deep) for 32px inputs, plain residual (one stream)."""
    return _create('vit_micro_patch4_32', 'residual', pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_hc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Micro/4 for 32px inputs with Hyper-Connections."""
    return _create('vit_micro_patch4_32', 'hc', pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_mhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Micro/4 for 32px inputs with mHC."""
    return _create('vit_micro_patch4_32', 'mhc', pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_mhclite(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Micro/4 for 32px inputs with mHC-lite."""
    return _create('vit_micro_patch4_32', 'mhclite', pretrained, **kwargs)


@register_model
def vit_micro_patch4_32_kromhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Micro/4 for 32px inputs with KromHC."""
    return _create('vit_micro_patch4_32', 'kromhc', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_residual(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Tiny/16, plain residual (one stream)."""
    return _create('vit_tiny_patch16_224', 'residual', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_hc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Tiny/16 with Hyper-Connections."""
    return _create('vit_tiny_patch16_224', 'hc', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_mhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Tiny/16 with mHC."""
    return _create('vit_tiny_patch16_224', 'mhc', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_mhclite(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Tiny/16 with mHC-lite."""
    return _create('vit_tiny_patch16_224', 'mhclite', pretrained, **kwargs)


@register_model
def vit_tiny_patch16_224_kromhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Tiny/16 with KromHC."""
    return _create('vit_tiny_patch16_224', 'kromhc', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_residual(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Small/16, plain residual (one stream)."""
    return _create('vit_small_patch16_224', 'residual', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_hc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Small/16 with Hyper-Connections."""
    return _create('vit_small_patch16_224', 'hc', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_mhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Small/16 with mHC."""
    return _create('vit_small_patch16_224', 'mhc', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_mhclite(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Small/16 with mHC-lite."""
    return _create('vit_small_patch16_224', 'mhclite', pretrained, **kwargs)


@register_model
def vit_small_patch16_224_kromhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Small/16 with KromHC."""
    return _create('vit_small_patch16_224', 'kromhc', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_residual(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Base/16, plain residual (one stream)."""
    return _create('vit_base_patch16_224', 'residual', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_hc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Base/16 with Hyper-Connections."""
    return _create('vit_base_patch16_224', 'hc', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_mhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Base/16 with mHC."""
    return _create('vit_base_patch16_224', 'mhc', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_mhclite(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Base/16 with mHC-lite."""
    return _create('vit_base_patch16_224', 'mhclite', pretrained, **kwargs)


@register_model
def vit_base_patch16_224_kromhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Base/16 with KromHC."""
    return _create('vit_base_patch16_224', 'kromhc', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_residual(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Large/16, plain residual (one stream)."""
    return _create('vit_large_patch16_224', 'residual', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_hc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Large/16 with Hyper-Connections."""
    return _create('vit_large_patch16_224', 'hc', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_mhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Large/16 with mHC."""
    return _create('vit_large_patch16_224', 'mhc', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_mhclite(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Large/16 with mHC-lite."""
    return _create('vit_large_patch16_224', 'mhclite', pretrained, **kwargs)


@register_model
def vit_large_patch16_224_kromhc(pretrained: bool = False, **kwargs) -> VisionTransformerHC:
    """ViT-Large/16 with KromHC."""
    return _create('vit_large_patch16_224', 'kromhc', pretrained, **kwargs)
