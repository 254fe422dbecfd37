"""projUNN: orthogonal weights trained by rank-k updates (Kiani et al., NeurIPS 2022, arXiv 2203.05483).

A weight ``U`` (N×N, real) tagged orthogonal is never updated by ``U + Δ``. The base optimizer's step ``Δ`` is
first replaced by a rank-k approximation ``G = a bᵀ`` (``a, b``: N×k), then ``U`` moves on the orthogonal group:

- **tangent** (projUNN-T, geodesic): ``U ← U · expm(½(UᵀG − GᵀU))``;
- **direct** (projUNN-D, nearest orthogonal): ``U ← polar(U + G) = (U + G)((U + G)ᵀ(U + G))^{-1/2}``.

Both are computed in O(k·N²) in a 2k-dimensional subspace: ``Q`` (N×2k) an orthonormal basis of ``[b, Uᵀa]``,
``a_o = QᵀUᵀa``, ``b_o = Qᵀb`` (2k×k);

- tangent: ``S = ½(a_o b_oᵀ − b_o a_oᵀ)`` (2k×2k, skew), ``U ← U + U Q (exp(S) − I) Qᵀ``, ``exp(S)`` from
  ``eigh`` of ``iS``;
- direct: ``M = I + a_o b_oᵀ = P Σ Wᵀ`` (2k×2k, SVD in float64), ``U ← U + U Q (P Wᵀ − I) Qᵀ``: the same
  polar factor as the paper's ``Ã + Ã Q D ((1 + Λ)^{-1/2} − I) Dᵀ Qᵀ`` (``Ã = U + a bᵀ``,
  ``H = a_o b_oᵀ + b_o a_oᵀ + b_o (aᵀa) b_oᵀ = MᵀM − I = D Λ Dᵀ``), without squaring the condition number of
  ``Ã`` (:func:`projunn_direct`).

Low-rank samplers (``G`` equals ``Δ`` whenever ``rank Δ ≤ k``):

- ``"lsi"`` (the paper's LSI): ``Y = ΔᵀR`` with ``R`` (N×k) random Gaussian, ``V`` = orthonormal basis of
  ``range(Y)``, ``a = ΔV``, ``b = V``, so ``G = Δ V Vᵀ``. The paper draws ``R`` orthonormal and takes ``V`` from
  the eigendecomposition of ``BBᵀ``, ``B = √(N/k) RᵀΔ``; ``V`` spans the same space (a Gaussian ``R`` spans
  a uniformly random k-plane like an orthonormal one), and we take it from the thin SVD of ``Y`` (O(N k²)),
  which does not square ``Y``'s condition number.
- ``"column"`` (column sampling): ``k`` distinct columns of ``Δ`` drawn with probability ∝ their squared norm
  (Gumbel top-k), ``P`` = orthonormal basis of their span, ``a = P``, ``b = ΔᵀP``, so ``G = P Pᵀ Δ``.

When ``Δ`` has rank below ``k`` the basis has singular values at rounding level: those below
``max(N, k) · eps · σ_max`` are dropped (their basis vectors set to zero, which removes them from ``G``)
instead of being divided by. A zero step leaves ``U`` unchanged.

Shapes: a tagged parameter is a square ``(N, N)``, a stack ``(..., N, N)``, or a 2-D ``(m·N, N)`` / ``(N, m·N)``
weight, which is treated as ``m`` square N×N blocks stacked along rows / columns (each block orthogonal).
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    'MODES', 'SAMPLERS', 'ProjUNN', 'lookahead_refusal', 'lowrank_factors', 'mark_orthogonal', 'is_orthogonal',
    'orthogonal_param_groups', 'orthogonality_error', 'polar', 'project_orthogonal_', 'projunn_direct',
    'projunn_tangent', 'square_blocks',
]

MODES = ('tangent', 'direct')
SAMPLERS = ('lsi', 'column')

_PARAM_TAG = '_projunn_orthogonal'      # on a Parameter: ProjUNN steps it on the orthogonal group
_MODULE_TAG = '_projunn_orthogonal_names'  # on a Module: its parameter names that are orthogonal (survives deepcopy)


# ------------------------------------------------------------------------------------------------ shapes
def square_blocks(weight: torch.Tensor) -> torch.Tensor:
    """The square blocks of an orthogonal-tagged weight as a ``(B, N, N)`` view (writing into it writes the weight).

    ``(N, N)`` → 1 block; ``(..., N, N)`` → the stack; 2-D ``(m·N, N)`` → ``m`` row blocks ``W[jN:(j+1)N]``;
    2-D ``(N, m·N)`` → ``m`` column blocks ``W[:, jN:(j+1)N]``. Anything else, and blocks of one element (N = 1:
    a 1x1 convolution weight ``(C_out, C_in, 1, 1)`` is such a stack by shape), raises ``ValueError``.
    """
    shape = tuple(weight.shape)
    if weight.ndim < 2:
        raise ValueError(f'an orthogonal weight needs at least 2 dims, got shape {shape}')
    rows, cols = shape[-2:]
    if min(rows, cols) == 1:  # an orthogonal 1x1 block is ±1: a 1x1 conv weight or a column would become signs
        raise ValueError(f'an orthogonal weight of 1x1 blocks is a sign pattern (polar factor ±1 entrywise), not a '
                         f'stack of orthogonal matrices; a (C_out, C_in, 1, 1) convolution weight is not one: '
                         f'got shape {shape}')
    if rows == cols:
        return weight.reshape(-1, rows, cols) if weight.is_contiguous() else weight.view(-1, rows, cols)
    if weight.ndim == 2 and rows % cols == 0:
        return weight.view(rows // cols, cols, cols)
    if weight.ndim == 2 and cols % rows == 0:
        return weight.view(rows, cols // rows, rows).transpose(0, 1)
    raise ValueError(f'an orthogonal weight must be square (..., N, N), or 2-D (m*N, N) / (N, m*N); '
                     f'got shape {shape}')


def orthogonality_error(weight: torch.Tensor) -> float:
    """``max over blocks of ‖UᵀU − I‖₂`` (spectral norm), computed in float64."""
    u = square_blocks(weight.detach()).double()
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return torch.linalg.matrix_norm(u.mT @ u - eye, ord=2).max().item()


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``A (AᵀA)^{-1/2} = P Wᵀ`` of ``A = P Σ Wᵀ`` (nearest orthogonal matrix,
    Frobenius norm), batched over leading dims; computed in at least float32, returned in ``a``'s dtype."""
    work = a if a.dtype in (torch.float32, torch.float64) else a.float()
    p, _, wh = torch.linalg.svd(work, full_matrices=False)
    return (p @ wh).to(a.dtype)


