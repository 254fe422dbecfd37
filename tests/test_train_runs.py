"""train.py keeps runs safe: no run folder overwritten by accident, one run per folder, resume continues the run
it names (its settings, its schedule), and bad settings are named before any work."""
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from kromhc_vision.cli import ConfigError
from kromhc_vision.cli.train_config import parse_args, validate
from kromhc_vision.data import write_digits_folder

from _scripts import ROOT, TINY, load_script

train_script = load_script('train')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """30 train / 30 validation images (3 per class)."""
    return str(write_digits_folder(tmp_path_factory.mktemp('data') / 'digits', per_class=3))


def run(*argv):
    train_script.main([str(a) for a in argv])


def error_of(capsys, *argv):
    """The exit status and stderr of a refused train.py run."""
    with pytest.raises(SystemExit) as e:
        run(*argv)
    return e.value.code, capsys.readouterr().err


def stop_after_epoch(monkeypatch, epoch=0):
    """Make the next run die (as if killed) before its checkpoint of ``epoch + 1``; returns the undo."""
    save = train_script.CheckpointSaver.save_checkpoint

    def die_after_epoch(self, saving, metric=None):
        if saving == epoch + 1:
            raise KeyboardInterrupt(f'killed after epoch {epoch}')
        return save(self, saving, metric=metric)

    monkeypatch.setattr(train_script.CheckpointSaver, 'save_checkpoint', die_after_epoch)
    return lambda: monkeypatch.setattr(train_script.CheckpointSaver, 'save_checkpoint', save)


# ------------------------------------------------------------------------------------------- the run folder
def test_a_second_run_into_a_run_folder_is_refused_and_leaves_it_intact(tmp_path, data, capsys):
    argv = [*TINY, '--data-dir', data, '--epochs', 1, '--output', tmp_path, '--experiment', 'run']
    run(*argv)
    folder = tmp_path / 'run'
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, err = error_of(capsys, *argv, '--seed', 4)
    assert code == 2
    assert str(folder) in err and '--resume' in err and 'last.pth.tar' in err and '--experiment' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_run_stopped_before_its_first_checkpoint_is_refused_naming_overwrite(tmp_path, data, capsys,
                                                                               monkeypatch):
    def die_at_epoch_0(self, epoch, metric=None):
        raise KeyboardInterrupt('killed before the checkpoint of epoch 0')

    argv = [*TINY, '--data-dir', data, '--epochs', 1, '--output', tmp_path, '--experiment', 'run']
    monkeypatch.setattr(train_script.CheckpointSaver, 'save_checkpoint', die_at_epoch_0)
    with pytest.raises(KeyboardInterrupt):
        run(*argv)
    monkeypatch.undo()
    assert not (tmp_path / 'run' / 'last.pth.tar').exists()
    code, err = error_of(capsys, *argv)
    assert code == 2 and 'no epoch of it finished' in err and '--overwrite' in err and '--resume' not in err
    run(*argv, '--overwrite')  # the way it names
    assert (tmp_path / 'run' / 'last.pth.tar').exists()


