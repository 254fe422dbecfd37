"""eval.py refuses to evaluate the wrong data or weights: a split that does not exist, classes that are not the
checkpoint's, --use-ema without EMA weights, an unreadable checkpoint; all before the model and data are built."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from kromhc_vision.data import write_digits_folder

from _scripts import load_script

train_script, eval_script = load_script('train'), load_script('eval')
MODEL = 'vit_micro_patch4_32_kromhc'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-epoch run without EMA on 30 digits at 16px: (data folder, checkpoint)."""
    root = tmp_path_factory.mktemp('run')
    data = write_digits_folder(root / 'digits', per_class=3)
    train_script.main([
        '--data-dir', str(data), '--model', MODEL, '--model-kwargs', 'depth=1', 'img_size=16', '--img-size', '16',
        '--num-classes', '10', '--batch-size', '8', '--epochs', '1', '--opt', 'adamw', '--lr', '2e-3',
        '--warmup-epochs', '0', '--workers', '0', '--output', str(root), '--experiment', 'run'])
    return data, root / 'run' / 'last.pth.tar'


def evaluate(*argv):
    eval_script.main(['--model', MODEL, '--workers', '0', *map(str, argv)])


def test_a_split_that_does_not_exist_is_refused_naming_the_ones_that_do(trained, tmp_path):
    data, checkpoint = trained
    with pytest.raises(SystemExit, match=r"split 'nosplit': no such subfolder in .*; it has: train, validation"):
        evaluate('--checkpoint', checkpoint, '--data-dir', data, '--split', 'nosplit', '--output', tmp_path)
    assert not (tmp_path / 'results.json').exists()


def test_a_split_without_images_is_refused_naming_it(trained, tmp_path):
    _, checkpoint = trained
    for c in range(10):
        (tmp_path / 'data' / 'validation' / str(c)).mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"eval.py: error: data: Found 0 images in subfolders of .*validation"):
        evaluate('--checkpoint', checkpoint, '--data-dir', tmp_path / 'data', '--output', tmp_path / 'out')
    assert not (tmp_path / 'out' / 'results.json').exists()


def test_the_split_evaluated_is_recorded(trained, tmp_path):
    data, checkpoint = trained
    evaluate('--checkpoint', checkpoint, '--data-dir', data, '--split', 'train', '--output', tmp_path)
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['split_dir'] == str(Path(data) / 'train') and results['num_images'] == 30
    assert results['weights'] == 'model'


def test_classes_that_are_not_the_checkpoints_are_refused(trained, tmp_path):
    data, checkpoint = trained
    shutil.copytree(data, tmp_path / 'data')
    shutil.rmtree(tmp_path / 'data' / 'validation' / '3')  # labels 4..9 would become 3..8
    with pytest.raises(SystemExit, match=r"classes of .*validation are not the checkpoint's \(missing: 3\)"):
        evaluate('--checkpoint', checkpoint, '--data-dir', tmp_path / 'data', '--output', tmp_path / 'out')
    assert not (tmp_path / 'out' / 'results.json').exists()


def test_use_ema_with_pretrained_weights_is_refused(capsys):
    """--pretrained weights have no EMA copy: --use-ema was ignored while results.json recorded weights 'ema'."""
    with pytest.raises(SystemExit):
        evaluate('--pretrained', '--use-ema')
    assert "--use-ema selects a --checkpoint's EMA weights; --pretrained weights have none" in capsys.readouterr().err


def test_use_ema_without_ema_weights_is_refused(trained, tmp_path):
    data, checkpoint = trained
    with pytest.raises(SystemExit, match='--use-ema: .* holds no EMA weights'):
        evaluate('--checkpoint', checkpoint, '--data-dir', data, '--use-ema', '--output', tmp_path)
    assert not (tmp_path / 'results.json').exists()


