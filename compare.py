#!/usr/bin/env python3
"""Residual, HC, mHC, mHC-lite and KromHC side by side: regenerates RESULTS.md, its figures and BENCHMARKS.md.

    python compare.py                 # every variant at n = 2, 4, 8, 3 seeds, on the embedded digits (CPU)
    python compare.py --seeds 1 --epochs 2 --variants residual kromhc --streams 4   # a quick look

Each run is ``train.py -c configs/digits_<variant>.yaml`` with the seed, epoch count and stream count set on the
command line, so every variant has the same model size and recipe. Runs are interleaved seed by seed, so that
throughput ratios compare runs made under the same machine load. After a run, every epoch's checkpoint is loaded
and :func:`kromhc_vision.diagnostics.connection_diagnostics` is taken on a fixed batch of validation images: the
largest deviation from double stochasticity over the run and the composite gain across depth at its end. The
activation memory of a training step is counted with :func:`kromhc_vision.memory.saved_activation_bytes`.
Finished runs are kept in ``--output`` and reused when run again with the same settings, so an interrupted
comparison continues where it stopped. With CUDA, a larger size (ViT-Tiny, 12 blocks, 192 wide) runs as well.

BENCHMARKS.md gets the output of the benchmark scripts (the ViT-Tiny trunk on CPU, on the default backend and on
plain PyTorch; the kernel benchmarks: numba on CPU, Triton on CUDA) and the training throughput of the runs, each
with the device, date, command and commit.
"""
import argparse
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from timm.data import create_dataset
from timm.models import create_model

import kromhc_vision as kv
from kromhc_vision.backend import numba_unavailable_reason
from kromhc_vision.data import digits_folder
from kromhc_vision.diagnostics import connection_diagnostics, plot_composite_gain
from kromhc_vision.memory import saved_activation_bytes
from kromhc_vision.training import eval_loader, load_trained_model, write_json

ROOT = Path(__file__).resolve().parent
GENERATED = ('RESULTS.md', 'BENCHMARKS.md', 'results')

# Model sizes: the digits configs' ViT-Micro/4 everywhere; ViT-Tiny at 4px patches where a GPU is present.
SIZES = {
    'micro': dict(model='vit_micro_patch4_32_{variant}', about='6 blocks, 64 wide, 16×16 input, 4×4 patches',
                  model_kwargs=dict(img_size=16), train_args=[]),
    'tiny': dict(model='vit_tiny_patch16_224_{variant}', about='12 blocks, 192 wide, 32×32 input, 4×4 patches',
                 model_kwargs=dict(img_size=32, patch_size=4),
                 train_args=['--img-size', '32', '--batch-size', '128', '--workers', '4', '--amp',
                             '--amp-dtype', 'bfloat16']),
}
KERNEL_BENCHMARKS = ('bench_stream_pre.py', 'bench_stream_post.py', 'bench_sinkhorn.py')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variants', nargs='+', default=list(kv.CONNECTIONS), choices=list(kv.CONNECTIONS))
    p.add_argument('--streams', nargs='+', type=int, default=[2, 4, 8], help='stream counts n (residual: 1)')
    p.add_argument('--seeds', type=int, default=3, help='seeds 0 .. seeds-1')
    p.add_argument('--epochs', type=int, default=10, help='epochs per run (the configs say 30)')
    p.add_argument('--sizes', nargs='+', choices=sorted(SIZES), default=None,
                   help="default: micro, and tiny with CUDA")
    p.add_argument('--output', default='output/compare', help='run folders (reused when the settings match)')
    p.add_argument('--results', default='RESULTS.md', help='its figures go to results/ beside it')
    p.add_argument('--benchmarks', default='BENCHMARKS.md')
    p.add_argument('--bench-rounds', type=int, default=15,
                   help='rounds of the trunk benchmark (ratios move by about 5 %% with 7)')
    p.add_argument('--bench-batch', type=int, default=16, help='batch of the trunk benchmark')
    p.add_argument('--bench-streams', nargs='+', type=int, default=[2, 4, 8], help='n of the trunk benchmark')
    p.add_argument('--kernel-benchmarks', action=argparse.BooleanOptionalAction, default=True,
                   help='also time the kernel ops: Triton with CUDA, numba on CPU')
    p.add_argument('--diag-images', type=int, default=128, help='validation images for the diagnostics')
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = ['micro', 'tiny'] if torch.cuda.is_available() else ['micro']
    if args.seeds < 1 or args.epochs < 1:
        p.error(f'--seeds and --epochs must be >= 1 (got {args.seeds}, {args.epochs})')
    bad = [n for n in args.streams + args.bench_streams if n < 2]
    if bad:
        p.error(f'stream counts must be >= 2 (got {bad}); residual always runs with one stream')
    return args


