"""Errors that are clear and come before any work: pretrained weights offline, broken local-dir folders,
double backward through the PyTorch path. None of these tests needs the network."""
import time

import huggingface_hub
import huggingface_hub.constants
import pytest
import timm
import torch
import safetensors.torch
from timm.models import save_for_hf

import kromhc_vision as kv

MICRO = 'vit_micro_patch4_32_mhc'


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def _assert_names_local_options(msg):
    for text in ('HF_HUB_OFFLINE', 'pretrained_cfg_overlay=dict(file=', 'local-dir:', 'load_residual_weights'):
        assert text in msg, text


def test_pretrained_with_hf_hub_offline_fails_at_once(empty_hf_cache, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    start = time.monotonic()
    with pytest.raises(kv.PretrainedWeightsUnavailableError) as err:
        timm.create_model('vit_tiny_patch16_224_hc', pretrained=True)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k' in msg and 'HF_HUB_OFFLINE is set' in msg
    _assert_names_local_options(msg)
    assert isinstance(err.value, FileNotFoundError)  # as huggingface_hub's LocalEntryNotFoundError is


def test_pretrained_with_unreachable_hub_fails_after_one_short_probe(empty_hf_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    probes = []

    class Session:
        def head(self, url, timeout):
            probes.append((url, timeout))
            raise OSError('Name or service not known')

    monkeypatch.setattr(huggingface_hub, 'get_session', Session)

    def no_download(*args, **kwargs):
        raise AssertionError('hf_hub_download must not be reached')

    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_download)
    with pytest.raises(kv.PretrainedWeightsUnavailableError, match='cannot be reached.*Name or service') as err:
        timm.create_model('convnext_atto_kromhc', pretrained=True)
    assert len(probes) == 1 and probes[0][1] <= 5
    _assert_names_local_options(str(err.value))


@pytest.mark.parametrize('offline', [True, False], ids=['HF_HUB_OFFLINE', 'unreachable'])
def test_hf_hub_name_fails_at_once_without_the_hub(empty_hf_cache, monkeypatch, offline):
    """create_model('hf-hub:<repo>') reads the repo's config.json first: without the Hub and the cache, the error
    comes at once (offline) or after one short probe, naming the repo and the local options."""
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', offline)
    probes = []

    class Session:
        def head(self, url, timeout):
            probes.append(timeout)
            raise OSError('Name or service not known')

    monkeypatch.setattr(huggingface_hub, 'get_session', Session)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', None)  # a download attempt would be a TypeError
    start = time.monotonic()
    with pytest.raises(kv.PretrainedWeightsUnavailableError, match='hf-hub:someone/vit_micro_hc reads config.json '
                                                                   'from the Hugging Face Hub') as err:
        timm.create_model('hf-hub:someone/vit_micro_hc', pretrained=True)
    assert time.monotonic() - start < 5 and len(probes) == (0 if offline else 1)
    assert ('HF_HUB_OFFLINE is set' if offline else 'cannot be reached') in str(err.value)
    _assert_names_local_options(str(err.value))


def test_local_weights_need_no_hub(empty_hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, 'get_session', None)  # any Hub probe would fail with a TypeError
    model = timm.create_model(MICRO, num_streams=2)
    save_for_hf(model, tmp_path / 'out', safe_serialization=True)
    timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    timm.create_model(MICRO, num_streams=2, pretrained=True,
                      pretrained_cfg_overlay=dict(file=str(tmp_path / 'out' / 'model.safetensors')))


@pytest.fixture
def saved(tmp_path):
    out = tmp_path / 'out'
    save_for_hf(timm.create_model(MICRO, num_streams=2), out, safe_serialization=True)
    return out


@pytest.mark.parametrize('config, match', [
    (b'', r'config.json is not valid JSON \(0 bytes'),
    (b'{"architecture": "vit_micro_pat', r'config.json is not valid JSON .*truncated'),
    (b'\xff\xfe garbage', r'config.json is not valid JSON'),
    (b'[1, 2]', r"config.json does not name the model: expected a JSON object with an 'architecture'"),
    (b'{"pretrained_cfg": {}}', r"config.json does not name the model"),
], ids=['empty', 'truncated', 'garbage', 'list', 'no-architecture'])
def test_local_dir_bad_config_names_the_file(saved, config, match):
    (saved / 'config.json').write_bytes(config)
    with pytest.raises(kv.CheckpointFileError, match=match) as err:
        timm.create_model(f'local-dir:{saved}', pretrained=True)
    assert str(saved / 'config.json') in str(err.value)


def test_local_dir_missing_config_or_folder(saved, tmp_path):
    (saved / 'config.json').unlink()
    with pytest.raises(kv.CheckpointFileError, match=r'config.json is missing \(local-dir: expects a folder written'):
        timm.create_model(f'local-dir:{saved}', pretrained=True)
    with pytest.raises(kv.CheckpointFileError, match='is not a folder'):
        timm.create_model(f'local-dir:{tmp_path / "nowhere"}', pretrained=True)


def test_local_dir_missing_weights(saved):
    (saved / 'model.safetensors').unlink()
    with pytest.raises(kv.CheckpointFileError, match=r'holds no checkpoint \(expected model.safetensors'):
        timm.create_model(f'local-dir:{saved}', pretrained=True)
    timm.create_model(f'local-dir:{saved}', pretrained=False)  # the config alone builds the model


@pytest.mark.parametrize('cut, match', [(0, r'is empty \(0 bytes\)'), (0.5, 'not a complete safetensors file'),
                                        (None, 'not a complete safetensors file')],
                         ids=['empty', 'truncated', 'garbage'])
def test_bad_weights_file_names_the_file(saved, cut, match):
    weights = saved / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(b'not a checkpoint' if cut is None else data[:int(len(data) * cut)])
    with pytest.raises(kv.CheckpointFileError, match=match) as err:
        timm.create_model(f'local-dir:{saved}', pretrained=True)
    assert str(weights) in str(err.value)
    with pytest.raises(kv.CheckpointFileError, match=match):
        timm.create_model(MICRO, num_streams=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))


