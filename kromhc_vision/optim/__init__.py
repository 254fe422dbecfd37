"""Optimizers: projUNN (orthogonal weights by rank-k updates), registered in timm's optimizer registry.

``import kromhc_vision`` registers ``projunn<base>`` for each base in :data:`PROJUNN_BASES` (``projunnsgd``,
``projunnadamw``, ...) in timm's ``default_registry`` (``timm.optim._optim_factory.default_registry.register``:
timm 1.0.31 has no public registration function), so ``timm.optim.create_optimizer_v2(model, opt="projunnadamw",
mode="direct", rank=4)`` and ``train.py --opt projunnsgd --opt-kwargs mode=tangent rank=1`` build
:class:`ProjUNN` around timm's own base optimizer, with the base's defaults (``sgd``: Nesterov). The names have no
underscore: timm's factory keeps only the part of ``opt`` after the last ``_`` (``lookahead_adamw``), so
``projunn_sgd`` would silently build plain SGD. For the same reason ``lookahead_projunnadamw`` builds timm's
Lookahead around :class:`ProjUNN`, whose weight interpolation leaves the orthogonal group: :func:`check_opt_name`
(train.py's config check) refuses the name, and :meth:`ProjUNN.step` refuses to run wrapped.
"""
from timm.optim._optim_factory import OptimInfo, default_registry

from .projunn import (
    MODES, SAMPLERS, ProjUNN, is_orthogonal, lookahead_refusal, lowrank_factors, mark_orthogonal,
    orthogonal_param_groups, orthogonality_error, polar, project_orthogonal_, projunn_direct, projunn_tangent,
    square_blocks,
)

PROJUNN_BASES = ('sgd', 'momentum', 'adam', 'adamw', 'nadamw', 'radam', 'rmsprop', 'rmsproptf', 'lamb', 'lion',
                 'adopt', 'laprop')


def check_opt_name(opt: str) -> None:
    """Raise ``ValueError`` for a timm optimizer name ``opt`` that wraps a projunn optimizer in timm's Lookahead
    (``lookahead_projunn<base>``: timm reads the part after the last ``_`` as the optimizer and a ``lookahead``
    first part as the wrapper); any other name passes (unknown names are timm's to refuse)."""
    parts = opt.lower().split('_')
    if len(parts) > 1 and parts[0] == 'lookahead' and parts[-1].startswith('projunn'):
        raise ValueError(lookahead_refusal(opt, [f'projunn{name}' for name in PROJUNN_BASES]))


def register_projunn_optimizers(registry=default_registry) -> None:
    """Register ``projunn<base>`` for every base of :data:`PROJUNN_BASES` in ``registry`` (timm's by default),
    with the base's flags (eps, momentum, betas) and defaults, plus ``base=<base>``."""
    for name in PROJUNN_BASES:
        info = registry.get_optimizer_info(name)
        registry.register(OptimInfo(
            name=f'projunn{name}', opt_class=ProjUNN,
            description=f'projUNN (orthogonal weights by rank-k updates) around {name}',
            has_eps=info.has_eps, has_momentum=info.has_momentum, has_betas=info.has_betas,
            num_betas=info.num_betas, defaults={'base': name, **(info.defaults or {})}))


register_projunn_optimizers()
