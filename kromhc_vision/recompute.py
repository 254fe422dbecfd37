"""Recomputing the stream mixing in the backward pass (the models' ``hc_recompute``).

Autograd keeps, for every connection, what its pre and post steps save: the stream state ``X (..., n, C)``
(twice referenced, stored once), the coefficients and the mixing. Across ``L`` connections that is about
``n C L`` values per token on top of what the branches keep. With recomputation the connections are grouped
into *segments* of ``L_r`` consecutive connections, each feeding the next (``X_next`` of one is ``X`` of the
next). Per segment only these stay until the backward pass:

- the stream state at the segment's start (``n C`` per token);
- each connection's branch output ``y`` (``C`` per token; the post step needs it, and recomputation starts
  from it);
- what the branches themselves save (their input ``u``, attention and MLP internals), untouched.

Every other tensor a connection's ops save is replaced by a placeholder. When the backward pass first
unpacks one of a segment's placeholders, the segment's connections are run forward again (pre and post
steps only, never the branches, so no random numbers are drawn: drop-path and dropout are not replayed)
from the kept start state and branch outputs, and the tensors their ops save are collected in the order
they were saved in the forward pass. The same code on the same inputs gives the same values, so the
gradients are those without recomputation. A connection's recomputed tensors are released once all of
its placeholders have been unpacked; the transient is one segment's states and coefficients. Per token
the memory is about ``n C L / L_r + (n + 2) C L_r``, minimised by ``L_r = sqrt(n L / (n + 2))``
(:func:`segment_length` with ``True``).

The placeholders are made by :func:`torch.autograd.graph.saved_tensors_hooks` around the pre and post
steps only. Hence:

- the branches and everything outside the connections (patch embedding, downsamples, head) save as usual;
- a segment ends where the chain of connections breaks (the input of a connection is not the output of
  the previous one, e.g. across a ConvNeXt downsample): a new one starts there, from the state kept there;
- the session is inactive (no hooks, plain autograd) outside training, without grad, under
  ``torch.compile`` (the compiler's partitioner chooses what to save and recompute), in torch.fx tracing,
  and inside timm's ``set_grad_checkpointing`` regions (see :func:`suspended`), where
  ``torch.utils.checkpoint`` already recomputes everything, connections included.
"""
import contextlib
import math
import numbers
import threading
from typing import Callable, List, Optional

import torch
from torch.fx import _symbolic_trace

# True while torch.fx symbolically traces (torch >= 2.8 names it is_fx_symbolic_tracing; is_fx_tracing also
# answers True under torch.export, and warns)
is_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing

__all__ = ["RECOMPUTE_CHOICES", "check_recompute", "segment_length", "session", "suspended", "active_session",
           "RecomputeSession"]

RECOMPUTE_CHOICES = "False, True (L_r = round(sqrt(n L / (n + 2)))) or an int L_r >= 1 (connections per segment)"

_local = threading.local()
# Callbacks told of each tensor a segment keeps (its start state, branch outputs): how
# kromhc_vision.memory.saved_activation_bytes counts what these hooks, nested inside its own, keep.
_keep_observers: List[Callable[[torch.Tensor], None]] = []


def check_recompute(value) -> None:
    """Raise ``ValueError`` naming the value and the choices unless ``value`` is a valid ``hc_recompute``."""
    if isinstance(value, bool):
        return
    if isinstance(value, numbers.Integral) and value >= 1:
        return
    raise ValueError(f"hc_recompute must be {RECOMPUTE_CHOICES}; got {value!r} ({type(value).__name__})")


def segment_length(value, num_connections: int, num_streams: int) -> int:
    """``L_r`` for ``hc_recompute=value`` in a model of ``num_connections`` connections on ``num_streams``
    streams: 0 (off) for ``False``; ``round(sqrt(n L / (n + 2)))`` (at least 1) for ``True``; else ``value``."""
    check_recompute(value)
    if value is False:
        return 0
    if value is True:
        n, L = num_streams, max(num_connections, 1)
        return max(1, round(math.sqrt(n * L / (n + 2))))
    return int(value)


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


class _Placeholder:
    """What autograd holds instead of a tensor a connection saved: where to find its recomputed value."""
    __slots__ = ("segment", "index", "position", "shape", "dtype")

    def __init__(self, segment, index, position, t):
        self.segment, self.index, self.position, self.shape, self.dtype = segment, index, position, t.shape, t.dtype