@pytest.mark.parametrize('cut, match', [(0.5, 'not a complete torch checkpoint'), (0.999, 'not a complete torch '
                                        'checkpoint'), (None, 'not a torch checkpoint')],
                         ids=['truncated', 'truncated-end', 'garbage'])
def test_bad_torch_weights_file_names_the_file(saved, cut, match):
    weights = saved / 'pytorch_model.bin'
    safetensors_file = saved / 'model.safetensors'
    torch.save(safetensors.torch.load_file(safetensors_file), weights)
    safetensors_file.unlink()
    timm.create_model(f'local-dir:{saved}', pretrained=True)  # the complete file loads
    data = weights.read_bytes()
    weights.write_bytes(b'not a checkpoint' if cut is None else data[:int(len(data) * cut)])
    with pytest.raises(kv.CheckpointFileError, match=match) as err:
        timm.create_model(f'local-dir:{saved}', pretrained=True)
    assert str(weights) in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# double backward


def _penalty(connection, X, backend):
    """A gradient penalty: the input gradient with create_graph=True, then the backward of its norm."""
    out = connection(X, lambda u: torch.tanh(u))
    (gX,) = torch.autograd.grad(out.square().sum(), X, create_graph=True)
    return gX.square().sum()


@pytest.mark.parametrize('backend', ['torch', 'numba'])
@pytest.mark.parametrize('variant', ['hc', 'mhc', 'kromhc'])
def test_double_backward_raises_a_named_error(backend, variant):
    if backend == 'numba':
        pytest.importorskip('numba')
    connection = kv.build_connection(variant, 4, 8, backend=backend)
    X = torch.randn(2, 3, 4, 8, requires_grad=True)
    with pytest.raises(kv.DoubleBackwardUnsupportedError, match=r'double backward through stream_p(re|ost) is not '
                                                                 r'supported.*once_differentiable.*ops.reference'):
        _penalty(connection, X, backend).backward()


@pytest.mark.parametrize('backend', ['torch', 'numba', 'triton'])
@pytest.mark.parametrize('transform', ['vmap', 'grad', 'jacrev', 'jvp'])
def test_torch_func_transforms_raise_a_named_error(transform, backend):
    """A connection (kromhc, n = 4, C = 8) on X (2, 3, 4, 8) under a torch.func transform says that it does not
    support torch.func (was torch's "an autograd.Function ... must override the setup_context staticmethod", which
    blames the op's code); functional_call with ordinary autograd gives the parameter gradients of a plain call."""
    connection = kv.build_connection('kromhc', 4, 8, backend=backend)
    X = torch.randn(2, 3, 4, 8)

    def f(X):
        return connection(X, torch.tanh).sum()

    run = {'vmap': lambda: torch.func.vmap(f)(X), 'grad': lambda: torch.func.grad(f)(X),
           'jacrev': lambda: torch.func.jacrev(f)(X), 'jvp': lambda: torch.func.jvp(f, (X,), (X,))}[transform]
    with pytest.raises(RuntimeError, match=r'KromHC cannot run under a torch\.func transform.*functional_call'):
        run()
    params = {k: v.detach().clone().requires_grad_() for k, v in connection.named_parameters()}
    torch.func.functional_call(connection, params, (X, torch.tanh)).sum().backward()
    connection(X, torch.tanh).sum().backward()
    for k, p in connection.named_parameters():
        torch.testing.assert_close(params[k].grad, p.grad, rtol=0, atol=0)


def test_first_backward_with_create_graph_is_unchanged():
    connection = kv.build_connection('kromhc', 4, 8, backend='torch')
    X = torch.randn(2, 3, 4, 8, requires_grad=True)
    out = connection(X, torch.tanh)
    (plain,) = torch.autograd.grad(out.square().sum(), X)
    out = connection(X, torch.tanh)
    (graph,) = torch.autograd.grad(out.square().sum(), X, create_graph=True)
    torch.testing.assert_close(graph, plain, rtol=0, atol=0)


def test_reference_ops_support_double_backward():
    from kromhc_vision.ops import reference
    X, y = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    h_res, h_post = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (X, y, h_res, h_post)]
    assert torch.autograd.gradgradcheck(reference.stream_post, inputs)
