"""The timm model zoo: registration, timm's model contract, upcycling of residual weights, Hub save/load.

Default tests cover the smallest bases (vit_micro_patch4_32, convnext_atto; vit_tiny at 64px for upcycling),
every variant; the ``slow`` test runs the contract on every registered name. Nothing is downloaded: Hub
loading reads a pre-filled cache in tmp_path with ``HF_HUB_OFFLINE=1``.
"""
import hashlib
import json

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg, save_for_hf
from timm.optim import create_optimizer_v2

import kromhc_vision as kv
from kromhc_vision.models._hc_common import VARIANTS

BASES = ['vit_micro_patch4_32', 'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224',
         'vit_large_patch16_224', 'convnext_micro', 'convnext_atto', 'convnext_nano', 'convnext_tiny',
         'convnext_small', 'convnext_base']
ALL_NAMES = [f'{b}_{v}' for b in BASES for v in VARIANTS]
FAST_NAMES = [f'{b}_{v}' for b in ('vit_micro_patch4_32', 'convnext_atto') for v in VARIANTS]
SMALL_VIT = dict(img_size=64)  # ViTs other than micro run at 64px (16 patches) in these tests


def model_kwargs(name):
    return SMALL_VIT if name.startswith('vit_') and 'micro' not in name else {}


def input_size(name):
    """(C, H, W) the tests feed: 32px for the micro bases, else 64px (the ViTs are built for it)."""
    return (3, 32, 32) if 'micro' in name else (3, 64, 64)


def create(name, **kwargs):
    return timm.create_model(name, **{**model_kwargs(name), **kwargs})


