"""Residual-free ViTs (vit_*_plain, vit_*_orthogonal): timm's model contract, no residual, orthogonal maps that
start orthogonal and stay so under projUNN through timm's factory and train.py."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import kromhc_vision  # noqa: F401
from kromhc_vision.models import OrthogonalLinear
from kromhc_vision.optim import ProjUNN, is_orthogonal, orthogonality_error, project_orthogonal_
from test_models import (check_factory_device_and_dtype, check_features_and_head, check_features_only,
                         check_forward_backward, check_fx_feature_extraction, check_intermediates_and_checkpointing,
                         randomize)

BASES = ['vit_micro_patch4_32', 'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224',
         'vit_large_patch16_224']
CHECKS = [check_forward_backward, check_features_and_head, check_features_only,
          check_intermediates_and_checkpointing, check_fx_feature_extraction, check_factory_device_and_dtype]


@pytest.mark.parametrize('check', CHECKS, ids=lambda c: c.__name__[6:])
def test_contract_orthogonal(check):
    check('vit_micro_patch4_32_orthogonal')


@pytest.mark.parametrize('check', CHECKS[:4], ids=lambda c: c.__name__[6:])
def test_contract_plain(check):  # timm's ViT but for PlainBlock.forward: the checks that run the blocks
    check('vit_micro_patch4_32_plain')


@pytest.mark.slow
@pytest.mark.parametrize('name', [f'{b}_{v}' for b in BASES for v in ('plain', 'orthogonal')])
def test_contract_all_registered(name):
    for check in CHECKS:
        check(name)


def test_registration_and_paper_ids():
    assert set(timm.list_models('*_plain')) == {f'{b}_plain' for b in BASES}
    assert set(timm.list_models('*_orthogonal')) == {f'{b}_orthogonal' for b in BASES}
    assert timm.models.get_pretrained_cfg('vit_micro_patch4_32_orthogonal').paper_ids == (
        'arXiv:2010.11929', 'arXiv:2203.05483')


def test_blocks_have_no_residual():
    model = randomize(timm.create_model('vit_micro_patch4_32_plain', num_classes=10)).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        y = blk.attn(blk.norm1(x))
        assert torch.allclose(blk(x), blk.mlp(blk.norm2(y)), atol=1e-6)


def test_orthogonal_maps_start_orthogonal_and_are_isometries():
    model = timm.create_model('vit_micro_patch4_32_orthogonal', num_classes=10, depth=2)
    tagged = {n for n, p in model.named_parameters() if is_orthogonal(p)}
    assert tagged == {f'blocks.{i}.{m}.weight' for i in range(2) for m in ('attn.qkv', 'attn.proj', 'mlp.fc1',
                                                                              'mlp.fc2')}
    assert tagged <= model.no_weight_decay()
    assert all(orthogonality_error(p) < 1e-5 for n, p in model.named_parameters() if n in tagged)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose((fc1(x) - fc1.bias).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # isometry
        h = torch.randn(5, 256)
        s = torch.linalg.svdvals(fc2.weight * fc2.scale)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-5) and fc2(h).shape == (5, 64)
    plain = timm.create_model('vit_micro_patch4_32_plain', num_classes=10, depth=2)
    assert not any(is_orthogonal(p) for p in plain.parameters())
    # the same names and shapes: plain (and timm's residual) weights load, ProjUNN projects them at start
    model.load_state_dict(plain.state_dict())
    assert orthogonality_error(model.blocks[0].attn.proj.weight) > 0.1
    create_optimizer_v2(model, opt='projunnsgd', lr=0.1)
    assert max(orthogonality_error(p) for n, p in model.named_parameters() if n in tagged) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match='drop_path_rate=0.1 is not supported'):
        timm.create_model('vit_micro_patch4_32_plain', drop_path_rate=0.1)
    with pytest.raises(ValueError, match='integer mlp_ratio'):
        timm.create_model('vit_micro_patch4_32_orthogonal', mlp_ratio=2.5)
    with pytest.raises(ValueError, match='one divides the other'):
        OrthogonalLinear(6, 4)


@pytest.mark.parametrize('opt, mode', [('projunnadamw', 'tangent'), ('projunnsgd', 'direct')])
def test_trains_through_timm_factory_and_stays_orthogonal(opt, mode):
    model = timm.create_model('vit_micro_patch4_32_orthogonal', num_classes=10, img_size=16, depth=2)
    optimizer = create_optimizer_v2(model, opt=opt, lr=1e-2, weight_decay=0.05, mode=mode, rank=2)
    assert type(optimizer) is ProjUNN
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert max(orthogonality_error(p) for p in model.parameters() if is_orthogonal(p)) < 1e-5
    assert project_orthogonal_(model) == 8


def test_train_py_with_projunn_and_ema(tmp_path):
    """train.py --opt projunnsgd with mode/rank through --opt-kwargs: the weights and the EMA copy it saves are
    orthogonal, and the optimizer state records the projUNN step count."""
    from _scripts import TINY, load_script
    from kromhc_vision.data import write_digits_folder

    data = write_digits_folder(tmp_path / 'digits', per_class=3)
    argv = [*TINY, '--data-dir', data, '--epochs', 1, '--output', tmp_path, '--experiment', 'orth',
            '--model-ema', '--model-ema-decay', 0.5]
    argv[argv.index('vit_micro_patch4_32_kromhc')] = 'vit_micro_patch4_32_orthogonal'
    argv[argv.index('adamw')] = 'projunnsgd'
    load_script('train').main([str(a) for a in argv] + ['--opt-kwargs', 'mode=direct', 'rank=2'])
    ckpt = torch.load(tmp_path / 'orth' / 'last.pth.tar', weights_only=False)
    assert ckpt['optimizer']['projunn']['step'] == 3  # 30 images, batches of 8, the last one dropped
    model = timm.create_model('vit_micro_patch4_32_orthogonal', depth=1, img_size=16, num_classes=10)
    for key in ('state_dict', 'state_dict_ema'):
        model.load_state_dict(ckpt[key])
        assert max(orthogonality_error(p) for p in model.parameters() if is_orthogonal(p)) < 1e-5, key


def test_copies_and_materialised_models_keep_their_orthogonal_weights():
    """A deep copy, an unpickled model and a model built on the meta device and materialised with ``to_empty``
    have new Parameters: their OrthogonalLinear weights are tagged again (they were not, and ProjUNN silently
    stepped them as ordinary weights, with weight decay)."""
    import copy
    import pickle
    model = timm.create_model('vit_micro_patch4_32_orthogonal', depth=1)
    count = sum(map(is_orthogonal, model.parameters()))
    meta = timm.create_model('vit_micro_patch4_32_orthogonal', depth=1, device='meta').to_empty(device='cpu')
    meta.load_state_dict(model.state_dict())  # the meta-device recipe: weights loaded into the empty model
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), meta):
        assert sum(map(is_orthogonal, other.parameters())) == count > 0
        opt = create_optimizer_v2(other, 'projunnadamw', lr=1e-3, weight_decay=0.05)
        assert sum(len(g['params']) for g in opt.param_groups if g.get('orthogonal')) == count


def test_a_pruned_orthogonal_linear_still_moves():
    """Re-tagging after ``_apply`` skips a weight that is no longer a Parameter: ``torch.nn.utils.prune`` makes it
    a plain attribute, and ``.to()`` of a pruned model raised 'OrthogonalLinear.weight is not a Parameter'."""
    from torch.nn.utils import prune
    layer = OrthogonalLinear(8, 8)
    prune.l1_unstructured(layer, 'weight', amount=0.25)
    assert layer.to(torch.float64).weight_orig.dtype == torch.float64  # the pruned weight: at the next forward
    prune.remove(layer, 'weight')  # the weight a Parameter again: tagged at the next move
    assert is_orthogonal(layer.to(torch.float32).weight)
