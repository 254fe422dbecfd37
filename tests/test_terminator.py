"""Terminator (HyperZ·Z·W, kromhc_vision/models/terminator.py): timm's contract, the operators against direct
references, batch independence in eval, the paper's batch-dependent option, the slow loss.

The contract checks run on terminator_micro (16px) and terminator_tiny at 16px; terminator_cifar only at build
time and in one forward/backward (it is the largest: ~0.8M parameters at 32x32, every block at full resolution).
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import kromhc_vision  # noqa: F401  (registers the models)
from kromhc_vision.models.terminator import Terminator, dynamic_depthwise_conv, global_hyper_conv

NAMES = ['terminator_micro', 'terminator_tiny', 'terminator_cifar']
SIZE = {'terminator_micro': 16, 'terminator_tiny': 16, 'terminator_cifar': 32}
# The behaviour tests (batch independence, state dict, slow loss) on a narrow terminator_micro at 8px: the same
# code at a fraction of the cost (every block runs at full resolution).
SMALL = dict(img_size=8, dims=(8, 16, 24), slow_hidden=8)


def create(name, **kwargs):
    size = SIZE[name]
    return timm.create_model(name, **({'img_size': size} | kwargs))


def randomize(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def trained_stats(model, size, steps=2):
    """A few training-mode forwards so that BatchNorm's running statistics are not the init's (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, model.in_chans, size, size))
    return model.eval()


# ------------------------------------------------------------------------------------------------- operators
def test_global_hyper_conv_is_the_depthwise_convolution():
    """The FFT path equals F.conv2d with one group per (sample, channel), a kernel of the image's size."""
    for H, W in ((6, 5), (7, 8), (16, 16)):
        v, k = torch.randn(2, 3, H, W, dtype=torch.float64), torch.randn(2, 3, H, W, dtype=torch.float64)
        ref = F.conv2d(v.reshape(1, 6, H, W), k.reshape(6, 1, H, W), padding=(H // 2, W // 2), groups=6)
        torch.testing.assert_close(global_hyper_conv(v, k), ref[..., :H, :W].reshape(2, 3, H, W))


def test_dynamic_depthwise_conv_uses_each_samples_kernel():
    x, k = torch.randn(3, 4, 9, 9), torch.randn(3, 4, 5, 5)
    out = dynamic_depthwise_conv(x, k)
    for b in range(3):
        torch.testing.assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], k[b][:, None], padding=2, groups=4))


# ------------------------------------------------------------------------------------------------- timm contract
@pytest.mark.parametrize('name', NAMES)
def test_registered_with_cfg(name):
    assert name in timm.list_models('terminator_*')
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] and model.in_chans == cfg['input_size'][0]
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert tuple(cfg['pool_size']) == tuple(cfg['input_size'][1:])  # no downsampling


def test_cifar_is_the_papers_configuration():
    model = timm.create_model('terminator_cifar')
    assert [b.bottleneck.out_channels for b in model.blocks] == [12, 36, 72, 144, 288]
    assert model.blocks[0].bottleneck.in_channels == 9 * 3
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('name', ['terminator_micro', 'terminator_tiny'])
def test_forward_backward_every_parameter_batch_one(name):
    """Batch size 1 trains (instance norm and the per-sample context need no batch); every parameter gets a
    gradient; the arguments reach the model."""
    model = create(name, num_classes=7, in_chans=1, drop_rate=0.1)
    assert model.head.drop.p == 0.1
    model.train()
    out = model(torch.randn(1, 1, 16, 16))
    assert out.shape == (1, 7)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize('name', ['terminator_micro'])
def test_features_head_and_reset(name):
    model = randomize(create(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 16, 16)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model.head.fc(pre))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), feats)


@pytest.mark.parametrize('name', ['terminator_micro'])
def test_intermediates_features_only_checkpointing(name):
    model = randomize(create(name, **SMALL)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape[1] for t in inter] == [b.bottleneck.out_channels for b in model.blocks]
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_features(x), feats)
    fo = create(name, features_only=True, out_indices=(0, 2), **SMALL).eval()
    missing, _ = fo.model.load_state_dict(model.state_dict(), strict=False)  # timm's getter wraps the model
    assert not missing
    with torch.no_grad():
        out = fo(x)
    assert fo.feature_info.channels() == [model.feature_info[0]['num_chs'], model.feature_info[2]['num_chs']]
    assert fo.feature_info.reduction() == [1, 1]
    torch.testing.assert_close(out[0], inter[0])
    torch.testing.assert_close(out[1], inter[2])
    model.train()
    model(x).sum().backward()  # checkpointed backward runs