def test_num_classes_that_contradict_a_train_checkpoint_are_refused(trained, tmp_path):
    """--num-classes 5 on a checkpoint of 10 classes was ignored (its run's settings build the model)."""
    data, checkpoint = trained
    with pytest.raises(SystemExit, match=r'--num-classes 5: .* is a train.py checkpoint of 10 classes'):
        evaluate('--checkpoint', checkpoint, '--data-dir', data, '--num-classes', 5, '--output', tmp_path)
    assert not (tmp_path / 'results.json').exists()
    evaluate('--checkpoint', checkpoint, '--data-dir', data, '--num-classes', 10, '--output', tmp_path)  # agrees


@pytest.mark.parametrize('content', [b'', b'garbage, not a checkpoint', 'truncated'])
def test_an_unreadable_checkpoint_is_named(trained, tmp_path, content):
    data, checkpoint = trained
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(checkpoint.read_bytes()[:2000] if content == 'truncated' else content)
    with pytest.raises(SystemExit, match=f'checkpoint: {bad} is not a readable checkpoint'):
        evaluate('--checkpoint', bad, '--data-dir', data, '--output', tmp_path)
    with pytest.raises(SystemExit) as e:
        train_script.main(['--resume', str(bad)])
    assert e.value.code == 2


def test_a_one_channel_checkpoint_is_evaluated_on_a_folder_in_grayscale(trained, tmp_path):
    data, _ = trained
    train_script.main([
        '--data-dir', str(data), '--model', MODEL, '--model-kwargs', 'depth=1', 'img_size=16', '--img-size', '16',
        '--in-chans', '1', '--num-classes', '10', '--batch-size', '10', '--epochs', '1', '--opt', 'adamw',
        '--warmup-epochs', '0', '--workers', '0', '--output', str(tmp_path), '--experiment', 'gray'])
    evaluate('--checkpoint', tmp_path / 'gray' / 'last.pth.tar', '--data-dir', data, '--output', tmp_path / 'out')
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['data_config']['input_size'] == [1, 16, 16] and results['num_images'] == 30


def test_diagnostics_of_a_model_without_hyper_connections_is_refused_before_evaluating(trained, tmp_path,
                                                                                      monkeypatch):
    import timm
    import torch
    data, _ = trained
    weights = tmp_path / 'plain.pth'
    torch.save(timm.create_model('vit_micro_patch4_32_plain', num_classes=10).state_dict(), weights)

    def no_evaluation(*args, **kwargs):
        raise AssertionError('evaluated before refusing --diagnostics')

    monkeypatch.setattr(eval_script, 'evaluate', no_evaluation)
    with pytest.raises(SystemExit, match='--diagnostics: vit_micro_patch4_32_plain has no hyper-connections'):
        eval_script.main(['--model', 'vit_micro_patch4_32_plain', '--checkpoint', str(weights), '--num-classes',
                          '10', '--data-dir', str(data), '--workers', '0', '--diagnostics', '--output',
                          str(tmp_path)])
    assert not (tmp_path / 'results.json').exists()


def test_dataset_download_is_taken_as_the_missing_dataset_error_says(trained, tmp_path, monkeypatch):
    """The Fashion-MNIST error names --dataset-download; eval.py refused it as an unrecognised argument."""
    import kromhc_vision.cli.evaluation as evaluation
    seen = {}

    def create_dataset(name, root, download=False, **kwargs):
        seen.update(name=name, root=root, download=download)
        raise SystemExit('stop before reading')
    monkeypatch.setattr(evaluation, 'create_dataset', create_dataset)
    with pytest.raises(SystemExit, match='stop before reading'):
        evaluate('--checkpoint', trained[1], '--dataset', 'torch/fashion_mnist', '--dataset-download',
                 '--data-dir', tmp_path / 'fm')
    assert seen == dict(name='torch/fashion_mnist', root=str(tmp_path / 'fm'), download=True)


