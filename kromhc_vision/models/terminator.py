"""Terminator: a residual-free slow-fast network built on the HyperZ·Z·W operator (Zhang 2024, arXiv 2401.17948).

Written from the paper and ``shared/spec/terminator.md`` (the author's code was withdrawn and unlicensed). Every
layer sees the whole image through large implicit kernels instead of adding a skip:

* a **slow network** (:class:`SlowNet`, a multiplicative filter network on coordinates ``c`` in ``[-1, 1]^2``)
  generates hyper-kernels ``W`` of any size: ``h_1 = sin(F_1 c + φ_1)``,
  ``h_{l+1} = sin(F_{l+1} c + φ_{l+1}) ⊙ (A_l h_l + a_l)``, ``W = W_o h_L + b_o``; the frequencies ``F_l`` start at
  ``2π ω₀ γ u`` with ``γ ~ Gamma(6 / (l + 1), 1)`` per hidden unit and ``u ~ U(-1, 1)^2``;
* the **fast network** convolves its activations ``Z (B, C, H, W)`` with context-dependent kernels made by the
  **HyperZ·Z·W** operator: the hyper-kernel multiplied elementwise with the activations, the product used as the
  kernel ``Z`` (through a value projection) is convolved with.

One block (:class:`SFNEBlock`, "slow-fast neural encoding"), ``x (B, C_in, H, W) -> (B, C_out, H, W)``, nine
branches of ``C_in`` channels each, concatenated (no additive skip anywhere)::

    K_g = slow_g(coords(H, W))                      (C_in, H, W)   global hyper-kernel
    Ŵ   = x ⊙ K_g                                   global product (context-dependent kernel, per sample)
    g   = Std(conv_same(V x, Ŵ) / (H W))            global HyperZ·Z·W: depthwise, kernel of the image's size (FFT)
    e   = x ⊙ σ(fc(mean_hw((x ⊙ K_g) ⊙ x)))         hyper-channel interaction (second-order, SE-like gate)
    l_k = GELU(Std(M_k dwconv(x, K_k ⊙ s)))         local HyperZ·Z·W, k = 3, 5, 7, 9: K_k = slow_l(coords(k, k)),
                                                     s = mean_hw(GELU(P x)) (B, C_in) the sample's own context
    r   = W_y GELU(Std(W_k x ⊙ W_q W_v x))          recursive gated unit
    y   = Dropout(GELU(Std(B [x, Ŵ, g, e, l_3, l_5, l_7, l_9, r])))   1x1 bottleneck, 9 C_in -> C_out

``x`` itself among the branches is the dense concatenation (DenseNet-style, not a residual sum). ``Std`` is
group-wise standardisation without affine terms (:class:`Standardize`): half the channels by batch statistics
(``BatchNorm2d(affine=False)``: running statistics in eval), the other half per sample (instance norm).

The network is blocks without downsampling (``dims``, e.g. 3 -> 12 -> 36 -> 72 -> 144 -> 288 at 32x32 for
``terminator_cifar``), global average pooling and a linear head. Features are ``(B, C, H, W)`` at the input's
resolution (reduction 1).

**Slow loss** (:meth:`Terminator.slow_loss`): local feedback for the slow networks, the mean over consecutive
block pairs of ``mean((tile(K_g^(i)) - K_g^(i+1))^2)``, the global kernels at ``img_size``, ``K_g^(i)`` repeated along
channels to ``C_in^(i+1)``. It depends on parameters only; its gradient reaches only the global slow networks.

Differences from the archived code, on purpose: a sample's eval logits do not depend on its batch-mates (the local
context ``s`` is per sample, standardisation uses running statistics in eval); ``paper_batch_context=True`` restores
the archived behaviour (context averaged over the batch, batch statistics also in eval). Every coefficient is a
registered parameter; no device calls; any number of blocks; batch size 1 works. The archived model concatenated
channel-repeated outputs of all earlier blocks; here each block concatenates its own input, so blocks stay a
sequence (``features_only``, ``checkpoint_seq``). The kernel sizes, widths, ``ω₀`` and the context projection
are this implementation's choices where the paper and spec leave them open.

Not supported: ``torch.jit.script`` (raises :class:`TorchScriptUnsupportedError`, naming ``torch.compile`` and
``torch.export``, which work: export is tested); ``torch.jit.trace`` works. With grad checkpointing, a
recomputed block updates BatchNorm's running statistics a second time (as any BatchNorm network in timm).
Parameter names: ``blocks.i.{global_slow, local_slow, ...}``, ``head.fc``.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model, \
    register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices  # no public name in timm 1.0.31

from ..ops.dispatch import recording_for_export
from ._hc_common import TorchScriptUnsupportedError

__all__ = ['Terminator', 'SFNEBlock', 'SlowNet', 'Standardize', 'global_hyper_conv', 'dynamic_depthwise_conv',
           'coordinate_grid']


# ----------------------------------------------------------------------------------------------- operators
@register_notrace_function
def coordinate_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Coordinates of a ``height x width`` grid in ``[-1, 1]^2``, ``(height * width, 2)``, on ``like``'s device/dtype."""
    ys = torch.linspace(-1., 1., height, device=like.device, dtype=like.dtype) if height > 1 else \
        torch.zeros(1, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1., 1., width, device=like.device, dtype=like.dtype) if width > 1 else \
        torch.zeros(1, device=like.device, dtype=like.dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1).reshape(-1, 2)


