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
  dozen values per token); and ``H_res`` and what its map ``Phi`` saved, where these come to at most a
  ``RES_KEEP_WIDTH_RATIO``-th (a quarter) of ``y``'s bytes, so that ``Phi`` (Sinkhorn's iterations, the
  permutation softmax) is not run again. ``H_res`` is ``n^2`` values per token: ViT-Tiny and ViT-Micro at n = 4
  keep it, n = 8 does not; ``Phi``'s saves are measured (every backend's Sinkhorn saves only the logits, kept
  anyway);
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
- what a segment holds until the backward pass (the tensors kept above and the parameters the ops save) goes
  through the saved-tensor hooks in force outside the connection, if any (``torch.autograd.graph.save_on_cpu``,
  a user's offloading or compression hooks), packed when kept and unpacked when used, as without recomputation;
  the placeholders hold no tensor and what the backward recomputes is not packed (see :class:`_Kept`);
- the session is inactive (no hooks, plain autograd) outside training, without grad, under
  ``torch.compile`` (the compiler's partitioner chooses what to save and recompute), in torch.fx tracing,
  and inside timm's ``set_grad_checkpointing`` regions (see :func:`suspended`) and any other region of
  ``torch.utils.checkpoint`` (a user's ``checkpoint(block, X)``, FSDP's ``checkpoint_wrapper``), which
  recomputes everything, connections included.
"""
import contextlib
import math
import numbers
import threading
from typing import Callable, List, Optional

import torch
from torch.fx import _symbolic_trace
from torch.multiprocessing.reductions import StorageWeakRef

# True while torch.fx symbolically traces (torch >= 2.8 names it is_fx_symbolic_tracing; is_fx_tracing also
# answers True under torch.export, and warns)
is_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing

__all__ = ["RECOMPUTE_CHOICES", "RES_KEEP_WIDTH_RATIO", "check_recompute", "segment_length", "session", "suspended",
           "active_session", "RecomputeSession"]

# H_res and what Phi saved are kept, not recomputed, where their bytes times this are at most the branch output's
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


class _Kept:
    """A tensor a segment holds until the backward pass (one a connection's op saved, or one the recomputation
    starts from), detached (what the backward needs is the value; no cycle can form). Under the saved-tensor hooks
    ``outer`` (``(pack, unpack)``: those in force outside the connection, e.g. ``save_on_cpu``) ``value`` is what
    their pack hook made of it, and :meth:`unpack` gives what their unpack hook makes of that, as autograd does
    without recomputation; nothing of the tensor is held here (it may be offloaded).

    Without outer hooks it is kept as it is, with its version counter's value when saved. Saved-tensor hooks take
    autograd's own check of that counter away: :meth:`unpack` makes it, so that a tensor changed in place between
    the forward and the backward pass (a parameter stepped by an optimizer before a second ``backward``) raises as
    without recomputation, instead of giving gradients computed from the changed values. Under outer hooks it is
    not made, as autograd makes it for no tensor that hooks packed (the counter would hold the tensor)."""
    __slots__ = ("value", "version", "outer_unpack")

    def __init__(self, t, outer=None):
        if outer is None:
            t = t.detach()
            self.value, self.version, self.outer_unpack = t, t._version, None
        else:  # a leaf as it is (no grad_fn: no cycle), so that hooks see a parameter as one (and may skip it)
            self.value = outer[0](t if t.grad_fn is None else t.detach())
            self.version, self.outer_unpack = None, outer[1]

    def unpack(self) -> torch.Tensor:
        if self.outer_unpack is not None:
            return self.outer_unpack(self.value)
        t = self.value
        if t._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {self.version} instead "
                "(saved by a hyper-connection under hc_recompute; a parameter changed in place, e.g. by "
                "optimizer.step(), between the forward pass and this backward pass?)")
        return t


class _Pending:
    """A tensor ``Phi`` saved, held until :meth:`_Segment.form_res_matrix` decides whether ``H_res`` is kept;
    ``value`` is then the tensor kept or its :class:`_Placeholder`."""
    __slots__ = ("position", "value")

    def __init__(self, position, t):
        self.position, self.value = position, t


class _Link:
    """One connection of a segment: its module, what the recomputation of its post step starts from (the branch
    output ``y`` and the coefficients ``h_post``, ``a_res`` and ``H_res``, each None where not kept, with whether
    it tracks grad), the storage of its state where that is to be recomputed (None for the segment's start), and
    counts of what its steps saved: every tensor the post step (and a ``Phi`` run for it) saved, in order; the
    placeholders among them; those of the placeholders held by position (not the state's views)."""
    __slots__ = ("conn", "state_key", "x_grad", "y", "coefs", "saves", "placeholders", "positional")

    def __init__(self, conn, state_key, x_grad):
        self.conn, self.state_key, self.x_grad = conn, state_key, x_grad
        self.y = self.coefs = None
        self.saves = self.placeholders = self.positional = 0


class _Segment:
    """Up to ``L_r`` chained connections (:class:`_Link` each) and the start state, from which the
    recomputation rebuilds the states and what the post steps saved."""

    def __init__(self, start: torch.Tensor, post: Callable, outer=None):
        # the saved-tensor hooks outside the connection running now (None: none), which what it keeps goes through
        self.outer, self.post = outer, post
        self.packed = {}  # under outer hooks: what was kept, by tensor (see _kept)
        # detached (same storage): a tensor with its grad_fn here would make a cycle through the autograd graph
        # (graph -> placeholder -> segment -> tensor -> graph) that Python's collector cannot see, leaking a
        # graph whose backward never runs
        self.start = self._kept(start)
        # storages kept as they are (the start, branch outputs, coefficients), by key, each with a weak reference:
        # under outer hooks that copy (save_on_cpu) a kept tensor's storage is freed, and its address may be reused
        # by a tensor that is not kept
        self.keep = {}
        self.keep_storages(start)
        self.links: List[_Link] = []
        device = start.device.type
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) \
            if torch.amp.is_autocast_available(device) else None
        self.states: Optional[List[Optional[torch.Tensor]]] = None  # recomputed stream states, per connection
        self.saved: Optional[List[Optional[list]]] = None  # what each post step saved, recomputed
        self.remaining: List[int] = []

    @property
    def conns(self) -> list:
        return [link.conn for link in self.links]

    def add(self, conn, X: torch.Tensor) -> int:
        """Connection ``conn`` on state ``X`` joins the segment; returns its index."""
        key = _storage_key(X)
        self.links.append(_Link(conn, None if self.keeps(key) else key, X.requires_grad))
        return len(self.links) - 1

    def _kept(self, t: torch.Tensor) -> "_Kept":
        """``t`` kept until the backward pass. Under outer hooks packed once per segment: a tensor kept again while
        alive and unchanged (a branch output the post step saves, a parameter two ops save) shares its
        :class:`_Kept`, so that ``save_on_cpu`` copies it once (its unpack runs once per use, as for any saved
        tensor a backward uses twice)."""
        _observe(t)
        if self.outer is None:
            return _Kept(t)
        key = (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version, self.outer)
        hit = self.packed.get(key)
        if hit is not None and not hit[1].expired():
            return hit[0]
        kept = _Kept(t, self.outer)
        self.packed[key] = (kept, StorageWeakRef(t.untyped_storage()))
        return kept

    def _kept_anyway(self, t: torch.Tensor) -> bool:
        """Whether ``t`` stays without costing the segment anything: a parameter, or a storage already kept."""
        return (t.requires_grad and t.grad_fn is None) or self.keeps(_storage_key(t))

    def keep_storages(self, *tensors) -> None:
        for t in tensors:
            self.keep[_storage_key(t)] = StorageWeakRef(t.untyped_storage())

    def keeps(self, key) -> bool:
        """Whether the storage at ``key`` is one kept (alive: not a later one at a freed kept one's address)."""
        ref = self.keep.get(key)
        return ref is not None and not ref.expired()

    def _pack(self, index: int, t: torch.Tensor, position: Optional[int]):
        """The state's views become placeholders; of the rest, with ``position`` (a post step's saves) all but the
        parameters and the kept storages too, by position; without (a pre step's), nothing."""
        link = self.links[index]
        if link.state_key is not None and _storage_key(t) == link.state_key:
            link.placeholders += 1
            return _Placeholder(self, index, None, t)
        if position is None or self._kept_anyway(t):
            return self._kept(t)
        link.placeholders += 1
        link.positional += 1
        return _Placeholder(self, index, position, t)

    def _post_pack(self, index: int, t: torch.Tensor):
        link = self.links[index]
        link.saves += 1  # counts every saved tensor: the recomputation sees them all
        return self._pack(index, t, link.saves - 1)

    def pre_hooks(self, index: int):
        """Hooks for connection ``index``'s pre step: its stream state becomes a placeholder (unless it is the
        segment's start); the rest it saves (parameters, a few coefficients per token) is kept."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(index, t, None), _unpack)

    def post_hooks(self, index: int):
        """Hooks for connection ``index``'s post step: the state and what else it saves become placeholders,
        numbered in saving order; parameters and the kept storages (``y``, the coefficients, a kept ``H_res``)
        stay."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._post_pack(index, t), _unpack)

    def form_res_matrix(self, index: int, res_matrix: Callable, a_res: torch.Tensor, y: torch.Tensor):
        """``H_res = res_matrix(conn, a_res)`` for connection ``index``, and whether it is kept: where it and what
        ``Phi`` saved (storages not kept already, not the connection's buffers) come to at most
        ``1 / RES_KEEP_WIDTH_RATIO`` of the bytes of the branch output ``y``, all of it
        stays until the backward and ``Phi`` is not run again; elsewhere what ``Phi`` saved becomes the first
        placeholders of the post step (which, recomputed without ``H_res``, runs ``Phi`` first)."""
        link = self.links[index]
        pending = []

        def pack(t):
            pending.append(_Pending(link.saves + len(pending), t))  # not detached until decided, below
            return pending[-1]

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            h_res = res_matrix(link.conn, a_res)
        candidates = [t for t in (h_res, *(p.value for p in pending)) if not self._kept_anyway(t)]
        if candidates:  # (HC's H_res is a view of a_res, kept anyway: no buffer to look at)
            buffers = {_storage_key(b) for b in link.conn.buffers()}
            candidates = [t for t in candidates if _storage_key(t) not in buffers]
        new = {_storage_key(t): t.untyped_storage().nbytes() for t in candidates}
        kept = sum(new.values()) * RES_KEEP_WIDTH_RATIO <= y.numel() * y.element_size()
        if kept:
            self.keep_storages(h_res)
        for p in pending:
            p.value = self._kept(p.value) if kept else self._pack(index, p.value, p.position)
        if not kept:  # the post step's first saves, when it runs Phi itself
            link.saves += len(pending)
        return h_res, kept

    def posts_to_run(self) -> int:
        """How many of the segment's post steps the recomputation runs, from the first: up to the last one with a
        placeholder by position, and up to the one before the last connection whose state is a placeholder."""
        runs = 0
        for i, link in enumerate(self.links):
            if link.positional:
                runs = i + 1
            elif link.placeholders:
                runs = max(runs, i)
        return runs

    def recompute(self) -> None:
        """Run the post steps again from the start state, with the kept branch outputs and coefficients (the pre
        steps, the branches and a kept ``H_res``'s ``Phi`` are not run), as far as :meth:`posts_to_run`, and
        collect the states and what the post steps save from them (a post step with no placeholder by position
        runs without grad), outside inference mode whatever the backward pass runs in."""
        runs = self.posts_to_run()
        states, saved = [], []
        X = self.start.unpack()
        autocast = contextlib.nullcontext() if self.autocast is None else torch.autocast(
            self.autocast[0], dtype=self.autocast[2], enabled=self.autocast[1])
        # not in inference mode, where a backward may run (plain autograd's does): the post steps would make
        # inference tensors, which cannot be saved for backward
        with torch.inference_mode(False), autocast:
            for i, link in enumerate(self.links):
                states.append(X if i <= runs else None)
                if i >= runs:
                    saved.append(None)
                    continue
                got = []
                kept = [None if c is None else (c[0].unpack(), c[1]) for c in (link.y, *link.coefs)]
                if not link.positional:  # only the next state is needed
                    y, h_post, a_res, h_res = (None if c is None else c[0] for c in kept)
                    with torch.no_grad():
                        out = self.post(link.conn, (y, None, h_post, a_res, X), y, h_res)
                else:
                    def pack(t, got=got):
                        # detached, and nothing left in this throw-away graph: a saved output holding its own
                        # grad_fn would be a cycle through C++ that leaks the graph and these tensors
                        got.append(t.detach())

                    X_, y, h_post, a_res, h_res = (None if c is None else c[0].detach().requires_grad_(c[1])
                                                   for c in ((X, link.x_grad), *kept))
                    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
                        # y stands in for u, which the post step only checks the shape of
                        out = self.post(link.conn, (y, None, h_post, a_res, X_), y, h_res)
                    if len(got) != link.saves:
                        raise RuntimeError(f"hc_recompute: the post step of connection {i} of a segment saved "
                                           f"{link.saves} tensors in the forward pass but {len(got)} when "
                                           "recomputed; its ops are not deterministic in what they save")
                saved.append(got)
                X = out.detach()
                del out
        self.states, self.saved = states, saved
        self.remaining = [link.placeholders for link in self.links]


def _observe(t: torch.Tensor) -> None:
    """Tell :data:`_keep_observers` of a tensor a segment holds until the backward pass."""
    for observe in _keep_observers:
        observe(t)


def _never_unpacked(packed):
    raise RuntimeError("hc_recompute: the graph of a recomputation is not differentiated")


def _unpack(packed):
    if isinstance(packed, _Pending):
        packed = packed.value
    if isinstance(packed, _Kept):
        return packed.unpack()
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
        self._last_version = -1  # _last's version counter when its post step returned it
        self.outer = None  # the saved-tensor hooks in force outside, as active_session() last saw them

    def connect(self, conn, X: torch.Tensor, branch: Callable, pre: Callable, res_matrix: Callable,
                post: Callable) -> torch.Tensor:
        """``post(conn, p, y, H_res)`` with ``p = pre(conn, X)``, ``y = branch(u)``, ``H_res = res_matrix(conn,
        a_res)``: the stream state and what the post step saves from it deferred to recomputation, and ``H_res``
        with what ``Phi`` saved kept where they come to at most ``1 / RES_KEEP_WIDTH_RATIO`` of ``y``'s bytes
        (:meth:`_Segment.form_res_matrix`), recomputed from ``a_res`` elsewhere."""
        seg = self._segment
        # a new segment unless X is the previous connection's output as it returned it: one changed in place
        # since (a forward hook's out.mul_(...)) cannot be rebuilt by running the post steps again
        if seg is None or X is not self._last or X._version != self._last_version or len(seg.links) >= self.length:
            seg = self._segment = _Segment(X, post, self.outer)
        seg.outer = self.outer  # what this connection keeps goes through the hooks in force around it
        i = seg.add(conn, X)
        with seg.pre_hooks(i):
            p = pre(conn, X)
        y = branch(p[0])
        seg.keep_storages(y, *p[1:4])
        h_res, kept = seg.form_res_matrix(i, res_matrix, p[3], y)
        link = seg.links[i]
        # what the post step is recomputed from: y, h_post and H_res, or a_res where H_res is not kept
        link.y = (seg._kept(y), y.requires_grad)
        link.coefs = [None if t is None else (seg._kept(t), t.requires_grad)
                      for t in (p[2], None if kept else p[3], h_res if kept else None)]
        with seg.post_hooks(i):
            out = post(conn, p, y, h_res)  # a kept H_res's storage is kept; otherwise its save is a placeholder
        self._last, self._last_version = out, out._version
        return out


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _top_hooks():
    """The saved-tensor hooks in force (the innermost ``(pack, unpack)``), or None: none, or a torch without the
    private query (then a session neither sees a checkpoint nor packs into outer hooks)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _under_checkpoint(hooks) -> bool:
    """Whether the saved-tensor hooks in force, ``hooks`` (:func:`_top_hooks`), are ``torch.utils.checkpoint``'s
    (non-reentrant checkpoint, its recomputation, selective checkpointing; a user's ``checkpoint(block, X)``,
    FSDP's ``checkpoint_wrapper``). A session's hooks inside would take the connections' saves from the
    checkpoint, whose recomputation (with no session) then saves more tensors than its forward did: a
    ``CheckpointError``, or the wrong tensors. Only the innermost hooks are seen: a ``save_on_cpu`` opened inside
    the checkpointed function hides the checkpoint."""
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def active_session() -> Optional[RecomputeSession]:
    """The session in force in this thread, or None (always None under torch.compile and torch.fx tracing, and
    inside a region of ``torch.utils.checkpoint``, which recomputes the connections with everything else). The
    saved-tensor hooks in force are recorded on it (one look per connection): the next :meth:`connect` passes
    what it keeps through them."""
    if torch.compiler.is_compiling() or is_fx_tracing():
        return None
    stack = _stack()
    if not stack or stack[-1] is None:
        return None
    hooks = _top_hooks()
    if _under_checkpoint(hooks):
        return None
    stack[-1].outer = hooks
    return stack[-1]


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