class _Segment:
    """Up to ``L_r`` chained connections: their modules, branch outputs, and the start state."""

    def __init__(self, start: torch.Tensor, pre: Callable, post: Callable):
        # detached (same storage): a tensor with its grad_fn here would make a cycle through the autograd graph
        # (graph -> placeholder -> segment -> tensor -> graph) that Python's collector cannot see, leaking a
        # graph whose backward never runs
        self.start, self.pre, self.post = start.detach(), pre, post
        self.keep = {_storage_key(start)}
        self.conns, self.ys, self.x_grad, self.y_grad, self.counts, self.placeholders = [], [], [], [], [], []
        device = start.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) \
            if torch.amp.is_autocast_available(device) else None
        self.saved: Optional[List[Optional[list]]] = None  # recomputed saved tensors, per connection
        self.remaining: List[int] = []

    def hooks(self, index: int):
        """Saved-tensor hooks for connection ``index``'s ops: keep parameters and the kept storages, else a
        placeholder numbered in saving order."""

        def pack(t: torch.Tensor):
            position = self.counts[index]  # counts every saved tensor: the recomputation sees them all
            self.counts[index] += 1
            if (t.requires_grad and t.grad_fn is None) or _storage_key(t) in self.keep:
                for observe in _keep_observers:
                    observe(t)
                return t.detach()  # what the backward needs is the value; detached, no cycle can form
            self.placeholders[index] += 1
            return _Placeholder(self, index, position, t)

        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)

    def recompute(self) -> None:
        """Run the connections forward again (pre and post only) and collect what their ops save."""
        saved = []
        X = self.start
        autocast = contextlib.nullcontext() if self.autocast is None else torch.autocast(
            self.autocast[0], dtype=self.autocast[2], enabled=self.autocast[1])
        with torch.enable_grad(), autocast:
            for i, conn in enumerate(self.conns):
                got = []

                def pack(t, got=got):
                    # detached, and nothing left in this throw-away graph: a saved output holding its own
                    # grad_fn would be a cycle through C++ that leaks the graph and these tensors
                    got.append(t.detach())

                with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
                    pre = self.pre(conn, X.detach().requires_grad_(self.x_grad[i]))
                    out = self.post(conn, pre, self.ys[i].detach().requires_grad_(self.y_grad[i]))
                saved.append(got)
                X = out.detach()
                del pre, out
        self.saved = saved
        self.remaining = [0] * len(saved)
        for i, got in enumerate(saved):
            self.remaining[i] = self.placeholders[i]
            if len(got) != self.counts[i]:
                raise RuntimeError(f"hc_recompute: connection {i} of a segment saved {self.counts[i]} tensors in the "
                                   f"forward pass but {len(got)} when recomputed; its ops are not deterministic in "
                                   "what they save")


def _never_unpacked(packed):
    raise RuntimeError("hc_recompute: the graph of a recomputation is not differentiated")


def _unpack(packed):
    if not isinstance(packed, _Placeholder):
        return packed
    seg, i = packed.segment, packed.index
    if seg.saved is None or seg.saved[i] is None:  # first use, or a second backward (retain_graph)
        seg.recompute()
    t = seg.saved[i][packed.position]
    if t.shape != packed.shape or t.dtype != packed.dtype:
        raise RuntimeError(f"hc_recompute: a recomputed tensor of connection {i} has shape {tuple(t.shape)} "
                           f"{t.dtype}, saved as {tuple(packed.shape)} {packed.dtype}")
    seg.remaining[i] -= 1
    if seg.remaining[i] == 0:
        seg.saved[i] = None  # every placeholder of this connection unpacked: release its recomputed tensors
    return t


class RecomputeSession:
    """One forward pass with recomputation: chains connections into segments of ``length``."""

    def __init__(self, length: int):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"segment length must be an int >= 1, got {length!r}")
        self.length = length
        self._segment: Optional[_Segment] = None
        self._last: Optional[torch.Tensor] = None

    def connect(self, conn, X: torch.Tensor, branch: Callable, pre: Callable, post: Callable) -> torch.Tensor:
        """``post(conn, pre(conn, X), branch(u))`` with the ops' saved tensors deferred to recomputation."""
        seg = self._segment
        if seg is None or X is not self._last or len(seg.conns) >= self.length:
            seg = self._segment = _Segment(X, pre, post)
        i = len(seg.conns)
        seg.conns.append(conn)
        seg.counts.append(0)
        seg.placeholders.append(0)
        seg.x_grad.append(X.requires_grad)
        with seg.hooks(i):
            p = pre(conn, X)
        y = branch(p[0])
        seg.ys.append(y.detach())
        seg.y_grad.append(y.requires_grad)
        seg.keep.add(_storage_key(y))
        with seg.hooks(i):
            out = post(conn, p, y)
        self._last = out
        return out


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def active_session() -> Optional[RecomputeSession]:
    """The session in force in this thread, or None (always None under torch.compile and torch.fx tracing)."""
    if torch.compiler.is_compiling() or is_fx_tracing():
        return None
    stack = _stack()
    return stack[-1] if stack else None


@contextlib.contextmanager
def session(length: int):
    """Recompute the connections run inside in segments of ``length`` (0: no recomputation).

    Inactive, whatever ``length``, without grad, under torch.compile and while torch.fx traces.
    """
    if not length or not torch.is_grad_enabled() or torch.compiler.is_compiling() or is_fx_tracing():
        yield None
        return
    stack = _stack()
    stack.append(RecomputeSession(length))
    try:
        yield stack[-1]
    finally:
        stack.pop()


@contextlib.contextmanager
def suspended():
    """No recomputation session inside (timm's grad checkpointing regions: they recompute everything)."""
    if torch.compiler.is_compiling() or is_fx_tracing():
        yield
        return
    stack = _stack()
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()