def test_weight_decay_and_groups():
    model = create('terminator_micro')
    nwd = model.no_weight_decay()
    optimizer = create_optimizer_v2(model, 'adamw', weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    freq = [p for n, p in model.named_parameters() if '_slow.filters.' in n and n.endswith('.weight')]
    assert freq and all(id(p) in no_decay for p in freq) and nwd
    assert id(model.blocks[1].bottleneck.weight) not in no_decay
    from timm.models._manipulate import group_parameters
    groups = group_parameters(model, model.group_matcher())  # block 0 (takes the image) as timm's 'stem'; head last
    assert len(groups) == len(model.blocks) + 1 and groups[max(groups)] == ['head.fc.weight', 'head.fc.bias']
    optimizer = create_optimizer_v2(model, 'adamw', weight_decay=0.05, layer_decay=0.75)
    assert len({g['lr_scale'] for g in optimizer.param_groups}) == len(model.blocks) + 1  # + the head


def test_fx_and_factory_device():
    model = randomize(create('terminator_micro', **SMALL)).eval()
    x = torch.randn(2, 3, 8, 8)
    _, nodes = timm.models.get_graph_node_names(model)
    extractor = timm.models.create_feature_extractor(model, {nodes[-1]: 'logits'}).eval()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['logits'], model(x))
    meta = create('terminator_micro', device='meta', dtype=torch.float64)
    misplaced = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if t.device.type != 'meta']
    assert not misplaced
    assert meta(torch.randn(1, 3, 16, 16, device='meta', dtype=torch.float64)).device.type == 'meta'


def test_parameters_are_registered_and_saved():
    """Every coefficient is an nn.Parameter: a state dict round trip reproduces the outputs exactly, and .to()
    moves all of them (float64 here, as a device stand-in)."""
    a = trained_stats(randomize(create('terminator_micro', **SMALL)), 8)
    b = create('terminator_micro', **SMALL).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    a.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in [*a.parameters(), *a.buffers()] if t.is_floating_point())
    with torch.no_grad():
        assert a(x.double()).dtype == torch.float64


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='kernel_sizes'):
        create('terminator_micro', kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match='slow_layers'):
        create('terminator_micro', slow_layers=0)
    with pytest.raises(TypeError):
        create('terminator_micro', not_an_arg=1)


# ------------------------------------------------------------------------------------------------- batch context
@pytest.mark.parametrize('kwargs', [SMALL, dict(SMALL, kernel_sizes=(3,), slow_layers=3)])
def test_eval_logits_do_not_depend_on_batch_mates(kwargs):
    model = trained_stats(randomize(create('terminator_micro', **kwargs)), 8)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        batched = model(x)
        for i in range(6):
            alone = model(x[i:i + 1])
            torch.testing.assert_close(alone, batched[i:i + 1], rtol=1e-5, atol=1e-5 * batched.abs().max().item())
        # the same sample among other batch-mates
        other = torch.cat([x[:1], torch.randn(3, 3, 8, 8) * 3 + 1])
        torch.testing.assert_close(model(other)[:1], batched[:1], rtol=1e-5, atol=1e-5 * batched.abs().max().item())


def test_paper_batch_context_depends_on_batch_mates():
    """The archived behaviour, kept as an option: the same weights, but a sample's eval logits change with the
    rest of the batch (batch statistics and a batch-averaged context). Off by default."""
    model = trained_stats(randomize(create('terminator_micro', **SMALL)), 8)
    paper = create('terminator_micro', paper_batch_context=True, **SMALL).eval()
    missing, unexpected = paper.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all('running_' in k or 'num_batches' in k for k in unexpected)
    assert not Terminator().paper_batch_context
    x = torch.randn(4, 3, 8, 8)
    other = torch.cat([x[:1], torch.randn(3, 3, 8, 8) * 3 + 1])
    with torch.no_grad():
        a, b = paper(x)[:1], paper(other)[:1]
        assert (a - b).abs().max() > 1e-2 * a.abs().max()
        assert paper.blocks[0].paper_batch_context and paper.blocks[0].norm.bn.track_running_stats is False


