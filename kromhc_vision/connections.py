"""Hyper-connections: one branch ``F`` wrapped so that n residual streams are mixed by learned matrices.

For a stream state ``X (..., n, C)`` every connection computes::

    u = H_pre X,   y = F(u),   X_next = H_res X + H_post^T y

with per-token coefficients from ``X`` (see :mod:`kromhc_vision.ops.reference`). The variants differ only
in ``Phi``, the map from the residual logits ``a_res (..., m)`` to ``H_res (..., n, n)``.
"""
import math
from typing import Any, Mapping, Optional

import torch
import torch.fx
from timm.layers import register_notrace_function
from torch import nn

from . import recompute
from .ops import dispatch
from .ops.reference import autocast_off, is_int
from .permutations import PermutationSizeError, check_permutation_size, kronecker_factors, permutation_matrices
from .residual_maps import stochasticity_error

INITS = ("published", "identity")
# Off-identity logit of the published init: H_res starts close to the identity.
OFF_IDENTITY_LOGIT = -8.0
# How the arguments of :meth:`HyperConnection.check` are spelled in its messages: as the connection's own
# arguments here; the models pass their names (``hc_init``, ``hc_backend``, ``hc_kwargs``).
CONNECTION_ARGUMENT_NAMES = {"init": "init", "backend": "backend", "options": "keyword arguments"}


def _check_int(name: str, value, minimum: int) -> None:
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_common(dim, init, names: Mapping[str, str]) -> None:
    if dim is not None:
        _check_int("dim", dim, 1)
    if init not in INITS:
        raise ValueError(f"unknown {names['init']} {init!r}; valid choices: {', '.join(INITS)}")


def _check_dim_given(dim) -> None:
    """``dim=None`` lets :meth:`HyperConnection.check` skip the width; building or counting needs one."""
    if dim is None:
        raise ValueError("dim must be an int >= 1 (the channels per stream), got None")


def _check_state(owner: str, X, num_streams: int, dim: Optional[int]) -> None:
    """Raise ``ValueError`` naming ``X``'s shape or dtype unless it is a floating-point stream state
    ``(..., num_streams, dim)`` (``dim=None``: any width)."""
    if X.dim() < 2 or X.shape[-2] != num_streams or (dim is not None and X.shape[-1] != dim):
        width = "C" if dim is None else dim
        raise ValueError(f"{owner} expects streams of shape (..., {num_streams}, {width}), got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"{owner} expects a floating-point stream state, got dtype {X.dtype}")


def _check_stream_count(variant: str, num_streams) -> None:
    if not is_int(num_streams):
        raise ValueError(f"variant '{variant}' cannot take num_streams={num_streams!r}: num_streams must be an "
                         f"int, got {type(num_streams).__name__}")


class ResidualConnection(nn.Module):
    """The baseline ``x + F(x)`` in stream layout, with a single stream: ``X (..., 1, C)``."""

    variant = "residual"

    def __init__(self, num_streams: int = 1, dim: Optional[int] = None, layer_index: int = 0,
                 init: str = "published", backend=None, device=None, dtype=None, **options):
        super().__init__()
        self.check(num_streams, dim, init=init, backend=backend, **options)
        self.num_streams = 1
        self.dim = dim

    @classmethod
    def check(cls, num_streams: int = 1, dim: Optional[int] = None, *, init: str = "published", backend=None,
              names: Mapping[str, str] = CONNECTION_ARGUMENT_NAMES, **options: Any) -> None:
        """Raise ``ValueError`` naming the value and the valid choices unless the arguments build a connection."""
        _check_stream_count(cls.variant, num_streams)
        if num_streams != 1:
            raise ValueError(f"variant 'residual' cannot take num_streams={num_streams}: the residual connection "
                             f"carries exactly 1 stream, got num_streams={num_streams}")
        _check_common(dim, init, names)
        dispatch.resolve_backend(backend)
        cls.check_option_names(options, names)

    @classmethod
    def check_option_names(cls, options: Mapping[str, Any], names: Mapping[str, str] = CONNECTION_ARGUMENT_NAMES):
        """Raise ``ValueError`` unless ``options`` is empty: the residual connection takes none."""
        if options:
            raise ValueError(f"{names['options']} {dict(options)} not accepted by the 'residual' connection: "
                             "it takes none")

    @classmethod
    def num_params(cls, num_streams: int, dim: int) -> int:
        return 0

    def coefficients(self, X):
        ones = X.new_ones(X.shape[:-1], dtype=torch.float32)
        return ones, ones, ones.unsqueeze(-1)

    def forward(self, X, branch):
        """``X (..., 1, C)`` and ``branch: (..., C) -> (..., C)`` -> ``X + F(X)`` of shape ``(..., 1, C)``.

        The checks are skipped while torch.fx traces (symbolic shapes): timm's FX feature extraction traces it whole.
        """
        if not isinstance(X, torch.fx.Proxy):
            self._check_input(X)
        x = X.squeeze(-2)
        y = branch(x)
        if not isinstance(y, torch.fx.Proxy) and (not isinstance(y, torch.Tensor) or y.shape != x.shape):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"the branch of ResidualConnection returned shape {got}; it must return its input's "
                             f"shape {tuple(x.shape)}")  # X + y would broadcast another shape silently
        return X + y.unsqueeze(-2).to(X.dtype)

    def _check_input(self, X):
        _check_state("ResidualConnection", X, 1, self.dim)


