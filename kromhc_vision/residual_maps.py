"""Phi: the maps from residual logits ``a_res`` to the stream-mixing matrix ``H_res``.

Each takes per-token logits ``(..., m)`` and returns ``(..., n, n)``: here mHC-lite's and KromHC's
(mHC's Sinkhorn is an op with kernel backends, :mod:`kromhc_vision.ops`). They run in the dtype of
their input (callers pass float32 or float64). Internally the tokens sit on the last axis,
``(n, n, T)``, so that every small reduction over n (or over the k! permutation weights) is
vectorised across tokens, which CPUs run much faster than reductions over an innermost axis of size 2-4.
"""
import torch


class _Permute(torch.autograd.Function):
    """``x.permute(dims).contiguous()`` whose gradient comes back contiguous too (plain autograd would
    hand the upstream ops a strided view, on which CPU reductions over small axes run much slower)."""

    @staticmethod
    def forward(ctx, x, dims):
        ctx.inverse = tuple(sorted(range(len(dims)), key=dims.__getitem__))
        return x.permute(dims).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(ctx.inverse).contiguous(), None


def _permute(x: torch.Tensor, dims) -> torch.Tensor:
    """:class:`_Permute`, or its plain ops while ``torch.jit.trace`` records (a TorchScript module cannot keep a
    Python autograd Function: it would not save)."""
    if torch.jit.is_tracing():
        return x.permute(dims).contiguous()
    return _Permute.apply(x, dims)


def tokens_last(x: torch.Tensor, trailing: int) -> torch.Tensor:
    """``(..., *s)`` with ``len(s) = trailing`` -> ``(*s, T)``, tokens flattened onto the last axis."""
    flat = x.reshape(-1, *x.shape[x.dim() - trailing:])
    return _permute(flat, (*range(1, trailing + 1), 0))


def tokens_first(x: torch.Tensor, lead) -> torch.Tensor:
    """``(*s, T)`` -> ``(*lead, *s)`` with ``T = prod(lead)``, contiguous."""
    k = x.dim() - 1
    return _permute(x, (k, *range(k))).view(*lead, *x.shape[:-1])


def birkhoff_tokens_last(logits: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``(k!, T)`` logits -> ``(k, k, T)``: ``sum_p softmax(logits)_p P_p`` for each token.

    The weights and their sums are formed in float64 and the result rounded once to the dtype of
    ``logits``: each row and column of a float32 result sums to 1 up to the rounding of its k
    entries, where summing k! float32 weights would add up to k! roundings (1.5e-6 seen at k = 4).
    """
    k = perms.shape[-1]
    weights = torch.softmax(logits.double(), dim=0)
    H = perms.reshape(perms.shape[0], k * k).t().double() @ weights
    return H.to(logits.dtype).view(k, k, -1)


def _kronecker(factors: list) -> torch.Tensor:
    """``(i_k, i_k, T)`` factors -> ``(n, n, T)``; row ``(a, b)``, column ``(c, d)`` of ``U (x) V`` is
    ``U[a, c] V[b, d]``."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :, None] * f[None, :, None, :]).flatten(2, 3).flatten(0, 1)
    return out


def birkhoff(logits: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """mHC-lite: ``sum_k softmax(logits)_k P_k``, ``(..., k!) -> (..., k, k)``.

    ``perms`` is ``(k!, k, k)``. Each row and column of the result sums to ``sum_k w_k = 1``
    (Birkhoff-von Neumann), up to the rounding of its k entries.
    """
    return tokens_first(birkhoff_tokens_last(tokens_last(logits, 1), perms), logits.shape[:-1])


def kronecker(factors: list) -> torch.Tensor:
    """``U_1 (x) U_2 (x) ... (x) U_K`` per token; each ``U_k`` is ``(..., i_k, i_k)``."""
    return tokens_first(_kronecker([tokens_last(f, 2) for f in factors]), factors[0].shape[:-2])


def kronecker_birkhoff(logits: torch.Tensor, perms: list, factor_mix=None) -> torch.Tensor:
    """KromHC: ``(..., sum_k i_k!) -> (..., n, n)``, the Kronecker product of one Birkhoff mix per factor.

    ``perms[k]`` is ``(i_k!, i_k, i_k)``; ``logits`` holds the factors' logits one after the other.
    ``factor_mix``: what forms each factor, ``(i_k!, T)`` logits -> ``(i_k, i_k, T)`` (default: this module's,
    differentiated by autograd).
    """
    factor_mix = birkhoff_tokens_last if factor_mix is None else factor_mix
    chunks = tokens_last(logits, 1).split([p.shape[0] for p in perms], dim=0)
    return tokens_first(_kronecker([factor_mix(a, p) for a, p in zip(chunks, perms)]), logits.shape[:-1])


def stochasticity_error(h_res: torch.Tensor) -> torch.Tensor:
    """Largest ``|row sum - 1|`` or ``|column sum - 1|`` of ``(..., n, n)``, as a 0-d tensor (0 for no tokens)."""
    if h_res.numel() == 0:  # amax has no identity to reduce an empty tensor to
        return h_res.new_zeros(())
    rows = (h_res.sum(-1) - 1).abs().amax()
    cols = (h_res.sum(-2) - 1).abs().amax()
    return torch.maximum(rows, cols)
