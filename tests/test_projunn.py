"""projUNN optimizer: exactness against the dense formulas, the samplers, rank deficiency, stacks, timm's factory,
determinism across ranks, projection at start, EMA re-projection, state_dict resume, bad input."""
import copy
import re

import pytest
import timm
import torch
from torch import nn

import kromhc_vision  # noqa: F401  (registers the projunn* optimizers)
from kromhc_vision.optim import (
    MODES, PROJUNN_BASES, SAMPLERS, ProjUNN, lowrank_factors, mark_orthogonal, orthogonal_param_groups,
    orthogonality_error, polar, project_orthogonal_, square_blocks,
)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _orthogonal(n, dtype, gen, batch=()):
    return torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64, generator=gen))[0].to(dtype)


def _lowrank(n, r, dtype, gen):
    return (torch.randn(n, r, dtype=torch.float64, generator=gen)
            @ torch.randn(r, n, dtype=torch.float64, generator=gen)).to(dtype)


def _reference(u, delta, mode):
    """The dense updates: ``U expm(½(UᵀΔ − ΔᵀU))`` (tangent) and ``polar(U + Δ)`` (direct), float64."""
    u, delta = u.double(), delta.double()
    if mode == 'tangent':
        return u @ torch.linalg.matrix_exp(0.5 * (u.mT @ delta - delta.mT @ u))
    return polar(u + delta)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('sampler', SAMPLERS)