@pytest.mark.parametrize('device, message', [
    ('cpux', "device: 'cpux' is not a torch device"),
    ('cuda', "device: 'cuda', but CUDA is not available here"),  # CUDA switched off below, on any machine
    ('cuda:0', "device: 'cuda:0', but CUDA is not available here"),
])
def test_a_device_torch_cannot_use_is_named_before_the_model_is_built(device, message, monkeypatch):
    """Was torch's RuntimeError: at once for 'cpux', after the model was built for 'cuda' without a GPU."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match=f'eval.py: error: {message}'):
        evaluate('--pretrained', '--device', device)


def test_a_cuda_device_index_beyond_the_devices_present_is_named(monkeypatch):
    """``cuda:2`` where two CUDA devices are visible (CUDA faked available): refused naming the count."""
    from kromhc_vision.cli import ConfigError, check_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert check_device('cuda:1') == torch.device('cuda', 1)
    with pytest.raises(ConfigError, match=r"device: 'cuda:2', but this machine has 2 CUDA device\(s\)"):
        check_device('cuda:2')


@pytest.mark.parametrize('model, message', [
    ('vit_micro_patch4_32_kromhcc', "model: unknown model 'vit_micro_patch4_32_kromhcc' (did you mean "
                                    "'vit_micro_patch4_32_kromhc'"),
    (MODEL, f"{MODEL} has no pretrained weights (give a --checkpoint"),
])
def test_a_model_name_without_weights_is_named_not_raised(model, message, tmp_path):
    """Were timm's RuntimeErrors (tracebacks): 'Unknown model (...)', 'No pretrained weights exist for ...'."""
    (tmp_path / 'validation').mkdir()
    with pytest.raises(SystemExit) as e:
        eval_script.main(['--model', model, '--pretrained', '--workers', '0', '--data-dir', str(tmp_path)])
    assert str(e.value).startswith(f'eval.py: error: {message}')


def test_a_model_saved_to_a_local_dir_is_evaluated_by_its_prefixed_name(trained, tmp_path):
    """``--model local-dir:<folder>`` (a model written by timm's ``save_for_hf``, as the README shows) with
    ``--pretrained``: timm's source prefixes pass the model-name check, the folder's weights are evaluated."""
    import timm
    from timm.models import save_for_hf
    from kromhc_vision import hc_model_args
    data, checkpoint = trained
    model = timm.create_model(MODEL, depth=1, img_size=16, num_classes=10)
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict'])
    save_for_hf(model, tmp_path / 'saved', model_args=dict(depth=1, img_size=16, **hc_model_args(model)))
    eval_script.main(['--model', f'local-dir:{tmp_path / "saved"}', '--pretrained', '--workers', '0',
                      '--data-dir', str(data), '--output', str(tmp_path / 'eval')])
    assert 'top1' in json.loads((tmp_path / 'eval' / 'results.json').read_text())


def test_a_torchvision_dataset_without_data_dir_is_refused_not_read_from_the_digits_folder(trained):
    """``--dataset torch/cifar10`` (``--dataset-download`` or not) without ``--data-dir``: torchvision was handed the
    embedded digits folder as its root (and would download CIFAR-10 into it); refused as train.py refuses it."""
    with pytest.raises(SystemExit, match='eval.py: error: dataset: torch/cifar10 needs --data-dir'):
        evaluate('--checkpoint', trained[1], '--dataset', 'torch/cifar10', '--dataset-download')