def randomize(model, std=0.02):
    """Move every parameter off its init (connections included), so that comparisons are meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def connection_params(model):
    prefixes = [n for n, m in model.named_modules() if isinstance(m, kv.HyperConnection)]
    return [n for n, _ in model.named_parameters() if any(n.startswith(p + '.') for p in prefixes)]


# ---------------------------------------------------------------------------------------------------------------
# timm's model contract, one check per function so that the fast tests name the failing one


def check_forward_backward(name):
    model = create(name, num_classes=42).eval()
    x = torch.randn(1, *input_size(name))
    out = model(x)
    assert out.shape == (1, 42) and not out.isnan().any()
    model.train()
    model(torch.randn(2, *input_size(name))).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without grad: {no_grad}'
    assert all(p.grad.isfinite().all() for p in model.parameters())


def check_features_and_head(name):
    model = create(name).eval()
    cfg = model.pretrained_cfg
    size = input_size(name) if name.startswith('vit_') else cfg['input_size']
    x = torch.randn(1, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        if cfg.get('pool_size'):  # ConvNeXt at its cfg input size: NCHW with the cfg's pool size
            assert feats.shape[1] == model.num_features and tuple(feats.shape[-2:]) == cfg['pool_size']
        else:
            assert feats.shape[-1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        assert model.forward_head(feats).shape == (1, model.num_classes)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape
        bare = create(name, num_classes=0, global_pool='').eval()
        bare.load_state_dict(model.state_dict())
        assert bare(x).shape == feats.shape
    state = create(name).state_dict()
    classifier, first_conv = cfg['classifier'], cfg['first_conv']
    assert f'{classifier}.weight' in state and f'{first_conv}.weight' in state


def check_features_only(name):
    out_indices = (1, 3) if name.startswith('vit_') else (0, 2, 3)
    model = create(name, features_only=True, out_indices=out_indices).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, *input_size(name)))
    assert len(feats) == len(out_indices) == len(model.feature_info.channels())
    for f, chs, red in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape[1] == chs and f.shape[-1] == input_size(name)[-1] // red


def check_intermediates_and_checkpointing(name):
    model = randomize(create(name)).eval()
    x = torch.randn(2, *input_size(name))
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, feats, atol=1e-6) and len(inter) == len(model.feature_info)
        model.set_grad_checkpointing()
        assert torch.allclose(model.forward_features(x), feats, atol=1e-6)
        assert torch.allclose(model.forward_intermediates(x)[0], feats, atol=1e-6)
    model.train()
    model(x).sum().backward()  # checkpointed backward runs


def check_torchscript_raises(name):
    model = create(name)
    with pytest.raises(kv.TorchScriptUnsupportedError, match='torch.compile or torch.export'):
        torch.jit.script(model)


def check_weight_decay_and_layer_decay(name):
    model = create(name)
    hc = connection_params(model)
    assert set(hc) <= model.no_weight_decay()
    assert bool(hc) == (not name.endswith('_residual'))
    optimizer = create_optimizer_v2(model, 'adamw', weight_decay=0.05, layer_decay=0.75)
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    for n in hc:  # with its block: blocks.i.hc_* / stages.i.blocks.j.hc.* share the block's layer scale
        block = n.split('.hc')[0]
        sibling = next(k for k in params if k.startswith(block + '.') and k not in hc)
        assert group_of[id(params[n])]['weight_decay'] == 0.0
        assert group_of[id(params[n])]['lr_scale'] == group_of[id(params[sibling])]['lr_scale']
    assert len({g['lr_scale'] for g in optimizer.param_groups}) > 2


def check_fx_feature_extraction(name):
    """timm's FX feature extraction traces the model (connections' pre and post steps are leaf calls around
    the traced branch) and returns what the model computes, values and gradients."""
    model = randomize(create(name)).eval()
    x = torch.randn(2, *input_size(name))
    _, nodes = timm.models.get_graph_node_names(model)
    posts = [n for n in nodes if 'connection_post' in n]
    assert len(posts) == (0 if name.endswith('_residual') else len(connection_params(model)) // 4)
    extractor = timm.models.create_feature_extractor(model, {nodes[-1]: 'logits'}).eval()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['logits'], model(x))
    if not hasattr(model, 'hc_spec'):  # no streams (the plain and orthogonal ViTs): timm's FX features as usual
        fx_model = create(name, features_only=True, feature_cls='fx').eval()
        fx_model.load_state_dict(create(name, features_only=True).state_dict(), strict=False)
        feats = fx_model(x)
        assert len(feats) == len(fx_model.feature_info.channels())
        sum(f.sum() for f in feats).backward()
        return
    # timm's module-output feature wrappers would return the blocks' stream states (..., n, C) as features (they
    # did, feature_info's channels notwithstanding): refused, naming the getter (check_features_only checks it)
    for feature_cls in ('fx', 'hook', 'dict'):
        with pytest.raises(ValueError, match=f"feature_cls='{feature_cls}'.*valid choice: 'getter'"):
            create(name, features_only=True, feature_cls=feature_cls)


def check_factory_device_and_dtype(name):
    """timm's ``create_model(device=..., dtype=...)`` puts every parameter and buffer there, connections included,
    and the model runs on it."""
    model = create(name, device='meta', dtype=torch.float64)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != 'meta']
    assert not misplaced, misplaced[:5]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, *input_size(name), device='meta', dtype=torch.float64)).device.type == 'meta'


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_kromhc', 'convnext_atto_mhclite', 'vit_micro_patch4_32_mhc'])
def test_meta_device_recipe_restores_the_connections_buffers(name):
    """timm's recipe for large models: made on ``meta``, given memory by ``to_empty`` (uninitialised: filled here
    with 7s), weights loaded, then ``reinit_non_persistent_buffers``: the connections' ``scale_index`` and
    permutation tables are made again, so the model computes what it was saved computing (they were left as the
    memory held them: wrong outputs or an index error)."""
    from timm.models._manipulate import reinit_non_persistent_buffers
    reference = randomize(create(name)).eval()
    model = create(name, device='meta').to_empty(device='cpu')
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.fill_(7)
    model.load_state_dict(reference.state_dict())
    reinit_non_persistent_buffers(model)
    x = torch.randn(2, *input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


CHECKS = [check_forward_backward, check_features_and_head, check_features_only,
          check_intermediates_and_checkpointing, check_torchscript_raises, check_weight_decay_and_layer_decay,
          check_fx_feature_extraction, check_factory_device_and_dtype]


@pytest.mark.parametrize('check', CHECKS, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize('name', FAST_NAMES)
def test_contract(name, check):
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', ALL_NAMES)
def test_contract_all_registered(name):
    for check in CHECKS:
        check(name)


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_kromhc', 'convnext_atto_mhc'])
def test_drop_path_drops_branches_per_sample_in_training(name):
    """``drop_path_rate`` reaches the branches inside the connections: in training two copies of one image
    (``x (2, C, H, W)``) draw their own drop masks, so their logits differ; in eval they are equal (nothing else in
    the models is random). The recompute tests run with drop-path: this shows it is active there."""
    model = randomize(create(name, drop_path_rate=0.5))
    x = torch.randn(1, *input_size(name)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model.train()(x)
        assert (out[0] - out[1]).abs().max() > 1e-3
        out = model.eval()(x)
        torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_kromhc', 'convnext_micro_mhc'])
def test_torch_export(name):
    """torch.export, the alternative the TorchScript error names, traces the closures."""
    model = randomize(create(name)).eval()
    x = torch.randn(2, *input_size(name))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# registration, arguments, init


def test_registration():
    assert set(timm.list_models('*_kromhc')) == {f'{b}_kromhc' for b in BASES}
    assert set(ALL_NAMES) <= set(timm.list_models())
    assert 'vit_small_patch16_224_kromhc.upcycled_augreg_in21k_ft_in1k' in timm.list_pretrained('*_kromhc*')
    cfg = get_pretrained_cfg('vit_small_patch16_224_kromhc.upcycled_augreg_in21k_ft_in1k').to_dict()
    src = get_pretrained_cfg('vit_small_patch16_224.augreg_in21k_ft_in1k').to_dict()
    assert cfg['hf_hub_id'] == 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'
    assert all(cfg[k] == src[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'classifier', 'first_conv'))
    assert cfg['paper_ids'] == ('arXiv:2010.11929', 'arXiv:2601.21579')
    assert get_pretrained_cfg('convnext_atto_mhc').paper_ids == ('arXiv:2201.03545', 'arXiv:2512.24880')
    micro = timm.create_model('vit_micro_patch4_32_kromhc')
    assert micro.num_classes == 1000 and micro.embed_dim == 64 and len(micro.blocks) == 6 and micro.num_streams == 4


@pytest.mark.parametrize('variant, kwargs, match', [
    ('residual', dict(num_streams=4), "'residual' cannot take num_streams=4"),
    ('hc', dict(num_streams=1), "'hc' cannot take num_streams=1"),
    ('mhclite', dict(num_streams=8), "'mhclite' cannot take num_streams=8"),
    ('kromhc', dict(num_streams=7), "'kromhc' cannot take num_streams=7"),
    ('kromhc', dict(hc_init='zeros'), "hc_init 'zeros'"),
    ('kromhc', dict(hc_kwargs={'sinkhorn_iters': 3}), 'hc_kwargs .* not accepted'),
    ('mhc', dict(hc_backend='cuda'), "backend 'cuda'"),
    ('kromhc', dict(num_streams='4'), "'kromhc' cannot take num_streams='4': num_streams must be an int"),
    ('kromhc', dict(hc_kwargs='x'), "hc_kwargs must be a mapping of connection options .*got 'x'"),
    ('mhc', dict(hc_kwargs={'sinkhorn_iters': 0}), 'sinkhorn_iters must be >= 1, got 0'),
    ('mhc', dict(num_streams=32, hc_backend='triton'), "backend 'triton' cannot run sinkhorn"),
    # keys naming the connection's own arguments: refused as unknown (were a TypeError, or for dim one raised by
    # the constructor after the model was half built)
    ('mhc', dict(hc_kwargs={'init': 'identity'}), "hc_kwargs .* unknown 'init'; valid: sinkhorn_iters"),
    ('mhc', dict(hc_kwargs={'dim': 8}), "hc_kwargs .* unknown 'dim'; valid: sinkhorn_iters"),
    ('kromhc', dict(hc_kwargs={'names': {}}), "hc_kwargs .* unknown 'names'; valid: none"),
    ('residual', dict(hc_kwargs={'backend': 'torch'}), "hc_kwargs .* not accepted by the 'residual' connection"),
])
def test_bad_arguments(variant, kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(f'vit_micro_patch4_32_{variant}', **kwargs)


def test_arguments_reach_connections():
    model = timm.create_model('vit_micro_patch4_32_mhc', num_streams=3, hc_init='identity',
                              hc_backend='torch', hc_kwargs={'sinkhorn_iters': 7})
    conn = model.blocks[5].hc_mlp
    assert (conn.num_streams, conn.init, conn.backend, conn.sinkhorn_iters, conn.layer_index) == (3, 'identity',
                                                                                                  'torch', 7, 11)
    assert timm.create_model('convnext_atto_kromhc', num_streams=8).stages[3].blocks[1].hc.factors == (2, 2, 2)
    assert timm.create_model('convnext_atto_kromhc').stages[1].blocks[0].hc.layer_index == 2


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_kromhc', 'convnext_atto_mhclite'])
def test_timm_init_leaves_connections_alone(name):
    model = create(name)
    if hasattr(model, 'init_weights'):
        model.init_weights()
    for module in (m for m in model.modules() if isinstance(m, kv.HyperConnection)):
        fresh = kv.build_connection(module.variant, module.num_streams, module.dim, module.layer_index)
        assert all(torch.equal(a, b) for a, b in zip(module.parameters(), fresh.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Hub cache and upcycling


def fill_hf_cache(cache, repo_id, files):
    """Lay out ``files`` ({name: path}) for ``repo_id`` the way huggingface_hub caches a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    for fname, src in files.items():
        data = src.read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / 'snapshots' / commit / fname
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f'../../blobs/{blob.name}')


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def residual_timm_model(base, **kwargs):
    """timm's residual model with random weights; ConvNeXt layer scales raised so the blocks matter."""
    model = timm.create_model(base, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('gamma'):
                p.uniform_(0.2, 1.0)
    return randomize(model).eval()


def assert_close_rel(out, ref, rtol=1e-3):
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < rtol, f'relative error {err:.2e}'


UPCYCLE_CASES = [('vit_tiny_patch16_224', 'augreg_in21k_ft_in1k', dict(img_size=64), 64),
                 ('convnext_atto', 'd2_in1k', {}, 64)]


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('base, tag, kwargs, size', UPCYCLE_CASES, ids=[c[0] for c in UPCYCLE_CASES])
def test_upcycled_pretrained_reproduces_residual(hf_cache, tmp_path, base, tag, kwargs, size, variant):
    ref = residual_timm_model(base, **kwargs)
    save_file(ref.state_dict(), tmp_path / 'model.safetensors')
    fill_hf_cache(hf_cache, f'timm/{base}.{tag}', {'model.safetensors': tmp_path / 'model.safetensors'})
    model = timm.create_model(f'{base}_{variant}.upcycled_{tag}', pretrained=True, **kwargs).eval()
    assert all(getattr(m, 'init', 'identity') == 'identity' for m in model.modules()
               if isinstance(m, kv.HyperConnection))
    default = timm.create_model(f'{base}_{variant}', pretrained=True, **kwargs).eval()  # default tag: upcycled
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x))
        assert torch.equal(default(x), model(x))
    if variant != 'residual':
        with pytest.raises(ValueError, match="needs hc_init='identity'"):
            timm.create_model(f'{base}_{variant}.upcycled_{tag}', pretrained=True, hc_init='published', **kwargs)


