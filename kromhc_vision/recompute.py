"""Recomputing the stream mixing in the backward pass (the models' ``hc_recompute``).

Autograd keeps, for every connection, what its pre and post steps save: the stream state ``X (..., n, C)``
(twice referenced, stored once), the coefficients and the mixing. Across ``L`` connections the states are about
``n C L`` values per token on top of what the branches keep; everything else the connections save is a few
values per token (coefficients, ``H_res`` and what its map ``Phi`` saves). With recomputation the connections are
grouped into *segments* of ``L_r`` consecutive connections, each feeding the next (``X_next`` of one is ``X`` of
the next). Per segment these stay until the backward pass:

- the stream state at the segment's start (``n C`` per token);
- each connection's branch output ``y`` (``C`` per token; the post step needs it, and recomputation uses it);
- the coefficients ``h_pre, h_post, a_res`` and every other small tensor the ops save (``2n + m`` to a few
  dozen values per token); and where the width allows (``C >= RES_KEEP_WIDTH_RATIO n^2``: ViT-Tiny and
  ViT-Micro at n = 4), ``H_res`` and what its map ``Phi`` saved, so that ``Phi`` (Sinkhorn's iterations, the
  permutation softmax) is not run again: ``H_res`` is ``n^2`` values per token, at most a quarter of ``y``,
  and ``Phi``'s saves come on top (the numba and Triton Sinkhorns: the logits; PyTorch's: its iterates);
- what the branches themselves save (their input ``u``, attention and MLP internals), untouched.

Every saved view of one of the other stream states, and what else the post steps save (a copy of the state in
another dtype; ``H_res`` and what ``Phi`` saved where they are not kept), is replaced by a placeholder. When the
backward pass first unpacks one of a segment's placeholders, the segment's post steps alone are run again,
``X_{i+1} = H_res,i X_i + H_post,i^T y_i``, from the start state, the kept branch outputs and the kept
coefficients (``H_res`` again from ``a_res`` where it is not kept), as far as a placeholder needs (a segment's
last post step only if it saved a placeholder by position: its output is the next segment's start; without grad
where all it saves is kept), and the states and what the post steps save are collected in saving order. Neither
the branches nor the pre steps run again (no random numbers are drawn: drop-path and dropout are not replayed; no
projection GEMM). The same ops on the same inputs give the same values, so the gradients are those without
recomputation. A connection's recomputed tensors are released once all of its placeholders have been unpacked; the
transient is one segment's states and coefficients. Per token the memory is about ``n C L / L_r + (n + 2) C L_r``,
minimised by ``L_r = sqrt(n L / (n + 2))`` (:func:`segment_length` with ``True``).

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

__all__ = ["RECOMPUTE_CHOICES", "RES_KEEP_WIDTH_RATIO", "check_recompute", "segment_length", "session", "suspended",
           "active_session", "RecomputeSession"]

# H_res (n^2 values per token) and what Phi saved are kept, not recomputed, where C >= this * n^2
RES_KEEP_WIDTH_RATIO = 4

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
    """What autograd holds instead of a tensor a connection's op saved: connection ``index`` of ``segment``, and
    either its stream state (``position`` None: the view that was saved, by size, stride and storage offset) or
    the ``position``-th tensor its post step saved (one made from the state, e.g. in another dtype)."""
    __slots__ = ("segment", "index", "position", "size", "stride", "offset", "dtype")

    def __init__(self, segment, index, position, t):
        self.segment, self.index, self.position, self.dtype = segment, index, position, t.dtype
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class _Segment:
    """Up to ``L_r`` chained connections: their modules, the start state, and per connection the branch output
    and the coefficients ``h_post``, ``a_res`` and ``H_res`` (or None where it is not kept), from which the
    recomputation rebuilds the states and what the post steps saved."""

    def __init__(self, start: torch.Tensor, post: Callable):
        # detached (same storage): a tensor with its grad_fn here would make a cycle through the autograd graph
        # (graph -> placeholder -> segment -> tensor -> graph) that Python's collector cannot see, leaking a
        # graph whose backward never runs
        self.start, self.post = start.detach(), post
        self.keep = {_storage_key(start)}  # storages kept as they are: the start, branch outputs, coefficients
        self.conns, self.state_keys, self.x_grad, self.ys, self.coefs, self.counts = [], [], [], [], [], []
        self.placeholders, self.positional = [], []  # per connection: all its placeholders, those by position
        device = start.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) \
            if torch.amp.is_autocast_available(device) else None
        self.states: Optional[List[Optional[torch.Tensor]]] = None  # recomputed stream states, per connection
        self.saved: Optional[List[Optional[list]]] = None  # what each post step saved, recomputed
        self.remaining: List[int] = []

    def add(self, conn, X: torch.Tensor) -> int:
        """Connection ``conn`` on state ``X`` joins the segment; returns its index."""
        key = _storage_key(X)
        self.conns.append(conn)
        self.state_keys.append(None if key in self.keep else key)
        self.x_grad.append(X.requires_grad)
        self.ys.append(None)
        self.coefs.append(None)
        self.counts.append(0)
        self.placeholders.append(0)
        self.positional.append(0)
        return len(self.conns) - 1

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        for observe in _keep_observers:
            observe(t)
        return t.detach()  # what the backward needs is the value; detached, no cycle can form

    def _pack(self, index: int, t: torch.Tensor, post: bool):
        if self.state_keys[index] is not None and _storage_key(t) == self.state_keys[index]:
            self.placeholders[index] += 1
            return _Placeholder(self, index, None, t)
        if not post or (t.requires_grad and t.grad_fn is None) or _storage_key(t) in self.keep:
            return self._kept(t)
        self.placeholders[index] += 1
        self.positional[index] += 1
        return _Placeholder(self, index, self.counts[index] - 1, t)

    def pre_hooks(self, index: int):
        """Hooks for connection ``index``'s pre step: its stream state becomes a placeholder (unless it is the
        segment's start); the rest it saves (parameters, a few coefficients per token) is kept."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(index, t, False), _unpack)

    def post_hooks(self, index: int):
        """Hooks for connection ``index``'s post step: the state and what else it saves become placeholders,
        numbered in saving order; parameters and the kept storages (``y``, the coefficients, a kept ``H_res``)
        stay."""

        def pack(t):
            self.counts[index] += 1  # counts every saved tensor: the recomputation sees them all
            return self._pack(index, t, True)

        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)

    def posts_to_run(self) -> int:
        """How many of the segment's post steps the recomputation runs, from the first: up to the last one with a
        placeholder by position, and up to the one before the last connection whose state is a placeholder."""
        runs = 0
        for i, (placeholders, positional) in enumerate(zip(self.placeholders, self.positional)):
            if positional:
                runs = i + 1
            elif placeholders:
                runs = max(runs, i)
        return runs

    def recompute(self) -> None:
        """Run the post steps again from the start state, with the kept branch outputs and coefficients (the pre
        steps, ``Phi`` and the branches are not run), as far as :meth:`posts_to_run`, and collect the states and
        what the post steps save from them (a post step with no placeholder by position runs without grad)."""
        runs = self.posts_to_run()
        states, saved = [], []
        X = self.start
        autocast = contextlib.nullcontext() if self.autocast is None else torch.autocast(
            self.autocast[0], dtype=self.autocast[2], enabled=self.autocast[1])
        with autocast:
            for i, conn in enumerate(self.conns):
                states.append(X if i <= runs else None)
                if i >= runs:
                    saved.append(None)
                    continue
                (y, y_grad), *coefs = self.ys[i], *self.coefs[i]
                got = []
                if not self.positional[i]:  # only the next state is needed
                    h_post, a_res, h_res = (None if c is None else c[0] for c in coefs)
                    with torch.no_grad():
                        out = self.post(conn, (y, None, h_post, a_res, X), y, h_res)
                else:
                    def pack(t, got=got):
                        # detached, and nothing left in this throw-away graph: a saved output holding its own
                        # grad_fn would be a cycle through C++ that leaks the graph and these tensors
                        got.append(t.detach())

                    X_, y_, h_post, a_res, h_res = (None if c is None else c[0].detach().requires_grad_(c[1])
                                                    for c in ((X, self.x_grad[i]), (y, y_grad), *coefs))
                    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
                        # y stands in for u, which the post step only checks the shape of
                        out = self.post(conn, (y_, None, h_post, a_res, X_), y_, h_res)
                    if len(got) != self.counts[i]:
                        raise RuntimeError(f"hc_recompute: the post step of connection {i} of a segment saved "
                                           f"{self.counts[i]} tensors in the forward pass but {len(got)} when "
                                           "recomputed; its ops are not deterministic in what they save")
                saved.append(got)
                X = out.detach()
                del out
        self.states, self.saved = states, saved
        self.remaining = list(self.placeholders)