# ------------------------------------------------------------------------------------------------ tags
def mark_orthogonal(module: nn.Module, name: str = 'weight') -> nn.Parameter:
    """Tag ``module.<name>`` as orthogonal: ProjUNN steps it on the orthogonal group (no weight decay), and
    :func:`project_orthogonal_` projects it, also in deep copies of ``module`` (a model EMA). Checks the shape.
    ProjUNN reads the tag on the Parameter, which a deep copy or ``to_empty`` replaces: tag a copy of a module you
    tagged yourself again (:class:`~kromhc_vision.models.OrthogonalLinear` does so itself)."""
    param = getattr(module, name)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f'{type(module).__name__}.{name} is not a Parameter')
    square_blocks(param)
    if param.is_complex():
        raise ValueError(f'{type(module).__name__}.{name}: complex weights are not supported (real only)')
    setattr(param, _PARAM_TAG, True)
    names = tuple(getattr(module, _MODULE_TAG, ()))
    if name not in names:
        object.__setattr__(module, _MODULE_TAG, names + (name,))
    return param


def is_orthogonal(param: torch.Tensor) -> bool:
    """Whether ``param`` was tagged by :func:`mark_orthogonal`."""
    return bool(getattr(param, _PARAM_TAG, False))


def _tagged(module: nn.Module):
    """``(qualified name, parameter)`` of every tagged parameter of ``module``, from the module-level tags."""
    for prefix, sub in module.named_modules():
        for name in getattr(sub, _MODULE_TAG, ()):
            yield (f'{prefix}.{name}' if prefix else name), getattr(sub, name)