# ------------------------------------------------------------------------------------------------- slow loss
def test_slow_loss_reaches_only_the_slow_networks():
    """slow_loss() depends on parameters only; its gradient is non-zero for every global slow-network parameter
    and absent everywhere else (the local slow networks and the fast network included)."""
    model = randomize(create('terminator_micro', **SMALL))
    loss = model.slow_loss()
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in model.named_parameters() if '.global_slow.' in n}
    assert got == expected
    assert set(model.slow_parameters()) >= expected


def test_slow_loss_is_the_tiled_kernel_mse():
    model = Terminator(num_classes=3, img_size=8, dims=(4, 8), slow_hidden=8)
    ka = model.blocks[0].global_kernel(8, 8)  # (3, 8, 8): block 0's input is the image
    kb = model.blocks[1].global_kernel(8, 8)  # (4, 8, 8)
    assert ka.shape == (3, 8, 8) and kb.shape == (4, 8, 8)
    expected = ((torch.cat([ka, ka])[:4] - kb) ** 2).mean()
    torch.testing.assert_close(model.slow_loss(), expected)
    assert Terminator(img_size=8, dims=(4,)).slow_loss().item() == 0


# ------------------------------------------------------------------------------------------------- train.py
def test_train_adds_and_logs_the_slow_loss(tmp_path):
    """train.py adds slow_loss_weight * model.slow_loss() to the task loss (first update: the losses of weight 2
    and weight 0 differ by twice the slow loss of the initial weights) and logs it separately per epoch."""
    import csv
    import json

    from timm.utils import random_seed

    from kromhc_vision.data import write_digits_folder
    from _scripts import load_script

    data = write_digits_folder(tmp_path / 'digits', per_class=3)
    kwargs = dict(img_size=8, dims=(8, 8), slow_hidden=8)
    common = ['--data-dir', str(data), '--model', 'terminator_micro', '--model-kwargs',
              *[f'{k}={v}'.replace(' ', '') for k, v in kwargs.items()], '--img-size', '8', '--num-classes', '10',
              '--batch-size', '8', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--workers', '0',
              '--epochs', '1', '--seed', '3', '--output', str(tmp_path / 'out')]
    train = load_script('train')
    first_loss, summaries = {}, {}
    for w in (0, 2):
        train.main(common + ['--experiment', f'w{w}', '--slow-loss-weight', str(w)])
        run = tmp_path / 'out' / f'w{w}'
        first_loss[w] = float(next(csv.DictReader(open(run / 'steps.csv')))['loss'])
        summaries[w] = json.load(open(run / 'summary.json'))[0]
    random_seed(3, 0)  # as train.py seeds before building the model
    model = timm.create_model('terminator_micro', num_classes=10, in_chans=3, drop_rate=0., **kwargs)
    slow = model.slow_loss().item()
    assert slow > 0
    assert first_loss[2] - first_loss[0] == pytest.approx(2 * slow, rel=1e-4, abs=1e-6)
    assert 'train_slow_loss' in summaries[2] and 'train_slow_loss' not in summaries[0]


def test_torchscript_refused_with_the_alternatives_and_export_works():
    """torch.jit.script fails inside TorchScript's compiler on the slow networks' zipped ModuleLists; the model
    refuses it up front, naming what works: torch.export gives the eager outputs."""
    model = randomize(create('terminator_micro')).eval()
    with pytest.raises(kromhc_vision.TorchScriptUnsupportedError, match='torch.compile or torch.export'):
        torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), model(x))


def test_torch_jit_trace_takes_another_batch_size_and_saves(tmp_path):
    """``torch.jit.trace``: the per-sample depthwise convolution is recorded without ``groups = B C`` (which the
    trace kept as a constant: the traced module refused any other batch size, 'expected weight to be divisible by
    6'); the traced module saves, loads and computes the model's outputs."""
    model = randomize(create('terminator_micro')).eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
    torch.jit.save(traced, str(tmp_path / 'traced.pt'))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / 'traced.pt'))(x), model(x))