def _never_unpacked(packed):
    raise RuntimeError("hc_recompute: the graph of a recomputation is not differentiated")


def _unpack(packed):
    if not isinstance(packed, _Placeholder):
        return packed
    seg, i = packed.segment, packed.index
    if seg.states is None or seg.states[i] is None:  # first use, or a second backward (retain_graph)
        seg.recompute()
    if packed.position is None:
        t = seg.states[i].as_strided(packed.size, packed.stride, packed.offset)
    else:
        t = seg.saved[i][packed.position]
    if t.shape != packed.size or t.dtype != packed.dtype:
        raise RuntimeError(f"hc_recompute: a recomputed tensor of connection {i} has shape {tuple(t.shape)} "
                           f"{t.dtype}, saved as {tuple(packed.size)} {packed.dtype}")
    seg.remaining[i] -= 1
    if seg.remaining[i] == 0:  # every placeholder of this connection unpacked: release what was recomputed
        seg.states[i] = seg.saved[i] = None
    return t


class RecomputeSession:
    """One forward pass with recomputation: chains connections into segments of ``length``."""

    def __init__(self, length: int):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"segment length must be an int >= 1, got {length!r}")
        self.length = length
        self._segment: Optional[_Segment] = None
        self._last: Optional[torch.Tensor] = None

    def connect(self, conn, X: torch.Tensor, branch: Callable, pre: Callable, res_matrix: Callable,
                post: Callable) -> torch.Tensor:
        """``post(conn, p, y, res_matrix(conn, a_res))`` with ``p = pre(conn, X)``, ``y = branch(u)``: the
        stream state and what the post step saves from it deferred to recomputation. ``H_res`` is formed outside
        the hooks (kept) where ``C >= RES_KEEP_WIDTH_RATIO n^2``; elsewhere ``post(conn, p, y)`` forms it
        inside them (recomputed)."""
        seg = self._segment
        if seg is None or X is not self._last or len(seg.conns) >= self.length:
            seg = self._segment = _Segment(X, post)
        i = seg.add(conn, X)
        with seg.pre_hooks(i):
            p = pre(conn, X)
        y = branch(p[0])
        n, C = X.shape[-2:]
        # outside the hooks: H_res and what Phi saves are kept, and Phi is not run again
        h_res = res_matrix(conn, p[3]) if C >= RES_KEEP_WIDTH_RATIO * n * n else None
        # y, h_post and H_res, or a_res where H_res is not kept: what the post step is recomputed from
        seg.coefs[i] = [None if t is None else (t.detach(), t.requires_grad)
                        for t in (p[2], p[3] if h_res is None else None, h_res)]
        seg.ys[i] = (y.detach(), y.requires_grad)
        seg.keep.update(_storage_key(t) for t in (y, *p[1:4], h_res) if t is not None)
        with seg.post_hooks(i):
            out = post(conn, p, y, h_res)
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
