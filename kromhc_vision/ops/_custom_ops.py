"""What the kernel backends' ``stream_post`` custom ops share: their fake (shape-only) implementations
and their autograd registration."""
import torch


def _empty_like(*tensors):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)


def register_stream_post(fwd, bwd):
    """Fakes and autograd for a pair of custom ops ``fwd(X, y, h_res, h_post) -> X_next`` and
    ``bwd(X, y, h_res, h_post, dX_next) -> (dX, dy, dh_res, dh_post)``; the forward saves its inputs."""
    fwd.register_fake(lambda X, y, h_res, h_post: _empty_like(X)[0])
    bwd.register_fake(lambda X, y, h_res, h_post, dout: _empty_like(X, y, h_res, h_post))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dout):
        return bwd(*ctx.saved_tensors, dout)

    fwd.register_autograd(backward, setup_context=setup_context)