@torch.no_grad()
def project_orthogonal_(module: nn.Module) -> int:
    """Replace every tagged weight of ``module`` (or of its deep copy: a model EMA) by its polar factor, block by
    block, in place. Returns the number of weights projected. O(N³) per block: for initialisation, loaded
    weights, an EMA before it is used, and an occasional re-orthogonalisation."""
    count = 0
    for _, param in _tagged(module):
        blocks = square_blocks(param)
        blocks.copy_(polar(blocks))
        count += 1
    return count


def orthogonal_param_groups(
        model: nn.Module,
        weight_decay: float = 0.,
        modules: Sequence[type] = (),
        names: Sequence[str] = (),
        no_weight_decay_list: Iterable[str] = (),
        weight_decay_exclude_1d: bool = True,
) -> List[Dict[str, Any]]:
    """Parameter groups for :class:`ProjUNN`: one group ``orthogonal=True, weight_decay=0`` with the tagged weights,
    the rest as timm's ``param_groups_weight_decay`` makes them.

    Besides what the model tagged itself, the ``weight`` of every module of a type in ``modules`` and every
    parameter whose name matches one of the fnmatch patterns ``names`` is tagged (with :func:`mark_orthogonal`,
    which checks its shape). Usable as ``create_optimizer_v2(..., param_group_fn=partial(orthogonal_param_groups,
    weight_decay=wd, names=[...]))``.
    """
    from fnmatch import fnmatch
    from timm.optim import param_groups_weight_decay

    modules = tuple(modules)
    for mod_name, module in model.named_modules():
        if modules and isinstance(module, modules) and isinstance(getattr(module, 'weight', None), nn.Parameter):
            mark_orthogonal(module, 'weight')
        for pname, _ in module.named_parameters(recurse=False):
            full = f'{mod_name}.{pname}' if mod_name else pname
            if any(fnmatch(full, pattern) for pattern in names):
                mark_orthogonal(module, pname)
    orthogonal = [p for _, p in _tagged(model) if p.requires_grad]
    ids = {id(p) for p in orthogonal}
    if not no_weight_decay_list:
        no_weight_decay_list = getattr(model, 'no_weight_decay', lambda: set())()
    groups = param_groups_weight_decay(
        _ParamsView([(n, p) for n, p in model.named_parameters() if id(p) not in ids]),
        weight_decay=weight_decay, no_weight_decay_list=no_weight_decay_list,
        weight_decay_exclude_1d=weight_decay_exclude_1d)
    groups = [g for g in groups if g['params']]
    if orthogonal:
        groups.insert(0, {'params': orthogonal, 'weight_decay': 0., 'orthogonal': True})
    return groups


class _ParamsView:
    """What timm's ``param_groups_weight_decay`` reads of a model (``named_parameters``), for a subset."""

    def __init__(self, named):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


# ------------------------------------------------------------------------------------------------ the maths
def _tolerance(y: torch.Tensor) -> float:
    return max(y.shape[-2], y.shape[-1]) * torch.finfo(y.dtype).eps


def _tmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``xᵀ y`` for a square ``x`` (B, N, N) and a narrow ``y`` (B, N, k), as ``(yᵀ x)ᵀ``: CPU BLAS runs the
    transposed-operand product at 2 <= k <= 8 some 30x slower (bench_projunn)."""
    return (y.mT @ x).mT


def _range_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``range(y)`` for ``y`` (B, N, k): the thin SVD's left vectors, those whose singular
    value is below ``max(N, k)·eps·σ_max`` set to zero (rank-deficient ``y``)."""
    p, s, _ = torch.linalg.svd(y, full_matrices=False)
    keep = s > _tolerance(y) * s[..., :1]
    return p * keep.unsqueeze(-2).to(p.dtype)