@pytest.mark.parametrize('k,step_rank', [(1, 1), (4, 4), (4, 2)])  # (4, 2): rank-deficient step
def test_sgd_steps_equal_dense_update(dtype, mode, sampler, k, step_rank):
    gen = torch.Generator().manual_seed(k * 10 + step_rank)
    n, lr = 16, 0.05
    w = nn.Parameter(_orthogonal(n, dtype, gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=lr, mode=mode, rank=k, sampler=sampler)
    expected = w.detach().double().clone()
    for _ in range(3):
        grad = _lowrank(n, step_rank, dtype, gen)
        w.grad = grad.clone()
        opt.step()
        expected = _reference(expected, -lr * grad.double(), mode)
        assert (w.detach().double() - expected).abs().max().item() < TOL[dtype]
        assert orthogonality_error(w) < TOL[dtype]


@pytest.mark.parametrize('mode', MODES)
def test_full_rank_step_is_approximated_not_exact_but_stays_orthogonal(mode):
    gen = torch.Generator().manual_seed(1)
    n = 16
    w = nn.Parameter(_orthogonal(n, torch.float64, gen))
    opt = ProjUNN([w], base='adamw', lr=1e-2, mode=mode, rank=2)  # untagged list: nothing orthogonal ...
    assert not any(g['orthogonal'] for g in opt.param_groups)
    mark_orthogonal(_Holder(w), 'w')
    opt = ProjUNN([w], base='adamw', lr=1e-2, mode=mode, rank=2)  # ... tagged: split into an orthogonal group
    assert opt.param_groups[0]['orthogonal'] and opt.param_groups[0]['weight_decay'] == 0.
    start = w.detach().clone()
    for _ in range(50):
        w.grad = torch.randn(n, n, dtype=torch.float64, generator=gen)
        opt.step()
    assert orthogonality_error(w) < 1e-12
    assert (w.detach() - start).abs().max() > 1e-2  # it moved


@pytest.mark.parametrize('gap', [1e-3, 1e-5, 0.])
def test_direct_step_near_singular_stays_orthogonal_in_float32(gap):
    """``U + G`` with ``σ_min = gap`` (a rank-1 step cancelling all but ``gap`` of a direction of ``U``): the
    float32 step stays orthogonal (``1 + Λ`` from ``eigh(H)`` squared the condition number: 0.2 off at 1e-3)
    and, while ``U + G`` is nonsingular, equals ``polar(U + G)``; SGD-momentum steps do not blow up."""
    gen = torch.Generator().manual_seed(1)
    n = 16
    u = _orthogonal(n, torch.float64, gen)
    x = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    x /= x.norm()
    w = nn.Parameter(u.float())
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=1.0, mode='direct', rank=1)
    w.grad = ((1 - gap) * (u @ x) @ x.mT).float()  # step -grad: U + G = U (I - (1 - gap) x xᵀ)
    opt.step()
    assert orthogonality_error(w) < 1e-5
    if gap:
        assert (w.detach().double() - polar(u + w.grad.double().neg())).abs().max() < 1e-5
    w = nn.Parameter(_orthogonal(32, torch.float32, gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.05, momentum=0.9, mode='direct', rank=4)
    for _ in range(100):
        w.grad = torch.randn(32, 32, generator=gen)
        opt.step()
    assert orthogonality_error(w) < 1e-4


class _Holder(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w


@pytest.mark.parametrize('shape', [(48, 16), (16, 32), (3, 16, 16)])
def test_stacks_of_square_blocks_step_block_by_block(shape):
    gen = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(*shape, dtype=torch.float64, generator=gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.2, rank=2, mode='direct')
    start = square_blocks(w.detach()).clone()
    assert (start.mT @ start - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12  # projected when built
    grads = torch.stack([_lowrank(16, 2, torch.float64, gen) for _ in range(start.shape[0])])
    g = torch.zeros_like(w)
    square_blocks(g).copy_(grads)
    w.grad = g
    opt.step()
    for j in range(start.shape[0]):
        assert (square_blocks(w.detach())[j] - _reference(start[j], -0.2 * grads[j], 'direct')).abs().max() < 1e-12


def test_square_blocks_layout_and_refusals():
    w = torch.arange(2 * 4 * 2, dtype=torch.float64).reshape(2, 8)  # (N, 4N) with N = 2: 4 column blocks
    assert torch.equal(square_blocks(w)[1], w[:, 2:4])
    w = torch.arange(6 * 2, dtype=torch.float64).reshape(6, 2)
    assert torch.equal(square_blocks(w)[2], w[4:6])
    for bad in [(5, 3), (4,), (2, 3, 4)]:
        with pytest.raises(ValueError, match='orthogonal weight'):
            square_blocks(torch.zeros(bad))


def test_blocks_of_one_element_are_refused():
    """A 1x1 convolution weight (C, C, 1, 1), or an (N, 1) column, is a stack of 1x1 blocks by shape, whose
    polar factors are ±1: the weight would silently become a sign pattern."""
    for bad in [(4, 4, 1, 1), (3, 1), (1, 5), (1, 1)]:
        with pytest.raises(ValueError, match=r'1x1 blocks.*' + re.escape(str(bad))):
            square_blocks(torch.zeros(bad))
    with pytest.raises(ValueError, match='1x1 blocks'):
        orthogonal_param_groups(nn.Sequential(nn.Conv2d(4, 4, 1)), modules=(nn.Conv2d,))


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_zero_step_keeps_weight_and_sampler_drops_null_directions(sampler):
    gen = torch.Generator().manual_seed(3)
    delta = _lowrank(20, 2, torch.float64, gen)
    a, b = lowrank_factors(delta[None], rank=6, sampler=sampler, generator=gen)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a @ b.mT - delta).abs().max() < 1e-12
    assert torch.linalg.matrix_rank(b[0] if sampler == 'lsi' else a[0]).item() == 2  # 4 directions dropped
    a, b = lowrank_factors(torch.zeros(1, 20, 20, dtype=torch.float64), rank=3, sampler=sampler, generator=gen)
    assert (a == 0).all() or (b == 0).all()
    for mode in MODES:
        w = nn.Parameter(_orthogonal(20, torch.float64, gen))
        start = w.detach().clone()
        opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.1, mode=mode, sampler=sampler, rank=3)
        w.grad = torch.zeros_like(w)
        opt.step()
        assert (w.detach() - start).abs().max() < 1e-14


def test_rank_k_approximation_keeps_the_dominant_directions():
    gen = torch.Generator().manual_seed(4)
    n = 32
    delta = _lowrank(n, 3, torch.float64, gen) + 1e-3 * torch.randn(n, n, dtype=torch.float64, generator=gen)
    for sampler in SAMPLERS:
        a, b = lowrank_factors(delta[None], rank=3, sampler=sampler, generator=gen)
        kept = torch.linalg.matrix_norm(a @ b.mT).item() / torch.linalg.matrix_norm(delta).item()
        assert 0.99 < kept <= 1.0 + 1e-12


def _tiny_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    mark_orthogonal(model[0])
    mark_orthogonal(model[2])
    return model


def test_timm_factory_builds_projunn_itself_with_base_defaults_and_no_decay_on_orthogonal():
    model = _tiny_model()
    opt = timm.optim.create_optimizer_v2(model, opt='projunnadamw', lr=1e-3, weight_decay=0.05, mode='direct',
                                         rank=2, sampler='column')
    assert type(opt) is ProjUNN and type(opt.base) is torch.optim.AdamW
    assert (opt.defaults['mode'], opt.defaults['rank'], opt.defaults['sampler']) == ('direct', 2, 'column')
    orth = [g for g in opt.param_groups if g['orthogonal']]
    assert {id(p) for g in orth for p in g['params']} == {id(model[0].weight), id(model[2].weight)}
    assert all(g['weight_decay'] == 0. for g in orth)
    assert any(g['weight_decay'] == 0.05 for g in opt.param_groups if not g['orthogonal'])  # model[4].weight
    sgd = timm.optim.create_optimizer_v2(model, opt='projunnsgd', lr=0.1)
    assert type(sgd) is ProjUNN and sgd.base.defaults['nesterov'] and sgd.base.defaults['momentum'] == 0.9
    # why the names have no underscore: timm keeps only what follows the last '_'
    assert type(timm.optim.create_optimizer_v2(model, opt='projunn_sgd', lr=0.1)) is torch.optim.SGD


def test_lookahead_prefix_is_refused_by_name_and_at_the_first_step():
    """timm's ``lookahead_`` prefix wraps ProjUNN in Lookahead, whose slow/fast interpolation is not orthogonal."""
    from kromhc_vision.cli import ConfigError
    from kromhc_vision.cli.train_config import build_parser, check_ranges
    from kromhc_vision.optim import check_opt_name
    args = build_parser().parse_args([])
    for name in ('lookahead_projunnadamw', 'Lookahead_ProjUNNsgd'):
        with pytest.raises(ValueError, match="(?i)optimizer '" + name + "': timm's Lookahead.*projunnsgd, "):
            check_opt_name(name)
        args.opt = name
        with pytest.raises(ConfigError, match='opt: .*use a plain projunn name: .*projunnadamw'):
            check_ranges(args)
    for name in ('projunnadamw', 'lookahead_adamw', 'adamw'):
        check_opt_name(name)
    model = _tiny_model()
    opt = timm.optim.create_optimizer_v2(model, opt='lookahead_projunnadamw', lr=0.1)  # timm's factory builds it
    start = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(ValueError, match="'lookahead_projunnadamw'.*use a plain projunn name: projunnadamw"):
        opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))  # refused before any step