def test_a_plain_state_dict_that_does_not_fit_the_model_is_named_with_the_class_count(tmp_path):
    """A plain state dict (``torch.save(model.state_dict())``) of a 10-class model evaluated without --num-classes,
    or as another variant: torch's load_state_dict RuntimeError was a traceback of every mismatched key."""
    import timm
    torch.save(timm.create_model(MODEL, num_classes=10).state_dict(), tmp_path / 'plain.pth')
    (tmp_path / 'validation').mkdir()
    common = ['--checkpoint', str(tmp_path / 'plain.pth'), '--workers', '0', '--data-dir', str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        eval_script.main(['--model', MODEL, *common])
    assert str(e.value).startswith(f"eval.py: error: {tmp_path / 'plain.pth'} does not fit '{MODEL}' with 1000 "
                                   "classes (its default): its classifier has 10 outputs (give --num-classes 10): "
                                   "size mismatch for head.weight")
    with pytest.raises(SystemExit, match=r"does not fit 'vit_micro_patch4_32_mhc': blocks.0.hc_attn: the state dict "
                       r"was saved by a 'kromhc' connection and this is a 'mhc' one.* size mismatch for blocks.0.hc_"):
        eval_script.main(['--model', 'vit_micro_patch4_32_mhc', '--num-classes', '10', *common])
    state_dict = torch.load(tmp_path / 'plain.pth')  # wrapped as timm reads it, saved from DataParallel
    torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, tmp_path / 'plain.pth')
    with pytest.raises(SystemExit, match=r"its classifier has 10 outputs \(give --num-classes 10\)"):
        eval_script.main(['--model', MODEL, *common])


def test_a_local_dir_model_without_its_config_is_named_with_a_checkpoint(tmp_path):
    """``--model local-dir:<folder>`` with a plain state dict as ``--checkpoint``: a folder without config.json was
    a traceback."""
    (tmp_path / 'saved').mkdir()
    (tmp_path / 'validation').mkdir()
    torch.save({'head.bias': torch.zeros(10)}, tmp_path / 'plain.pth')
    with pytest.raises(SystemExit, match=r"eval.py: error: model 'local-dir:.*saved': .*config.json is missing"):
        eval_script.main(['--model', f'local-dir:{tmp_path / "saved"}', '--checkpoint', str(tmp_path / 'plain.pth'),
                          '--workers', '0', '--data-dir', str(tmp_path)])


def test_a_torchvision_dataset_missing_from_its_folder_is_named(trained, tmp_path):
    """torchvision's RuntimeError ('Dataset not found or corrupted. You can use download=True') was a traceback."""
    with pytest.raises(SystemExit, match=r"eval.py: error: dataset: torchvision finds no intact cifar10 files in .*; "
                                         "give the --data-dir that holds them, or add --dataset-download"):
        evaluate('--checkpoint', trained[1], '--dataset', 'torch/cifar10', '--data-dir', tmp_path)


def test_a_run_trained_on_rgba_images_is_evaluated_on_rgba_images(tmp_path):
    """eval.py reads the images as the run did (--input-img-mode RGBA for a 4-channel model): it read them as RGB,
    and the model's first convolution refused 3 channels."""
    data = write_digits_folder(tmp_path / 'digits', per_class=3)
    train_script.main([
        '--data-dir', str(data), '--model', MODEL, '--model-kwargs', 'depth=1', 'img_size=16', '--img-size', '16',
        '--in-chans', '4', '--input-img-mode', 'RGBA', '--mean', '0.5', '0.5', '0.5', '0.5', '--std', '0.5', '0.5',
        '0.5', '0.5', '--num-classes', '10', '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0',
        '--workers', '0', '--output', str(tmp_path), '--experiment', 'run'])
    evaluate('--checkpoint', tmp_path / 'run' / 'last.pth.tar', '--data-dir', data, '--output', tmp_path / 'eval')
    results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
    assert results['data_config']['input_img_mode'] == 'RGBA' and results['num_images'] == 30


def test_a_run_folder_given_as_checkpoint_names_its_checkpoint(trained, tmp_path):
    data, checkpoint = trained
    with pytest.raises(SystemExit, match=rf'{checkpoint.parent} is a folder, not a checkpoint file; its last '
                                         rf'checkpoint is {checkpoint}'):
        evaluate('--checkpoint', checkpoint.parent, '--data-dir', data, '--output', tmp_path)