def test_load_residual_weights_and_errors():
    micro_args = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    ref = randomize(timm.models.VisionTransformer(**micro_args)).eval()
    model = timm.create_model('vit_micro_patch4_32_kromhc', hc_init='identity', num_classes=10).eval()
    kv.load_residual_weights(model, ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x))
    with pytest.raises(ValueError, match="needs a model built with hc_init='identity'"):
        kv.load_residual_weights(timm.create_model('vit_micro_patch4_32_kromhc', num_classes=10), ref)
    other = timm.models.VisionTransformer(**dict(micro_args, embed_dim=32, depth=7))
    with pytest.raises(kv.CheckpointMismatchError) as err:
        kv.load_residual_weights(model, other)
    msg = str(err.value)
    assert 'unexpected keys (' in msg and 'blocks.6.attn.qkv.weight' in msg
    assert 'shape mismatches' in msg and 'cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)' in msg
    # another head: ignore_classifier keeps the model's own head
    model_1k = timm.create_model('vit_micro_patch4_32_hc', hc_init='identity')
    with pytest.raises(kv.CheckpointMismatchError, match='head.weight: checkpoint'):
        kv.load_residual_weights(model_1k, ref)
    kv.load_residual_weights(model_1k, ref, ignore_classifier=True)
    assert torch.equal(model_1k.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------------------------------------------------------
# our own weights: save_for_hf, local-dir:, hf-hub:


SAVE_CASES = [('vit_micro_patch4_32_mhc', dict(num_streams=2, hc_kwargs={'sinkhorn_iters': 5}, num_classes=7), 32),
              ('convnext_micro_kromhc', dict(num_classes=7), 32)]


@pytest.mark.parametrize('name, kwargs, size', SAVE_CASES, ids=[c[0] for c in SAVE_CASES])
def test_save_and_reload(hf_cache, tmp_path, name, kwargs, size):
    model = randomize(timm.create_model(name, **kwargs)).eval()
    out_dir = tmp_path / 'export'
    save_for_hf(model, out_dir, model_args=kv.hc_model_args(model), safe_serialization=True)
    assert (out_dir / 'model.safetensors').is_file()
    config = json.loads((out_dir / 'config.json').read_text())
    assert config['architecture'] == name and 'pretrained_cfg' in config
    assert config['model_args']['num_streams'] == model.num_streams
    assert config['model_args']['hc_init'] == 'published'
    assert config['model_args'].get('hc_kwargs') == kwargs.get('hc_kwargs')
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        local = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
        assert torch.equal(local(x), ref)
        fill_hf_cache(hf_cache, 'kromhc/test-model', {f: out_dir / f for f in ('config.json', 'model.safetensors')})
        hub = timm.create_model('hf-hub:kromhc/test-model', pretrained=True).eval()
        assert torch.equal(hub(x), ref)
    assert hub.hc_spec == model.hc_spec and hub.num_classes == 7
    # plain timm export records the hc settings too (the constructor records them)
    save_for_hf(model, tmp_path / 'plain')
    assert json.loads((tmp_path / 'plain' / 'config.json').read_text())['model_args']['num_streams'] == model.num_streams


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_plain', 'terminator_micro'])
def test_hc_model_args_refuses_a_model_without_streams(name):
    model = timm.create_model(name)
    with pytest.raises(ValueError, match=f'{type(model).__name__} has no stream settings'):
        kv.hc_model_args(model)


def test_wrong_checkpoint_errors(tmp_path):
    model = timm.create_model('vit_micro_patch4_32_mhc', num_streams=2)
    save_for_hf(model, tmp_path, safe_serialization=True)
    weights = dict(file=str(tmp_path / 'model.safetensors'))
    with pytest.raises(kv.CheckpointMismatchError,
                       match=r"variant 'kromhc'.*shape mismatches.*blocks.0.hc_attn.proj_weight: checkpoint \(128, 8\)"
                             r" vs model \(128, 6\)"):
        timm.create_model('vit_micro_patch4_32_kromhc', num_streams=2, pretrained=True, pretrained_cfg_overlay=weights)
    with pytest.raises(kv.CheckpointMismatchError, match=r'num_streams=4.*hc_attn.norm_weight: checkpoint \(128,\)'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_streams=4)
    with pytest.raises(kv.CheckpointMismatchError, match=r"variant 'residual'.*unexpected keys.*blocks.0.hc_attn.bias"):
        timm.create_model('vit_micro_patch4_32_residual', pretrained=True, pretrained_cfg_overlay=weights)
    with pytest.raises(kv.CheckpointMismatchError, match=r'missing keys.*blocks.11.*shape mismatches.*pos_embed'):
        timm.create_model('vit_tiny_patch16_224_mhc', num_streams=2, img_size=64, pretrained=True,
                          pretrained_cfg_overlay=weights)


@pytest.mark.parametrize('residual, hyper, kwargs', [
    ('vit_micro_patch4_32_residual', 'vit_micro_patch4_32_kromhc', dict(depth=2)),
    ('convnext_atto', 'convnext_atto_mhc', {}),
])
def test_pretrained_weights_with_other_input_channels(tmp_path, residual, hyper, kwargs):
    """``pretrained=True, in_chans=1``: timm adapts the first convolution's 3-channel weight after the filter, as for
    its own models, in both ways a hyper-connected model loads weights (a residual checkpoint upcycled, and its
    own). The filter refused the 3-channel weight before."""
    from safetensors.torch import save_file
    base = randomize(timm.create_model(residual, **kwargs))
    save_file(base.state_dict(), tmp_path / 'residual.safetensors')
    own = randomize(timm.create_model(hyper, hc_init='identity', **kwargs))
    save_file(own.state_dict(), tmp_path / 'own.safetensors')
    key = base.pretrained_cfg['first_conv'] + '.weight'
    for source, file in ((base, 'residual'), (own, 'own')):
        gray = timm.create_model(hyper, hc_init='identity', in_chans=1, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / f'{file}.safetensors')), **kwargs)
        # timm's adapt_input_conv for one channel: the sum over the three
        torch.testing.assert_close(gray.state_dict()[key], source.state_dict()[key].sum(1, keepdim=True))


