"""train.py: configs and their validation, resume after SIGKILL, non-finite loss, DDP (gloo) = one process."""
import csv
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kromhc_vision.data import write_digits_folder
from kromhc_vision.cli import ConfigError
from kromhc_vision.cli.train_config import parse_args, validate
from kromhc_vision.models._hc_common import VARIANTS

from _scripts import GLOO_THREADS, ROOT, TINY, load_script

CONFIGS = sorted((ROOT / 'configs').rglob('*.yaml'))
train_script = load_script('train')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """30 train / 30 validation images (3 per class)."""
    return str(write_digits_folder(tmp_path_factory.mktemp('data') / 'digits', per_class=3))


def read_steps(run_dir):
    with open(Path(run_dir) / 'steps.csv') as f:
        return [(int(r['epoch']), int(r['step']), float(r['loss'])) for r in csv.DictReader(f)]


def run(*argv):
    train_script.main([str(a) for a in argv])


def test_a_data_folder_without_images_is_named_and_leaves_no_run_folder(tmp_path, capsys):
    # class folders but no images: timm's reader raises when the dataset is built, after the run folder is locked
    for split in ('train', 'validation'):
        for c in range(10):
            (tmp_path / 'data' / split / str(c)).mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        run(*TINY, '--data-dir', tmp_path / 'data', '--epochs', '1', '--output', tmp_path / 'out', '--experiment', 'x')
    assert e.value.code == 2
    assert f"train.py: error: data: Found 0 images in subfolders of {tmp_path / 'data' / 'train'}" in \
        capsys.readouterr().err
    assert not (tmp_path / 'out' / 'x').exists()  # released unused, as for any refused run


