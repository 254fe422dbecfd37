"""Phi: the maps from residual logits ``a_res`` to the stream-mixing matrix ``H_res``.

Each takes per-token logits ``(..., m)`` and returns ``(..., n, n)``. These are the PyTorch
reference implementations; they run in the dtype of their input (callers pass float32 or
float64).
"""
import torch


def sinkhorn_log(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """mHC: Sinkhorn-Knopp on ``exp(logits)`` in log domain, ``(..., n, n) -> (..., n, n)``.

    Each iteration normalises rows then columns: ``L = log_softmax(L, rows)``,
    ``L = log_softmax(L, columns)`` (i.e. ``L -= logsumexp(L)`` along each). The result's columns
    sum to 1 to rounding; its rows only approximately (the error shrinks with ``num_iters`` but is
    not zero). The iterations run with tokens on the last axis, ``(n, n, T)``, so that each
    reduction over n is vectorised across tokens (10x faster on CPU than reducing the innermost
    axis of size n); autograd keeps one ``(n, n, T)`` tensor per half-step.
    """
    L = logits.reshape(-1, *logits.shape[-2:]).permute(1, 2, 0).contiguous()
    for _ in range(num_iters):
        L = torch.log_softmax(L, dim=1)
        L = torch.log_softmax(L, dim=0)
    return L.exp().permute(2, 0, 1).contiguous().view(logits.shape)


def birkhoff(logits: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """mHC-lite: ``sum_k softmax(logits)_k P_k``, ``(..., k!) -> (..., k, k)``.

    ``perms`` is ``(k!, k, k)``. Each row and column of the result sums to ``sum_k w_k = 1``,
    exactly up to float rounding (Birkhoff-von Neumann).
    """
    k = perms.shape[-1]
    weights = torch.softmax(logits, dim=-1)
    return (weights @ perms.reshape(perms.shape[0], k * k).to(weights.dtype)).unflatten(-1, (k, k))


def kronecker(factors: list) -> torch.Tensor:
    """KromHC: ``U_1 (x) U_2 (x) ... (x) U_K`` per token; each ``U_k`` is ``(..., i_k, i_k)``.

    Row ``(a, b)`` and column ``(c, d)`` of ``U (x) V`` hold ``U[a, c] * V[b, d]``.
    """
    out = factors[0]
    for f in factors[1:]:
        rows, cols = out.shape[-2] * f.shape[-2], out.shape[-1] * f.shape[-1]
        out = (out[..., :, None, :, None] * f[..., None, :, None, :]).reshape(*f.shape[:-2], rows, cols)
    return out


def stochasticity_error(h_res: torch.Tensor) -> torch.Tensor:
    """Largest ``|row sum - 1|`` or ``|column sum - 1|`` of ``(..., n, n)``, as a 0-d tensor."""
    rows = (h_res.sum(-1) - 1).abs().amax()
    cols = (h_res.sum(-2) - 1).abs().amax()
    return torch.maximum(rows, cols)
