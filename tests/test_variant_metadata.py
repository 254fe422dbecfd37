"""Another variant's weights of the same shapes (HC and mHC) are refused on every timm loading path of a torch file,
not only by ``load_state_dict`` on what ``torch.load`` returns: timm's ``clean_state_dict`` (``load_checkpoint``,
``create_model(checkpoint_path=...)``, ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:`` with a
``pytorch_model.bin``) rebuilt the dict without its ``_metadata``, where each connection records its variant."""
import json
from collections import OrderedDict

import pytest
import timm
import torch
from timm.models import load_checkpoint, save_for_hf

import kromhc_vision as kv

KW = dict(depth=1, img_size=16, num_classes=10, num_streams=2)


@pytest.fixture(scope='module')
def hc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('hc') / 'hc.pth'
    torch.save(timm.create_model('vit_micro_patch4_32_hc', **KW).state_dict(), path)
    return path


def mhc():
    return timm.create_model('vit_micro_patch4_32_mhc', **KW)


REFUSED = "saved by a 'hc' connection and this is a 'mhc' one"


def test_load_checkpoint_refuses_another_variant(hc_file):
    with pytest.raises(RuntimeError, match=REFUSED):
        load_checkpoint(mhc(), str(hc_file))


def test_a_ddp_prefixed_state_dict_keeps_its_variants(hc_file, tmp_path):
    state_dict = torch.load(hc_file)
    prefixed = OrderedDict((f'module.{k}', v) for k, v in state_dict.items())
    prefixed._metadata = OrderedDict((f'module.{k}' if k else 'module', v) for k, v in state_dict._metadata.items())
    torch.save(prefixed, tmp_path / 'ddp.pth')
    with pytest.raises(RuntimeError, match=REFUSED):
        load_checkpoint(mhc(), str(tmp_path / 'ddp.pth'))
    model = timm.create_model('vit_micro_patch4_32_hc', **KW)
    load_checkpoint(model, str(tmp_path / 'ddp.pth'))  # its own variant loads
    for k, v in state_dict.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_create_model_checkpoint_path_refuses_another_variant(hc_file):
    with pytest.raises(RuntimeError, match=REFUSED):
        timm.create_model('vit_micro_patch4_32_mhc', checkpoint_path=str(hc_file), **KW)
    timm.create_model('vit_micro_patch4_32_hc', checkpoint_path=str(hc_file), **KW)  # the same variant loads


def test_pretrained_file_refuses_another_variant(hc_file):
    with pytest.raises(RuntimeError, match=REFUSED):
        timm.create_model('vit_micro_patch4_32_mhc', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(hc_file)), **KW)
    timm.create_model('vit_micro_patch4_32_hc', pretrained=True, pretrained_cfg_overlay=dict(file=str(hc_file)), **KW)


def test_local_dir_with_torch_weights_refuses_another_variant(tmp_path):
    hc = timm.create_model('vit_micro_patch4_32_hc', **KW)
    save_for_hf(hc, tmp_path / 'repo', model_args=kv.hc_model_args(hc), safe_serialization=False)
    loaded = timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in hc.state_dict().items())
    config = json.loads((tmp_path / 'repo' / 'config.json').read_text())
    config['architecture'] = 'vit_micro_patch4_32_mhc'
    (tmp_path / 'repo' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=REFUSED):
        timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True)


def test_train_refuses_an_initial_checkpoint_of_another_variant_naming_it(hc_file, tmp_path, capsys):
    """train.py --initial-checkpoint of an HC run's weights into an mHC model: named (exit 2), not a traceback, and
    no run folder is left behind; before, the mHC run trained on from the HC weights without a word."""
    from kromhc_vision.data import write_digits_folder
    from _scripts import TINY, load_script
    data = write_digits_folder(tmp_path / 'digits', per_class=1)
    argv = [a for a in TINY if a not in ('vit_micro_patch4_32_kromhc',)]
    argv[argv.index('--model') + 1:argv.index('--model') + 1] = ['vit_micro_patch4_32_mhc']
    argv[argv.index('img_size=16') + 1:argv.index('img_size=16') + 1] = ['num_streams=2']
    argv += ['--data-dir', data, '--epochs', 1, '--batch-size', 5, '--output', tmp_path, '--experiment', 'run',
             '--initial-checkpoint', hc_file]
    with pytest.raises(SystemExit) as e:
        load_script('train').main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'initial_checkpoint' in err and str(hc_file) in err and REFUSED in err, err
    assert not (tmp_path / 'run').exists()
