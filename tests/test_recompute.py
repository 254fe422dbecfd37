"""hc_recompute: the connections' saved tensors recomputed in the backward pass give the gradients of plain
autograd (every variant, the torch / numba / Triton-interpreter backends, ViT and ConvNeXt, drop-path, timm's
grad checkpointing, forward_intermediates, torch.compile, DDP), keep less, and bad values are refused."""
import collections
import os
import sys
import textwrap
import subprocess

import pytest
import timm
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import kromhc_vision as kv
from kromhc_vision import recompute
from kromhc_vision.memory import peak_step_bytes, saved_activation_bytes

VARIANTS = ["hc", "mhc", "mhclite", "kromhc"]
VIT = dict(img_size=16, depth=3)  # vit_micro_patch4_32 at 16 px: 17 tokens, 6 connections
CONVNEXT = dict(depths=(2, 1, 3, 1))  # convnext_micro, 7 connections: segments also end at every downsample


def make_pair(name, dtype=torch.float64, recompute_value=True, **kwargs):
    """The same weights (perturbed off the init, so that every coefficient matters) without and with recompute."""
    plain = timm.create_model(name, hc_recompute=False, **kwargs).to(dtype)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    other = timm.create_model(name, hc_recompute=recompute_value, **kwargs).to(dtype)
    other.load_state_dict(plain.state_dict())
    return plain, other


def step_grads(model, x, seed=1, forward=None):
    """Gradients of one training step; ``seed`` fixes drop-path's draws."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = (model if forward is None else forward)(x)
    torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out).mul(out).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, rtol=0.0, atol=1e-12):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture
def recompute_calls(monkeypatch):
    """How many segment recomputations ran (a test of recomputation must see some)."""
    calls = []
    original = recompute._Segment.recompute

    def counted(self):
        calls.append(len(self.conns))
        return original(self)

    monkeypatch.setattr(recompute._Segment, "recompute", counted)
    return calls


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_gradients_equal_without_recompute_float64(family, variant, backend, recompute_calls):
    if family == "vit":
        name, kwargs, x = f"vit_micro_patch4_32_{variant}", VIT, torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        name, kwargs, x = f"convnext_micro_{variant}", CONVNEXT, torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain, rec = make_pair(name, hc_backend=backend, drop_path_rate=0.3, **kwargs)
    assert rec.hc_recompute_length == 2  # round(sqrt(4 * 6 / 6)), round(sqrt(4 * 7 / 6))
    expected = step_grads(plain, x)
    assert not recompute_calls
    assert_same_grads(expected, step_grads(rec, x))
    # ViT: 3 segments of 2; ConvNeXt: stages of 2, 1, 3, 1 connections -> segments 2 | 1 | 2, 1 | 1 (a segment of
    # one connection keeps its start state, and H_res with what Phi saved where that is at most a quarter of y:
    # nothing to recompute there; per token, H_res with Phi's saves: HC 0 new values (a view of a_res), mHC 16
    # (either Sinkhorn saves only the logits, kept anyway), KromHC 28 and mHC-lite 40 (PyTorch) or 16 (numba: its
    # kernels keep only the logits), against C / 4 = 8, 16, 32, 64 by stage
    if family == "vit":
        assert sorted(recompute_calls) == [2, 2, 2]
    else:
        single = {"hc": 0, "mhc": 0, "kromhc": 1, "mhclite": 2}[variant] if backend == "torch" else 0
        assert sorted(recompute_calls) == [1] * single + [2, 2]


def test_gradients_equal_float32_and_every_segment_length(recompute_calls):
    x = torch.randn(2, 3, 16, 16)
    plain, _ = make_pair("vit_micro_patch4_32_kromhc", torch.float32, **VIT)
    expected = step_grads(plain, x)
    for length in (1, 4, 6, 100):
        plain.set_hc_recompute(length)
        assert plain.hc_recompute_length == length
        assert_same_grads(expected, step_grads(plain, x), rtol=1e-6, atol=1e-7)
    # segments of 1 keep their start states and KromHC's H_res (16 values per token: numba's Phi keeps only the
    # logits, kept anyway; a quarter of y's 64): nothing runs again for them
    assert recompute_calls == [2, 4] + [6] + [6]


@pytest.mark.parametrize("length", [2, 3])
def test_a_state_changed_in_place_between_connections_starts_a_segment(length):
    """A forward hook that changes a block's output in place (plain autograd allows it): the next connection must
    not chain onto the post step that made it, whose recomputation would rebuild the state without the change.
    Before the fix, a block boundary inside a segment (length 3) gave gradients off by up to ~2."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", recompute_value=length, **VIT)
    for model in (plain, rec):
        model.blocks[1].register_forward_hook(lambda module, args, out: out.mul_(1.5))
    assert_same_grads(step_grads(plain, x), step_grads(rec, x))


