"""RESULTS.md and BENCHMARKS.md: provenance, tables, the reading computed from the numbers."""
import math
import os
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

import kromhc_vision as kv

from ...diagnostics import plot_composite_gain
from ..sections import replace_section, write_section
from .benchmarks import KERNEL_BENCHMARKS, default_backend
from .figures import plot_curves, plot_params
from .runs import ROOT, SIZES
from .stats import throughput_epochs

GENERATED = ('RESULTS.md', 'BENCHMARKS.md', 'results')
SECTION = 'compare'  # compare.py's section of BENCHMARKS.md and RESULTS.md (digits)


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
                command=shlex.join(['python', 'compare.py', *argv]), torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version())



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



def reading(rows, args, counts, size, reused=0) -> list:
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
        iters = kv.MHC.OPTIONS['sinkhorn_iters']
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
                   + ('measured in this run' if not reused else
                      f'{reused} of the runs reused from an earlier call: measured then, at the commits named above')
                   + '): '
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


def made_at(records) -> str:
    """``made at commit `a`, `b` on <device>; <device>``: the runs' own commits and devices (reused runs were made
    by an earlier call, maybe at another commit, on another machine)."""
    commits = sorted({r.get('commit', 'unknown') for r in records})
    devices = sorted({r.get('device') or 'device not recorded' for r in records})
    return 'made at commit ' + ', '.join(f'`{c}`' for c in commits) + ' on ' + '; '.join(devices)


def runs_provenance(records) -> str:
    """How many runs, their minutes, :func:`made_at`, how many reused."""
    reused = sum(r['reused'] for r in records)
    minutes = sum(r['wall_s'] for r in records) / 60
    return (f"The {len(records)} training runs took {minutes:.1f} min, {made_at(records)}"
            + (f' ({reused} reused from an earlier call).' if reused else '.'))


def write_results(path: Path, args, prov, records, tables, refused, counts, wall, cfg):
    figures = path.parent / 'results'
    figures.mkdir(parents=True, exist_ok=True)
    val_images = counts['validation']
    plot_params(figures / 'params.png')
    lines = ['## Digits (scikit-learn, the quick embedded default)', '',
             f"Generated by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']}; device: "
             f"{prov['device']}; torch {prov['torch']}, timm {prov['timm']}, Python {prov['python']}; "
             f'wall time {wall / 60:.1f} min. {runs_provenance(records)} Every number and figure below comes from '
             'that command.', '',
             '### Setup', '',
             '- Data: scikit-learn\'s handwritten digits (the embedded default): '
             f"{counts['train']:,} training and {val_images} validation images of 8×8 pixels, 10 classes, "
             "resized to each model's input size (`kromhc_vision.data`).",
             f"- Recipe: `configs/digits_<variant>.yaml` ({cfg['opt']}, lr {cfg['lr']}, {cfg['sched']} schedule, "
             f"label smoothing {cfg['smoothing']}, batch {cfg['batch_size']}), "
             f'with `--epochs {args.epochs}`, `--seed` 0 … {args.seeds - 1} and `--model-kwargs num_streams=n`; '
             'the configs differ only in the model. Top-1: last epoch, mean ± standard deviation over seeds.',
             '- Extra params: over the residual model of the same size. Throughput: median training images/s '
             f'of {throughput_epochs(args.epochs)}, mean over seeds, ratio to residual in this run. Peak memory: '
             '`train.py`\'s peak (CUDA max allocated; on CPU the process RSS, mostly libraries). Activations: '
             'bytes autograd keeps for the backward pass of one training batch (`kromhc_vision.memory`), of the '
             'model as the runs build it (the configs\' `model_kwargs`, '
             f"`hc_recompute` {(cfg.get('model_kwargs') or {}).get('hc_recompute', 'the default')}).",
             f'- Diagnostics (`kromhc_vision.diagnostics`): on the first {args.diag_images} validation images, '
             'after every epoch; max |row/col sum − 1| of H_res over all epochs, layers and tokens; composite '
             'gain = largest absolute row or column sum of H_res^(l)…H_res^(1) over depth l and tokens at the '
             'end (1 for a product of doubly stochastic matrices).', '']
    for size in args.sizes:
        rows = tables[size]
        size_refused = [(v, n, why) for s, v, n, why in refused if s == size]
        model = SIZES[size]['model'].format(variant='<variant>')
        lines += [f"### {model} ({SIZES[size]['about']})", '', table(rows, size_refused), '']
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
            reused = sum(r['reused'] for r in records if r['size'] == size)
            lines += ['### Reading', '', *[f'- {s}' for s in reading(rows, args, counts, size, reused)], '']
    lines += ['### Parameters against n', '',
              'Per connection at C = 768 (`python -m kromhc_vision table` prints the same counts): mHC-lite grows '
              'as n·C·n! (n! + 2n logits projected from the n·C stream state), HC and mHC as '
              'n·C·(n² + 2n) ≈ n³·C, '
              'KromHC as n·C·(2n + the logits of its small factors) = O(n²·C).', '',
              '![parameters](results/params.png)', '']
    write_results_section(path, '\n'.join(lines))


def write_results_section(path: Path, body: str):
    """RESULTS.md's digits section (``compare``); everything outside it (other generators' marked sections,
    hand-written text) is kept, and a new file starts with ``# Results``."""
    text = path.read_text() if path.exists() else '# Results\n'
    path.write_text(replace_section(text, SECTION, body))



def write_benchmarks(path: Path, prov, outputs, tables, args, records):
    """compare.py's section of BENCHMARKS.md (the others, e.g. benchmarks/gpu_suite.py's, are kept)."""
    lines = [f"Generated by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']}; device: "
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
                  'From the runs of RESULTS.md (same command): median images/s over '
                  f'{throughput_epochs(args.epochs)}, mean over seeds. ' + runs_provenance([r for r in records if r['size'] == size]), '',
                  '| variant | n | train img/s | ×residual | peak memory MiB | activations MiB |',
                  '|---|---|---|---|---|---|']
        for row in rows:
            lines.append(f"| {row['variant']} | {row['n']} | {row['img_per_sec']:.0f} | "
                         f"{row.get('speed_ratio', float('nan')):.2f} | {row['peak_mb']:.0f} | "
                         f"{row['activation_bytes'] / 2 ** 20:.1f} |")
        lines.append('')
    write_section(path, SECTION, '\n'.join(lines))