def test_command_line_overrides_config(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model: vit_micro_patch4_32_hc\nlr: 1.0e-3\nmodel_kwargs: {depth: 2, img_size: 28}\nno_aug: true\n')
    args, text = parse_args(['-c', str(cfg), '--lr', '0.5', '--model-kwargs', 'depth=3', 'num_streams=2'])
    # --model-kwargs overrides the config's model_kwargs key by key: img_size stays (before: the whole dict replaced)
    assert (args.model, args.lr, args.no_aug) == ('vit_micro_patch4_32_hc', 0.5, True)
    assert args.model_kwargs == {'depth': 3, 'img_size': 28, 'num_streams': 2}
    assert parse_args(['-c', str(cfg)])[0].model_kwargs == {'depth': 2, 'img_size': 28}
    assert yaml.safe_load(text)['lr'] == 0.5 and 'config' not in yaml.safe_load(text)


@pytest.mark.parametrize('yaml_text, argv, message', [
    ('learning_rate: 1.0\n', [], "unknown key 'learning_rate'"),
    ('lr: 5e-4\n', [], 'write 5.0e-4'),
    ('device_modules: kromhc_vision\n', [], 'device_modules: expected a list'),
    ('torchscript: true\n', [], "option 'torchscript' is not supported"),
    ('', ['--bach-size', '4'], "did you mean 'batch_size'"),
    ('', ['--model', 'vit_micro_patch4_32_kromhcc'], "unknown model 'vit_micro_patch4_32_kromhcc' (did you mean "
                                                     "'vit_micro_patch4_32_kromhc'"),
    ('', ['--model', 'vit_micro_patch4_32_mhclite', '--model-kwargs', 'num_streams=8'],
     "variant 'mhclite' cannot take num_streams=8"),
    ('', ['--model', 'vit_small_patch16_224_kromhc.nope'], 'Invalid pretrained tag (nope)'),
    ('', ['--data-dir', '/nonexistent/imagenet'], 'data_dir: folder not found: /nonexistent/imagenet'),
    ('', ['--val-split', 'val'], "no 'val' subfolder"),
    ('', ['--num-classes', '5'], 'has 10 classes but the model has 5 outputs'),
    ('', ['--batch-size', '0'], 'batch_size must be >= 1'),
    ('', ['--resume', '/nonexistent.pth.tar'], 'resume: checkpoint file not found'),
])
def test_invalid_settings_are_named_before_any_work(tmp_path, data, yaml_text, argv, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        args, _ = parse_args(['-c', str(cfg), '--data-dir', data, '--num-classes', '10', *argv])
        validate(args)
    assert message in str(e.value)


def test_a_run_folder_given_as_checkpoint_names_its_checkpoint(tmp_path, data):
    """``--resume <run folder>`` (was 'checkpoint file not found') names the folder's last.pth.tar."""
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'last.pth.tar').touch()
    with pytest.raises(ConfigError, match=rf"resume: {tmp_path / 'run'} is a folder, not a checkpoint file; its "
                                          rf"last checkpoint is {tmp_path / 'run' / 'last.pth.tar'}"):
        validate(parse_args(['--data-dir', data, '--num-classes', '10', '--resume', str(tmp_path / 'run')])[0])


def test_a_changed_digits_cache_is_named_before_any_work(tmp_path, monkeypatch):
    """The default data (the digits cache) is checked by validate: images deleted from it were a smaller training
    set, silently (see tests/test_fashion_mnist.py)."""
    monkeypatch.setenv('KROMHC_CACHE', str(tmp_path))
    root = write_digits_folder(tmp_path / 'digits', per_class=2)  # the cache, reused as it is
    next((root / 'validation' / '0').iterdir()).unlink()
    with pytest.raises(ConfigError, match=r'digits folder .* validation holds 19 images, its manifest 20'):
        validate(parse_args(['--num-classes', '10'])[0])


def test_main_refuses_an_invalid_config_before_creating_outputs(tmp_path, data, capsys):
    with pytest.raises(SystemExit) as e:
        run(*TINY, '--data-dir', data, '--model', 'vit_micro_patch4_32_mhclite', '--model-kwargs', 'num_streams=8',
            '--output', tmp_path / 'out')
    assert e.value.code == 2
    assert "cannot take num_streams=8" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_every_config_validates_and_families_differ_only_in_model(tmp_path):
    fake = tmp_path / 'imagenet'
    for split in ('train', 'validation'):
        (fake / split / 'n01440764').mkdir(parents=True)
    families = {}
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        assert cfg['device_modules'] == ['kromhc_vision'], path
        data = ['--data-dir', str(fake)] if not cfg.get('dataset') else \
            ['--data-dir', str(tmp_path / 'torch'), '--dataset-download']  # validation downloads nothing
        args, _ = parse_args(['-c', str(path), *data])
        validate(args)
        variant = cfg['model'].split('.')[0].rsplit('_', 1)[1]
        if variant not in VARIANTS:  # a model family of its own (terminator_*): validated, no variant family
            continue
        family = path.parent / path.stem.replace(variant, '<variant>')
        # the recipe: everything but the model and its stream count (residual has one stream by definition)
        recipe = {k: v for k, v in cfg.items() if k != 'model'}
        recipe['model_kwargs'] = {k: v for k, v in cfg.get('model_kwargs', {}).items() if k != 'num_streams'}
        lines = yaml.safe_dump(recipe, sort_keys=True).splitlines()
        families.setdefault(family, []).append((path.name, lines))
    assert len(families) == 9 and all(len(members) == 5 for members in families.values()), families.keys()
    for members in families.values():
        (first, ref), *others = members
        for name, lines in others:
            assert lines == ref, f'{name} vs {first}:\n' + '\n'.join(difflib.unified_diff(ref, lines, lineterm=''))


def test_kill_between_summary_and_checkpoint_keeps_every_epoch_once(tmp_path, data, monkeypatch):
    """An epoch's summary rows are written before its checkpoint: dying in between resumes that epoch."""
    save = train_script.CheckpointSaver.save_checkpoint

    def die_at_epoch_1(self, epoch, metric=None):
        if epoch == 1:
            raise KeyboardInterrupt('killed after the summaries of epoch 1')
        return save(self, epoch, metric=metric)

    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--output', tmp_path, '--experiment', 'run']
    monkeypatch.setattr(train_script.CheckpointSaver, 'save_checkpoint', die_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(*argv)
    assert [r['epoch'] for r in json.loads((tmp_path / 'run' / 'summary.json').read_text())] == [0, 1]
    monkeypatch.setattr(train_script.CheckpointSaver, 'save_checkpoint', save)
    run(*argv, '--resume', tmp_path / 'run' / 'last.pth.tar')
    assert [r['epoch'] for r in json.loads((tmp_path / 'run' / 'summary.json').read_text())] == [0, 1, 2]
    with open(tmp_path / 'run' / 'summary.csv') as f:
        assert [int(r['epoch']) for r in csv.DictReader(f)] == [0, 1, 2]
    steps = [r[:2] for r in read_steps(tmp_path / 'run')]
    assert sorted(set(steps)) == steps and sorted({e for e, _ in steps}) == [0, 1, 2]  # each update once


def test_resume_after_sigkill_replays_the_uninterrupted_run(tmp_path, data):
    # random crops, mixup, drop path, EMA and a loader worker: every RNG path a resumed run has to replay
    argv = [*TINY, '--data-dir', data, '--epochs', 4, '--mixup', 0.5, '--drop-path', 0.1, '--model-ema',
            '--model-ema-decay', 0.9, '--workers', 1]
    run(*argv, '--output', tmp_path, '--experiment', 'whole')

    killed = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, ROOT / 'train.py', *map(str, argv), '--output', str(tmp_path),
                             '--experiment', 'killed'],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (killed / 'last.pth.tar').exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = torch.load(killed / 'last.pth.tar', weights_only=False)['epoch']
    assert resumed_from < 3, 'the run finished before it was killed'

    run(*argv, '--resume', killed / 'last.pth.tar')  # continues in the run's folder
    whole, continued = read_steps(tmp_path / 'whole'), read_steps(killed)
    assert len(whole) == 4 * 3 and [r[:2] for r in continued] == [r[:2] for r in whole]
    assert [r[2] for r in continued] == pytest.approx([r[2] for r in whole], rel=1e-6, abs=1e-7)
    a, b = (torch.load(d / 'last.pth.tar', weights_only=False) for d in (tmp_path / 'whole', killed))
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=1e-6, atol=1e-7, msg=f'{key}.{name}')
    assert a['task_state']['step'] == b['task_state']['step'] == 12
    summary = json.loads((killed / 'summary.json').read_text())
    assert [r['epoch'] for r in summary] == [0, 1, 2, 3]
    assert {'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'eval_ema_top1', 'lr', 'train_img_per_sec',
            'train_peak_memory_mb'} <= set(summary[-1])
    with open(killed / 'summary.csv') as f:
        assert [int(r['epoch']) for r in csv.DictReader(f)] == [0, 1, 2, 3]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data):
    # epoch 0 warms up at lr 1e-4, epoch 1 runs at lr ~1e10: its second update sees a NaN loss
    with pytest.raises(SystemExit) as e:
        run(*TINY, '--data-dir', data, '--epochs', 3, '--lr', 1e10, '--warmup-epochs', 1, '--warmup-lr', 1e-4,
            '--output', tmp_path, '--experiment', 'nan')
    message = str(e.value.code)
    assert 'non-finite loss' in message and 'epoch 1' in message and 'update step' in message
    last = tmp_path / 'nan' / 'last.pth.tar'
    assert f'last good checkpoint: {last}' in message
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values())
    assert not (tmp_path / 'nan' / 'checkpoint-1.pth.tar').exists()


