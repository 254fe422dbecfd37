"""What the stream-mixing matrices of a trained hyper-connected model do, measured on real images.

:func:`connection_diagnostics` runs a batch through the model with a forward pre-hook on every module that has
``coefficients`` (the connections), evaluates ``coefficients(X)`` on the captured stream state ``X`` and reports
per connection, in forward (depth) order:

- ``row_error`` / ``col_error``: max over tokens of ``|row sum - 1|`` / ``|column sum - 1|`` of ``H_res``;
- ``entropy``: mean over tokens and rows of the entropy of ``|H_res|``'s rows normalised to sum 1 (0: the
  streams are only permuted; ``log n``: uniform mixing);
- ``h_pre_mean``, ``h_post_mean`` (per stream) and ``h_res_mean`` (n x n), means over tokens;
- ``gain_row`` / ``gain_col``: for the composite ``M_l = H_res^(l) ... H_res^(1)`` of this and all earlier
  connections, per token (float64), the largest absolute row / column sum, max over tokens: the forward signal
  and backward gradient gain ("Amax gain magnitude" of the mHC paper).

A product of doubly stochastic matrices is doubly stochastic, so mHC-lite and KromHC stay at gain 1 to float
rounding at every depth; mHC's Sinkhorn leaves a per-layer error that compounds with depth; HC's ``H_res`` is
unconstrained. ViT: the token set is the same in every block, so the composite is a per-token product.
ConvNeXt: each downsample halves the grid. It treats all streams alike (shared weights, streams folded into
the batch), so the composite is carried onto the coarser grid by averaging it over the positions each output
position covers (the 2 x 2 windows of the stride-2 downsample, the last row or column of an odd grid left out as
the convolution leaves it; adaptive average pooling for any other shrink); a mean of doubly stochastic matrices
is doubly stochastic, so exactness survives. Any other change of token shape restarts the composite
(``composite_restart``).
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from .extras import pyplot

FLOAT32_EPS = torch.finfo(torch.float32).eps


def _max(values) -> float:
    """The largest of ``values``, NaN if any is NaN (Python's ``max`` keeps or drops a NaN by its position: a
    diverged layer's NaN gain would vanish from the summary behind a finite one)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _carry(composite: torch.Tensor, shape) -> torch.Tensor:
    """The running composite ``(..., n, n)`` on a new token shape, or None when it cannot be carried."""
    n = composite.shape[-1]
    if composite.ndim == 5 and len(shape) == 3 and shape[0] == composite.shape[0]:  # (B, H, W) -> (B, H', W')
        grid = composite.flatten(-2).permute(0, 3, 1, 2)
        halved = all(new == old // 2 for new, old in zip(shape[1:], grid.shape[2:]))
        pooled = F.avg_pool2d(grid, 2) if halved else F.adaptive_avg_pool2d(grid, tuple(shape[1:]))
        return pooled.permute(0, 2, 3, 1).unflatten(-1, (n, n))
    return None


@torch.no_grad()
def connection_diagnostics(model: torch.nn.Module, images: torch.Tensor) -> Dict:
    """Diagnostics of every connection of ``model`` for ``images`` (see the module docstring); JSON-ready."""
    connections = [(name, m) for name, m in model.named_modules() if hasattr(m, 'coefficients')]
    if not connections:
        raise ValueError(f'{type(model).__name__} has no hyper-connections (no module with `coefficients`)')
    layers: List[Dict] = []
    state = {'composite': None}

    def hook(name, module, args):
        h_pre, h_post, h_res = (t.double() for t in module.coefficients(args[0]))
        n = h_res.shape[-1]
        restart = False
        composite = state['composite']
        if composite is not None and composite.shape[:-2] != h_res.shape[:-2]:
            composite = _carry(composite, h_res.shape[:-2])
            restart = composite is None
        composite = h_res if composite is None else h_res @ composite
        state['composite'] = composite
        abs_rows = h_res.abs() / h_res.abs().sum(-1, keepdim=True).clamp_min(1e-300)
        entropy = -torch.xlogy(abs_rows, abs_rows).sum(-1).mean()
        layers.append(dict(
            name=name, variant=module.variant, num_streams=n,
            row_error=(h_res.sum(-1) - 1).abs().max().item(),
            col_error=(h_res.sum(-2) - 1).abs().max().item(),
            entropy=entropy.item(), max_entropy=math.log(n),
            h_pre_mean=h_pre.reshape(-1, n).mean(0).tolist(),
            h_post_mean=h_post.reshape(-1, n).mean(0).tolist(),
            h_res_mean=h_res.reshape(-1, n, n).mean(0).tolist(),
            gain_row=composite.abs().sum(-1).max().item(),
            gain_col=composite.abs().sum(-2).max().item(),
            composite_restart=restart,
        ))

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(name, mod, args))
               for name, m in connections]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        model(images.to(param.device if param is not None else images.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    variants = sorted({layer['variant'] for layer in layers})
    return dict(
        model=getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__),
        variant=variants[0] if len(variants) == 1 else variants,
        num_streams=layers[0]['num_streams'],
        num_images=int(images.shape[0]),
        num_connections=len(layers),
        summary=dict(
            max_row_error=_max(layer['row_error'] for layer in layers),
            max_col_error=_max(layer['col_error'] for layer in layers),
            final_gain_row=layers[-1]['gain_row'],
            final_gain_col=layers[-1]['gain_col'],
            max_gain_deviation=_max(abs(layer[k] - 1) for layer in layers for k in ('gain_row', 'gain_col')),
        ),
        layers=layers,
    )


def _short(name: str) -> str:
    return name.replace('blocks.', '').replace('stages.', 's').replace('hc_', '').replace('.hc', '')


def plot_h_res(diag: Dict, path) -> None:
    """Heat maps of the mean ``H_res`` of every connection, in depth order."""
    plt = pyplot()

    layers = diag['layers']
    cols = min(len(layers), 6)
    rows = math.ceil(len(layers) / cols)
    mats = [torch.tensor(layer['h_res_mean']) for layer in layers]
    lo = min(0.0, min(m.min().item() for m in mats))
    hi = max(1.0, max(m.max().item() for m in mats))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1, 1.8 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, layer, mat in zip(axes.flat, layers, mats):
        im = ax.imshow(mat.numpy(), vmin=lo, vmax=hi, cmap='viridis' if lo >= 0 else 'RdBu_r')
        ax.set_title(f"{_short(layer['name'])}\nerr {max(layer['row_error'], layer['col_error']):.0e}", fontsize=7)
        ax.axis('off')
        if mat.shape[0] <= 4:
            for (i, j), v in _cells(mat):
                ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=5, color='w' if v < hi / 2 else 'k')
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(f"{diag['model']}: mean H_res per connection (title: max |row/col sum - 1|)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cells(mat):
    return (((i, j), mat[i, j].item()) for i in range(mat.shape[0]) for j in range(mat.shape[1]))


def plot_composite_gain(runs: Dict[str, Dict], path) -> None:
    """Per-layer stochasticity error and composite gain deviation ``|gain - 1|`` vs depth, one line per run.

    ``runs``: label -> :func:`connection_diagnostics` result (one model, or several to compare variants).
    The first two panels log scale; the dotted line is float32 rounding (eps), the floor of an exactly doubly
    stochastic map.
    """
    plt = pyplot()

    fig, (ax_err, ax_gain, ax_abs) = plt.subplots(1, 3, figsize=(15, 4.2))
    floor = 1e-17
    for label, diag in runs.items():
        layers = diag['layers']
        depth = range(1, len(layers) + 1)
        ax_err.plot(depth, [max(l['row_error'], l['col_error'], floor) for l in layers], 'o-', ms=3, label=label)
        line, = ax_gain.plot(depth, [max(abs(l['gain_row'] - 1), floor) for l in layers], 'o-', ms=3,
                             label=f'{label} (rows)')
        ax_gain.plot(depth, [max(abs(l['gain_col'] - 1), floor) for l in layers], 's--', ms=3,
                     color=line.get_color(), label=f'{label} (columns)')
        ax_abs.plot(depth, [l['gain_row'] for l in layers], 'o-', ms=3, color=line.get_color(), label=label)
    for ax in (ax_err, ax_gain):
        ax.set_yscale('log')
        ax.axhline(FLOAT32_EPS, color='gray', ls=':', lw=1)
        ax.text(1, FLOAT32_EPS * 1.5, 'float32 eps', fontsize=7, color='gray')
    ax_err.set(title='per connection: max |row/col sum of H_res - 1|', xlabel='connection (depth)')
    ax_gain.set(title='composite H_res^(l)...H_res^(1): |Amax gain - 1|', xlabel='depth l')
    ax_abs.set(title='composite Amax gain (max abs row sum)', xlabel='depth l')
    for ax in (ax_err, ax_gain, ax_abs):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