def test_another_variants_state_dict_of_the_same_shapes_is_refused(tmp_path):
    """HC and mHC have the same parameter shapes; the variant each connection records in the state dict's
    metadata (kept by torch.save) makes load_state_dict refuse the other's weights, naming both."""
    hc = timm.create_model('vit_micro_patch4_32_hc', num_streams=2, depth=2)
    torch.save(hc.state_dict(), tmp_path / 'hc.pth')
    saved = torch.load(tmp_path / 'hc.pth', weights_only=True)
    mhc = timm.create_model('vit_micro_patch4_32_mhc', num_streams=2, depth=2)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in mhc.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"blocks.0.hc_attn: the state dict was saved by a 'hc' connection and "
                                           r"this is a 'mhc' one"):
        mhc.load_state_dict(saved)
    again = timm.create_model('vit_micro_patch4_32_hc', num_streams=2, depth=2)
    again.load_state_dict(saved)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in saved.items())


@pytest.mark.parametrize('name', ['vit_micro_patch4_32_kromhc', 'convnext_micro_mhc'])
def test_pretrained_strict_false_loads_what_matches(tmp_path, name):
    """timm's ``pretrained_strict=False``: a checkpoint with keys the model lacks and without some of the model's keys
    loads what matches, both for the model's own weights and for residual weights upcycled (the filter refused
    both before, whatever ``pretrained_strict`` said). Keys of another shape are still refused, as torch refuses
    them with ``strict=False``; the default stays strict."""
    own = randomize(create(name, hc_init='identity', depth=2) if name.startswith('vit_') else create(name))
    residual = randomize(create(name.rsplit('_', 1)[0] + '_residual', **({'depth': 2} if 'vit' in name else {})))
    for source, file in ((own, 'own'), (residual, 'residual')):
        state = dict(source.state_dict(), extra_weight=torch.zeros(3))
        dropped = next(k for k in state if k.endswith(('blocks.0.norm1.weight', 'blocks.0.conv_dw.bias')))
        del state[dropped]
        save_file(state, tmp_path / f'{file}.safetensors')
        kwargs = dict(hc_init='identity', pretrained=True, **({'depth': 2} if name.startswith('vit_') else {}),
                      pretrained_cfg_overlay=dict(file=str(tmp_path / f'{file}.safetensors')))
        with pytest.raises(kv.CheckpointMismatchError, match=rf'missing keys \(1\): {dropped}.*extra_weight'):
            timm.create_model(name, **kwargs)
        model = timm.create_model(name, pretrained_strict=False, **kwargs)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
        assert not torch.equal(loaded[dropped], source.state_dict()[dropped])  # the model's own init
    state = dict(own.state_dict())
    key = next(k for k in state if k.endswith('hc_attn.bias') or k.endswith('hc.bias'))
    state[key] = state[key][:-1]
    save_file(state, tmp_path / 'shape.safetensors')
    with pytest.raises(kv.CheckpointMismatchError, match=rf'shape mismatches \(1\): {key}: checkpoint'):
        timm.create_model(name, hc_init='identity', pretrained=True, pretrained_strict=False,
                          **({'depth': 2} if name.startswith('vit_') else {}),
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'shape.safetensors')))