@pytest.mark.parametrize("keep_res", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_what_the_backward_runs_again(variant, keep_res, monkeypatch):
    """Where ``H_res`` is kept (it and what ``Phi`` saved within ``1 / RES_KEEP_WIDTH_RATIO`` of ``y``'s bytes;
    here forced both ways by that ratio) the backward pass runs no ``Phi`` and, per
    segment of ``L_r`` connections, ``L_r - 1`` post steps (the last one's output is the next segment's start);
    elsewhere ``Phi`` and every post step run again. The gradients are the same either way."""
    monkeypatch.setattr(recompute, "RES_KEEP_WIDTH_RATIO", 0 if keep_res else 10 ** 9)
    plain, rec = make_pair(f"vit_micro_patch4_32_{variant}", **VIT)  # 6 connections, segments of 2
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = step_grads(plain, x)
    calls = {"phi": 0, "post": 0}
    cls = type(rec.blocks[0].hc_attn)
    res_matrix, stream_post = cls.res_matrix, kv.ops.dispatch.stream_post

    def count(name, fn):
        def counted(*args, **kwargs):  # stream_post takes checked=
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(cls, "res_matrix", count("phi", res_matrix))
    monkeypatch.setattr(kv.ops.dispatch, "stream_post", count("post", stream_post))
    assert_same_grads(expected, step_grads(rec, x))
    # forward: 6 of each; backward: 3 post steps (kept H_res) or 6 post steps and 6 Phi; HC's H_res, a view of
    # a_res, costs nothing to keep: it is kept either way
    if keep_res or variant == "hc":
        assert calls == {"phi": 6, "post": 9}
    else:
        assert calls == {"phi": 12, "post": 12}


def test_state_copies_a_post_step_saves_are_recomputed(monkeypatch):
    """A post step that saves a tensor made from the state (here the reference op on a bfloat16 state saves its
    float32 copy) gets it back by recomputation, with grad: the gradients equal plain autograd's bit for bit."""
    from kromhc_vision.ops import reference
    monkeypatch.setattr(recompute, "RES_KEEP_WIDTH_RATIO", 0)  # H_res kept: only the state's copy is recomputed
    monkeypatch.setattr(kv.ops.dispatch, "stream_post", lambda X, y, h_res, h_post, backend=None, checked=True:
                        reference.stream_post(X, y, h_res, h_post))
    plain, rec = make_pair("vit_micro_patch4_32_mhc", torch.bfloat16, **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    segments = []
    original = recompute._Segment.recompute
    monkeypatch.setattr(recompute._Segment, "recompute", lambda self: segments.append(self) or original(self))
    assert_same_grads(step_grads(plain, x), step_grads(rec, x), atol=0.0)
    # both post steps of each segment of 2 saved a copy (by position), so both run again
    assert len(segments) == 3 and all(seg.posts_to_run() == 2 and all(link.positional for link in seg.links)
                                 for seg in segments)


def test_triton_interpreter_gradients_equal(recompute_calls):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    pytest.importorskip("triton")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    plain, rec = make_pair("vit_micro_patch4_32_mhc", hc_backend="triton", img_size=8, depth=1, num_streams=2,
                           recompute_value=2)
    assert_same_grads(step_grads(plain, x), step_grads(rec, x))
    assert recompute_calls == [2]


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_composes_with_grad_checkpointing_and_forward_intermediates(family):
    if family == "vit":
        plain, rec = make_pair("vit_micro_patch4_32_kromhc", drop_path_rate=0.3, **VIT)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        plain, rec = make_pair("convnext_micro_mhclite", drop_path_rate=0.3, **CONVNEXT)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def intermediates(model):
        def forward(x):
            final, inter = model.forward_intermediates(x)
            return torch.cat([final.flatten(), *[t.flatten() for t in inter]])
        return forward

    expected = step_grads(plain, x)
    expected_inter = step_grads(plain, x, forward=intermediates(plain))
    assert_same_grads(expected_inter, step_grads(rec, x, forward=intermediates(rec)))
    rec.set_grad_checkpointing(True)
    assert_same_grads(expected, step_grads(rec, x))
    assert_same_grads(expected_inter, step_grads(rec, x, forward=intermediates(rec)))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_composes_with_a_users_checkpoint_around_blocks(backend, recompute_calls):
    """A user's non-reentrant ``torch.utils.checkpoint`` around a block (torch's default, FSDP's
    ``checkpoint_wrapper``), timm's ``set_grad_checkpointing`` not used: the connections inside run plain (the
    checkpoint recomputes them; a session's hooks there hid their saves from it, and its recomputation, without a
    session, saved more tensors: CheckpointError). ViT-Micro at 16 px, 3 blocks (6 connections), block 1
    checkpointed, float64: gradients equal those without recomputation, and blocks 0 and 2 are still recomputed."""
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", hc_backend=backend, **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = step_grads(plain, x)
    block = rec.blocks[1]
    forward = block.forward
    block.forward = lambda X: torch.utils.checkpoint.checkpoint(forward, X, use_reentrant=False)
    assert_same_grads(expected, step_grads(rec, x))
    assert recompute_calls == [2, 2], recompute_calls  # blocks 0 and 2: their own segments, the chain broken


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_what_segments_keep_goes_through_a_users_saved_tensor_hooks(backend, recompute_calls, monkeypatch):
    """A user's saved-tensor hooks around the forward pass (``save_on_cpu``, offloading, compression) get what the
    segments keep, as they get every save without recomputation: the session's hooks, innermost, took the branch
    outputs, start states and coefficients from them (left on the GPU under ``save_on_cpu``). ViT-Micro at 16 px,
    3 blocks, float64: hooks that pack a copy in a box see every branch output (the attention's and MLP's outputs)
    and every tensor a segment holds, the backward unpacks only their boxes, and the gradients equal those
    without hooks and without recomputation; under ``save_on_cpu`` on CPU they are the same bitwise."""
    observed = set()
    monkeypatch.setattr(recompute, "_keep_observers", [lambda t: observed.add(t.untyped_storage().data_ptr())])
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", hc_backend=backend, **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected, without_hooks = step_grads(plain, x), step_grads(rec, x)
    branch_tensors, packed, unpacked = [], set(), []
    for block in rec.blocks:
        for branch in (block.attn, block.mlp):  # y itself: no layer scale, no drop-path
            # the tensors held, not just their addresses: the boxes below hold copies, so a branch output freed
            # after the forward could lend its address to a later one (5 distinct addresses for 6 outputs)
            branch.register_forward_hook(lambda m, a, out: branch_tensors.append(out))

    def pack(t):
        packed.add(t.untyped_storage().data_ptr())
        return ["box", t.clone()]

    def unpack(box):
        assert box[0] == "box"
        unpacked.append(box)
        return box[1]

    def under(hooks):
        def forward(x):
            with hooks():
                return rec(x)
        return forward

    observed.clear()
    assert_same_grads(expected, step_grads(rec, x, forward=under(lambda: torch.autograd.graph.saved_tensors_hooks(
        pack, unpack))))
    branch_outputs = {t.untyped_storage().data_ptr() for t in branch_tensors}
    assert len(branch_outputs) == 6 and branch_outputs <= packed, "a branch output bypassed the outer hooks"
    branch_tensors.clear()
    assert observed and observed <= packed, "a tensor a segment keeps bypassed the outer hooks"
    assert unpacked and recompute_calls
    save_on_cpu = under(lambda: torch.autograd.graph.save_on_cpu(pin_memory=False))
    assert_same_grads(without_hooks, step_grads(rec, x, forward=save_on_cpu), atol=0)
    assert_same_grads(expected, step_grads(rec, x, forward=save_on_cpu))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_outer_hooks_see_the_parameters_a_segment_keeps_as_parameters(backend):
    """Offloading hooks skip parameters (torchtune's: ``isinstance(t, nn.Parameter)``); what a segment kept reached
    them detached, plain tensors, so that they copied every connection's weights. They see the same parameters as
    without recomputation."""
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", hc_backend=backend, **VIT)

    def parameters_packed(model):
        seen = set()

        def pack(t):
            if isinstance(t, torch.nn.Parameter):
                seen.add(id(t))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()
        return {name for name, p in model.named_parameters() if id(p) in seen}

    assert parameters_packed(rec) == parameters_packed(plain) and any('hc_' in n for n in parameters_packed(rec))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_outer_hooks_pack_what_a_segment_keeps_once(backend):
    """Under outer hooks a branch output was packed twice (kept for the recomputation, and saved by the post step)
    and so were parameters two ops save: ``save_on_cpu`` copied each twice. Each branch output and each connection
    parameter is packed once now; the gradients stay those without recomputation."""
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", hc_backend=backend, **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = step_grads(plain, x)
    outputs, packs = [], collections.Counter()  # the outputs held: no other tensor takes their addresses
    for block in rec.blocks:
        for branch in (block.attn, block.mlp):
            branch.register_forward_hook(lambda m, a, out: outputs.append(out))
    connection_parameters = {p.untyped_storage().data_ptr() for n, p in rec.named_parameters() if '.hc_' in n}

    held = []  # what was packed, held: no address is reused during the forward pass, counts are per tensor

    def pack(t):
        held.append(t)
        packs[t.untyped_storage().data_ptr()] += 1
        return t.clone()

    def forward(x):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return rec(x)
    assert_same_grads(expected, step_grads(rec, x, forward=forward))
    assert len(outputs) == 6 and [packs[y.untyped_storage().data_ptr()] for y in outputs] == [1] * 6
    assert {packs[k] for k in connection_parameters} <= {0, 1}  # (scale and bias: only their gathered copies)


def test_outer_hooks_that_copy_pack_no_more_than_hooks_that_keep():
    """Hooks that copy what they pack (save_on_cpu on a GPU, a user's offloading) free the tensors a segment keeps:
    a later tensor at a freed one's address was taken for a kept one (packed, not recomputed: more offloaded). The
    tensors packed are those that hooks keeping the tensors (no address reused) see, for several batch sizes."""
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32_kromhc", hc_backend="torch", hc_recompute=12, img_size=16, depth=6)

    def packed(batch, copy):
        shapes = []

        def pack(t):
            shapes.append((tuple(t.shape), t.dtype))
            return t.clone() if copy else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(batch, 3, 16, 16))
        out.sum().backward()
        return sorted(shapes, key=str)

    for batch in range(1, 5):
        assert packed(batch, copy=True) == packed(batch, copy=False), batch


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_parameter_changed_in_place_before_the_backward_raises(variant, backend):
    """Saved-tensor hooks take autograd's version check away; the segments make it: a connection's parameter
    (``proj_weight (n C, 2n + m)`` of the last block's MLP connection) changed in place between the forward and the
    backward pass (an optimizer step before a second loss's backward) raises autograd's error, as without
    recomputation, instead of gradients from the changed weights. ViT-Micro at 16 px, 3 blocks, float64."""
    for model in make_pair(f"vit_micro_patch4_32_{variant}", hc_backend=backend, **VIT):
        loss = model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).square().sum()
        with torch.no_grad():
            model.blocks[2].hc_mlp.proj_weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_second_backward_with_retain_graph_recomputes_again(variant, recompute_calls, monkeypatch):
    """HC: only states are recomputed; mHC with nothing of Phi kept: Phi's saves are placeholders by position
    too, and each backward gets them again."""
    if variant == "mhc":
        monkeypatch.setattr(recompute, "RES_KEEP_WIDTH_RATIO", 10 ** 9)
    plain, rec = make_pair(f"vit_micro_patch4_32_{variant}", hc_backend="torch", **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for model in (plain, rec):
        model.zero_grad(set_to_none=True)
        loss = model(x).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_grads({k: p.grad for k, p in plain.named_parameters()},
                      {k: p.grad for k, p in rec.named_parameters()})
    assert recompute_calls == [2, 2, 2] * 2


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_backward_in_inference_mode_recomputes(backend, recompute_calls, monkeypatch):
    """A backward pass run under ``torch.inference_mode()`` (plain autograd's runs there) recomputes outside it: its
    post steps with placeholders by position (H_res not kept) saved inference tensors, which autograd refuses."""
    monkeypatch.setattr(recompute, "RES_KEEP_WIDTH_RATIO", 10 ** 9)
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", hc_backend=backend, **VIT)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for model in (plain, rec):
        model.zero_grad(set_to_none=True)
        loss = model(x).square().sum()
        with torch.inference_mode():
            loss.backward()
    assert_same_grads({k: p.grad for k, p in plain.named_parameters()},
                      {k: p.grad for k, p in rec.named_parameters()})
    assert recompute_calls == [2, 2, 2]


@pytest.mark.slow  # a minute of compiling on 2 busy cores
def test_torch_compile_gradients_equal():
    """Under torch.compile the session is off (the compiler chooses what to recompute): compiled with and
    without hc_recompute are identical, and equal eager to float32 rounding."""
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", torch.float32, img_size=16, depth=2)
    x = torch.randn(2, 3, 16, 16)
    eager = step_grads(plain, x)
    compiled = step_grads(rec, x, forward=torch.compile(rec, fullgraph=True))
    compiled_plain = step_grads(plain, x, forward=torch.compile(plain, fullgraph=True))
    assert_same_grads(compiled_plain, compiled, atol=0)
    assert_same_grads(eager, compiled, rtol=1e-4, atol=1e-5)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, timm
    import kromhc_vision
    rank = int(sys.argv[1]); out = sys.argv[2]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    grads = []
    for value in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('vit_micro_patch4_32_mhc', img_size=16, depth=2, drop_path_rate=0.2,
                                  hc_recompute=value).double()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(10 + rank)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        ddp(x).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    worst = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    with open(out + str(rank), 'w') as f:
        f.write(repr(worst))
""")


@pytest.mark.slow  # two fresh interpreters importing torch and timm
def test_ddp_two_gloo_processes_gradients_equal(tmp_path):
    script = tmp_path / "ddp.py"
    from _scripts import END_DDP_SCRIPT
    script.write_text(DDP_SCRIPT + END_DDP_SCRIPT)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "out"), port], env=env)
             for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    for r in range(2):
        assert float((tmp_path / f"out{r}").read_text()) <= 1e-12


@pytest.mark.parametrize("variant, backend", [("mhclite", "torch"), ("kromhc", "numba")])
def test_what_segments_hold_is_counted_as_saved(variant, backend, monkeypatch):
    """``saved_activation_bytes`` counts every storage a segment holds until the backward pass: its start state and
    each connection's branch output and coefficients (the PyTorch mHC-lite's ``a_res``, held where ``H_res`` is not
    kept, a view of all the coefficients, was not counted: 3 % of the model's saves)."""
    segments = []
    original = recompute._Segment.__init__

    def init(self, *args):
        original(self, *args)
        segments.append(self)

    monkeypatch.setattr(recompute._Segment, "__init__", init)
    observed = set()
    monkeypatch.setattr(recompute, "_keep_observers", [lambda t: observed.add(t.untyped_storage().data_ptr())])
    model = timm.create_model(f"vit_micro_patch4_32_{variant}", hc_backend=backend, hc_recompute=2, **VIT)
    assert saved_activation_bytes(model, torch.randn(2, 3, 16, 16)) > 0
    held = {t.untyped_storage().data_ptr() for seg in segments
            for t in [seg.start.value] + [link.y[0].value for link in seg.links]
            + [c[0].value for link in seg.links for c in link.coefs if c is not None]}
    assert len(segments) == 3 and held <= observed


def test_keeps_less_and_only_in_training_with_grad():
    plain, rec = make_pair("vit_micro_patch4_32_kromhc", torch.float32, **VIT)
    x = torch.randn(2, 3, 16, 16)
    saved_plain, saved_rec = saved_activation_bytes(plain, x), saved_activation_bytes(rec, x)
    # per token and connection, plain keeps the state (4 x 64) and what the branch needs; with segments of 2,
    # every other connection's state goes
    assert saved_rec < saved_plain - 2 * 17 * 4 * 64 * 4 * 2
    after_forward, peak = peak_step_bytes(rec, x)
    assert after_forward < peak_step_bytes(plain, x)[0] and peak > after_forward
    seen = []
    rec.blocks[0].mlp.register_forward_hook(lambda *a: seen.append(recompute.active_session()))
    rec.eval()
    rec(x)
    rec.train()
    with torch.no_grad():
        rec(x)
    rec(x)
    assert seen[:2] == [None, None] and isinstance(seen[2], recompute.RecomputeSession)


@pytest.mark.parametrize("variant,backend", [("mhc", "torch"), ("mhc", "numba"), ("mhclite", "torch"),
                                             ("kromhc", "torch"), ("kromhc", "numba")])
def test_what_phi_saves_is_kept_only_when_small(variant, backend, monkeypatch):
    """With recomputation a connection keeps H_res and what its map Phi saved only where these come to at most a
    quarter of the branch output y (C / 4 values per token), whatever Phi saves (PyTorch's Sinkhorn saved its 41
    iterates until it kept only its logits; they were kept where the width alone allowed H_res, C >= 4 n^2)."""
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    model = timm.create_model(f"vit_micro_patch4_32_{variant}", hc_backend=backend, **VIT)
    saved = saved_activation_bytes(model, x)
    monkeypatch.setattr(recompute, "RES_KEEP_WIDTH_RATIO", 10 ** 9)  # nothing Phi makes is kept
    tokens, connections, C = 2 * 17, 6, 64
    assert saved <= saved_activation_bytes(model, x) + connections * tokens * (C // 4) * 4


def saved_shapes(model, x):
    """Shapes of the tensors autograd saves in ``model(x)`` (hooks outside hc_recompute's, which see them first)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return shapes


def test_convnext_downsample_keeps_only_its_folded_input_and_is_counted(monkeypatch):
    """Under hc_recompute a downsample keeps only the folded streams it reads (n C per token over B n images, by
    its checkpoint), not its norm's and conv's two tensors of that size, nor the stream state it was folded from;
    saved_activation_bytes counts what the checkpoint keeps."""
    plain, rec = make_pair("convnext_micro_kromhc", torch.float32, **CONVNEXT)
    B, x = 2, torch.randn(2, 3, 32, 32)
    dims, sizes = (32, 64, 128), (32, 16, 8)  # convnext_micro's widths and resolutions at its three downsamples
    folded = [s for s in saved_shapes(rec, x) if len(s) == 4 and s[0] == B * rec.num_streams]
    assert folded == [(B * 4, c, h, h) for c, h in zip(dims, sizes)], folded  # one each: the checkpoint's input
    assert sum(len(s) == 4 and s[0] == B * 4 for s in saved_shapes(plain, x)) >= 2 * len(dims)  # norm + conv's
    dropped = sum(2 * B * 4 * c * h * h * 4 for c, h in zip(dims, sizes))  # norm input + conv input, float32
    kept = sum(B * 4 * c * h * h * 4 for c, h in zip(dims, sizes))  # the checkpoints' inputs
    saved_plain, saved_rec = saved_activation_bytes(plain, x), saved_activation_bytes(rec, x)
    assert saved_rec < saved_plain - dropped + kept
    # the checkpoints' inputs are in the count (non-reentrant checkpoint saves its inputs through autograd), and
    # the stream states the downsamples read are freed (nothing keeps them once their stage has run)
    states, folds = [], []
    convnext_hc = sys.modules["kromhc_vision.models.convnext_hc"]
    stage_forward, fold = convnext_hc._stage_forward, convnext_hc._fold_streams
    monkeypatch.setattr(convnext_hc, "_stage_forward",
                        lambda stage, X: states.append(StorageWeakRef(X.untyped_storage())) or stage_forward(stage, X))
    monkeypatch.setattr(convnext_hc, "_fold_streams", lambda X: folds.append(fold(X)) or folds[-1])
    counted = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: counted.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = rec(x)
    assert len(folds) == 3 and {f.untyped_storage().data_ptr() for f in folds} <= set(counted)
    del folds
    assert len(states) == 4 and all(ref.expired() for ref in states[1:]), "a downsampled stream state is kept"
    out.sum().backward()  # and the backward runs from what was kept


def test_convnext_downsample_of_the_broadcast_stem_output_keeps_the_broadcast(recompute_calls):
    """With ``patch_size=2`` stage 0 downsamples the stem's output broadcast over the streams (C values per token):
    under hc_recompute the fold runs inside the checkpoint, which keeps the broadcast view, not a copy of n C;
    the gradients are those without recomputation."""
    plain, rec = make_pair("convnext_micro_kromhc", **dict(CONVNEXT, patch_size=2))
    assert not isinstance(rec.stages[0].downsample, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    folded_stage0 = (2 * 4, 32, 16, 16)
    assert folded_stage0 in saved_shapes(plain, x)
    assert folded_stage0 not in saved_shapes(rec, x)
    assert_same_grads(step_grads(plain, x), step_grads(rec, x))
    assert recompute_calls


def test_runtime_setting_leaves_state_dict_and_model_args_alone():
    a = timm.create_model("convnext_micro_kromhc", hc_recompute=False)
    b = timm.create_model("convnext_micro_kromhc", hc_recompute=3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert kv.hc_model_args(a) == kv.hc_model_args(b) and "hc_recompute" not in kv.hc_model_args(b)
    assert b.hc_recompute == 3 and b.hc_recompute_length == 3


@pytest.mark.parametrize("name", ["vit_micro_patch4_32_kromhc", "convnext_atto_kromhc"])
def test_pruned_models_segment_length_follows_the_connections_left(name):
    """``prune_intermediate_layers`` (which timm's features_only getter calls) removes blocks: ``hc_recompute=True``
    picks ``L_r`` for the connections left (it kept the full depth's)."""
    model = timm.create_model(name)
    assert len(model.hc_connections()) == 12 and model.hc_recompute_length == 3
    model.prune_intermediate_layers([1])  # blocks (ViT) or stages (ConvNeXt) 0 and 1 stay
    left = len(model.hc_connections())
    assert left == 4
    assert model.hc_recompute_length == recompute.segment_length(True, left, 4)


def test_default_segment_length_follows_the_depth():
    def length(name, **kwargs):
        return timm.create_model(name, device="meta", **kwargs).hc_recompute_length

    assert length("vit_tiny_patch16_224_kromhc") == 4  # sqrt(4 * 24 / 6)
    assert length("vit_tiny_patch16_224_hc", num_streams=8) == 4  # sqrt(8 * 24 / 10) = 4.38
    assert length("convnext_atto_mhc") == 3  # sqrt(4 * 12 / 6) = 2.83
    assert timm.create_model("vit_micro_patch4_32_residual", hc_recompute=True).hc_recompute_length == 0
    assert recompute.segment_length(True, 24, 4) == 4 and recompute.segment_length(False, 24, 4) == 0


@pytest.mark.parametrize("value", [0, -2, 1.5, "True", [2]])  # None: timm's create_model drops it (the default)
@pytest.mark.parametrize("base", ["vit_micro_patch4_32", "convnext_micro"])
def test_bad_values_are_refused_before_any_work(monkeypatch, base, value):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was built before hc_recompute was checked")

    monkeypatch.setattr(timm.models.vision_transformer.VisionTransformer, "__init__", no_work)
    monkeypatch.setattr(timm.models.convnext.ConvNeXt, "__init__", no_work)
    with pytest.raises(ValueError) as e:
        timm.create_model(f"{base}_kromhc", hc_recompute=value)
    assert repr(value) in str(e.value) and "False, True" in str(e.value) and "int L_r >= 1" in str(e.value)
    monkeypatch.undo()
    model = timm.create_model(f"{base}_kromhc")
    with pytest.raises(ValueError, match="hc_recompute must be"):
        model.set_hc_recompute(value)


def test_a_forward_without_backward_frees_its_graph(monkeypatch):
    """The segments hold their tensors detached: no reference cycle through the autograd graph keeps a graph
    alive whose backward never runs (a forward with grad, e.g. saved_activation_bytes)."""
    import gc
    import weakref
    segments = []
    original = recompute._Segment.__init__

    def tracked(self, *args):
        original(self, *args)
        segments.append(weakref.ref(self))

    monkeypatch.setattr(recompute._Segment, "__init__", tracked)
    model = timm.create_model("vit_micro_patch4_32_kromhc", **VIT)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.requires_grad and len(segments) == 3
    del out
    gc.collect()
    assert [ref() for ref in segments] == [None] * 3


@pytest.mark.parametrize("recompute_value", [False, True])
def test_gradients_of_later_parameters_only_free_the_graph(recompute_value):
    """``torch.autograd.grad`` with respect to the last block's parameters only (the numba pre steps' backwards do
    not run): the numba post steps' link to their pre steps held the graph in a cycle through C++ (the saved
    ``H_res`` with its grad_fn), which leaked the input and every activation of each such call."""
    import gc
    import weakref
    model = timm.create_model("vit_micro_patch4_32_kromhc", hc_backend="numba", hc_recompute=recompute_value, **VIT)
    params = [p for name, p in model.named_parameters() if name.startswith("blocks.2.mlp.")]
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    torch.autograd.grad(model(x).square().sum(), params)
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None


def test_training_steps_do_not_accumulate_tensors():
    """Nothing of a step's recomputation outlives it (a saved output holding its own grad_fn leaked the
    recomputed tensors of every step)."""
    import gc
    model = timm.create_model("vit_micro_patch4_32_mhc", **VIT)
    x = torch.randn(2, 3, 16, 16)

    def is_tensor(o):
        try:
            return isinstance(o, torch.Tensor)
        except ReferenceError:  # a weakref.proxy whose object died (numba's for the libraries of freed functions)
            return False

    def live_tensors():
        gc.collect()
        return sum(is_tensor(o) for o in gc.get_objects())

    counts = []
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        counts.append(live_tensors())
    # A leak adds the same tensors every step; a one-off lazy cache (or another test's thread) does not.
    assert counts[-1] <= counts[2], counts