def test_overwrite_replaces_the_run_and_leaves_no_stale_checkpoint(tmp_path, data):
    run(*TINY, '--data-dir', data, '--epochs', 2, '--output', tmp_path, '--experiment', 'run')
    assert (tmp_path / 'run' / 'checkpoint-1.pth.tar').exists()
    run(*TINY, '--data-dir', data, '--epochs', 1, '--output', tmp_path, '--experiment', 'run', '--overwrite')
    assert sorted(p.name for p in (tmp_path / 'run').glob('*.pth.tar')) == [
        'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert [r['epoch'] for r in json.loads((tmp_path / 'run' / 'summary.json').read_text())] == [0]


def test_overwrite_is_refused_where_it_would_remove_the_checkpoint_the_run_starts_from(tmp_path, data, capsys):
    """--overwrite --initial-checkpoint <folder>/last.pth.tar removed the run's files, that checkpoint among them,
    then failed reading it (FileNotFoundError): the run and the weights were both gone. Refused before any work,
    the folder left as it was."""
    argv = [*TINY, '--data-dir', data, '--epochs', 1, '--output', tmp_path, '--experiment', 'run']
    run(*argv)
    folder = tmp_path / 'run'
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, err = error_of(capsys, *argv, '--overwrite', '--initial-checkpoint', folder / 'last.pth.tar')
    assert code == 2 and f'initial_checkpoint: {folder / "last.pth.tar"} is a file of the run in {folder}' in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_folder_in_use_is_refused_and_a_killed_holder_does_not_block_resume(tmp_path, data, capsys, monkeypatch):
    folder = tmp_path / 'run'
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(*TINY, '--data-dir', data, '--epochs', 2, '--output', tmp_path, '--experiment', 'run')
    undo()
    # another process holds the folder's lock, as a running train.py does
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
                               'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)',
                               str(folder / '.train.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        code, err = error_of(capsys, '--resume', folder / 'last.pth.tar')
        assert code == 2 and f'{folder} is in use by another train.py run' in err
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, the lock file stays behind
        holder.wait()
    assert (folder / '.train.lock').exists()
    run('--resume', folder / 'last.pth.tar')
    assert [r['epoch'] for r in json.loads((folder / 'summary.json').read_text())] == [0, 1]
    with open(folder / '.train.lock') as f:  # released when the run ended
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_an_unwritable_output_folder_is_named_before_any_work(tmp_path, data):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(ConfigError, match=f'cannot write to {blocker}'):
        validate(parse_args([*TINY, '--data-dir', data, '--output', str(blocker / 'sub')])[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


def test_an_output_folder_under_an_executable_file_is_named_before_any_work(tmp_path, data):
    """os.access grants W and X on a 755 file (to its owner, and to root on any file with an x bit)."""
    blocker = tmp_path / 'a_script'
    blocker.write_text('#!/bin/sh\n')
    blocker.chmod(0o755)
    with pytest.raises(ConfigError, match=f'cannot write to {blocker}'):
        validate(parse_args([*TINY, '--data-dir', data, '--output', str(blocker / 'sub')])[0])


def test_pretrained_weights_that_cannot_be_read_are_named_not_raised(tmp_path, data, capsys):
    """kv.CheckpointFileError (and PretrainedWeightsUnavailableError offline) came out of train.py as tracebacks."""
    weights = tmp_path / 'w.safetensors'
    weights.write_bytes(b'not a safetensors file')
    code, err = error_of(capsys, *TINY, '--data-dir', data, '--pretrained', '--pretrained-path', weights,
                         '--output', tmp_path, '--experiment', 'x')
    assert code == 2 and f'error: pretrained weights of vit_micro_patch4_32_kromhc: weights file {weights}' in err
    assert 'Traceback' not in err


def test_a_run_folder_that_cannot_be_made_is_named_not_raised(tmp_path, monkeypatch):
    from kromhc_vision.cli import run_folder

    def makedirs(folder, exist_ok=False):
        raise FileNotFoundError(2, 'No such file or directory', folder)
    monkeypatch.setattr(run_folder.os, 'makedirs', makedirs)
    with pytest.raises(ConfigError, match=f'output: cannot write the run folder {tmp_path / "run"}: No such file'):
        run_folder.RunLock(tmp_path / 'run')


# ------------------------------------------------------------------------------------------------- resume
@pytest.fixture
def stopped_run(tmp_path, data, monkeypatch):
    """A 3-epoch run of the digits config (30 images) stopped after epoch 0: its folder."""
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run('-c', ROOT / 'configs' / 'digits_kromhc.yaml', '--data-dir', data, '--epochs', 3, '--batch-size', 8,
            '--output', tmp_path, '--experiment', 'run')
    undo()
    return tmp_path / 'run'


def test_resume_alone_continues_the_digits_config_run_with_its_settings(stopped_run):
    run('--resume', stopped_run / 'last.pth.tar')  # the README's command: no -c, no model settings
    assert [r['epoch'] for r in json.loads((stopped_run / 'summary.json').read_text())] == [0, 1, 2]
    args = torch.load(stopped_run / 'last.pth.tar', weights_only=False)['args']
    assert (args.model, args.model_kwargs, args.img_size, args.opt, args.batch_size, args.epochs) == (
        'vit_micro_patch4_32_kromhc', {'img_size': 16, 'hc_recompute': False}, 16, 'adamw', 8, 3)
    assert yaml.safe_load((stopped_run / 'args.yaml').read_text())['model_kwargs'] == {'img_size': 16,
                                                                                        'hc_recompute': False}


@pytest.mark.parametrize('argv, names', [
    (['--model', 'vit_micro_patch4_32_mhc'], ["model is 'vit_micro_patch4_32_mhc'", "'vit_micro_patch4_32_kromhc'"]),
    (['--model-kwargs', 'img_size=32'], ['model_kwargs img_size is 32', '16']),
    (['--model-kwargs', 'num_streams=2'], ['model_kwargs num_streams is 2', "'<not set>'"]),
    (['--num-classes', '5'], ['num_classes is 5', '10']),
    (['--img-size', '32'], ['img_size is 32', '16']),
    (['--epochs', '5'], ['epochs is 5', '3', 'learning-rate schedule']),
    # restored with the optimizer state, over the new value (which args.yaml then recorded): were accepted, ignored
    (['--weight-decay', '0.5'], ['weight_decay is 0.5', '0.05', 'the optimizer state']),
    (['--opt-betas', '0.5', '0.6'], ['opt_betas is [0.5, 0.6]', 'None', 'the optimizer state']),
    (['--layer-decay', '0.75'], ['layer_decay is 0.75', 'the optimizer state']),
    (['--model-ema'], ['model_ema is True', 'False', 'the EMA weights']),  # was accepted: an EMA begun mid-run
    # was accepted: model_best and the checkpoint history compared the new metric with the recorded one's values
    (['--eval-metric', 'loss'], ["eval_metric is 'loss'", "'top1'", 'the best checkpoint']),
])
def test_resume_refuses_what_contradicts_the_run_naming_both_values(stopped_run, capsys, argv, names):
    code, err = error_of(capsys, '--resume', stopped_run / 'last.pth.tar', *argv)
    assert code == 2 and str(stopped_run / 'last.pth.tar') in err
    for name in names:
        assert name in err


def test_without_its_optimizer_state_a_resume_may_change_the_optimizer_settings(stopped_run):
    """--no-resume-opt starts a fresh optimizer: its settings (weight decay, betas, ...) are the new ones."""
    args, _ = parse_args(['--resume', str(stopped_run / 'last.pth.tar'), '--no-resume-opt', '--weight-decay', '0.5'])
    assert args.weight_decay == 0.5


def test_without_its_optimizer_state_a_resume_may_change_the_optimizer(stopped_run):
    """--no-resume-opt --opt sgd: the run goes on with a fresh SGD (was refused as 'the optimizer state')."""
    run('--resume', stopped_run / 'last.pth.tar', '--no-resume-opt', '--opt', 'sgd', '--momentum', '0.8')
    checkpoint = torch.load(stopped_run / 'last.pth.tar', weights_only=False)
    assert checkpoint['args'].opt == 'sgd' and checkpoint['epoch'] == checkpoint['args'].epochs - 1
    assert checkpoint['optimizer']['param_groups'][0]['momentum'] == 0.8


def test_a_run_recorded_with_num_samples_on_a_folder_dataset_resumes(stopped_run):
    """--train-num-samples on an image folder, which timm ignored, is refused since; a run recorded with it (before
    the refusal) resumes, as it ran (it was refused as if the resume had given it)."""
    checkpoint = torch.load(stopped_run / 'last.pth.tar', weights_only=False)
    checkpoint['args'].train_num_samples = 100
    torch.save(checkpoint, stopped_run / 'last.pth.tar')
    run('--resume', stopped_run / 'last.pth.tar')
    checkpoint = torch.load(stopped_run / 'last.pth.tar', weights_only=False)
    assert checkpoint['epoch'] == checkpoint['args'].epochs - 1 and checkpoint['args'].train_num_samples is None


def test_resume_may_change_runtime_settings(stopped_run):
    # the digits config sets hc_recompute false; the resumed run turns it on
    run('--resume', stopped_run / 'last.pth.tar', '--model-kwargs', 'hc_backend=torch', 'hc_recompute=True',
        '--workers', 1)
    args = torch.load(stopped_run / 'last.pth.tar', weights_only=False)['args']
    assert args.model_kwargs == {'img_size': 16, 'hc_backend': 'torch', 'hc_recompute': True}
    assert args.workers == 1 and args.epochs == 3


def test_a_plateau_schedule_resumes_with_its_patience_and_cooldown_counters(tmp_path, data, monkeypatch):
    """timm's PlateauLRScheduler saves only best and last_epoch: without torch's ReduceLROnPlateau counters
    (bad epochs, cooldown) a run resumed after epoch 1 decays the lr at other epochs than the whole run."""
    argv = [*TINY, '--data-dir', data, '--batch-size', 10, '--epochs', 5, '--sched', 'plateau', '--patience-epochs',
            1, '--cooldown-epochs', 1, '--decay-rate', 0.5, '--lr', 1e-7, '--output', tmp_path]
    run(*argv, '--experiment', 'whole')
    undo = stop_after_epoch(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run(*argv, '--experiment', 'killed')
    undo()
    run('--resume', tmp_path / 'killed' / 'last.pth.tar')
    whole, resumed = (json.loads((tmp_path / d / 'summary.json').read_text()) for d in ('whole', 'killed'))
    assert len({r['lr'] for r in whole}) > 1  # the lr decays within the run
    assert [r['lr'] for r in resumed] == [r['lr'] for r in whole]


def test_a_per_update_schedule_refuses_another_number_of_updates_per_epoch(tmp_path, data, monkeypatch):
    """With --sched-on-updates the schedule's position is the update count: resumed with another batch size,
    accumulation or process count, the epochs left would follow another schedule than the run's."""
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(*TINY, '--data-dir', data, '--epochs', 2, '--sched-on-updates', '--output', tmp_path, '--experiment', 'r')
    undo()
    last = str(tmp_path / 'r' / 'last.pth.tar')
    for argv, message in ((['--batch-size', '5'], 'batch_size is 5 here but 8'),
                          (['--grad-accum-steps', '2'], 'grad_accum_steps is 2 here but 1')):
        with pytest.raises(ConfigError, match=message):
            parse_args(['--resume', last, *argv])
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(ConfigError, match='world_size is 2 here but 1'):
        parse_args(['--resume', last])
    monkeypatch.delenv('WORLD_SIZE')
    parse_args(['--resume', last, '--batch-size', '8'])  # the same updates per epoch


def test_with_mixup_a_resume_refuses_another_worker_count(tmp_path, data, monkeypatch):
    """With the prefetcher, timm's FastCollateMixup draws its mixes in the loader workers, from each worker's RNG:
    resumed with another --workers (or without the prefetcher), the epochs left would mix other pairs (a review
    found epoch-1 losses 2.3843 against 2.3821). Refused, naming the cause; the recorded count resumes."""
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(*TINY, '--data-dir', data, '--epochs', 2, '--mixup', '0.5', '--output', tmp_path, '--experiment', 'r')
    undo()
    last = str(tmp_path / 'r' / 'last.pth.tar')
    recorded = parse_args(['--resume', last])[0].workers
    with pytest.raises(ConfigError, match=f'workers is {recorded + 1} here but {recorded} .*mixup / cutmix draws'):
        parse_args(['--resume', last, '--workers', str(recorded + 1)])
    with pytest.raises(ConfigError, match='no_prefetcher is True here but False .*mixup / cutmix draws'):
        parse_args(['--resume', last, '--no-prefetcher'])  # timm's Mixup in the main process: other draws
    parse_args(['--resume', last, '--workers', str(recorded)])


@pytest.mark.parametrize('fails', ['write', 'copy'])
def test_a_failed_checkpoint_write_names_what_last_holds(tmp_path, data, monkeypatch, fails):
    """A full disk while saving epoch 1: writing last.pth.tar fails (it keeps epoch 0), or its copy checkpoint-1
    does after last.pth.tar already holds epoch 1, which the message said was the previous, intact one. Either way
    the run stops (exit 1) naming the epoch last.pth.tar holds, and --resume continues from there."""
    saver = train_script.CheckpointSaver
    method = {'write': '_save', 'copy': '_duplicate'}[fails]
    original = getattr(saver, method)

    def full_disk(self, *args, **kwargs):
        if getattr(self, 'saving_epoch', None) == 1:
            raise OSError(28, 'No space left on device')
        return original(self, *args, **kwargs)

    save = saver.save_checkpoint

    def tagged(self, epoch, metric=None):
        self.saving_epoch = epoch
        return save(self, epoch, metric=metric)

    monkeypatch.setattr(saver, method, full_disk)
    monkeypatch.setattr(saver, 'save_checkpoint', tagged)
    with pytest.raises(SystemExit) as e:
        run(*TINY, '--data-dir', data, '--epochs', 3, '--output', tmp_path, '--experiment', 'r')
    last = tmp_path / 'r' / 'last.pth.tar'
    held = torch.load(last, map_location='cpu', weights_only=False)['epoch']
    assert held == (0 if fails == 'write' else 1)
    expected = 'last good checkpoint: ' if fails == 'write' else 'holds epoch 1 (intact)'
    assert expected in str(e.value.code) and f'--resume {last}' in str(e.value.code)


def test_resuming_a_plain_state_dict_is_refused_naming_initial_checkpoint(tmp_path, data, capsys):
    weights = tmp_path / 'weights.pth'
    torch.save({'cls_token': torch.zeros(1, 1, 4), 'head.weight': torch.zeros(10, 4)}, weights)
    for argv in ([], [*TINY, '--data-dir', data, '--output', tmp_path, '--experiment', 'x']):
        code, err = error_of(capsys, *argv, '--resume', weights)
        assert code == 2 and f'{weights} is not a train.py checkpoint' in err
        assert f'--initial-checkpoint {weights}' in err
    assert not (tmp_path / 'x').exists()


def test_resume_takes_short_options_with_attached_values(stopped_run):
    """``-b4 -j1`` set batch_size and workers as ``--batch-size 4 --workers 1`` do, over the recorded 8 and 0."""
    args, _ = parse_args(['--resume', str(stopped_run / 'last.pth.tar'), '-b4', '-j1'])
    assert (args.batch_size, args.workers) == (4, 1)
    with pytest.raises(ConfigError, match='epochs is 5 here but 3'):  # a contradiction in that spelling is named
        parse_args(['--resume', str(stopped_run / 'last.pth.tar'), '--epochs=5'])


def test_extending_a_finished_run_is_refused_with_the_way_on(tmp_path, data, capsys):
    argv = [*TINY, '--data-dir', data, '--epochs', 2, '--output', tmp_path, '--experiment', 'run']
    run(*argv)
    last = tmp_path / 'run' / 'last.pth.tar'
    code, err = error_of(capsys, '--resume', last, '--epochs', 5)
    assert code == 2 and 'epochs is 5' in err and 'learning-rate schedule' in err and '--initial-checkpoint' in err
    code, err = error_of(capsys, '--resume', last)
    assert code == 2 and 'finished run (2 of 2 epochs)' in err and '--initial-checkpoint' in err
    assert [r['epoch'] for r in json.loads((tmp_path / 'run' / 'summary.json').read_text())] == [0, 1]
    # the way on it names: a new run from the weights, with a schedule of its own
    run(*TINY, '--data-dir', data, '--epochs', 1, '--initial-checkpoint', last, '--output', tmp_path,
        '--experiment', 'longer')
    summary = json.loads((tmp_path / 'longer' / 'summary.json').read_text())
    assert summary[0]['lr'] == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------ errors before any work
@pytest.mark.parametrize('argv, message', [
    (['--weight-decay', '-1'], 'weight_decay must be >= 0, got -1.0'),
    (['--warmup-epochs', '-3'], 'warmup_epochs must be >= 0, got -3'),
    (['--workers', '-1'], 'workers must be >= 0, got -1'),
    (['--smoothing', '1.5'], 'smoothing must be between 0 and 1, got 1.5'),
    (['--lr', '0'], 'lr must be > 0, got 0.0'),
    (['--sched', 'foo'], "invalid choice: 'foo' (choose from 'cosine', 'tanh'"),
    (['--sched', 'wsd', '--epochs', '2'], "sched 'wsd' with these settings (epochs 2, warmup_epochs 0, decay_epochs "
                                          "90"),  # timm's default decay_epochs: refused once the model was built
    (['--sched', 'step', '--decay-epochs', '0'], "sched 'step' with these settings"),
    # names timm takes unchecked until the data is built (a KeyError or AssertionError after args.yaml was written)
    (['--interpolation', 'foo'], "interpolation: 'foo' is not one of ['nearest', 'bilinear', 'bicubic'"),
    (['--train-interpolation', 'foo'], "train_interpolation: 'foo' is not one of ['random', 'nearest'"),
    (['--aa', 'foo'], "aa: 'foo' is not an auto-augment spec timm can read (Unknown AA policy foo)"),
    (['--aa', 'rand-m9-x3'], "(Unknown RandAugment config section); expected rand-<options>"),
    (['--reprob', '0.5', '--remode', 'foo'], "remode: 'foo' is not one of ['const', 'rand', 'pixel']"),
    (['--train-crop-mode', 'foo'], "train_crop_mode: 'foo' is not one of ['rrc', 'rkrc', 'rkrr']"),
    (['--input-img-mode', 'foo'], "input_img_mode: 'foo' is not one of PIL's modes ['1', 'CMYK'"),
    # value counts argparse's nargs='+' lets through
    (['--cutmix-minmax', '0.5'], 'cutmix_minmax takes two values (min max), got [0.5]'),
    (['--scale', '0.5'], 'scale takes two values (min max), got [0.5]'),
    (['--ratio', '1.0'], 'ratio takes two values (min max), got [1.0]'),
    (['--opt-betas', '0.9'], "opt_betas: optimizer 'adamw' takes 2 betas, got [0.9]"),
    (['--opt', 'adamz'], "opt: unknown optimizer 'adamz' (did you mean 'adam"),  # was 'model ... cannot be built'
    (['--device', 'cpux'], "device: 'cpux' is not a torch device"),  # was torch's RuntimeError, in the run folder
    (['--device', 'cuda'], "device: 'cuda', but CUDA is not available here"),  # timm's AssertionError; CUDA off below
    (['--mean', '0.5', '0.5'], 'mean takes 1 value or one per input channel (3), got [0.5, 0.5]'),
    (['--in-chans', '1', '--std', '0.2', '0.2', '0.2'], 'std takes 1 value or one per input channel (1), got'),
    (['--aug-repeats', '3'], 'aug_repeats: 3.0 needs distributed training'),
    (['--class-map', '/nonexistent.txt'], 'class_map: file not found: /nonexistent.txt'),
    (['--model-kwargs', 'depth=1', 'img_size=24'], 'model_kwargs img_size=24 builds the model for 24x24 images but '
                                                   'the data are 16x16 (input_size (3, 16, 16)'),
    (['--dataset', 'torch/cifar'], "'cifar' is not one of timm's torchvision datasets ['cifar10', 'cifar100'"),
    (['--dataset', 'hfsd/x'], "dataset: 'hfsd/x': 'hfsd' is not a timm dataset prefix (did you mean 'hfds'"),
    # timm's TypeError named the key only: the model's arguments listed
    (['--train-num-samples', '100'], "train_num_samples: 100 applies to iterable datasets only (prefixes hfids/, "
                                     "tfds/, wds/): the length of an image folder is its number of images"),  # ignored
    (['--dataset', 'torch/cifar10', '--val-num-samples', '10'], "val_num_samples: 10 applies to iterable datasets"),
    (['--model-kwargs', 'hc_recompte=3'], "model_kwargs hc_recompte=3: VisionTransformerHC takes no argument "
                                          "'hc_recompte' (did you mean 'hc_recompute'?); its arguments: hc_variant, "),
    (['--drop-block', '0.1'], "drop_block=0.1 (passed as drop_block_rate): VisionTransformerHC takes no argument"),
    # an optimizer's unknown keyword is the optimizer's, not the model's
    (['--opt', 'sgd', '--opt-kwargs', 'amsgrad=True'], "cannot be built: SGD.__init__() got an unexpected keyword "
                                                       "argument 'amsgrad'"),
    # timm's create_dataset hands repeats to iterable readers only: an image folder's epoch was not repeated
    (['--epoch-repeats', '2', '--epochs', '1'], "epoch_repeats: 2.0 applies to iterable datasets only (prefixes "
                                                "hfids/, tfds/, wds/)"),
    # timm reads pretrained_path only with --pretrained: the run began from random weights
    (['--pretrained-path', ROOT / 'README.md', '--epochs', '1'], 'pretrained_path: read only with --pretrained'),
    # torch.compile's errors came as tracebacks once the model and data were built, in the run folder
    (['--torchcompile', 'inductr'], "torchcompile: 'inductr' is not a torch.compile backend (did you mean 'inductor'"),
    (['--torchcompile', '--torchcompile-mode', 'fast'], "torchcompile_mode: Unrecognized mode=fast"),
    # images read with another channel count than the model's: a RuntimeError at the first step, in the run folder
    (['--in-chans', '2'], "in_chans: the model takes 2-channel images but input_img_mode 'L' (the default for 2) "
                          "reads 1"),
    (['--input-img-mode', 'L'], "input_img_mode: the model takes 3-channel images but input_img_mode 'L' reads 1"),
])
def test_bad_values_are_named_before_any_work(tmp_path, data, capsys, argv, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same on a machine with a GPU
    code, err = error_of(capsys, *TINY, '--data-dir', data, *argv, '--output', tmp_path, '--experiment', 'x')
    assert code == 2 and message in err
    assert not (tmp_path / 'x').exists()


def test_model_names_with_a_source_prefix_pass_and_prefixless_paths_are_named(tmp_path, data):
    """``local-dir:<folder>`` (timm's ``save_for_hf`` output) is a model name train.py takes (fine-tuning from it);
    a repo id without ``hf-hub:`` is refused with timm's message naming both prefixes."""
    import timm
    from timm.models import save_for_hf
    from kromhc_vision import hc_model_args
    model = timm.create_model('vit_micro_patch4_32_kromhc', depth=1, img_size=16, num_classes=10)
    save_for_hf(model, tmp_path / 'saved', model_args=dict(depth=1, img_size=16, **hc_model_args(model)))
    args = parse_args([*TINY, '--data-dir', data, '--output', str(tmp_path), '--experiment', 'x'])[0]
    args.model, args.model_kwargs = f'local-dir:{tmp_path / "saved"}', {}
    validate(args)
    args.model = 'someone/vit_micro_patch4_32_kromhc'
    with pytest.raises(ConfigError, match="model: .* Use 'hf-hub:someone/vit_micro_patch4_32_kromhc'"):
        validate(args)


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'torch/cifar10'], 'dataset: torch/cifar10 needs --data-dir'),  # else a TypeError in torchvision
    (['--model', 'vit_micro_patch4_32_kromhc', '--img-size', '16'],  # was an AssertionError at the first step
     'vit_micro_patch4_32_kromhc is built (its default img_size; model_kwargs img_size=... builds it for another) for '
     '32x32 images but the data are 16x16'),
    (['--model-kwargs', 'depth=1', 'img_size=16'], 'model_kwargs img_size=16 builds the model for 16x16 images but '
                                                   'the data are 32x32'),  # the model's default: give --img-size
])
def test_settings_missing_an_option_are_named_before_any_work(tmp_path, capsys, argv, message):
    code, err = error_of(capsys, '--num-classes', '10', *argv, '--output', tmp_path, '--experiment', 'x')
    assert code == 2 and message in err
    assert not (tmp_path / 'x').exists()


def test_a_torchvision_dataset_missing_from_its_folder_is_named_and_leaves_no_run_folder(tmp_path, capsys):
    """--dataset torch/cifar10 --data-dir <a folder without it>: torchvision's RuntimeError was a traceback after
    the run folder was made (it stayed behind, empty but for the lock)."""
    (tmp_path / 'data').mkdir()
    code, err = error_of(capsys, *TINY, '--dataset', 'torch/cifar10', '--data-dir', tmp_path / 'data',
                         '--output', tmp_path / 'out', '--experiment', 'x')
    assert code == 2 and f"dataset: torchvision finds no intact cifar10 files in {tmp_path / 'data'}" in err
    assert 'add --dataset-download to download them there' in err
    assert not (tmp_path / 'out' / 'x').exists()


@pytest.mark.parametrize('dataset', ['torch/imagenet', 'torch/image_folder'])
@pytest.mark.parametrize('download', [[], ['--dataset-download']])
def test_a_torchvision_dataset_that_is_not_downloaded_is_named_without_dataset_download(tmp_path, capsys, dataset,
                                                                                         download):
    """torch/imagenet and torch/image_folder take no download (timm drops it): the message does not suggest
    --dataset-download, and with it the run is refused the same (it was a traceback)."""
    (tmp_path / 'data').mkdir()
    code, err = error_of(capsys, *TINY, '--dataset', dataset, '--data-dir', tmp_path / 'data', *download,
                         '--output', tmp_path / 'out', '--experiment', 'x')
    assert code == 2 and f"dataset: torchvision finds no intact {dataset[6:]} files in {tmp_path / 'data'}" in err
    assert '--dataset-download to' not in err and 'torchvision does not download' in err
    assert not (tmp_path / 'out' / 'x').exists()


@pytest.mark.parametrize('text, message', [
    ('sched: foo\n', "sched: 'foo' is not one of ['cosine'"),
    ('model: [unclosed\n', 'not valid YAML'),
    # an empty value (YAML null) for an option that has a value: tracebacks in validate or mid-run
    ('mixup:\n', 'mixup: expected a number, got None'),
    ('batch_size: null\n', 'batch_size: expected an integer, got None'),
    ('model: null\n', 'model: expected a string, got None'),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        validate(parse_args(['-c', str(cfg)])[0])
    assert str(cfg) in str(e.value) and message in str(e.value)


def test_a_batch_larger_than_the_training_set_is_refused_before_the_first_step(tmp_path, data, capsys):
    """timm's train loader drops the last incomplete batch: 64 of 30 images would make no update at all."""
    code, err = error_of(capsys, *TINY, '--data-dir', data, '--batch-size', 64, '--epochs', 1, '--output', tmp_path,
                         '--experiment', 'x')
    assert code == 2 and 'batch_size: 64 is more than the 30 training images' in err and '--batch-size 30' in err
    assert not (tmp_path / 'x').exists()  # no args.yaml, summary, checkpoint: the folder it made is removed


def test_an_empty_data_folder_is_named(tmp_path, capsys):
    for split in ('train', 'validation'):
        (tmp_path / 'data' / split).mkdir(parents=True)
    code, err = error_of(capsys, *TINY, '--data-dir', tmp_path / 'data', '--output', tmp_path)
    assert code == 2 and f"{tmp_path / 'data' / 'train'} has no class subfolders" in err


def test_a_validation_split_with_other_classes_is_named(tmp_path, data, capsys):
    shutil.copytree(data, tmp_path / 'data')
    shutil.rmtree(tmp_path / 'data' / 'validation' / '3')
    code, err = error_of(capsys, *TINY, '--data-dir', tmp_path / 'data', '--output', tmp_path)
    assert code == 2 and "missing in 'validation': ['3']" in err


def test_a_run_stopped_in_its_cooldown_resumes(tmp_path, data, monkeypatch):
    """train.py runs epochs + cooldown_epochs: a run stopped after epoch 0 of 1 + 1 cooldown is not finished."""
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(*TINY, '--data-dir', data, '--epochs', 1, '--cooldown-epochs', 1, '--output', tmp_path,
            '--experiment', 'run')
    undo()
    run('--resume', tmp_path / 'run' / 'last.pth.tar')
    assert [r['epoch'] for r in json.loads((tmp_path / 'run' / 'summary.json').read_text())] == [0, 1]


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so(tmp_path, data, monkeypatch):
    """The epoch-1 checkpoint write fails with ENOSPC: train.py stops with a message naming the error and the
    intact epoch-0 checkpoint, removes the partial file, and that checkpoint resumes."""
    import errno
    from timm.utils import checkpoint_saver

    real_save, calls = checkpoint_saver.torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        calls.append(path)
        if obj.get('epoch') == 1:
            with open(path, 'wb') as f:
                f.write(b'partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_saver.torch, 'save', save_until_full)
    with pytest.raises(SystemExit) as e:
        run(*TINY, '--data-dir', data, '--epochs', 2, '--output', tmp_path, '--experiment', 'full')
    run_dir = tmp_path / 'full'
    message = str(e.value.code)
    assert 'No space left on device' in message and str(run_dir / 'last.pth.tar') in message
    assert not (run_dir / 'tmp.pth.tar').exists()
    monkeypatch.setattr(checkpoint_saver.torch, 'save', real_save)
    assert torch.load(run_dir / 'last.pth.tar', weights_only=False)['epoch'] == 0
    run('--resume', run_dir / 'last.pth.tar', '--data-dir', data, '--workers', 0)
    assert torch.load(run_dir / 'last.pth.tar', weights_only=False)['epoch'] == 1


def test_a_failed_args_yaml_write_on_resume_keeps_the_recorded_one(stopped_run, monkeypatch):
    """A resume rewrites its run's args.yaml: a write that fails halfway (a full disk) leaves the recorded one
    whole (a temporary file renamed over it), and no temporary file behind."""
    import builtins
    import errno
    import os
    before = (stopped_run / 'args.yaml').read_bytes()
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, 'No space left on device')

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_on_a_full_disk(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if 'w' in mode and os.path.basename(str(path)).startswith('args.yaml') else f

    monkeypatch.setattr(builtins, 'open', open_on_a_full_disk)
    with pytest.raises(OSError, match='No space left on device'):
        run('--resume', stopped_run / 'last.pth.tar')
    monkeypatch.setattr(builtins, 'open', real_open)
    assert (stopped_run / 'args.yaml').read_bytes() == before
    assert [p.name for p in stopped_run.iterdir() if p.name.startswith('args.yaml')] == ['args.yaml']


# ------------------------------------------------------------------------------ kills while a checkpoint is saved
def checkpoint_epochs(folder) -> dict:
    """``{file name: epoch}`` of every checkpoint in ``folder`` (each must load: none truncated)."""
    return {p.name: torch.load(p, map_location='cpu', weights_only=False)['epoch'] for p in folder.glob('*.pth.tar')}


def assert_same_run(whole, resumed):
    """The resumed run ends as the uninterrupted one: the same checkpoint files holding the same epochs, bitwise the
    same final weights and optimizer state, the same per-update losses."""
    assert checkpoint_epochs(resumed) == checkpoint_epochs(whole)
    a, b = (torch.load(d / 'last.pth.tar', map_location='cpu', weights_only=False) for d in (whole, resumed))
    for name, tensor in a['state_dict'].items():
        assert torch.equal(b['state_dict'][name], tensor), name
    for key, state in a['optimizer']['state'].items():
        assert all(torch.equal(b['optimizer']['state'][key][k], v) for k, v in state.items()), key
    assert (resumed / 'steps.csv').read_text() == (whole / 'steps.csv').read_text()


def test_a_kill_while_last_is_replaced_leaves_last_whole(tmp_path, data, monkeypatch):
    """timm's saver unlinked last.pth.tar before renaming the new checkpoint over it: killed in between, the run
    folder had no last.pth.tar (--resume: 'not found'; a new run into it was told 'no epoch of it finished ... start
    it again with --overwrite', which deletes the run). The rename alone replaces it atomically."""
    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--output', tmp_path]
    run(*argv, '--experiment', 'whole')
    replace, renames = os.replace, []

    def killed_renaming_last(src, dst):
        if os.path.basename(dst) == 'last.pth.tar' and os.path.dirname(dst).endswith('killed'):
            renames.append(dst)
            if len(renames) == 2:  # epoch 1's checkpoint
                raise KeyboardInterrupt('killed while renaming the checkpoint of epoch 1 over last.pth.tar')
        return replace(src, dst)

    monkeypatch.setattr(os, 'replace', killed_renaming_last)
    with pytest.raises(KeyboardInterrupt):
        run(*argv, '--experiment', 'killed')
    monkeypatch.setattr(os, 'replace', replace)
    last = tmp_path / 'killed' / 'last.pth.tar'
    assert torch.load(last, map_location='cpu', weights_only=False)['epoch'] == 0
    run('--resume', last)
    assert_same_run(tmp_path / 'whole', tmp_path / 'killed')


def kill_before_copying(monkeypatch, name):
    """Make the next run die (as if killed) before the saver copies last.pth.tar to ``<name>.pth.tar``."""
    duplicate = train_script.CheckpointSaver._duplicate

    def kill_before_copy(self, src, dst):
        if os.path.basename(dst).startswith(name):
            raise KeyboardInterrupt(f'killed before copying last.pth.tar to {name}')
        return duplicate(self, src, dst)
    monkeypatch.setattr(train_script.CheckpointSaver, '_duplicate', kill_before_copy)


@pytest.mark.parametrize('killed', ['before the copy', 'during the copy'])
def test_a_kill_while_the_epoch_copy_of_last_is_made_loses_no_checkpoint(tmp_path, data, monkeypatch, killed):
    """checkpoint-<epoch>.pth.tar (and model_best) are copies of last.pth.tar made after it is in place. Killed
    before the copy, the resumed run (which starts after that epoch) never made it: the folder lacked
    checkpoint-1; killed during the copy (no hard links: a file copy), a truncated checkpoint-1 stayed, kept as a
    history checkpoint. Copies now appear whole (a temporary file renamed), and a resume makes a missing one."""
    from timm.utils import checkpoint_saver
    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--eval-metric', 'loss', '--output', tmp_path]
    run(*argv, '--experiment', 'whole')
    if killed == 'before the copy':
        kill_before_copying(monkeypatch, 'checkpoint-1')
    else:
        copy2 = checkpoint_saver.shutil.copy2

        def kill_during_copy(src, dst, **kwargs):
            if os.path.basename(dst).startswith('checkpoint-1'):
                with open(src, 'rb') as f, open(dst, 'wb') as g:
                    g.write(f.read(1000))
                raise KeyboardInterrupt('killed while copying last.pth.tar to checkpoint-1')
            return copy2(src, dst, **kwargs)

        def no_hard_links(src, dst, **kwargs):
            raise OSError(1, 'Operation not permitted')
        monkeypatch.setattr(checkpoint_saver.shutil, 'copy2', kill_during_copy)
        monkeypatch.setattr(os, 'link', no_hard_links)
    with pytest.raises(KeyboardInterrupt):
        run(*argv, '--experiment', 'killed')
    monkeypatch.undo()
    last = tmp_path / 'killed' / 'last.pth.tar'
    assert torch.load(last, map_location='cpu', weights_only=False)['epoch'] == 1
    run('--resume', last)
    assert_same_run(tmp_path / 'whole', tmp_path / 'killed')


def test_a_kill_before_the_copies_of_the_final_epoch_is_repaired_by_a_resume(tmp_path, data, monkeypatch, capsys):
    """Killed in the last epoch after last.pth.tar was written, before its copies (checkpoint-2, model_best): the
    resume was refused as a finished run, and the folder kept no checkpoint-2 and an older model_best. Now the resume
    makes the copies, trains nothing, and the folder is the uninterrupted run's; a resume after that is refused."""
    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--eval-metric', 'loss', '--output', tmp_path]
    run(*argv, '--experiment', 'whole')
    assert torch.load(tmp_path / 'whole' / 'model_best.pth.tar', weights_only=False)['epoch'] == 2, 'case needs it'
    kill_before_copying(monkeypatch, 'checkpoint-2')
    with pytest.raises(KeyboardInterrupt):
        run(*argv, '--experiment', 'killed')
    monkeypatch.undo()
    folder = tmp_path / 'killed'
    assert not (folder / 'checkpoint-2.pth.tar').exists()
    run('--resume', folder / 'last.pth.tar')
    assert 'made the copies of its last checkpoint that a kill left unmade: checkpoint-2.pth.tar, model_best.pth.tar' \
        in capsys.readouterr().out
    for name in ('checkpoint-2.pth.tar', 'model_best.pth.tar'):
        assert torch.load(folder / name, weights_only=False)['epoch'] == 2, name
    assert_same_run(tmp_path / 'whole', folder)
    assert sorted(p.name for p in folder.glob('*.pth.tar')) == sorted(p.name for p in (tmp_path / 'whole').glob(
        '*.pth.tar'))
    code, err = error_of(capsys, '--resume', folder / 'last.pth.tar')
    assert code == 2 and 'finished run (3 of 3 epochs)' in err


def test_a_resume_from_an_older_checkpoint_keeps_the_best_checkpoint_made_since(tmp_path, data, monkeypatch):
    """Resuming from checkpoint-1 of a run whose later epoch became the best: model_best.pth.tar stays that epoch's
    (the copies a kill left unmade are made only for the folder's newest checkpoint, last.pth.tar; an older one's
    model_best was replaced since, and was replaced back by the resume before any training)."""
    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--eval-metric', 'loss', '--lr', 3e-3, '--checkpoint-hist', 3,
            '--output', tmp_path, '--experiment', 'run']
    run(*argv)
    folder = tmp_path / 'run'
    best = torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)['epoch']
    saved = torch.load(folder / 'checkpoint-1.pth.tar', map_location='cpu', weights_only=False)['saver']
    assert best == 2 and saved['best_epoch'] != 1, 'the case needs epoch 2 best and epoch 1 better than epoch 0'

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt('stopped before the resumed run trains')
    monkeypatch.setattr(train_script, 'train_one_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        run('--resume', folder / 'checkpoint-1.pth.tar')
    assert torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)['epoch'] == 2


def test_an_hf_hub_model_whose_config_cannot_be_read_is_named(tmp_path, data, monkeypatch):
    """``--model hf-hub:<repo>`` offline with an empty cache: validation reads the repo's config.json to build the
    model on meta; the failure (an OSError: PretrainedWeightsUnavailableError) was a traceback, not a ConfigError."""
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    args = parse_args([*TINY, '--data-dir', data, '--output', str(tmp_path), '--experiment', 'x'])[0]
    args.model, args.model_kwargs = 'hf-hub:someone/vit_micro_patch4_32_kromhc', {}
    with pytest.raises(ConfigError, match="model 'hf-hub:someone/vit_micro_patch4_32_kromhc': "):
        validate(args)


def test_prefixed_model_names_are_compared_whole_and_tags_are_dropped():
    from kromhc_vision.cli.train_config import model_arch
    assert model_arch('vit_small_patch16_224_kromhc.upcycled_augreg') == 'vit_small_patch16_224_kromhc'
    assert model_arch('local-dir:./a') != model_arch('local-dir:./b')  # were both 'local-dir:'
    assert model_arch('hf-hub:me/model.v1') == 'hf-hub:me/model.v1'


def test_a_setting_the_optimizer_does_not_read_may_change_on_resume(stopped_run):
    """The digits config trains with adamw, which has no momentum: --momentum on resume changes nothing and is taken
    (betas, which adamw reads, are refused: test_resume_refuses_what_contradicts_the_run_naming_both_values)."""
    args, _ = parse_args(['--resume', str(stopped_run / 'last.pth.tar'), '--momentum', '0.5'])
    assert args.momentum == 0.5 and args.opt == 'adamw'


def test_overwrite_also_removes_what_a_kill_mid_write_left(tmp_path):
    from kromhc_vision.cli.run_folder import run_files
    for name in ('last.pth.tar', 'tmp.pth.tar', 'checkpoint-3.pth.tar.tmp', 'notes.txt'):
        (tmp_path / name).write_text('x')
    assert sorted(os.path.basename(p) for p in run_files(tmp_path)) == [
        'checkpoint-3.pth.tar.tmp', 'last.pth.tar', 'tmp.pth.tar']


def test_checkpoints_reach_the_disk_before_and_after_their_rename(tmp_path, monkeypatch):
    """A checkpoint's data is flushed before the rename that names it ``last.pth.tar`` and the folder after it:
    without the first, a crash of the machine may leave an empty ``last.pth.tar`` on filesystems that reorder
    the rename before the data (XFS, ext4 without auto_da_alloc); a killed process was already safe."""
    from kromhc_vision.cli.run_folder import CheckpointSaver
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.path.realpath(os.readlink(f'/proc/self/fd/{fd}'))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    model = torch.nn.Linear(2, 2)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    folder = os.path.realpath(tmp_path)
    last, tmp = os.path.join(folder, 'last.pth.tar'), os.path.join(folder, 'tmp.pth.tar')
    i = events.index(('replace', tmp, last))
    assert ('fsync', tmp) in events[:i] and ('fsync', folder) in events[i + 1:], events
    assert events[-1] == ('fsync', folder), events  # the last copy's (model_best) name flushed too