@register_notrace_function
def global_hyper_conv(value: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' cross-correlation of ``value`` with a per-sample kernel of the image's size.

    ``value, kernel (B, C, H, W) -> (B, C, H, W)``:
    ``out[b, c, i, j] = sum_{p, q} kernel[b, c, p, q] value[b, c, i + p - H//2, j + q - W//2]`` (zero outside),
    i.e. ``F.conv2d`` with padding ``(H//2, W//2)`` and one group per (sample, channel), cropped to ``H x W``.
    Computed with zero-padded real FFTs of size ``2H x 2W`` (in float32 at least: no CPU FFT in bf16/fp16).
    """
    H, W = value.shape[-2], value.shape[-1]
    dtype = torch.promote_types(value.dtype, torch.float32)
    flipped = kernel.to(dtype).flip(-2, -1)
    spec = torch.fft.rfft2(value.to(dtype), s=(2 * H, 2 * W)) * torch.fft.rfft2(flipped, s=(2 * H, 2 * W))
    full = torch.fft.irfft2(spec, s=(2 * H, 2 * W))
    h0, w0 = H - 1 - H // 2, W - 1 - W // 2
    return full[..., h0:h0 + H, w0:w0 + W].to(value.dtype)


@register_notrace_function
def dynamic_depthwise_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution with a kernel per sample: ``x (B, C, H, W)``, ``kernel (B, C, k, k)`` (odd ``k``)
    -> ``(B, C, H, W)``, zero padding, one group per (sample, channel)."""
    B, C, H, W = x.shape
    k = kernel.shape[-1]
    # groups=B*C: torch.jit.trace records it as a constant (the batch size of the trace), ONNX has no symbolic one
    if recording_for_export():
        k = int(k)  # a fixed size (the tracer hands sizes as tensors, which unfold does not take)
        columns = F.unfold(x, k, padding=k // 2).view(B, C, k * k, H * W)
        return (columns * kernel.reshape(B, C, k * k, 1)).sum(2).view(B, C, H, W)
    out = F.conv2d(x.reshape(1, B * C, H, W), kernel.reshape(B * C, 1, k, k), padding=k // 2, groups=B * C)
    return out.reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------- slow network
@register_notrace_module
class SlowNet(nn.Module):
    """Multiplicative filter network on coordinates: ``coords (N, 2) -> (N, out_dim)`` (the slow network).

    ``h_1 = sin(F_1 c + φ_1)``, ``h_{l+1} = sin(F_{l+1} c + φ_{l+1}) ⊙ (A_l h_l + a_l)``, ``out = W_o h_L + b_o``.
    ``kernel(h, w, like)`` evaluates it on an ``h x w`` grid: ``(out_dim, h, w)``.
    """

    def __init__(self, out_dim: int, hidden: int = 32, num_layers: int = 2, omega0: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f'slow_layers must be >= 1, got {num_layers}')
        dd = dict(device=device, dtype=dtype)
        self.omega0 = omega0
        self.filters = nn.ModuleList(nn.Linear(2, hidden, **dd) for _ in range(num_layers))
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden, **dd) for _ in range(num_layers - 1))
        self.out = nn.Linear(hidden, out_dim, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Frequencies ``2π ω₀ γ u`` (γ ~ Gamma(6/(l+1), 1) per unit, u ~ U(-1, 1)), phases ~ U(-π, π); the
        linear layers ``U(±1/sqrt(hidden))`` (their product stays O(1)), the output layer timm's trunc normal."""
        for l, f in enumerate(self.filters, start=1):
            hidden = f.weight.shape[0]
            # drawn on the host and copied to wherever the weights are (a no-op on meta): torch's Gamma sampler
            # has no meta kernel, and a torch.device('meta') context would otherwise catch these tensors too
            cpu = dict(device='cpu', dtype=torch.float32)
            gamma = torch._standard_gamma(torch.full((hidden, 1), 6. / (l + 1), **cpu))
            u = torch.rand(hidden, 2, **cpu) * 2 - 1
            f.weight.copy_(2 * math.pi * self.omega0 * gamma * u)
            f.bias.copy_(torch.rand(hidden, **cpu) * 2 * math.pi - math.pi)
        for lin in self.linears:
            bound = 1 / math.sqrt(lin.weight.shape[1])
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.out.weight, std=0.5 / math.sqrt(self.out.weight.shape[1]))
        nn.init.zeros_(self.out.bias)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        h = torch.sin(self.filters[0](coords))
        for f, lin in zip(self.filters[1:], self.linears):
            h = torch.sin(f(coords)) * lin(h)
        return self.out(h)

    def kernel(self, height: int, width: int) -> torch.Tensor:
        """The hyper-kernel on a ``height x width`` grid, ``(out_dim, height, width)``."""
        coords = coordinate_grid(height, width, self.out.weight)
        return self(coords).t().reshape(-1, height, width)


# ----------------------------------------------------------------------------------------------- fast network
class Standardize(nn.Module):
    """Group-wise standardisation without affine terms, ``(B, C, H, W) -> (B, C, H, W)``.

    The first ``C // 2`` channels by batch statistics (``BatchNorm2d(affine=False)``, running statistics in eval;
    with ``paper_batch_context`` batch statistics also in eval, as the archived code), the rest per sample and
    channel over space (instance norm). A single channel is instance-normalised.
    """

    def __init__(self, channels: int, paper_batch_context: bool = False, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        self.num_batch = channels // 2
        self.eps = eps
        self.bn = nn.BatchNorm2d(self.num_batch, eps=eps, momentum=momentum, affine=False,
                                 track_running_stats=not paper_batch_context, device=device, dtype=dtype) \
            if self.num_batch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_batch:
            return F.instance_norm(x, eps=self.eps)
        xb, xi = x[:, :self.num_batch], x[:, self.num_batch:]
        return torch.cat([self.bn(xb), F.instance_norm(xi, eps=self.eps)], dim=1)


class RecursiveGatedUnit(nn.Module):
    """``r = W_y GELU(Std(W_k x ⊙ W_q W_v x))``, 1x1 convolutions, ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, paper_batch_context: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_k = nn.Conv2d(channels, channels, 1, **dd)
        self.conv_v = nn.Conv2d(channels, channels, 1, **dd)
        self.conv_q = nn.Conv2d(channels, channels, 1, **dd)
        self.norm = Standardize(channels, paper_batch_context, **dd)
        self.conv_y = nn.Conv2d(channels, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_y(F.gelu(self.norm(self.conv_k(x) * self.conv_q(self.conv_v(x)))))


class SFNEBlock(nn.Module):
    """One slow-fast neural encoding block, ``(B, C_in, H, W) -> (B, C_out, H, W)``; see the module docstring."""

    def __init__(self, in_chs: int, out_chs: int, kernel_sizes: Sequence[int] = (3, 5, 7, 9), slow_hidden: int = 32,
                 slow_layers: int = 2, omega0: float = 1.0, drop: float = 0., paper_batch_context: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f'kernel_sizes must be odd and >= 1, got {tuple(kernel_sizes)}')
        self.kernel_sizes = tuple(kernel_sizes)
        self.paper_batch_context = paper_batch_context
        C = in_chs
        # global HyperZ·Z·W and hyper-channel interaction
        self.global_slow = SlowNet(C, slow_hidden, slow_layers, omega0, **dd)
        self.value = nn.Conv2d(C, C, 1, **dd)
        self.global_norm = Standardize(C, paper_batch_context, **dd)
        self.channel_fc = nn.Linear(C, C, **dd)
        # local HyperZ·Z·W: one slow net for every kernel size, modulated by the sample's context
        self.local_slow = SlowNet(C, slow_hidden, slow_layers, omega0, **dd)
        self.context = nn.Conv2d(C, C, 1, **dd)
        self.local_mix = nn.ModuleList(nn.Conv2d(C, C, 1, **dd) for _ in self.kernel_sizes)
        self.local_norm = nn.ModuleList(Standardize(C, paper_batch_context, **dd) for _ in self.kernel_sizes)
        self.rgu = RecursiveGatedUnit(C, paper_batch_context, **dd)
        self.num_branches = 5 + len(self.kernel_sizes)
        self.bottleneck = nn.Conv2d(self.num_branches * C, out_chs, 1, **dd)
        self.norm = Standardize(out_chs, paper_batch_context, **dd)
        self.drop = nn.Dropout(drop)

    def global_kernel(self, height: int, width: int) -> torch.Tensor:
        """``K_g (C_in, height, width)``."""
        return self.global_slow.kernel(height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2], x.shape[-1]
        k_g = self.global_kernel(H, W).to(x.dtype)
        w_hat = x * k_g  # HyperZ·Z·W: the context-dependent kernel
        g = self.global_norm(global_hyper_conv(self.value(x), w_hat) / (H * W))
        gate = torch.sigmoid(self.channel_fc((w_hat * x).mean((2, 3))))
        e = x * gate[:, :, None, None]
        s = F.gelu(self.context(x)).mean((2, 3))  # (B, C): each sample's own context
        if self.paper_batch_context:  # archived behaviour: the context averaged over the batch
            s = s.mean(0, keepdim=True).expand_as(s)
        branches = [x, w_hat, g, e]
        for k, mix, norm in zip(self.kernel_sizes, self.local_mix, self.local_norm):
            kernel = self.local_slow.kernel(k, k).to(x.dtype)[None] * s[:, :, None, None]  # (B, C, k, k)
            branches.append(F.gelu(norm(mix(dynamic_depthwise_conv(x, kernel)))))
        branches.append(self.rgu(x))
        return self.drop(F.gelu(self.norm(self.bottleneck(torch.cat(branches, dim=1)))))


# ----------------------------------------------------------------------------------------------- the model
class Terminator(nn.Module):
    """Terminator classifier: SFNE blocks at full resolution, global average pooling, linear head."""

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 32,
            dims: Sequence[int] = (12, 36, 72, 144, 288),
            kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            slow_hidden: int = 32,
            slow_layers: int = 2,
            omega0: float = 1.0,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            block_drop_rate: float = 0.,
            paper_batch_context: bool = False,
            device=None,
            dtype=None,
    ):
        """``dims``: output channels of each block (block 0 takes ``in_chans``). ``img_size``: the size the slow loss
        evaluates the global kernels at (the model takes any size). ``drop_rate``: before the head;
        ``block_drop_rate``: dropout after each block. ``paper_batch_context``: the archived, batch-dependent
        behaviour (see the module docstring)."""
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not dims:
            raise ValueError('dims must name at least one block')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.paper_batch_context = paper_batch_context
        self.grad_checkpointing = False
        chs = (in_chans, *dims)
        self.blocks = nn.Sequential(*[
            SFNEBlock(chs[i], chs[i + 1], kernel_sizes, slow_hidden, slow_layers, omega0, block_drop_rate,
                      paper_batch_context, **dd) for i in range(len(dims))])
        self.feature_info = [dict(num_chs=c, reduction=1, module=f'blocks.{i}') for i, c in enumerate(dims)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and '_slow' not in name:
                nn.init.trunc_normal_(m.weight, std=.02 if name.startswith('head') else
                                      math.sqrt(2. / (m.weight[0].numel())))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -------------------------------------------------------------------------------------- timm's contract
    def __prepare_scriptable__(self):
        raise TorchScriptUnsupportedError(
            "Terminator cannot be compiled by torch.jit.script: its slow networks call modules taken from "
            "zipped ModuleLists, which TorchScript cannot type. Use torch.compile or torch.export instead "
            "(both give the eager model's outputs).")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^blocks\.0\.', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        """The slow networks' frequencies: decay would shrink the hyper-kernels' bandwidth towards constants."""
        return {'blocks.*_slow.filters.*.weight'}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        ref = self.blocks[0].bottleneck.weight  # the new classifier where the model is (the old one may be gone)
        self.head.reset(num_classes, global_pool, device=ref.device, dtype=ref.dtype)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates``: each block's output ``(B, C_i, H, W)`` (no final norm exists)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, dims[-1], H, W)``."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -------------------------------------------------------------------------------------- slow loss
    def slow_loss(self) -> torch.Tensor:
        """Local feedback for the slow networks (parameters only), a scalar: the mean over consecutive block
        pairs of the mean squared difference between block i's global kernel, repeated along channels to block
        i+1's channel count, and block i+1's, both at ``img_size``. Zero for a single block."""
        H, W = self.img_size
        kernels = [b.global_kernel(H, W) for b in self.blocks]
        if len(kernels) < 2:
            return kernels[0].sum() * 0
        losses = []
        for a, b in zip(kernels[:-1], kernels[1:]):
            reps = -(-b.shape[0] // a.shape[0])
            losses.append(F.mse_loss(a.repeat(reps, 1, 1)[:b.shape[0]], b))
        return torch.stack(losses).mean()

    def slow_parameters(self):
        """Names of the slow networks' parameters (global and local)."""
        return [n for n, _ in self.named_parameters() if '_slow.' in n]


# ----------------------------------------------------------------------------------------------- registry
def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (32, 32), 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'fixed_input_size': False, 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'blocks.0.rgu.conv_k', 'classifier': 'head.fc', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2401.17948', 'paper_name': 'HyperZ·Z·W Operator Connects Slow-Fast Networks for Full '
                                                      'Context Interaction', **kwargs,
    }


default_cfgs = {
    'terminator_micro': _cfg(input_size=(3, 16, 16), pool_size=(16, 16)),
    'terminator_tiny': _cfg(),
    'terminator_cifar': _cfg(),
}
default_cfgs = generate_default_cfgs(default_cfgs)

_ARGS = {
    'terminator_micro': dict(dims=(24, 48, 96, 160), img_size=16, slow_hidden=16),
    'terminator_tiny': dict(dims=(16, 32, 64, 128), img_size=32, slow_hidden=16),
    'terminator_cifar': dict(dims=(12, 36, 72, 144, 288), img_size=32, slow_hidden=32),
}


def _create(name: str, pretrained: bool = False, **kwargs) -> Terminator:
    args = dict(_ARGS[name], **kwargs)
    out_indices = args.pop('out_indices', tuple(range(len(args['dims']))))
    return build_model_with_cfg(Terminator, name, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **args)


@register_model
def terminator_micro(pretrained: bool = False, **kwargs) -> Terminator:
    """Terminator for digits-sized inputs (16px): 4 blocks, 24-160 wide."""
    return _create('terminator_micro', pretrained, **kwargs)


@register_model
def terminator_tiny(pretrained: bool = False, **kwargs) -> Terminator:
    """Terminator for 28-32px inputs (Fashion-MNIST): 4 blocks, 16-128 wide."""
    return _create('terminator_tiny', pretrained, **kwargs)


@register_model
def terminator_cifar(pretrained: bool = False, **kwargs) -> Terminator:
    """The paper's CIFAR-10 configuration: 5 blocks, 3 -> 12 -> 36 -> 72 -> 144 -> 288 at 32x32."""
    return _create('terminator_cifar', pretrained, **kwargs)