class HyperConnection(nn.Module):
    """Base of the n-stream variants. Subclasses define ``num_res_logits``, ``res_bias`` and ``res_matrix``,
    and may declare extra constructor options in ``OPTIONS`` (name -> default) and checks in ``_check_variant``.

    Parameters: ``norm_weight (n*C)`` (RMSNorm gain), ``proj_weight (n*C, 2n+m)`` (``[W_pre|W_post|W_res]``,
    zero at init), ``scale (3)`` (``s_pre, s_post, s_res``, 0.01 at init), ``bias (2n+m)``.

    ``init='published'``: ``b_pre``, ``b_post`` are +1 on stream ``layer_index mod n`` and -1 elsewhere.
    ``init='identity'``: ``H_pre = 1/n``, ``H_post = 1``, ``H_res ~ I``, so that a network of these
    computes what its residual counterpart computes (upcycling of pretrained residual weights).
    """

    variant = None
    OPS = ("stream_pre", "stream_post")  # the ops of kromhc_vision.ops this variant runs
    OPTIONS: Mapping[str, Any] = {}

    def __init__(self, num_streams: int, dim: int, layer_index: int = 0, init: str = "published", eps: float = 1e-6,
                 backend=None, device=None, dtype=None, **options):
        super().__init__()
        self.check(num_streams, dim, init=init, backend=backend, **options)
        _check_dim_given(dim)
        _check_int("layer_index", layer_index, 0)  # picks the published init's stream (layer_index mod n)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (its parameters are trained), got {dtype!r}")
        self.num_streams, self.dim, self.layer_index, self.init, self.eps = num_streams, dim, layer_index, init, eps
        self.backend = dispatch.resolve_backend(backend)
        for name, default in self.OPTIONS.items():
            setattr(self, name, options.get(name, default))
        n, m = num_streams, self.num_res_logits(num_streams)
        dd = dict(device=device, dtype=dtype)  # factory arguments, as torch's and timm's modules take them
        self.norm_weight = nn.Parameter(torch.empty(n * dim, **dd))
        self.proj_weight = nn.Parameter(torch.empty(n * dim, 2 * n + m, **dd))
        self.scale = nn.Parameter(torch.empty(3, **dd))
        self.bias = nn.Parameter(torch.empty(2 * n + m, **dd))
        self.register_buffer("scale_index", self._scale_index(device), persistent=False)
        self.reset_parameters()

    @classmethod
    def check(cls, num_streams: int, dim: Optional[int] = None, *, init: str = "published", backend=None,
              names: Mapping[str, str] = CONNECTION_ARGUMENT_NAMES, **options: Any) -> None:
        """Raise ``ValueError`` naming the value and the valid choices unless the arguments build a connection.

        The one validation of a variant's settings: the constructor, :func:`connection_num_params` and the
        models call it. ``dim=None`` skips the width; ``names`` spells the arguments as the caller takes them.
        """
        _check_stream_count(cls.variant, num_streams)
        if num_streams < 2:
            raise ValueError(f"variant '{cls.variant}' cannot take num_streams={num_streams}: it needs "
                             "num_streams >= 2 (use 'residual' for one stream)")
        try:
            cls._check_variant(num_streams)
        except PermutationSizeError as e:  # its type kept: the parameter table tells it from other errors
            raise PermutationSizeError(f"variant '{cls.variant}' cannot take num_streams={num_streams}: {e}",
                                       e.size) from None
        except ValueError as e:
            raise ValueError(f"variant '{cls.variant}' cannot take num_streams={num_streams}: {e}") from None
        _check_common(dim, init, names)
        cls.check_option_names(options, names)
        cls._check_options(**options)
        dispatch.check_backend(backend, cls.OPS, num_streams)

    @classmethod
    def check_option_names(cls, options: Mapping[str, Any], names: Mapping[str, str] = CONNECTION_ARGUMENT_NAMES):
        """Raise ``ValueError`` naming the unknown keys of ``options`` and the valid ones (``OPTIONS``). Models
        call it on ``hc_kwargs`` before :meth:`check`, so that a key naming one of its own arguments (``init``,
        ``dim``, ...) is refused as unknown, not taken for that argument."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            valid = ", ".join(cls.OPTIONS) or "none"
            raise ValueError(f"{names['options']} {dict(options)} not accepted by the {cls.variant!r} connection: "
                             f"unknown {', '.join(map(repr, unknown))}; valid: {valid}")

    @classmethod
    def _check_variant(cls, num_streams: int) -> None:
        """Variant-specific limits on the stream count."""

    @classmethod
    def _check_options(cls, **options) -> None:
        """Variant-specific checks of ``OPTIONS`` values."""

    @staticmethod
    def num_res_logits(num_streams: int) -> int:
        raise NotImplementedError

    @classmethod
    def num_params(cls, num_streams: int, dim: int) -> int:
        """Parameters of one connection: ``nC + nC(2n+m) + 3 + (2n+m)``."""
        k = 2 * num_streams + cls.num_res_logits(num_streams)
        return num_streams * dim * (1 + k) + 3 + k

    def res_bias(self) -> torch.Tensor:
        """Initial ``b_res``, favouring ``H_res = I``."""
        raise NotImplementedError

    def res_matrix(self, a_res: torch.Tensor) -> torch.Tensor:
        """``Phi``: ``(..., m) -> (..., n, n)``."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self):
        n = self.num_streams
        self.norm_weight.fill_(1.0)
        self.proj_weight.zero_()
        self.scale.fill_(0.01)
        if self.init == "identity":
            # sigmoid(-log(n-1)) = 1/n; float64, rounded once to the bias's dtype (exact in float64 parameters)
            pre = torch.full((n,), -math.log(n - 1), dtype=torch.float64)
            post = torch.zeros(n, dtype=torch.float64)  # 2 sigmoid(0) = 1
        else:
            pre = torch.full((n,), -1.0, dtype=torch.float64)
            pre[self.layer_index % n] = 1.0
            post = pre.clone()
        self.bias.copy_(torch.cat([pre, post, self.res_bias().double()]))

    def _scale_index(self, device=None) -> torch.Tensor:
        """Which of ``scale (3)`` scales each of the ``2n + m`` coefficients: ``s_pre, s_post, s_res``."""
        n, m = self.num_streams, self.num_res_logits(self.num_streams)
        return torch.tensor([0] * n + [1] * n + [2] * m, device=device)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Fill the buffers made from the settings, not saved in a state dict (timm's
        ``reinit_non_persistent_buffers`` calls this after a model made on the ``meta`` device was given memory
        by ``to_empty`` and its weights were loaded)."""
        self.scale_index.copy_(self._scale_index())

    def _pre(self, X):
        self._check_input(X)
        scale = self.scale[self.scale_index]
        return dispatch.stream_pre(X, self.norm_weight, self.proj_weight, scale, self.bias, self.eps, self.backend,
                                   checked=False)  # X checked above, the parameters are the connection's

    def _prepare_ops(self) -> None:
        """Make what the ops keep per device ahead of the first forward pass (see
        :func:`kromhc_vision.ops.dispatch.prepare_permutation_mix`): when built, and after every move."""

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._prepare_ops()
        return module

    def _h_res(self, a_res):
        with autocast_off(a_res.device):  # coefficients stay float32 under autocast
            return self.res_matrix(a_res)

    def coefficients(self, X):
        """``X (..., n, C)`` -> ``H_pre (..., n)``, ``H_post (..., n)``, ``H_res (..., n, n)``, float32."""
        _, h_pre, h_post, a_res, _ = self._pre(X)
        return h_pre, h_post, self._h_res(a_res)

    def stochasticity_error(self, X) -> torch.Tensor:
        """Largest deviation of any row or column sum of ``H_res`` from 1 over the tokens of ``X``."""
        return stochasticity_error(self.coefficients(X)[2])

    def forward(self, X, branch):
        """``X (..., n, C)`` and ``branch: (..., C) -> (..., C)`` -> ``X_next (..., n, C)``.

        Inside a :func:`kromhc_vision.recompute.session` (a model's ``hc_recompute``), the tensors the pre and
        post steps save from the stream state are recomputed in the backward pass instead of kept (see there).
        """
        session = recompute.active_session()
        if session is not None:
            return session.connect(self, X, branch, connection_pre, connection_res_matrix, connection_post)
        pre = connection_pre(self, X)  # (u, h_pre, h_post, a_res, X for the post step), indexed: FX traces it
        return connection_post(self, pre, branch(pre[0]))

    def _check_input(self, X):
        _check_state(type(self).__name__, X, self.num_streams, self.dim)
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError(
                f"{type(self).__name__} cannot run under a torch.func transform (vmap, grad, jacrev, jacfwd, jvp): "
                "its ops' hand-written backwards have no vmap or forward-mode rules, on every backend. "
                "torch.func.functional_call with ordinary autograd (torch.autograd.grad, .backward()) works; "
                "per-sample gradients need a loop over samples")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Also record the variant in the state dict's metadata (``state_dict._metadata``, kept by ``torch.save``),
        so that another variant's weights of the same shapes are refused by :meth:`load_state_dict`."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})["hc_variant"] = self.variant

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get("hc_variant")
        if saved is not None and saved != self.variant:
            error_msgs.append(
                f"{prefix[:-1] or type(self).__name__}: the state dict was saved by a {saved!r} connection and this "
                f"is a {self.variant!r} one: the shapes agree, the maps they parameterise do not (create the "
                f"model of variant {saved!r})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        options = "".join(f", {name}={getattr(self, name)!r}" for name in self.OPTIONS)
        return (f"num_streams={self.num_streams}, dim={self.dim}, layer_index={self.layer_index}, init={self.init!r}"
                + options)


class HC(HyperConnection):
    """Hyper-Connections (Zhu et al. 2024): ``H_res = reshape(a_res, n, n)``, unconstrained."""

    variant = "hc"

    @staticmethod
    def num_res_logits(num_streams: int) -> int:
        return num_streams * num_streams

    def res_bias(self):
        return torch.eye(self.num_streams).flatten()

    def res_matrix(self, a_res):
        return a_res.unflatten(-1, (self.num_streams, self.num_streams))


class MHC(HyperConnection):
    """mHC (DeepSeek 2025): ``H_res = Sinkhorn(exp(reshape(a_res, n, n)))``, approximately doubly stochastic.

    Option ``sinkhorn_iters`` (default 20): row-then-column normalisations.
    """

    variant = "mhc"
    OPS = ("stream_pre", "stream_post", "sinkhorn")
    OPTIONS = {"sinkhorn_iters": 20}

    @classmethod
    def _check_options(cls, sinkhorn_iters: int = 20) -> None:
        _check_int("sinkhorn_iters", sinkhorn_iters, 1)

    @staticmethod
    def num_res_logits(num_streams: int) -> int:
        return num_streams * num_streams

    def res_bias(self):
        n = self.num_streams
        return (OFF_IDENTITY_LOGIT * (1 - torch.eye(n))).flatten()

    def res_matrix(self, a_res):
        logits = a_res.unflatten(-1, (self.num_streams, self.num_streams))
        return dispatch.sinkhorn(logits, self.sinkhorn_iters, self.backend, checked=False)


def _permutation_bias(k: int) -> torch.Tensor:
    """Logits over the k! permutations: 0 for the identity (index 0), the off-identity logit elsewhere."""
    bias = torch.full((math.factorial(k),), OFF_IDENTITY_LOGIT)
    bias[0] = 0.0
    return bias


class _BirkhoffMixConnection(HyperConnection):
    """``H_res = U_1 (x) ... (x) U_K``, each ``U_k`` a Birkhoff mix (a softmax-weighted sum of the ``i_k!``
    permutation matrices) of size ``i_k``, the sizes ``factors = factors_of(n)`` with ``prod_k i_k = n``: the base of
    mHC-lite (one factor) and KromHC. Exactly doubly stochastic."""

    OPS = ("stream_pre", "stream_post", "permutation_mix")

    def __init__(self, num_streams: int, dim: int, *args, **kwargs):
        super().__init__(num_streams, dim, *args, **kwargs)
        self.factors = self.factors_of(num_streams)
        for k in sorted(set(self.factors)):
            self.register_buffer(f"perms{k}", permutation_matrices(k, device=self.bias.device), persistent=False)
        self._prepare_ops()

    @staticmethod
    def factors_of(num_streams: int) -> tuple:
        raise NotImplementedError

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        super().init_non_persistent_buffers()
        for k in set(self.factors):
            getattr(self, f"perms{k}").copy_(permutation_matrices(k))
        self._prepare_ops()

    def _prepare_ops(self) -> None:
        dispatch.prepare_permutation_mix(self.factors, self.bias.device, self.backend)

    @classmethod
    def num_res_logits(cls, num_streams: int) -> int:
        return sum(math.factorial(k) for k in cls.factors_of(num_streams))

    def res_bias(self):
        return torch.cat([_permutation_bias(k) for k in self.factors_of(self.num_streams)])

    def res_matrix(self, a_res):
        return dispatch.permutation_mix(a_res, [getattr(self, f"perms{k}") for k in self.factors], self.backend,
                                        checked=False)


class MHCLite(_BirkhoffMixConnection):
    """mHC-lite: ``H_res = sum_k softmax(a_res)_k P_k`` over all n! permutations; exactly doubly stochastic."""

    variant = "mhclite"

    @staticmethod
    def factors_of(num_streams: int) -> tuple:
        return (num_streams,)

    @classmethod
    def _check_variant(cls, num_streams: int) -> None:
        check_permutation_size(num_streams, f"mHC-lite with num_streams={num_streams}")


class KromHC(_BirkhoffMixConnection):
    """KromHC: ``H_res = U_1 (x) ... (x) U_K`` with ``n = i_1 ... i_K`` and each ``U_k`` a Birkhoff mix of size ``i_k``.

    ``factors`` holds ``(i_1, ..., i_K)``: the prime factorisation of n, which minimises ``m = sum_k i_k!``.
    """

    variant = "kromhc"
    factors_of = staticmethod(kronecker_factors)

    @classmethod
    def _check_variant(cls, num_streams: int) -> None:
        factors = kronecker_factors(num_streams)
        for k in factors:
            check_permutation_size(k, f"KromHC with num_streams={num_streams} (factors {factors})")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", factors={self.factors}"


def connection_pre(conn: HyperConnection, X):
    """The pre step of ``conn`` on ``X``, checked: ``u, h_pre, h_post, a_res`` and the state for the post step.

    A function torch.fx does not trace into (like :func:`connection_post`): it reads shapes, devices and the
    backend, which a symbolic trace cannot, so timm's FX feature extraction sees a connection as these two
    calls around its branch, which it traces.
    """
    return conn._pre(X)


def connection_res_matrix(conn: HyperConnection, a_res):
    """``H_res (..., n, n) = Phi(a_res)`` of ``conn``, float32 under autocast."""
    return conn._h_res(a_res)


def connection_post(conn: HyperConnection, pre, y, h_res=None):
    """The post step of ``conn``: ``X_next = H_res X + H_post^T y`` from the pre step's outputs ``pre`` and the
    branch output ``y`` (checked to have the shape of ``u``); ``h_res``: ``H_res`` when already formed from
    ``a_res`` by :func:`connection_res_matrix` (recomputation keeps it)."""
    u, _, h_post, a_res, X = pre
    if y.shape != u.shape:
        raise ValueError(f"the branch of {type(conn).__name__} returned shape {tuple(y.shape)}; "
                         f"it must return its input's shape {tuple(u.shape)} (width {conn.dim})")
    h_res = connection_res_matrix(conn, a_res) if h_res is None else h_res
    return dispatch.stream_post(X, y, h_res, h_post, conn.backend, checked=False)  # checked above


for _fn in (connection_pre, connection_post):
    torch.fx.wrap(_fn.__name__)  # plain torch.fx.symbolic_trace
    register_notrace_function(_fn)  # timm's FX feature extraction and its model tests


CONNECTIONS = {cls.variant: cls for cls in (ResidualConnection, HC, MHC, MHCLite, KromHC)}


def connection_class(variant: str):
    """The connection class of ``variant`` (one of :data:`CONNECTIONS`)."""
    try:
        return CONNECTIONS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"unknown connection {variant!r}; valid choices: {', '.join(CONNECTIONS)}") from None


def build_connection(variant: str, num_streams: int, dim: int, layer_index: int = 0, **kwargs) -> nn.Module:
    """Build the connection named ``variant`` (one of :data:`CONNECTIONS`) for n streams of width ``dim``."""
    return connection_class(variant)(num_streams, dim, layer_index, **kwargs)


def connection_num_params(variant: str, num_streams: int, dim: int) -> int:
    """Parameters of one connection of ``variant`` without building it (validated as the constructor does)."""
    cls = connection_class(variant)
    cls.check(num_streams, dim)
    if cls is not ResidualConnection:
        _check_dim_given(dim)
    return cls.num_params(num_streams, dim)
