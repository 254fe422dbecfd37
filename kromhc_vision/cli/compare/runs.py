"""The training runs of compare.py: one train.py run per (size, variant, n, seed), its diagnostics, model facts."""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from timm.models import create_model

import kromhc_vision as kv

from .. import write_json
from ...diagnostics import connection_diagnostics
from ...memory import saved_activation_bytes
from ..evaluation import eval_loader, load_trained_model

# compare.py runs the repository's train.py with its configs/ (and benchmarks/): it works from a checkout.
ROOT = Path(__file__).resolve().parents[3]

# Model sizes: the digits configs' ViT-Micro/4 everywhere; ViT-Tiny at 4px patches where a GPU is present.
SIZES = {
    'micro': dict(model='vit_micro_patch4_32_{variant}', about='6 blocks, 64 wide, 16×16 input, 4×4 patches',
                  model_kwargs=dict(img_size=16), train_args=[]),
    'tiny': dict(model='vit_tiny_patch16_224_{variant}', about='12 blocks, 192 wide, 32×32 input, 4×4 patches',
                 model_kwargs=dict(img_size=32, patch_size=4),
                 train_args=['--img-size', '32', '--batch-size', '128', '--workers', '4', '--amp',
                             '--amp-dtype', 'bfloat16']),
}


def configurations(args):
    """``(size, variant, n, refusal)`` in table order; ``refusal``: None, or why the variant refuses n."""
    for size in args.sizes:
        for variant in args.variants:
            for n in [1] if variant == 'residual' else args.streams:
                try:
                    kv.connection_num_params(variant, n, 8)
                    yield size, variant, n, None
                except ValueError as e:
                    yield size, variant, n, str(e).split('.')[0]


def model_settings(size, variant, n):
    spec = SIZES[size]
    kwargs = dict(spec['model_kwargs'], **({} if variant == 'residual' else dict(num_streams=n)))
    return spec['model'].format(variant=variant), kwargs


def digits_config(variant) -> Path:
    """``configs/digits_<variant>.yaml``: the run's config (train.py ``-c``)."""
    return ROOT / 'configs' / f'digits_{variant}.yaml'


def train_command(size, variant, n, seed, epochs, out, name):
    model, kwargs = model_settings(size, variant, n)
    return [sys.executable, str(ROOT / 'train.py'), '-c', str(digits_config(variant)),
            '--model', model, '--model-kwargs', *(f'{k}={v}' for k, v in kwargs.items()), '--seed', str(seed),
            '--epochs', str(epochs), '--checkpoint-hist', str(epochs), '--output', str(out), '--experiment', name,
            *SIZES[size]['train_args']]


def run_diagnostics(run_dir: Path, model_name: str, epochs: int, num_images: int):
    """Per-epoch summaries of every epoch's checkpoint and the full diagnostics of the last one."""
    per_epoch, final = [], None
    images = None
    for epoch in range(epochs):
        model, data_config = load_trained_model(model_name, str(run_dir / f'checkpoint-{epoch}.pth.tar'))
        if images is None:
            loader = eval_loader(data_config, batch_size=num_images, workers=0, device=torch.device('cpu'))
            images = next(iter(loader))[0]
        final = connection_diagnostics(model, images)
        per_epoch.append(dict(final['summary'], epoch=epoch))
    return per_epoch, final


def run_logged(command, out: Path, name: str):
    """Run ``command`` (a train.py run into ``out / name``) afresh: the old run folder removed, stdout and stderr
    in ``out / f'{name}.log'``. Returns ``(returncode, log path, wall seconds)``."""
    shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f'{name}.log'
    start = time.perf_counter()
    with open(log, 'w') as f:
        rc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, log, time.perf_counter() - start


def run_failed(name: str, rc: int, log: Path) -> SystemExit:
    """The error for a run that failed: its exit status and the last lines of its log."""
    tail = ''.join(log.read_text().splitlines(keepends=True)[-15:])
    return SystemExit(f'compare.py: error: {name} failed (exit {rc}); last lines of {log}:\n{tail}')


def run_settings(command, config: Path, diag_images: int) -> dict:
    """What decides a stored run's reuse: ``command`` with its paths made portable (the interpreter, train.py and the
    config by file name, the output folder by a placeholder: a moved checkout reuses its runs) and the config's
    content (an edited config retrains), and the diagnostics' image count."""
    portable = [Path(c).name if i < 2 else c for i, c in enumerate(command)]
    portable[portable.index('-c') + 1] = Path(portable[portable.index('-c') + 1]).name
    portable[portable.index('--output') + 1] = '<output>'
    return dict(command=portable, config_sha256=hashlib.sha256(Path(config).read_bytes()).hexdigest(),
                diag_images=diag_images)


def train_run(args, size, variant, n, seed, commit, device=None) -> dict:
    """One training run (or the stored one when its settings match and it was made on ``device``, the
    provenance's device string: its throughput is reported as this device's), with its diagnostics; ``reused``
    says which."""
    name = f'{size}_{variant}_n{n}_s{seed}'
    out = Path(args.output)
    run_dir = out / name
    command = train_command(size, variant, n, seed, args.epochs, out, name)
    settings = run_settings(command, digits_config(variant), args.diag_images)
    record_path = run_dir / 'run.json'
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record['settings'] == settings and record.get('device') == device:
            return dict(record, reused=True)
    rc, log, wall = run_logged(command, out, name)
    if rc:
        raise run_failed(name, rc, log)
    rows = json.loads((run_dir / 'summary.json').read_text())
    model_name, _ = model_settings(size, variant, n)
    per_epoch, final = ([], None) if variant == 'residual' else run_diagnostics(
        run_dir, model_name, args.epochs, args.diag_images)
    for path in [*run_dir.glob('checkpoint-*.pth.tar'), run_dir / 'model_best.pth.tar']:
        path.unlink(missing_ok=True)  # keep last.pth.tar only
    record = dict(settings=settings, commit=commit, device=device, size=size, variant=variant, n=n, seed=seed,
                  wall_s=wall,
                  epochs=rows,
                  diagnostics=per_epoch, final_diagnostics=final)
    write_json(record_path, record)
    return dict(record, reused=False)


def config_model_kwargs(variant) -> dict:
    """The ``model_kwargs`` of the run's config (e.g. ``hc_recompute: false``)."""
    return yaml.safe_load(digits_config(variant).read_text()).get('model_kwargs') or {}


def model_facts(size, variant, n, batch_size) -> dict:
    """Parameters and the activation bytes of one training forward at the configs' batch size, of the model as
    the run builds it: the config's ``model_kwargs`` with the size's and ``num_streams`` over them (train.py's
    ``--model-kwargs`` overrides the config key by key)."""
    name, kwargs = model_settings(size, variant, n)
    kwargs = {**config_model_kwargs(variant), **kwargs}
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).train()
    images = torch.randn(batch_size, 3, kwargs['img_size'], kwargs['img_size'])
    return dict(params=sum(p.numel() for p in model.parameters()),
                activation_bytes=saved_activation_bytes(model, images))