# Random-resized crops, flips and colour jitter: per-image augmentation, which the two runs must draw alike.
AUGMENTATION = ['--scale', '0.5', '1.0', '--hflip', '0.5', '--color-jitter', '0.4']


def ddp_and_single_runs(tmp_path, data, *extra, batches=1):
    """The same 3 epochs of ``batches`` steps (30 images: 2 x 15/batches vs 1 x 30/batches) by two gloo processes
    and by one: steps and final checkpoints of both."""
    batch = 30 // batches
    argv = [*TINY, '--data-dir', data, '--epochs', 3, '--output', tmp_path, *extra]
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    ROOT / 'train.py', *map(str, argv), '--batch-size', str(batch // 2), '--experiment', 'ddp'],
                   cwd=ROOT, check=True, capture_output=True)
    run(*argv, '--batch-size', batch, '--experiment', 'single')
    ddp, single = read_steps(tmp_path / 'ddp'), read_steps(tmp_path / 'single')
    assert len(ddp) == len(single) == 3 * batches
    assert [r[2] for r in ddp] == pytest.approx([r[2] for r in single], rel=1e-5)
    a, b = (torch.load(tmp_path / d / 'last.pth.tar', weights_only=False) for d in ('ddp', 'single'))
    assert a['args'].world_size == 2 and b['args'].world_size == 1
    return a['state_dict'], b['state_dict']