def git(*cmd) -> str:
    try:
        return subprocess.run(['git', *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ''


def provenance(argv) -> dict:
    """Commit (``-dirty`` when code differs from it), device, versions, date and the command line."""
    import timm
    commit = git('rev-parse', '--short', 'HEAD') or 'unknown'
    if git('status', '--porcelain', '--', '.', *(f':!{g}' for g in GENERATED)):
        commit += '-dirty'
    if torch.cuda.is_available():
        device = f'{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})'
    else:
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
        device = f'CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'
    return dict(commit=commit, device=device, date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                command=' '.join(['python', 'compare.py', *argv]), torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version())


# ----------------------------------------------------------------------------------------------------- the runs
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


def train_command(size, variant, n, seed, epochs, out, name):
    model, kwargs = model_settings(size, variant, n)
    return [sys.executable, str(ROOT / 'train.py'), '-c', str(ROOT / 'configs' / f'digits_{variant}.yaml'),
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


def train_run(args, size, variant, n, seed, commit) -> dict:
    """One training run (or the stored one when its settings match), with its diagnostics; ``reused`` says which."""
    name = f'{size}_{variant}_n{n}_s{seed}'
    out = Path(args.output)
    run_dir = out / name
    command = train_command(size, variant, n, seed, args.epochs, out, name)
    settings = dict(command=[Path(c).name if i < 2 else c for i, c in enumerate(command)],
                    diag_images=args.diag_images)
    record_path = run_dir / 'run.json'
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record['settings'] == settings:
            return dict(record, reused=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f'{name}.log'
    start = time.perf_counter()
    with open(log, 'w') as f:
        rc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = ''.join(open(log).readlines()[-15:])
        raise SystemExit(f'compare.py: error: {name} failed (exit {rc}); last lines of {log}:\n{tail}')
    wall = time.perf_counter() - start
    rows = json.loads((run_dir / 'summary.json').read_text())
    model_name, _ = model_settings(size, variant, n)
    per_epoch, final = ([], None) if variant == 'residual' else run_diagnostics(
        run_dir, model_name, args.epochs, args.diag_images)
    for path in [*run_dir.glob('checkpoint-*.pth.tar'), run_dir / 'model_best.pth.tar']:
        path.unlink(missing_ok=True)  # keep last.pth.tar only
    record = dict(settings=settings, commit=commit, size=size, variant=variant, n=n, seed=seed, wall_s=wall,
                  epochs=rows,
                  diagnostics=per_epoch, final_diagnostics=final)
    write_json(record_path, record)
    return dict(record, reused=False)


def model_facts(size, variant, n, batch_size) -> dict:
    """Parameters and the activation bytes of one training forward at the configs' batch size."""
    name, kwargs = model_settings(size, variant, n)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).train()
    images = torch.randn(batch_size, 3, kwargs['img_size'], kwargs['img_size'])
    return dict(params=sum(p.numel() for p in model.parameters()),
                activation_bytes=saved_activation_bytes(model, images))


# --------------------------------------------------------------------------------------------------- statistics
def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def throughput(record) -> float:
    """Median training images/s over the epochs after the first (the first includes warm-up)."""
    rates = [r['train_img_per_sec'] for r in record['epochs']]
    return statistics.median(rates[1:] or rates)


def summarize(records, facts, size) -> list:
    """One row per configuration of ``size``: accuracy over seeds, costs relative to residual, diagnostics."""
    groups = {}
    for r in records:
        if r['size'] == size:
            groups.setdefault((r['variant'], r['n']), []).append(r)
    rows = []
    for (variant, n), runs in groups.items():
        top1 = [r['epochs'][-1]['eval_top1'] for r in runs]
        row = dict(variant=variant, n=n, seeds=len(runs), top1=mean_std(top1), top1_all=top1,
                   img_per_sec=statistics.fmean(throughput(r) for r in runs),
                   peak_mb=statistics.fmean(max(e['train_peak_memory_mb'] for e in r['epochs']) for r in runs),
                   params=facts[(size, variant, n)]['params'],
                   activation_bytes=facts[(size, variant, n)]['activation_bytes'],
                   curves=dict(train_loss=[statistics.fmean(r['epochs'][e]['train_loss'] for r in runs)
                                           for e in range(len(runs[0]['epochs']))],
                               top1=[statistics.fmean(r['epochs'][e]['eval_top1'] for r in runs)
                                     for e in range(len(runs[0]['epochs']))]))
        if variant != 'residual':
            row['max_ds_error'] = max(max(d['max_row_error'], d['max_col_error'])
                                      for r in runs for d in r['diagnostics'])
            row['final_gain'] = max(max(layer['gain_row'], layer['gain_col']) for r in runs
                                    for layer in r['final_diagnostics']['layers'])
        rows.append(row)
    ref = next((r for r in rows if r['variant'] == 'residual'), None)
    if ref is None:
        return rows
    for row in rows:
        row['speed_ratio'] = row['img_per_sec'] / ref['img_per_sec']
        row['peak_ratio'] = row['peak_mb'] / ref['peak_mb']
        row['activation_ratio'] = row['activation_bytes'] / ref['activation_bytes']
        row['extra_params'] = row['params'] - ref['params']
        diff = row['top1'][0] - ref['top1'][0]
        se = math.sqrt((row['top1'][1] ** 2 + ref['top1'][1] ** 2) / row['seeds']) if row['seeds'] > 1 else None
        row['top1_diff'], row['top1_se'] = diff, se
    return rows


# ------------------------------------------------------------------------------------------------------ figures
def plot_curves(rows, n, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        if row['n'] not in (1, n):
            continue
        label = row['variant'] if row['variant'] == 'residual' else f"{row['variant']} n={n}"
        epochs = range(1, len(row['curves']['top1']) + 1)
        ax_loss.plot(epochs, row['curves']['train_loss'], 'o-', ms=3, label=label)
        ax_acc.plot(epochs, row['curves']['top1'], 'o-', ms=3, label=label)
    ax_loss.set(title='training loss (mean over seeds)', xlabel='epoch')
    ax_acc.set(title='validation top-1 % (mean over seeds)', xlabel='epoch')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_params(path, dim=768, streams=(2, 3, 4, 6, 8, 12, 16)):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in kv.CONNECTIONS:
        if variant == 'residual':
            continue
        points = []
        for n in streams:
            try:
                points.append((n, kv.connection_num_params(variant, n, dim)))
            except ValueError:
                pass
        ax.plot(*zip(*points), '^--' if variant == 'mhc' else 'o-', ms=4, label=variant)
    ax.set_yscale('log')
    ax.set(title=f'parameters of one connection, C = {dim} (HC = mHC)\nmHC-lite refuses n > 6 (n! logits)',
           xlabel='streams n (with prime factors <= 3 here)', ylabel='parameters')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ writing
def fmt_top1(row):
    mean, std = row['top1']
    return f'{mean:.2f}' + ('' if math.isnan(std) else f' ± {std:.2f}')


def fmt_diff(row):
    if row['variant'] == 'residual' or 'top1_diff' not in row:
        return ''
    text = f"{row['top1_diff']:+.2f}"
    se = row['top1_se']
    if se is None:
        return text
    return text + (' (noise)' if abs(row['top1_diff']) <= 2 * se else ' (beyond 2 s.e.)')


def table(rows, refused):
    head = ('| variant | n | top-1 % | Δ vs residual | extra params | train img/s | ×residual | peak memory '
            '×residual | activations ×residual | max \\|row/col sum − 1\\| over run | max composite gain at end |')
    lines = [head, '|' + '---|' * 11]
    for row in rows:
        ds = '' if row['variant'] == 'residual' else f"{row['max_ds_error']:.1e}"
        gain = '' if row['variant'] == 'residual' else f"{row['final_gain']:.6g}"
        extra = row.get('extra_params', 0)
        lines.append(f"| {row['variant']} | {row['n']} | {fmt_top1(row)} | {fmt_diff(row)} | {extra:,} "
                     f"({100 * extra / (row['params'] - extra):.1f} %) | {row['img_per_sec']:.0f} | "
                     f"{row.get('speed_ratio', float('nan')):.2f} | {row.get('peak_ratio', float('nan')):.2f} | "
                     f"{row.get('activation_ratio', float('nan')):.2f} | {ds} | {gain} |")
    for variant, n, why in refused:
        lines.append(f'| {variant} | {n} | refused: {why} |' + ' |' * 8)
    return '\n'.join(lines)


def default_backend() -> str:
    """The backend the training runs get from ``auto`` on this machine."""
    if torch.cuda.is_available():
        return 'triton'
    return 'numba' if numba_unavailable_reason(torch.device('cpu')) is None else 'torch'


def reading(rows, args, counts, size) -> list:
    """Sentences computed from the numbers: what differs, what is within noise, what cannot be shown."""
    out = []
    val_images = counts['validation']
    by = {(r['variant'], r['n']): r for r in rows}
    base = by.get(('residual', 1))
    others = [r for r in rows if r['variant'] != 'residual']
    label = lambda r: f"{r['variant']} n={r['n']}"  # noqa: E731
    if base and others and args.seeds > 1:
        above = [r for r in others if r['top1_diff'] > 2 * r['top1_se']]
        below = [r for r in others if -r['top1_diff'] > 2 * r['top1_se']]
        widest = max(rows, key=lambda r: r['top1'][1])
        text = (f'**Accuracy.** Residual reaches {fmt_top1(base)} % top-1 after {args.epochs} epoch(s). '
                f'{len(others) - len(above) - len(below)} of {len(others)} hyper-connected configurations are '
                'within two standard errors of it')
        for word, group in (('above', above), ('below', below)):
            if group:
                text += f'; {word}: ' + ', '.join(f"{label(r)} ({r['top1_diff']:+.2f})" for r in group)
        text += (f". Seed-to-seed standard deviations range from {min(r['top1'][1] for r in rows):.2f} to "
                 f"{widest['top1'][1]:.2f} points (widest: {label(widest)}, seeds at "
                 + ', '.join(f'{t:.2f}' for t in widest['top1_all'])
                 + f' %); one validation image is {100 / val_images:.2f} points.')
        out.append(text)
    elif base and others:
        out.append('**Accuracy.** One seed only: no noise estimate, so no difference in top-1 can be called real.')
    pair = by.get(('mhclite', 2)), by.get(('kromhc', 2))
    if all(pair) and pair[0]['top1_all'] == pair[1]['top1_all']:
        out.append('mHC-lite and KromHC at n = 2 are the same map (KromHC with one factor of size 2); they give '
                   'the same top-1 seed by seed, as a deterministic pipeline must.')
    exact = [r for r in others if r['variant'] in ('mhclite', 'kromhc')]
    if exact:
        worst = max(r['max_ds_error'] for r in exact)
        out.append(f'**Double stochasticity.** mHC-lite and KromHC never left the doubly stochastic matrices: the '
                   f'largest |row or column sum − 1| over every epoch, layer and token is {worst:.1e}, float32 '
                   f'rounding, and their composite gain across depth stays at '
                   f'{max(r["final_gain"] for r in exact):.7f} (a product of doubly stochastic matrices has '
                   'gain exactly 1).')
    mhc = [r for r in others if r['variant'] == 'mhc']
    if mhc:
        iters = inspect.signature(kv.MHC.__init__).parameters['sinkhorn_iters'].default
        out.append(f'mHC, whose Sinkhorn-Knopp stops after {iters} iterations, deviates by up to '
                   + ', '.join(f"{r['max_ds_error']:.1e} (n={r['n']})" for r in mhc)
                   + '; its composite gain at the end is ' + ', '.join(f"{r['final_gain']:.4f}" for r in mhc) + '.')
    hc = [r for r in others if r['variant'] == 'hc']
    if hc:
        worst = max(hc, key=lambda r: r['final_gain'])
        out.append('HC is unconstrained: row/column sums differ from 1 by up to '
                   + ', '.join(f"{r['max_ds_error']:.2g} (n={r['n']})" for r in hc)
                   + ' and the composite gain across depth reaches ' + ', '.join(f"{r['final_gain']:.3g}" for r in hc)
                   + f". Where the gain is largest ({label(worst)}), the seeds end at "
                   + ', '.join(f'{t:.2f}' for t in worst['top1_all']) + ' % top-1.')
    if base and others:
        speed = {v: [r['speed_ratio'] for r in others if r['variant'] == v] for v in kv.CONNECTIONS}
        out.append(f'**Cost.** Training throughput relative to residual ({default_backend()} backend on this device, '
                   'measured in this run): '
                   + '; '.join(f"{v} {min(s):.2f}–{max(s):.2f}×" if len(s) > 1 else f"{v} {s[0]:.2f}×"
                               for v, s in speed.items() if s)
                   + f". Residual trains at {base['img_per_sec']:.0f} img/s. Activation memory relative to "
                     'residual: ' + ', '.join(f"{label(r)} {r['activation_ratio']:.2f}×" for r in others) + '.')
    out.append(f"**What this cannot show.** {counts['train'] + val_images:,} 8×8 digits, a ViT of "
               f"{SIZES[size]['about'].split(',')[0]} and {args.epochs} epoch(s): whether the ordering holds at "
               'ImageNet scale, where the published comparisons were made, and any difference smaller than about '
               'two standard errors in the table. What it shows exactly is the exactness of the constrained '
               'variants and what each costs.')
    return out


def runs_provenance(records) -> str:
    commits = sorted({r.get('commit', 'unknown') for r in records})
    reused = sum(r['reused'] for r in records)
    minutes = sum(r['wall_s'] for r in records) / 60
    return (f"The {len(records)} training runs took {minutes:.1f} min, made at commit "
            + ', '.join(f'`{c}`' for c in commits) + (f' ({reused} reused from an earlier call).' if reused else '.'))


def write_results(path: Path, args, prov, records, tables, refused, counts, wall, cfg):
    figures = path.parent / 'results'
    figures.mkdir(parents=True, exist_ok=True)
    val_images = counts['validation']
    plot_params(figures / 'params.png')
    lines = ['# Results', '',
             f"Generated by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']}; device: "
             f"{prov['device']}; torch {prov['torch']}, timm {prov['timm']}, Python {prov['python']}; "
             f'wall time {wall / 60:.1f} min. {runs_provenance(records)} Every number and figure below comes from '
             'that command.', '',
             '## Setup', '',
             '- Data: scikit-learn\'s handwritten digits (the embedded default): '
             f"{counts['train']:,} training and {val_images} validation images of 8×8 pixels, 10 classes, "
             "resized to each model's input size (`kromhc_vision.data`).",
             f"- Recipe: `configs/digits_<variant>.yaml` ({cfg['opt']}, lr {cfg['lr']}, {cfg['sched']} schedule, "
             f"label smoothing {cfg['smoothing']}, batch {cfg['batch_size']}), "
             f'with `--epochs {args.epochs}`, `--seed` 0 … {args.seeds - 1} and `--model-kwargs num_streams=n`; '
             'the configs differ only in the model. Top-1: last epoch, mean ± standard deviation over seeds.',
             '- Extra params: over the residual model of the same size. Throughput: median training images/s '
             'of the epochs after the first, mean over seeds, ratio to residual in this run. Peak memory: '
             '`train.py`\'s peak (CUDA max allocated; on CPU the process RSS, mostly libraries). Activations: '
             'bytes autograd keeps for the backward pass of one training batch (`kromhc_vision.memory`).',
             f'- Diagnostics (`kromhc_vision.diagnostics`): on the first {args.diag_images} validation images, '
             'after every epoch; max |row/col sum − 1| of H_res over all epochs, layers and tokens; composite '
             'gain = largest absolute row or column sum of H_res^(l)…H_res^(1) over depth l and tokens at the '
             'end (1 for a product of doubly stochastic matrices).', '']
    for size in args.sizes:
        rows = tables[size]
        size_refused = [(v, n, why) for s, v, n, why in refused if s == size]
        model = SIZES[size]['model'].format(variant='<variant>')
        lines += [f"## {model} ({SIZES[size]['about']})", '', table(rows, size_refused), '']
        n_plot = 4 if 4 in args.streams else args.streams[0]
        plot_curves(rows, n_plot, figures / f'curves_{size}.png', f'{model}, n = {n_plot}')
        diags = {f"{r['variant']} n={r['n']}": r['final_diagnostics'] for r in records
                 if r['size'] == size and r['seed'] == 0 and r['n'] == n_plot and r['variant'] != 'residual'}
        lines += [f'![training curves](results/curves_{size}.png)', '']
        if diags:
            plot_composite_gain(diags, figures / f'composite_gain_{size}.png')
            lines += [f'Per-connection stochasticity error and composite gain against depth at the end of '
                      f'training (n = {n_plot}, seed 0):', '', f'![composite gain](results/composite_gain_{size}.png)',
                      '']
        if size == args.sizes[0]:
            lines += ['## Reading', '', *[f'- {s}' for s in reading(rows, args, counts, size)], '']
    lines += ['## Parameters against n', '',
              'Per connection at C = 768 (`python -m kromhc_vision table` prints the same counts): mHC-lite grows '
              'as n·C·n! (n! + 2n logits projected from the n·C stream state), HC and mHC as '
              'n·C·(n² + 2n) ≈ n³·C, '
              'KromHC as n·C·(2n + the logits of its small factors) = O(n²·C).', '',
              '![parameters](results/params.png)', '']
    path.write_text('\n'.join(lines))


def run_script(script: Path, *script_args) -> str:
    cmd = [sys.executable, str(script), *script_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f'compare.py: error: {script.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc.stdout.rstrip()


def run_benchmarks(args) -> list:
    """``(command, output)`` of every benchmark script this device can time."""
    bench = ROOT / 'benchmarks'
    trunk = [['--streams', str(n), '--rounds', str(args.bench_rounds), '--batch', str(args.bench_batch)]
             for n in args.bench_streams]
    numba = numba_unavailable_reason(torch.device('cpu')) is None
    if numba:  # the plain PyTorch path at n = 4 too, beside the numba one
        trunk.append(['--streams', '4', '--rounds', str(args.bench_rounds), '--batch', str(args.bench_batch),
                      '--backend', 'torch'])
    commands = [('bench_trunk_cpu.py', cmd) for cmd in trunk]
    if args.kernel_benchmarks and torch.cuda.is_available():
        commands += [(name, []) for name in KERNEL_BENCHMARKS]
    if args.kernel_benchmarks and numba:
        commands += [('bench_stream_pre.py', ['--backend', 'numba', '--dtype', 'fp32']),
                     ('bench_stream_post.py', ['--backend', 'numba', '--dtype', 'fp32']),
                     ('bench_sinkhorn.py', ['--backend', 'numba'])]
    return [(' '.join(['python', f'benchmarks/{name}', *cmd]), run_script(bench / name, *cmd))
            for name, cmd in commands]


def write_benchmarks(path: Path, prov, outputs, tables, args):
    lines = ['# Benchmarks', '',
             f"Generated by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']}; device: "
             f"{prov['device']}; torch {prov['torch']}. Each block is the verbatim output of the command above it.",
             '']
    for command, output in outputs:
        lines += [f'## `{command}`', '', '```', output, '```', '']
    if not torch.cuda.is_available():
        lines += ['## Triton kernels on GPU', '',
                  'Not measured at this commit: this run had no GPU. On a CUDA machine the same command adds the '
                  'kernel benchmarks (' + ', '.join(f'`benchmarks/{b}`' for b in KERNEL_BENCHMARKS) + ': time, '
                  'bandwidth and distance from the memory-traffic floor, against eager and compiled PyTorch) and '
                  'the training throughput of the larger model.', '']
    for size in args.sizes:
        rows = tables[size]
        lines += [f"## Training throughput, {SIZES[size]['model'].format(variant='<variant>')}", '',
                  'From the runs of RESULTS.md (same command): median images/s over the epochs after the first, '
                  'mean over seeds.', '',
                  '| variant | n | train img/s | ×residual | peak memory MiB | activations MiB |',
                  '|---|---|---|---|---|---|']
        for row in rows:
            lines.append(f"| {row['variant']} | {row['n']} | {row['img_per_sec']:.0f} | "
                         f"{row.get('speed_ratio', float('nan')):.2f} | {row['peak_mb']:.0f} | "
                         f"{row['activation_bytes'] / 2 ** 20:.1f} |")
        lines.append('')
    path.write_text('\n'.join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    prov = provenance(argv)
    print(f"compare.py at {prov['commit']} on {prov['device']}", flush=True)
    outputs = run_benchmarks(args)  # first, on a quiet machine
    for command, output in outputs:
        print(f'$ {command}\n{output}', flush=True)
    configs = list(configurations(args))
    refused = [(s, v, n, why) for s, v, n, why in configs if why]
    runnable = [(s, v, n) for s, v, n, why in configs if not why]
    recipe = yaml.safe_load((ROOT / 'configs' / 'digits_residual.yaml').read_text())  # the configs share it
    facts = {c: model_facts(*c, recipe['batch_size']) for c in runnable}
    records = []
    total = len(runnable) * args.seeds
    for seed in range(args.seeds):
        for size, variant, n in runnable:
            record = train_run(args, size, variant, n, seed, prov['commit'])
            records.append(record)
            print(f"[{len(records)}/{total}] {size} {variant} n={n} seed {seed}: top-1 "
                  f"{record['epochs'][-1]['eval_top1']:.2f}%, {throughput(record):.0f} img/s", flush=True)
    counts = {split: len(create_dataset('', root=str(digits_folder()), split=split))
              for split in ('train', 'validation')}
    wall = time.perf_counter() - start
    results, benchmarks = Path(args.results), Path(args.benchmarks)
    tables = {size: summarize(records, facts, size) for size in args.sizes}
    write_results(results, args, prov, records, tables, refused, counts, wall, recipe)
    write_benchmarks(benchmarks, prov, outputs, tables, args)
    print(f'wrote {results}, {results.parent / "results"}/ and {benchmarks} in {wall / 60:.1f} min')


if __name__ == '__main__':
    main()