@pytest.mark.parametrize('base', PROJUNN_BASES)
def test_every_registered_base_trains_and_stays_orthogonal(base):
    torch.manual_seed(0)
    model = _tiny_model().double()
    opt = timm.optim.create_optimizer_v2(model, opt=f'projunn{base}', lr=1e-2, weight_decay=0.01, rank=1)
    assert type(opt) is ProjUNN
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    start = model[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert orthogonality_error(model[0].weight) < 1e-12 and orthogonality_error(model[2].weight) < 1e-12
    assert not torch.equal(model[0].weight.detach(), start)


def test_orthogonal_param_groups_by_type_and_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    groups = orthogonal_param_groups(model, weight_decay=0.1, names=['1.weight'], modules=())
    assert groups[0]['orthogonal'] and [id(p) for p in groups[0]['params']] == [id(model[1].weight)]
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    groups = orthogonal_param_groups(model, weight_decay=0.1, modules=(nn.Linear,))
    assert len(groups[0]['params']) == 2 and groups[0]['weight_decay'] == 0.
    with pytest.raises(ValueError, match='orthogonal weight'):
        orthogonal_param_groups(nn.Sequential(nn.Linear(8, 3)), modules=(nn.Linear,))


def _run(seed_global, steps=3, state=None):
    torch.manual_seed(seed_global)  # the global RNG must not matter
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(_orthogonal(24, torch.float64, gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.05, rank=2, seed=7)
    grads = [torch.randn(24, 24, dtype=torch.float64, generator=gen) for _ in range(steps)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach().clone()


def test_projection_is_the_same_on_every_rank_and_leaves_the_global_rng_alone():
    a = _run(0)
    b = _run(123)
    assert torch.equal(a, b)  # two processes with different global RNG states step identically
    gen = torch.Generator().manual_seed(9)
    w = nn.Parameter(_orthogonal(24, torch.float64, gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.05, rank=1, seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    w.grad = torch.randn(24, 24, dtype=torch.float64, generator=gen)
    opt.step()
    assert torch.equal(torch.get_rng_state(), state)
    g0 = opt._generator(w.device, 0).initial_seed()
    opt.projunn_step += 1
    assert opt._generator(w.device, 0).initial_seed() != g0  # a new projection each step


def test_initial_and_loaded_weights_are_projected_at_start():
    model = _tiny_model().double()
    assert orthogonality_error(model[0].weight) > 0.1  # timm's/torch's init is not orthogonal
    expected = polar(model[0].weight.detach())
    opt = timm.optim.create_optimizer_v2(model, opt='projunnsgd', lr=0.0)
    assert orthogonality_error(model[0].weight) < 1e-12
    assert (model[0].weight.detach() - expected).abs().max() < 1e-12  # the nearest orthogonal matrix
    with torch.no_grad():  # weights loaded after the optimizer was built
        model[2].weight.copy_(torch.randn(8, 8, dtype=torch.float64))
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    assert orthogonality_error(model[2].weight) < 1e-12


def test_orthogonal_weights_of_a_group_added_after_the_first_step_are_projected():
    model = _tiny_model().double()
    opt = timm.optim.create_optimizer_v2(model, opt='projunnsgd', lr=0.1, mode='direct', rank=2)
    model(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    tagged, explicit, plain = nn.Linear(6, 6).double(), nn.Linear(6, 12).double(), nn.Linear(6, 6).double()
    mark_orthogonal(tagged)
    plain_before = plain.weight.detach().clone()
    expected = polar(tagged.weight.detach())
    assert orthogonality_error(tagged.weight) > 0.1 and orthogonality_error(explicit.weight) > 0.1
    opt.add_param_group({'params': [tagged.weight, plain.weight]})  # split: tagged → an orthogonal group
    opt.add_param_group({'params': [explicit.weight], 'orthogonal': True})
    assert [g['orthogonal'] for g in opt.param_groups[-3:]] == [True, False, True]
    assert (tagged.weight.detach() - expected).abs().max() < 1e-12  # the nearest orthogonal matrix
    assert orthogonality_error(explicit.weight) < 1e-12 and torch.equal(plain.weight.detach(), plain_before)
    for _ in range(3):
        for w in (tagged.weight, explicit.weight, plain.weight):
            w.grad = torch.randn_like(w)
        opt.step()
    assert orthogonality_error(tagged.weight) < 1e-12 and orthogonality_error(explicit.weight) < 1e-12


def test_ema_copy_is_reprojected():
    model = _tiny_model().double()
    opt = timm.optim.create_optimizer_v2(model, opt='projunnsgd', lr=0.5, rank=1)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(model)
    assert orthogonality_error(ema.module[0].weight) > 1e-6  # an average of orthogonal matrices is not one
    assert project_orthogonal_(ema.module) == 2  # module tags survive the EMA's deepcopy
    assert orthogonality_error(ema.module[0].weight) < 1e-12 and orthogonality_error(ema.module[2].weight) < 1e-12
    clone = copy.deepcopy(model)
    assert project_orthogonal_(clone) == 2
    assert torch.equal(clone[4].weight, model[4].weight)  # untagged weights untouched


def test_state_dict_resume_equals_uninterrupted():
    def make():
        torch.manual_seed(0)
        model = _tiny_model().double()
        return model, timm.optim.create_optimizer_v2(model, opt='projunnadamw', lr=1e-2, rank=2, mode='tangent')

    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    m1, o1 = make()
    steps(m1, o1, 4)
    m2, o2 = make()
    steps(m2, o2, 2)
    saved = copy.deepcopy((m2.state_dict(), o2.state_dict()))
    assert saved[1]['projunn'] == {'step': 2}
    m3, o3 = make()
    m3.load_state_dict(saved[0])
    o3.load_state_dict(saved[1])
    steps(m3, o3, 2)
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)


def test_reorthogonalize_every_bounds_drift():
    gen = torch.Generator().manual_seed(6)
    w = nn.Parameter(_orthogonal(12, torch.float64, gen))
    opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='sgd', lr=0.01, reorthogonalize_every=2)
    w.grad = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    opt.step()
    with torch.no_grad():
        w.mul_(1.01)  # off the manifold (what float32 drift does, exaggerated)
    w.grad = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    opt.step()
    assert orthogonality_error(w) < 1e-12


def test_bad_input_is_refused_before_any_work():
    w = nn.Parameter(torch.eye(4))
    for kwargs, match in [(dict(mode='geodesic'), "mode 'geodesic'"), (dict(sampler='svd'), "sampler 'svd'"),
                          (dict(rank=0), 'rank must be'), (dict(rank=2.0), 'rank must be'),
                          (dict(base='adamx'), "base 'adamx' is not a timm optimizer name; valid: .*adamw"),
                          (dict(reorthogonalize_every=-1), 'reorthogonalize_every'),
                          (dict(seed=None), 'seed must be an int, got None')]:
        with pytest.raises(ValueError, match=match):
            ProjUNN([w], **kwargs)
    with pytest.raises(ValueError, match='orthogonal weight'):
        ProjUNN([{'params': [nn.Parameter(torch.zeros(3, 5))], 'orthogonal': True}])
    with pytest.raises(ValueError, match='weight_decay=0.1'):
        ProjUNN([{'params': [w], 'orthogonal': True, 'weight_decay': 0.1}], base='adamw')


DDP_SCRIPT = r'''
import sys, torch, torch.distributed as dist, timm, kromhc_vision
from kromhc_vision.optim import is_orthogonal, orthogonality_error
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
model = timm.create_model('vit_micro_patch4_32_orthogonal', img_size=16, depth=2, num_classes=10)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = timm.optim.create_optimizer_v2(model, opt='projunnadamw', lr=1e-2, rank=2, sampler=sys.argv[1])
torch.manual_seed(100 + rank)  # each rank its own data and its own global RNG state
for _ in range(3):
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
if rank == 0:
    assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
    assert max(orthogonality_error(p) for p in model.parameters() if is_orthogonal(p)) < 1e-5
    print('RANKS EQUAL')
'''


@pytest.mark.slow
@pytest.mark.parametrize('sampler', SAMPLERS)
def test_two_gloo_ranks_stay_identical(tmp_path, sampler):
    """Two DDP processes with different data and global RNG states: the same weights after projUNN steps
    (each rank draws the same random projection)."""
    import os
    import subprocess
    import sys
    script = tmp_path / 'ddp_projunn.py'
    from _scripts import END_DDP_SCRIPT
    script.write_text(DDP_SCRIPT + END_DDP_SCRIPT)
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          str(script), sampler], capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0 and 'RANKS EQUAL' in out.stdout, out.stderr[-3000:]


def test_step_with_closure():
    model = _tiny_model().double()
    opt = timm.optim.create_optimizer_v2(model, opt='projunnadamw', lr=1e-2)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    start = model[0].weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    assert not torch.equal(model[0].weight.detach(), start) and orthogonality_error(model[0].weight) < 1e-12


def test_step_hooks_run_from_the_first_step(monkeypatch):
    """``register_step_pre_hook`` / ``register_step_post_hook`` (torch's Optimizer API, which LR schedulers and
    profilers use) run at every step, the first included: ProjUNN does not call ``Optimizer.__init__``, which
    installs the step wrapper that runs them; only ``zero_grad`` did, so hooks registered before it never ran."""
    if getattr(ProjUNN.step, 'hooked', False):  # wrapped (once per class) by an earlier test's optimizer
        monkeypatch.setattr(ProjUNN, 'step', ProjUNN.step.__wrapped__)
    linear = torch.nn.Linear(8, 8)
    mark_orthogonal(linear)
    opt = ProjUNN(linear.parameters(), base='sgd', lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append('pre'))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append('post'))
    linear(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert calls == ['pre', 'post']


def test_base_name_brings_its_timm_defaults():
    """``base`` names a timm optimizer with its defaults (what tells 'cadamw' from 'adamw', 'nesterov' from
    'momentum'), under the caller's kwargs; timm's factory-wide momentum=0.9 is not added (pass momentum)."""
    w = nn.Parameter(torch.eye(4))
    assert ProjUNN([w], base='cadamw', lr=1e-3).base.defaults['caution']
    assert ProjUNN([w], base='lambc', lr=1e-3).base.defaults['trust_clip']
    assert not ProjUNN([w], base='lambc', lr=1e-3, trust_clip=False).base.defaults['trust_clip']
    assert ProjUNN([w], base='radamw', lr=1e-3).base.defaults['decoupled_weight_decay']
    assert ProjUNN([w], base='nesterov', lr=1e-3, momentum=0.9).base.defaults['nesterov']
    assert not ProjUNN([w], base='momentum', lr=1e-3, momentum=0.9).base.defaults['nesterov']
    plain = ProjUNN([w], base='sgd', lr=1e-3).base.defaults  # no momentum: plain SGD (Nesterov needs one)
    assert plain['momentum'] == 0 and not plain['nesterov']


def test_state_dict_hooks_run():
    """torch's ``register_(load_)state_dict_{pre,post}_hook`` work on ProjUNN (it skips ``Optimizer.__init__``,
    which creates their dicts) and run around its ``state_dict`` / ``load_state_dict``."""
    linear = nn.Linear(4, 4)
    mark_orthogonal(linear)
    opt = ProjUNN(linear.parameters(), base='sgd', lr=0.1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append('sd pre'))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(('sd post', sd['projunn']['step'])))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(('load pre', sd['projunn']['step'])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append('load post'))
    opt.load_state_dict(opt.state_dict())
    assert calls == ['sd pre', ('sd post', 0), ('load pre', 0), 'load post']



@pytest.mark.parametrize('base', ['adamp', 'cadamp', 'nmuon'])
def test_base_name_keeps_a_nesterov_that_needs_no_momentum_argument(base):
    """A default ``nesterov=True`` is dropped only where the base is left without momentum (SGD without
    ``momentum``): AdamP's Nesterov is its own and Muon's momentum defaults to 0.95, so both keep timm's
    ``nesterov=True`` for the name (they lost it)."""
    w = nn.Parameter(torch.eye(4))
    assert timm.optim.create_optimizer_v2([nn.Parameter(torch.eye(4))], base, lr=1e-3).defaults['nesterov']
    assert ProjUNN([w], base=base, lr=1e-3).base.defaults['nesterov']
    assert not ProjUNN([w], base='nesterov', lr=1e-3).base.defaults['nesterov']  # SGD, no momentum: plain