def save_jax_vit_npz(model, path):
    """Write a timm ViT (class token, no register tokens) in the original JAX ViT ``.npz`` layout, the one timm's
    ``VisionTransformer.load_pretrained`` (``custom_load=True``) reads."""
    import numpy as np
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    C, H = model.embed_dim, model.blocks[0].attn.num_heads
    w = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'], 'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': sd['head.weight'].T, 'head/bias': sd['head.bias']}
    for i in range(len(model.blocks)):
        p, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        mha = f'{p}MultiHeadDotProductAttention_1/'
        for jax_ln, ln in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
            w[f'{p}{jax_ln}/scale'], w[f'{p}{jax_ln}/bias'] = sd[f'{b}{ln}.weight'], sd[f'{b}{ln}.bias']
        for j, n in enumerate(('query', 'key', 'value')):
            w[f'{mha}{n}/kernel'] = sd[f'{b}attn.qkv.weight'][j * C:(j + 1) * C].T.reshape(C, H, C // H)
            w[f'{mha}{n}/bias'] = sd[f'{b}attn.qkv.bias'][j * C:(j + 1) * C].reshape(H, C // H)
        w[f'{mha}out/kernel'] = sd[f'{b}attn.proj.weight'].reshape(C, H, C // H).transpose(1, 2, 0)
        w[f'{mha}out/bias'] = sd[f'{b}attn.proj.bias']
        for r in range(2):
            w[f'{p}MlpBlock_3/Dense_{r}/kernel'] = sd[f'{b}mlp.fc{r + 1}.weight'].T
            w[f'{p}MlpBlock_3/Dense_{r}/bias'] = sd[f'{b}mlp.fc{r + 1}.bias']
    np.savez(path, **w)


@pytest.mark.parametrize('variant', ['residual', 'kromhc'])
def test_jax_npz_checkpoint_upcycles_with_custom_load(tmp_path, variant):
    """timm's way to load an original JAX ViT ``.npz`` (``pretrained_cfg_overlay=dict(file=..., custom_load=True)``,
    read by ``VisionTransformer.load_pretrained``) upcycles it: the model computes what the residual ViT does. The
    pre-load file check refused every ``.npz`` as 'not a complete torch checkpoint ... truncated?'. Without
    ``custom_load`` an ``.npz`` is refused naming it; a connection not built for upcycling is refused up front
    (timm's loader fills the blocks and leaves the connections alone)."""
    ref = randomize(timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)).eval()
    save_jax_vit_npz(ref, tmp_path / 'vit.npz')
    name, file = f'vit_micro_patch4_32_{variant}', str(tmp_path / 'vit.npz')
    model = timm.create_model(name, depth=2, hc_init='identity', pretrained=True,
                              pretrained_cfg_overlay=dict(file=file, custom_load=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x), rtol=1e-5)
    with pytest.raises(kv.CheckpointFileError, match=r'vit.npz is a NumPy \.npz archive.*custom_load=True'):
        timm.create_model(name, depth=2, hc_init='identity', pretrained=True, pretrained_cfg_overlay=dict(file=file))
    (tmp_path / 'cut.npz').write_bytes((tmp_path / 'vit.npz').read_bytes()[:1000])
    with pytest.raises(kv.CheckpointFileError, match=r'cut.npz is not a complete \.npz archive'):
        timm.create_model(name, depth=2, hc_init='identity', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'cut.npz'), custom_load=True))
    if variant != 'residual':
        with pytest.raises(ValueError, match=r"custom_load=True .* needs hc_init='identity', got 'published'"):
            timm.create_model(name, depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=file, custom_load=True))