def test_two_gloo_processes_match_one_process_with_sgd(tmp_path, data):
    """With SGD (momentum and weight decay included) the weights are linear in the gradients, which the
    all-reduce only sums in another order: the two runs agree to float32 rounding of those sums."""
    ddp, single = ddp_and_single_runs(tmp_path, data, '--no-aug', '--opt', 'sgd', '--momentum', '0.9', '--lr',
                                      '0.05')
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_match_one_process_with_adamw_as_far_as_adam_can(tmp_path, data):
    """AdamW's step m / sqrt(v) of an entry whose gradient is near zero turns on the rounding of that gradient
    (the all-reduce sums in another order), so only a bound follows from the maths: each step moves an entry by
    at most about lr (bias-corrected |m / sqrt(v)| <= ~1), so two runs differ by at most 2 lr per step. The
    losses agree to 1e-5 (checked in ddp_and_single_runs); most entries agree far closer than the bound."""
    lr, steps = 1e-3, 3
    ddp, single = ddp_and_single_runs(tmp_path, data, '--no-aug')  # TINY: adamw, lr 1e-3
    diffs = torch.cat([(ddp[k].float() - v.float()).abs().flatten() for k, v in single.items()
                       if v.is_floating_point()])
    assert diffs.max() <= 2 * lr * steps
    assert diffs.median() <= 1e-6


def test_two_gloo_processes_match_one_process_with_augmentation_and_shuffled_batches(tmp_path, data):
    """Three steps per epoch of 10 shuffled, augmented images (2 x 5 vs 1 x 10): each rank takes every second
    image of the one process's batch and augments it with generators seeded by (seed, epoch, image), so the
    losses and the SGD weights agree as in the unaugmented case."""
    ddp, single = ddp_and_single_runs(tmp_path, data, *AUGMENTATION, '--opt', 'sgd', '--momentum', '0.9',
                                      '--lr', '0.05', batches=3)
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


THREADS_AFTER_MAIN = GLOO_THREADS + """
import sys
sys.path.insert(0, sys.argv[1])
import train

if os.environ.get('INJECT_BUG'):  # an error train.py does not handle, raised once the DDP model exists
    def train_one_epoch(*args, **kwargs):
        raise RuntimeError('injected bug')
    train.train_one_epoch = train_one_epoch
try:
    train.main(sys.argv[2:])
    left, outcome = gloo_threads(), 'done'
except SystemExit as e:  # as the interpreter's shutdown would start: with the exit still propagating
    left, outcome = gloo_threads(), f'exit: {e.code}'
except RuntimeError as e:  # likewise, a bug's traceback still alive
    left, outcome = gloo_threads(), f'bug: {e}'
print(f"rank {os.environ['RANK']}: {outcome}", flush=True)
assert not left, f"rank {os.environ['RANK']}: gloo threads outlive main(): {left}"
"""


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='reads the threads from /proc')
@pytest.mark.parametrize('ending', ['done', 'non-finite loss', 'injected bug'])
def test_ddp_run_ends_with_its_process_group_gone(tmp_path, data, ending):
    """train.py's main() destroys the process group for good, after a run, after one that stops with its own error
    and after a bug: no gloo worker thread is left for the interpreter's shutdown, where one releasing a finished
    collective's tensors aborts the process (exit -6 instead of the error's status; see END_DDP_SCRIPT in
    _scripts.py). An error's traceback must not keep the DistributedDataParallel model, which holds the group."""
    script = tmp_path / 'threads_after_main.py'
    script.write_text(THREADS_AFTER_MAIN)
    argv = [*TINY, '--data-dir', data, '--output', tmp_path, '--experiment', 'ddp', '--batch-size', 5]
    if ending != 'non-finite loss':
        argv += ['--epochs', 1]
    else:  # as test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint
        argv += ['--epochs', 3, '--lr', 1e10, '--warmup-epochs', 1, '--warmup-lr', 1e-4]
    env = {**os.environ, 'INJECT_BUG': '1' if ending == 'injected bug' else ''}
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          script, ROOT, *map(str, argv)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(ending) == 2, out.stdout