def lowrank_factors(delta: torch.Tensor, rank: int, sampler: str = 'lsi',
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``, each (B, N, k), with ``G = a bᵀ`` the rank-``k`` approximation of ``delta`` (B, N, N) by the
    ``sampler`` (``"lsi"`` or ``"column"``, see the module docstring); exact when ``rank(delta) ≤ k``."""
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler {sampler!r} is not one of {SAMPLERS}')
    batch, n, _ = delta.shape
    k = min(int(rank), n)
    if sampler == 'lsi':
        r = torch.randn((batch, n, k), generator=generator, device=delta.device, dtype=delta.dtype)
        v = _range_basis(_tmm(delta, r))
        return delta @ v, v
    # column sampling without replacement, probability ∝ squared column norm: Gumbel top-k
    norms = delta.square().sum(-2)
    uniform = torch.rand((batch, n), generator=generator, device=delta.device, dtype=torch.float64)
    keys = norms.double().log() - (-uniform.clamp_min(1e-300).log()).log()
    idx = keys.topk(k, dim=-1).indices
    cols = torch.gather(delta, -1, idx.unsqueeze(-2).expand(batch, n, k))
    p = _range_basis(cols)
    return p, _tmm(delta, p)


def _subspace(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """``Q`` (B, N, 2k) orthonormal with ``b, Uᵀa ∈ range(Q)``; ``a_o = QᵀUᵀa``, ``b_o = Qᵀb`` (B, 2k, k)."""
    a_hat = _tmm(u, a)
    q, _ = torch.linalg.qr(torch.cat([b, a_hat], dim=-1))
    return q, q.mT @ a_hat, q.mT @ b


def projunn_tangent(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """projUNN-T: ``U · expm(½(UᵀG − GᵀU))`` with ``G = a bᵀ``, in O(k N²). ``u`` (B, N, N), ``a, b`` (B, N, k)."""
    q, a_o, b_o = _subspace(u, a, b)
    s = 0.5 * (a_o @ b_o.mT - b_o @ a_o.mT)
    return torch.baddbmm(u, (u @ q) @ _expm1_skew(s), q.mT)


def _expm1_skew(s: torch.Tensor) -> torch.Tensor:
    """``exp(S) − I`` for a real skew ``S`` (B, m, m), from ``eigh`` of the Hermitian ``iS = V diag(θ) Vᴴ``:
    ``exp(S) − I = V diag(e^{−iθ} − 1) Vᴴ``, with ``e^{−iθ} − 1 = −2 sin²(θ/2) − i sin θ`` (no cancellation for
    small θ). Orthogonal to rounding; ``torch.linalg.matrix_exp``'s truncated series is not (its ``exp(S)`` is
    ~1e-13 off orthogonal in float64 at ‖S‖ ≈ 0.04, which accumulates over steps)."""
    complex_dtype = torch.complex128 if s.dtype == torch.float64 else torch.complex64
    theta, v = torch.linalg.eigh(1j * s.to(complex_dtype))
    half = torch.sin(0.5 * theta)
    phase = torch.complex(-2 * half * half, -torch.sin(theta)).to(complex_dtype)
    return ((v * phase.unsqueeze(-2)) @ v.mH).real.to(s.dtype)


def projunn_direct(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """projUNN-D: the polar factor of ``U + G``, ``G = a bᵀ``, in O(k N²). ``u`` (B, N, N), ``a, b`` (B, N, k).

    ``U`` orthogonal and ``Uᵀa = Q a_o``, ``b = Q b_o`` give ``U + G = U (I + Q (M − I) Qᵀ)`` with
    ``M = I + a_o b_oᵀ`` (B, 2k, 2k), hence ``polar(U + G) = U + U Q (polar(M) − I) Qᵀ``, ``polar(M) = P Wᵀ``
    from the SVD ``M = P Σ Wᵀ`` in float64. This is the spec's ``Ã + Ã Q D ((1 + Λ)^{-1/2} − I) Dᵀ Qᵀ``
    (``H = MᵀM − I = D Λ Dᵀ``, ``1 + Λ = Σ²``) without forming ``H``, which squares the condition number of
    ``U + G``: from ``1 + Λ`` in float32 a step with ``σ_min(U + G) = 1e-3`` ended 0.2 off orthogonal. Here the
    result is ``U`` times an orthogonal matrix to rounding, whatever ``σ_min``; a singular ``U + G`` (a step that
    cancels a direction of ``U``) gets one of its polar factors."""
    q, a_o, b_o = _subspace(u, a, b)
    m = torch.eye(q.shape[-1], dtype=torch.float64, device=u.device) + a_o.double() @ b_o.double().mT
    p, _, wh = torch.linalg.svd(m)
    step = (p @ wh - torch.eye(q.shape[-1], dtype=torch.float64, device=u.device)).to(u.dtype)
    return torch.baddbmm(u, (u @ q) @ step, q.mT)


# ------------------------------------------------------------------------------------------------ the optimizer
def lookahead_refusal(opt: str, plain: Sequence[str]) -> str:
    """Why timm's ``lookahead_`` prefix cannot wrap projUNN (``opt``, e.g. ``"lookahead_projunnadamw"``), naming
    the ``plain`` projunn names to use instead."""
    return (f"optimizer {opt!r}: timm's Lookahead (the 'lookahead_' prefix) replaces every k steps each weight by "
            f"slow + alpha (fast - slow), which is not orthogonal for orthogonal slow and fast weights (0.04 off after "
            f"12 steps), so it cannot wrap projUNN; use a plain projunn name: {', '.join(plain)}")


def _base_class(base: Union[str, Callable]) -> Tuple[Callable, str, Dict[str, Any]]:
    """``(class, name, defaults)``: for a timm name, the registry's defaults of that name (``'cadamw'`` →
    ``caution=True``, ``'nesterov'`` → ``nesterov=True``: what tells the name from its class's other names)."""
    if callable(base):
        return base, getattr(base, '__name__', repr(base)), {}
    from timm.optim import list_optimizers
    from timm.optim._optim_factory import default_registry
    names = [n for n in list_optimizers() if not n.startswith('projunn')]
    if not isinstance(base, str) or base.lower() not in names:
        raise ValueError(f'base {base!r} is not a timm optimizer name; valid: {", ".join(names)}')
    defaults = dict(default_registry.get_optimizer_info(base.lower()).defaults or {})
    return default_registry.get_optimizer_class(base.lower(), bind_defaults=False), base.lower(), defaults