def test_another_architectures_checkpoint_is_named_as_a_mismatch(tmp_path):
    """A ConvNeXt checkpoint given to a ViT has no connection keys for the ViT, as a residual checkpoint has none:
    it is refused naming the keys, not taken for residual weights (the error asked for hc_init='identity')."""
    save_file(create('convnext_micro_mhc').state_dict(), tmp_path / 'convnext.safetensors')
    with pytest.raises(kv.CheckpointMismatchError, match=r'missing keys .*unexpected keys .*stem'):
        timm.create_model('vit_micro_patch4_32_mhc', depth=2, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'convnext.safetensors')))


@pytest.mark.parametrize('name, kwargs', [
    ('vit_micro_patch4_32_kromhc', dict(depth=2)),  # the numba kernels under auto
    ('vit_micro_patch4_32_mhc', dict(depth=2, hc_backend='torch')),  # the PyTorch backend's autograd Functions
    ('convnext_micro_mhclite', dict(depths=(1, 1, 1, 1))),  # the streams folded through the downsamples
])
def test_torch_jit_trace_records_the_model_and_saves(name, kwargs, tmp_path):
    """``torch.jit.trace`` (TorchScript by tracing, as opposed to ``torch.jit.script``, which is refused) records
    the plain PyTorch definitions of the ops, whatever the backend: the traced module computes what the model
    computes at another batch size, and saves and loads. Before, tracing failed inside numba (the kernels were
    handed the tracer's sizes), and a PyTorch Function in the graph could not be saved."""
    model = randomize(timm.create_model(name, num_classes=10, **kwargs), std=0.05).eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))
    torch.jit.save(traced, str(tmp_path / 'traced.pt'))
    loaded = torch.jit.load(str(tmp_path / 'traced.pt'))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(traced(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(loaded(x), expected, rtol=1e-4, atol=1e-5)