@pytest.mark.parametrize('force_cpu, device, has_ema, expected', [
    (True, 'cuda', True, False), (True, 'cuda:1', True, False), (True, 'cpu', True, True),
    (False, 'cuda', True, True), (False, 'cpu', False, False)])
def test_ema_kept_on_the_cpu_is_not_evaluated_in_a_cuda_run(force_cpu, device, has_ema, expected):
    """--model-ema-force-cpu keeps the EMA weights on the CPU; a CUDA run's eval batches arrive on the GPU, which the
    EMA model cannot take ("Expected all tensors to be on the same device" after the first epoch): as timm's
    train.py, the run evaluates the EMA only where it lives on the training device."""
    args = SimpleNamespace(model_ema_force_cpu=force_cpu)
    task = SimpleNamespace(has_ema=lambda: has_ema)
    assert train_script.evaluates_ema(args, task, torch.device(device)) is expected


def test_resume_on_fewer_gpus_restores_the_cuda_rng_states_of_the_devices_present(monkeypatch):
    """A checkpoint saved by a process that saw 8 GPUs (torchrun on an 8-GPU node: every process sees all 8), resumed
    where 1 is visible: torch's own set_rng_state_all, CUDA initialised, would index device 1 and raise IndexError;
    the state of device 0 alone is restored."""
    from kromhc_vision.cli.train_state import TrainTask
    task = TrainTask(torch.nn.Linear(2, 2), device=torch.device('cpu'))
    state = task.get_task_state()
    state['rng']['cuda'] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]

    class Generator:
        restored = None

        def set_state(self, new_state):
            self.restored = new_state

    generator = Generator()
    for module in (torch.cuda, torch.cuda.random):  # CUDA initialised: torch sets the states at once
        monkeypatch.setattr(module, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'default_generators', (generator,))
    task.load_task_state(state)
    assert torch.equal(generator.restored, state['rng']['cuda'][0])


def test_bf16_amp_grad_checkpointing_accumulation_and_clipping_run(tmp_path, data):
    run(*TINY, '--data-dir', data, '--epochs', 1, '--amp', '--amp-dtype', 'bfloat16', '--grad-checkpointing',
        '--grad-accum-steps', 2, '--clip-grad', 1.0, '--output', tmp_path, '--experiment', 'amp')
    steps = read_steps(tmp_path / 'amp')
    assert [s[1] for s in steps] == [1, 2]  # 3 batches of 8: updates of 2 and 1 batches
    assert torch.load(tmp_path / 'amp' / 'last.pth.tar', weights_only=False)['args'].grad_checkpointing


@pytest.mark.slow
def test_torchcompile_run(tmp_path, data):
    run(*TINY, '--data-dir', data, '--epochs', 1, '--torchcompile', '--output', tmp_path, '--experiment', 'c')
    assert len(read_steps(tmp_path / 'c')) == 3


@pytest.mark.slow
def test_digits_demo_reaches_high_accuracy(tmp_path):
    out = subprocess.run([sys.executable, 'train.py', '-c', 'configs/digits_kromhc.yaml', '--output', tmp_path,
                          '--experiment', 'demo'], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    top1 = json.loads((tmp_path / 'demo' / 'summary.json').read_text())[-1]['eval_top1']
    assert 'final validation top-1' in out and top1 > 90