def _without_momentum(base_cls: Callable, kwargs: Dict[str, Any]) -> bool:
    """Whether ``base_cls`` takes a ``momentum`` that ``kwargs`` (else the class's default) leave at 0: its
    ``nesterov`` then has no momentum to act on (torch's SGD refuses it). A class without ``momentum`` (AdamP: its
    own Nesterov) or with a default one (Muon: 0.95) keeps a default ``nesterov=True``."""
    try:
        param = inspect.signature(base_cls).parameters.get('momentum')
    except (TypeError, ValueError):  # no signature to read: the kwargs alone
        return not kwargs.get('momentum')
    if param is None:
        return False
    default = None if param.default is inspect.Parameter.empty else param.default
    return not kwargs.get('momentum', default)


class ProjUNN(torch.optim.Optimizer):
    """A timm/torch base optimizer whose steps of orthogonal weights go through the projUNN projection.

    Args:
        params: parameters or groups. A group with ``orthogonal=True`` holds orthogonal weights (square, a stack,
            or row/column stacks of squares: :func:`square_blocks`; no weight decay). Groups without the key are
            split: parameters tagged with :func:`mark_orthogonal` (as ``vit_*_orthogonal`` models do) go to an
            orthogonal copy of the group with ``weight_decay=0``, the rest stay.
        base: a timm optimizer name (``"sgd"``, ``"adamw"``, ``"rmsprop"``, ...) or an optimizer class; it
            computes every step ``Δ``; non-orthogonal parameters get ``Δ`` added as usual. A name brings timm's
            defaults for it (``"cadamw"``: ``caution=True``), under ``base_kwargs``; not timm's factory-wide
            ``momentum=0.9`` (pass ``momentum``), and a default ``nesterov=True`` of an SGD-like base only with a
            momentum (AdamP's and Muon's stay).
        mode: ``"tangent"`` (projUNN-T) or ``"direct"`` (projUNN-D).
        rank: ``k`` of the low-rank approximation.
        sampler: ``"lsi"`` or ``"column"``.
        seed: an int; the random projections are drawn from a generator seeded from ``(seed, step, batch index)`` (the
            blocks of all orthogonal weights of one size are stepped as one batch), so every DDP rank draws the
            same ones and the global RNG is untouched.
        reorthogonalize_every: every that many steps, replace the orthogonal weights by their polar factor
            (O(N³); bounds float32 drift); 0: never.
        **base_kwargs: passed to the base optimizer (``lr``, ``weight_decay``, ``momentum``, ``betas``, ...).

    The orthogonal weights are projected onto the orthogonal group (polar factor) when the optimizer is built
    and again at its first step (weights loaded in between); those of a group added later by
    :meth:`add_param_group` when it is added. ``state_dict`` is the base optimizer's plus
    ``{'projunn': {'step': n}}``.
    """

    def __init__(self, params, base: Union[str, Callable] = 'sgd', mode: str = 'tangent', rank: int = 1,
                 sampler: str = 'lsi', seed: int = 0, reorthogonalize_every: int = 0, **base_kwargs):
        if mode not in MODES:
            raise ValueError(f'mode {mode!r} is not one of {MODES}')
        if sampler not in SAMPLERS:
            raise ValueError(f'sampler {sampler!r} is not one of {SAMPLERS}')
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f'rank must be a positive int, got {rank!r}')
        if isinstance(reorthogonalize_every, bool) or not isinstance(reorthogonalize_every, int) \
                or reorthogonalize_every < 0:
            raise ValueError(f'reorthogonalize_every must be an int >= 0, got {reorthogonalize_every!r}')
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f'seed must be an int, got {seed!r}')
        base_cls, base_name, name_defaults = _base_class(base)
        kwargs = dict(name_defaults, **base_kwargs)
        if 'nesterov' not in base_kwargs and kwargs.get('nesterov') and _without_momentum(base_cls, kwargs):
            kwargs.pop('nesterov')  # timm's 'sgd' is Nesterov at its factory's momentum 0.9; without one: plain
        base_kwargs = kwargs
        groups = self._split_groups(params)
        # NOTE super().__init__() not called on purpose (as timm's Lookahead): the groups are the base's
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self.base = base_cls(groups, **base_kwargs)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = dict(self.base.defaults, base=base_name, mode=mode, rank=rank, sampler=sampler,
                             seed=seed, reorthogonalize_every=reorthogonalize_every)
        self.projunn_step = 0
        self._patch_step_function()  # what Optimizer.__init__ does: step runs the step hooks from the first call
        self._project_all()

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _split_groups(params) -> List[Dict[str, Any]]:
        params = list(params)
        if not params:
            raise ValueError('ProjUNN got an empty parameter list')
        if not isinstance(params[0], dict):
            params = [{'params': params}]
        groups = []
        for group in params:
            group = dict(group)
            plist = [group['params']] if isinstance(group['params'], torch.Tensor) else list(group['params'])
            if 'orthogonal' in group:
                if group['orthogonal']:
                    if group.get('weight_decay', 0.):
                        raise ValueError(f"an orthogonal group has weight_decay={group['weight_decay']}: decay "
                                         f"pulls the weights off the orthogonal group; use 0")
                    group['weight_decay'] = 0.
                    for p in plist:
                        square_blocks(p)
                        if p.is_complex():
                            raise ValueError('complex orthogonal weights are not supported (real only)')
                groups.append(dict(group, params=plist))
                continue
            tagged = [p for p in plist if is_orthogonal(p)]
            other = [p for p in plist if not is_orthogonal(p)]
            if tagged:
                groups.append(dict(group, params=tagged, orthogonal=True, weight_decay=0.))
            if other or not tagged:
                groups.append(dict(group, params=other, orthogonal=False))
        return [g for g in groups if g['params']] or groups[:1]

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add ``param_group``, split as the constructor splits groups; its orthogonal weights are projected onto
        the orthogonal group (polar factor) now, as those given to the constructor (the steps keep, never make,
        a weight orthogonal)."""
        for group in self._split_groups([param_group]):
            self.base.add_param_group(group)
            if group.get('orthogonal', False):
                self._project(group['params'])

    def _orthogonal_params(self):
        index = 0
        for group in self.param_groups:
            for p in group['params']:
                if group.get('orthogonal', False):
                    yield index, p
                index += 1

    def _project_all(self) -> None:
        self._project(p for _, p in self._orthogonal_params())

    @staticmethod
    @torch.no_grad()
    def _project(params: Iterable[torch.Tensor]) -> None:
        for p in params:
            blocks = square_blocks(p)
            blocks.copy_(polar(blocks))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's ``state_dict`` plus ``{'projunn': {'step': n}}``; runs torch's state-dict hooks."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base.state_dict()
        state['projunn'] = {'step': self.projunn_step}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else dict(result)
        extra = state_dict.pop('projunn', {'step': 0})
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.projunn_step = int(extra['step'])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @property
    def is_second_order(self) -> bool:
        return getattr(self.base, 'is_second_order', False)

    # ------------------------------------------------------------------ step
    def _generator(self, device: torch.device, index: int) -> torch.Generator:
        gen = torch.Generator(device=device)
        seed = (int(self.defaults['seed']) * 1_000_003 + self.projunn_step) * 65_537 + index
        gen.manual_seed(seed % (2 ** 63))
        return gen

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Base step for every parameter; then, for each orthogonal weight ``U`` with base step ``Δ``, ``U`` is
        replaced by projUNN-T/D of ``(U, G)``, ``G`` the rank-k approximation of ``Δ``. Raises ``ValueError``,
        before any change, when wrapped in timm's Lookahead (``lookahead_projunn*``: :func:`lookahead_refusal`)."""
        if 'lookahead_k' in self.defaults:  # timm's Lookahead(self) added its keys (the factory's 'lookahead_')
            base = self.defaults['base']
            raise ValueError(lookahead_refusal(f'lookahead_projunn{base}', [f'projunn{base}']))
        if self.projunn_step == 0:
            self._project_all()  # weights loaded after the optimizer was built
        loss = None
        if closure is not None:  # gradients first, so that the weights with one are known
            with torch.enable_grad():
                loss = closure()
        before = [(p, p.detach().clone()) for _, p in self._orthogonal_params() if p.grad is not None]
        self.base.step()
        mode, rank, sampler = self.defaults['mode'], self.defaults['rank'], self.defaults['sampler']
        update = projunn_tangent if mode == 'tangent' else projunn_direct
        # the blocks of every weight of one size, dtype and device in one batch: a few small LAPACK calls per step
        batches: Dict[Tuple, List] = OrderedDict()
        for p, old in before:
            batches.setdefault((min(p.shape[-2:]), p.dtype, p.device),
                               []).append((p, old))
        for index, ((_, dtype, device), items) in enumerate(batches.items()):
            work = torch.float64 if dtype == torch.float64 else torch.float32
            u = torch.cat([square_blocks(old).to(work) for _, old in items])
            delta = torch.cat([square_blocks(p).to(work) for p, _ in items]) - u
            a, b = lowrank_factors(delta, rank, sampler, self._generator(device, index))
            new = update(u, a, b)
            start = 0
            for p, _ in items:
                blocks = square_blocks(p)
                blocks.copy_(new[start:start + blocks.shape[0]].to(dtype))
                start += blocks.shape[0]
        self.projunn_step += 1
        every = self.defaults['reorthogonalize_every']
        if every and self.projunn_step % every == 0:
            self._project_all()
        return loss
