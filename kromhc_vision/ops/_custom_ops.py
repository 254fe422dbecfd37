"""How the kernel backends' ops are registered and called: as ``torch.library`` custom ops under
``torch.compile``, and straight to their Python implementations in eager mode.

A custom op costs tens to hundreds of microseconds per call in eager mode (schema checks, the dispatcher, the
autograd wrapper), as much as the kernel itself at small widths (ViT-Micro's 1,088 tokens of 4 x 64 per
connection). The compiler needs the custom op (an opaque node with a fake
implementation); eager mode does not, so:

- :func:`custom_op` registers ``fn`` as the custom op ``name`` and remembers ``fn``;
- :func:`call` runs an op: the custom op under ``torch.compile``, else ``fn`` itself (for ops without autograd:
  the backward halves, and ops called inside a ``torch.autograd.Function``);
- :func:`register_autograd` registers a backward on the custom op and builds the same backward as a
  ``torch.autograd.Function`` for eager mode; :func:`apply` runs such an op with its autograd (its function
  alone where autograd records nothing).

Both paths run the same function on the same inputs: the same values, bitwise.
"""
import torch
from torch.autograd import forward_ad

_IMPLEMENTATIONS = {}  # custom op -> the Python function it was made from
_EAGER_FUNCTIONS = {}  # custom op -> its torch.autograd.Function for eager mode


def custom_op(name: str, device_types=None):
    """``torch.library.custom_op(name, mutates_args=(), device_types=...)`` that also remembers the function."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=(), device_types=device_types)(fn)
        _IMPLEMENTATIONS[op] = fn
        return op

    return register


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def traced(args) -> bool:
    """Whether a compiler traces this call: torch.compile, or tensor subclasses as inputs (the fake and functional
    tensors of AOT autograd, torch.export, ``torch.library.opcheck``), which the custom op handles."""
    if torch.compiler.is_compiling():
        return True
    for a in args:  # a loop, not any() over a generator: this runs for every op call (micro widths feel it)
        if type(a) not in _PLAIN and isinstance(a, torch.Tensor):
            return True
    return False


def call(op, *args):
    """``op(*args)``: the custom op while a compiler traces, its function otherwise (no autograd)."""
    if traced(args):
        return op(*args)
    return _IMPLEMENTATIONS[op](*args)


def register_autograd(op, backward, setup_context):
    """``op.register_autograd(backward, setup_context=setup_context)``, and the same pair as an autograd
    Function for :func:`apply` in eager mode. ``backward`` should run its ops through :func:`call`."""
    op.register_autograd(backward, setup_context=setup_context)
    fn = _IMPLEMENTATIONS[op]

    def forward(ctx, *args):
        out = fn(*args)
        setup_context(ctx, args, out)
        return out

    _EAGER_FUNCTIONS[op] = type(f"Eager_{fn.__name__}", (torch.autograd.Function,),
                                dict(forward=staticmethod(forward), backward=staticmethod(backward)))


def needs_grad(args) -> bool:
    """Whether autograd records a call on ``args``: grad mode is on and some tensor among them requires grad, or
    forward-mode AD is active (the Functions then refuse it, having no ``jvp``, where the functions alone would
    drop the tangents)."""
    if forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for a in args:  # a loop, as in traced: this runs for every op call
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def apply(op, *args):
    """``op(*args)`` with its registered autograd: the custom op while a compiler traces, else the eager Function,
    or, where autograd records nothing (inference, ``torch.no_grad``), the function itself: the same values
    without building a Function's context (tens of microseconds a call)."""
    if traced(args):
        return op(*args)
    if not needs_grad(args):
        return _IMPLEMENTATIONS[op](*args)
    return _EAGER_FUNCTIONS[op].apply(*args)


def _empty_like(*tensors):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)


def register_stream_post(fwd, bwd):
    """Fakes and autograd for a pair of custom ops ``fwd(X, y, h_res, h_post) -> X_next`` and
    ``bwd(X, y, h_res, h_post, dX_next) -> (dX, dy, dh_res, dh_post)`` (the numba ``bwd`` also takes
    ``form_dX=False``: ``dX`` of no tokens); the forward saves its inputs.
    Returns ``stream_post(X, y, h_res, h_post)``, which runs ``fwd`` with that autograd (see :func:`apply`)."""
    fwd.register_fake(lambda X, y, h_res, h_post: _empty_like(X)[0])
    bwd.register_fake(lambda X, y, h_res, h_post, dout, form_dX=True:
                      _empty_like(X if form_dX else X.new_empty(0, *X.shape[-2:]), y, h_res, h_post))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dout):
        return call(bwd, *ctx.saved_tensors, dout)

    register_autograd(fwd, backward, setup_context)
    return lambda X, y, h_res, h_post: apply(fwd, X, y, h_res, h_post)


def register_logits_op(fwd, bwd):
    """Autograd for a pair of custom ops ``fwd(logits, static) -> out`` and ``bwd(logits, static, dout) ->
    dlogits`` (``Phi``'s ops: ``static`` the Sinkhorn iterations or the permutation factors); the forward saves
    ``logits`` and ``static``. Returns ``op(logits, static)``, which runs ``fwd`` with that autograd (see
    :func:`apply`)."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.static = inputs[1]

    def backward(ctx, dout):
        return call(bwd, *ctx.saved_tensors, ctx.static, dout), None

    register_autograd(fwd, backward, setup_context)
    return lambda logits, static: apply(fwd, logits, static)
