"""compare.py --dataset fashion_mnist: the variants on Fashion-MNIST, and the depth at which they part ways.

    python compare.py --dataset fashion_mnist                       # depth study, n = 4 grid, n = 8 (CPU budget)
    python compare.py --dataset fashion_mnist --parts depth --depth-rows plain   # only some runs
    python compare.py --dataset fashion_mnist --no-train            # the section from finished runs only

A *row* is a config file ``configs/fashion_mnist_<row>.yaml`` (the model and its settings; every file shares the
recipe). A row whose ``model_kwargs`` hold ``num_streams`` is a stream row: the comparison sets ``num_streams``
(4, and 8 in the ``wide`` part); other rows run as they are (n = 1 in the tables). A run sets ``depth`` in
``model_kwargs`` where the row's model takes it (timm ViT's ``depth``); a row whose model does not (Terminator) is
a *fixed-depth* row: it runs as its config builds it, in the grid only. The three parts, in priority order:

- ``depth``: :data:`DEPTH_ROWS` at n = 4 and depth 6, 12, 24 (``--depths``), seed 0: final top-1, composite gain of
  H_res across depth, the gradient norm of the first block against the last, the update losses; a non-finite loss
  (train.py stops the run) or a loss blow-up (:func:`blow_up`) is marked.
- ``grid``: :data:`GRID_ROWS` at n = 4, depth 6, seeds 0 .. ``--seeds``-1 (seed 0 is the depth study's depth-6 run).
- ``wide``: :data:`WIDE_ROWS` at n = 8, depth 6, seed 0.

Each run is ``train.py -c configs/fashion_mnist_<row>.yaml`` on the first ``--train-per-class`` training images of
every class (:func:`kromhc_vision.data.fashion_mnist_root`), evaluated on all 10,000 test images. A run folder's
``run.json`` keeps its settings (command, the config's SHA-256, diagnostics settings); a later call with the same
settings reuses it, so the comparison can be completed in parts. RESULTS.md's ``fashion_mnist`` section (before
the digits one) is rewritten from every finished run of the default rows and the rows named, and says which runs
were not made.
"""
import argparse
import csv
import functools
import gzip
import hashlib
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from timm.models import create_model

from .. import write_json
from ...data import fashion_mnist_root
from ...diagnostics import connection_diagnostics
from ...memory import saved_activation_bytes
from ..evaluation import eval_loader, load_trained_model
from ..sections import markers, replace_section
from .report import made_at, provenance
from .runs import ROOT, run_failed, run_logged
from .stats import diff_se, mean_std

# The rows of each part (configs/fashion_mnist_<row>.yaml); the command-line options --*-rows replace them.
GRID_ROWS = ['residual', 'hc', 'mhc', 'mhclite', 'kromhc', 'terminator']  # terminator: issue 20, fixed depth
DEPTH_ROWS = ['residual', 'hc', 'mhc', 'mhclite', 'kromhc', 'plain', 'orthogonal']  # plain, orthogonal: issue 19
WIDE_ROWS = ['hc', 'mhc', 'kromhc']
PARTS = ('depth', 'grid', 'wide')
DATASET = 'torch/fashion_mnist'
SECTION = 'fashion_mnist'  # RESULTS.md's section written here; placed before the digits one ('compare')
BEFORE = 'compare'
README = Path('/usr/share/doc/dataset-fashion-mnist/README.md.gz')  # the dataset's README, from Debian's package
BASELINES = README.parent / 'benchmark' / 'baselines.json'
BLOW_UP = 1.5  # a loss blow-up: an update loss, after the first tenth of the run, above 1.5x the first update's


def config_path(row: str) -> Path:
    return ROOT / 'configs' / f'fashion_mnist_{row}.yaml'


def row_config(row: str) -> dict:
    return yaml.safe_load(config_path(row).read_text())


def stream_row(row: str) -> bool:
    return 'num_streams' in (row_config(row).get('model_kwargs') or {})


def meta_model(row: str, **overrides):
    """Build the row's model (its config's ``model_kwargs`` with ``overrides``) on the meta device: the settings'
    checks run, no memory is used."""
    cfg = row_config(row)
    with torch.device('meta'):
        return create_model(cfg['model'], num_classes=10, in_chans=1, **dict(cfg.get('model_kwargs') or {},
                                                                             **overrides))


@functools.lru_cache(maxsize=None)
def takes_depth(row: str) -> bool:
    """Whether the row's model takes ``depth`` (built on meta with ``depth=1``: a TypeError says no)."""
    try:
        meta_model(row, depth=1)
    except TypeError:
        return False
    return True


def recipe_differences(row: str, base: str = 'residual') -> dict:
    """The settings of ``row``'s config, other than the model, that differ from ``base``'s: ``{key: value}``."""
    cfg, ref = row_config(row), row_config(base)
    return {k: cfg.get(k) for k in sorted(set(cfg) | set(ref))
            if k not in ('model', 'model_kwargs') and cfg.get(k) != ref.get(k)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='compare.py --dataset fashion_mnist', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', choices=['fashion_mnist'], default='fashion_mnist')
    p.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS), help='what to train (priority order)')
    p.add_argument('--grid-rows', nargs='+', default=GRID_ROWS)
    p.add_argument('--depth-rows', nargs='+', default=DEPTH_ROWS)
    p.add_argument('--wide-rows', nargs='+', default=WIDE_ROWS)
    p.add_argument('--depths', nargs='+', type=int, default=[6, 12, 24])
    p.add_argument('--grid-depth', type=int, default=6, help='depth of the grid and the wide part')
    p.add_argument('--streams', type=int, default=4, help='n of the grid and the depth study')
    p.add_argument('--wide-streams', type=int, default=8, help='n of the wide part')
    p.add_argument('--seeds', type=int, default=3, help='grid seeds 0 .. seeds-1')
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--warmup-epochs', type=int, default=0, help='passed to train.py (the configs say 1)')
    p.add_argument('--train-per-class', type=int, default=600,
                   help='first k training images of each class (0: all 60,000); the test set is always whole')
    p.add_argument('--diag-images', type=int, default=128, help='test images for diagnostics and gradient norms')
    p.add_argument('--no-train', action='store_true', help='only report the finished runs')
    p.add_argument('--output', default='output/compare_fashion')
    p.add_argument('--results', default='RESULTS.md', help='its figures go to results/ beside it')
    args = p.parse_args(argv)
    for key in ('seeds', 'epochs', 'grid_depth', 'diag_images'):
        if getattr(args, key) < 1:
            p.error(f'--{key.replace("_", "-")} must be >= 1, got {getattr(args, key)}')
    if args.train_per_class < 0 or args.warmup_epochs < 0:
        p.error(f'--train-per-class and --warmup-epochs must be >= 0 (got {args.train_per_class}, '
                f'{args.warmup_epochs})')
    if min(args.depths) < 1 or args.streams < 2 or args.wide_streams < 2:
        p.error(f'depths must be >= 1 and stream counts >= 2 (got --depths {args.depths}, --streams '
                f'{args.streams}, --wide-streams {args.wide_streams})')
    known = sorted(q.stem[len('fashion_mnist_'):] for q in (ROOT / 'configs').glob('fashion_mnist_*.yaml'))
    for key in ('grid_rows', 'depth_rows', 'wide_rows'):
        bad = [r for r in getattr(args, key) if r not in known]
        if bad:
            p.error(f'--{key.replace("_", "-")}: no configs/fashion_mnist_<row>.yaml for {bad}; rows: {known}')
    bad = [r for r in args.depth_rows if not takes_depth(r)]
    if bad:
        p.error(f'--depth-rows: the models of {bad} take no depth (fixed-depth rows run in the grid only)')
    bad = [r for r in args.wide_rows if not stream_row(r)]
    if bad:
        p.error(f'--wide-rows: {bad} take no num_streams (their config has none), so n = {args.wide_streams} '
                'means nothing for them')
    return args


# ------------------------------------------------------------------------------------------------------- runs
def spec_name(row, depth, n, seed):
    """A run's name: ``<row>_d<depth>_n<n>_s<seed>`` (no ``_d<depth>`` for a fixed-depth row)."""
    return f'{row}_d{depth}_n{n}_s{seed}' if takes_depth(row) else f'{row}_n{n}_s{seed}'


def plan(args, rows=None) -> list:
    """``(part, row, depth, n, seed)`` in priority order, without repeats (the grid's seed 0 at the grid depth is
    the depth study's run). ``rows``: per part, the rows (default: the arguments')."""
    rows = rows or dict(depth=args.depth_rows, grid=args.grid_rows, wide=args.wide_rows)
    out, seen = [], set()

    def add(part, row, depth, n, seed):
        n = n if stream_row(row) else 1
        if (row, depth, n, seed) not in seen:
            seen.add((row, depth, n, seed))
            out.append((part, row, depth, n, seed))
    for part in PARTS:
        if part == 'depth':
            for depth in args.depths:
                for row in rows['depth']:
                    add(part, row, depth, args.streams, 0)
        elif part == 'grid':
            for seed in range(args.seeds):
                for row in rows['grid']:
                    add(part, row, args.grid_depth, args.streams, seed)
        else:
            for row in rows['wide']:
                add(part, row, args.grid_depth, args.wide_streams, 0)
    return out


def model_settings(row, depth, n):
    cfg = row_config(row)
    kwargs = dict(cfg.get('model_kwargs') or {})
    if takes_depth(row):
        kwargs['depth'] = depth
    if 'num_streams' in kwargs:
        kwargs['num_streams'] = n
    return cfg['model'], kwargs


def refusal(row, depth, n):
    """Why the model cannot be built with these settings (e.g. mHC-lite at n = 8), else None; builds on meta."""
    _, kwargs = model_settings(row, depth, n)
    try:
        meta_model(row, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e).split('. ')[0]
    return None


def data_root(args) -> Path:
    return fashion_mnist_root(args.train_per_class or None)


def train_command(args, row, depth, n, seed, out, name):
    _, kwargs = model_settings(row, depth, n)
    return [sys.executable, str(ROOT / 'train.py'), '-c', str(config_path(row)),
            '--data-dir', str(data_root(args)), '--model-kwargs', *(f'{k}={v}' for k, v in kwargs.items()),
            '--seed', str(seed), '--epochs', str(args.epochs), '--warmup-epochs', str(args.warmup_epochs),
            '--checkpoint-hist', '1', '--output', str(out), '--experiment', name]


def settings_of(args, row, command):
    portable = [Path(c).name if i < 2 else c for i, c in enumerate(command)]
    portable[portable.index('--data-dir') + 1] = Path(portable[portable.index('--data-dir') + 1]).name
    portable[portable.index('--output') + 1] = '<output>'
    return dict(command=portable, config_sha256=hashlib.sha256(config_path(row).read_bytes()).hexdigest(),
                diag_images=args.diag_images)


def read_steps(run_dir: Path) -> list:
    path = run_dir / 'steps.csv'
    if not path.exists():
        return []
    with open(path) as f:
        return [float(r['loss']) for r in csv.DictReader(f)]


def blow_up(losses) -> bool:
    """An update loss after the first tenth of the run above :data:`BLOW_UP` times the first (or not finite)."""
    if not losses:
        return False
    tail = losses[max(1, len(losses) // 10):]
    return any(not math.isfinite(v) or v > BLOW_UP * losses[0] for v in tail)


def diagnostics(model_name, checkpoint: Path, data_dir, num_images):
    """Connection diagnostics (None without connections) and the gradient norms of the first and last block."""
    model, data_config = load_trained_model(model_name, str(checkpoint))
    loader = eval_loader(data_config, str(data_dir), DATASET, 'test', batch_size=num_images, workers=0)
    images, labels = next(iter(loader))
    try:
        conn = connection_diagnostics(model, images)
    except ValueError:
        conn = None
    model.eval()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    blocks = getattr(model, 'blocks', None)
    grads = None
    if blocks is not None and len(blocks):
        norm = lambda m: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters()  # noqa: E731
                                       if p.grad is not None))
        grads = dict(first=norm(blocks[0]), last=norm(blocks[-1]))
    return conn, grads


def load_record(run_dir: Path, settings):
    path = run_dir / 'run.json'
    if path.exists():
        record = json.loads(path.read_text())
        if record.get('settings') == settings:
            return record
    return None


def train_run(args, row, depth, n, seed, commit, device=None, train=True):
    """One run (the stored one when its settings match, from any device: the section names each run's; None when
    not stored and ``train`` is false); ``device``: the provenance's device string, recorded with the run."""
    name = spec_name(row, depth, n, seed)
    out = Path(args.output)
    run_dir = out / name
    command = train_command(args, row, depth, n, seed, out, name)
    settings = settings_of(args, row, command)
    record = load_record(run_dir, settings)
    if record is not None:
        return dict(record, reused=True)
    if not train:
        return None
    rc, log, wall = run_logged(command, out, name)
    nonfinite = re.search(r'non-finite loss[^\n;]*', log.read_text())
    if rc and not nonfinite:
        raise run_failed(name, rc, log)
    epochs = json.loads((run_dir / 'summary.json').read_text()) if (run_dir / 'summary.json').exists() else []
    losses = read_steps(run_dir)
    model_name, _ = model_settings(row, depth, n)
    conn = grads = None
    if epochs and (run_dir / 'last.pth.tar').exists():
        conn, grads = diagnostics(model_name, run_dir / 'last.pth.tar', data_root(args), args.diag_images)
    for path in [*run_dir.glob('checkpoint-*.pth.tar'), run_dir / 'model_best.pth.tar']:
        path.unlink(missing_ok=True)  # keep last.pth.tar only
    record = dict(settings=settings, commit=commit, device=device, row=row, depth=depth, n=n, seed=seed, wall_s=wall,
                  epochs=epochs, losses=losses, nonfinite=nonfinite.group(0) if nonfinite else None,
                  blow_up=blow_up(losses), diagnostics=conn and dict(conn['summary'], layers=[
                      {k: layer[k] for k in ('row_error', 'col_error', 'gain_row', 'gain_col')}
                      for layer in conn['layers']]), grad_norms=grads)
    write_json(run_dir / 'run.json', record)
    return dict(record, reused=False)


def model_facts(row, depth, n, batch_size) -> dict:
    name, kwargs = model_settings(row, depth, n)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, **kwargs).train()
    images = torch.randn(batch_size, 1, 28, 28)
    return dict(params=sum(p.numel() for p in model.parameters()),
                activation_bytes=saved_activation_bytes(model, images))


# ------------------------------------------------------------------------------------------------ statistics
def top1(record):
    return record['epochs'][-1]['eval_top1'] if record['epochs'] and not record['nonfinite'] else None


def img_per_sec(record):
    rates = [e['train_img_per_sec'] for e in record['epochs']]
    return statistics.median(rates[1:] or rates) if rates else None


def gain(record):
    """Max composite gain over layers and tokens (None for one stream: a 1x1 H_res is trivially 1)."""
    d = record.get('diagnostics')
    return None if d is None or record['n'] == 1 else max(max(layer['gain_row'], layer['gain_col'])
                                                         for layer in d['layers'])


def ds_error(record):
    d = record.get('diagnostics')
    return None if d is None or record['n'] == 1 else max(d['max_row_error'], d['max_col_error'])


def grad_ratio(record):
    g = record.get('grad_norms')
    return None if not g or not g['last'] else g['first'] / g['last']


def status(record):
    if record['nonfinite']:
        return 'NaN: ' + record['nonfinite']
    return 'loss blow-up' if record['blow_up'] else ''


def grid_rows(records, facts, rows, depth, n, ref=None):
    """One row per model: top-1 over seeds, Δ against residual (``ref``, else the residual row among ``rows``) with
    its standard error, costs, diagnostics."""
    out = []
    for row in rows:
        k = n if stream_row(row) else 1
        runs = [r for r in records if r['row'] == row and r['depth'] == depth and r['n'] == k]
        if not runs:
            continue
        accs = [top1(r) for r in runs]
        finite = [a for a in accs if a is not None]
        speeds = [s for s in (img_per_sec(r) for r in runs) if s]
        out.append(dict(row=row, n=k, seeds=len(runs), finite=len(finite),
                        top1=mean_std(finite) if finite else (None, None),
                        top1_all=accs, img_per_sec=statistics.fmean(speeds) if speeds else None,
                        facts=facts[(row, depth, k)], diverged=sum(a is None for a in accs),
                        ds_error=max((ds_error(r) for r in runs if ds_error(r) is not None), default=None),
                        gain=max((gain(r) for r in runs if gain(r) is not None), default=None),
                        losses=[r['losses'] for r in runs]))
    ref = ref or next((r for r in out if r['row'] == 'residual'), None)
    for r in out:
        if ref is None:
            break
        r['extra_params'] = r['facts']['params'] - ref['facts']['params']
        r['activation_ratio'] = r['facts']['activation_bytes'] / ref['facts']['activation_bytes']
        if r['img_per_sec'] and ref['img_per_sec']:
            r['speed_ratio'] = r['img_per_sec'] / ref['img_per_sec']
        if r['row'] != 'residual' and r['top1'][0] is not None and ref['top1'][0] is not None:
            r['diff'] = r['top1'][0] - ref['top1'][0]
            # the standard deviations are over the finite runs only, so each mean's count is theirs
            r['se'] = diff_se(r['top1'][1], r['finite'], ref['top1'][1], ref['finite'])
    return out


# ---------------------------------------------------------------------------------------------------- report
def fmt(x, spec='.2f', none=''):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def published_context() -> list:
    """Simple-CNN rows of the benchmark table in the dataset's README (Debian's copy), verbatim figures."""
    if not README.exists():
        return []
    rows = []
    for line in gzip.decompress(README.read_bytes()).decode('utf-8', 'replace').splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) >= 4 and re.fullmatch(r'0\.\d+', cells[2]) and re.match(r'\d Conv', cells[0]):
            submitter = re.sub(r'\[([^\]]+)\]\([^)]*\)', r'\1', cells[4]) if len(cells) > 4 else ''
            rows.append((cells[0], cells[1], 100 * float(cells[2]), submitter))
    return rows


def depth_table(records, rows, depths, streams):
    head = ['| model | n | ' + ' | '.join(f'depth {d}: top-1 %' for d in depths) + ' | '
            + ' | '.join(f'gain, depth {d}' for d in depths) + ' | '
            + ' | '.join(f'‖∇first‖/‖∇last‖, depth {d}' for d in depths) + ' | divergence |',
            '|' + '---|' * (3 + 3 * len(depths))]
    for row in rows:
        n = streams if stream_row(row) else 1
        by = {r['depth']: r for r in records if r['row'] == row and r['n'] == n and r['seed'] == 0}
        cells = [fmt(top1(by[d]), '.2f', 'NaN') if d in by else 'not run' for d in depths]
        cells += [fmt(gain(by[d]), '.7g', '—') if d in by else '' for d in depths]
        cells += [fmt(grad_ratio(by[d]), '.3g', '—') if d in by else '' for d in depths]
        notes = '; '.join(f'depth {d}: {status(by[d])}' for d in depths if d in by and status(by[d]))
        head.append(f'| {row} | {n} | ' + ' | '.join(cells) + f' | {notes or "none"} |')
    return '\n'.join(head)


def grid_table(table, refused):
    lines = ['| model | n | seeds | top-1 % | Δ vs residual | extra params | train img/s | ×residual | '
             'activations ×residual | max \\|row/col sum − 1\\| | max composite gain |', '|' + '---|' * 11]
    for r in table:
        diff = ''
        if 'diff' in r:
            diff = f"{r['diff']:+.2f}" + ('' if r.get('se') is None else
                                          (' (noise)' if abs(r['diff']) <= 2 * r['se'] else ' (beyond 2 s.e.)'))
        mean, std = r['top1']
        acc = 'NaN' if mean is None else f'{mean:.2f}' + ('' if std is None or math.isnan(std) else f' ± {std:.2f}')
        if r['diverged']:
            acc += f" ({r['diverged']} of {r['seeds']} diverged)"
        extra = r.get('extra_params')
        label = r['row'] if takes_depth(r['row']) else f"{r['row']} (its own depth)"
        lines.append(f"| {label} | {r['n']} | {r['seeds']} | {acc} | {diff} | "
                     + ('' if extra is None else f"{extra:,} ({100 * extra / (r['facts']['params'] - extra):.1f} %)")
                     + f" | {fmt(r['img_per_sec'], '.0f')} | {fmt(r.get('speed_ratio'))} | "
                     f"{fmt(r.get('activation_ratio'))} | {fmt(r['ds_error'], '.1e')} | {fmt(r['gain'], '.6g')} |")
    for row, n, why in refused:
        lines.append(f'| {row} | {n} | refused: {why} |' + ' |' * 8)
    return '\n'.join(lines)


def smooth(values, k=5):
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot_depth(records, rows, depths, streams, path):
    from kromhc_vision.extras import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for row in rows:
        n = streams if stream_row(row) else 1
        by = {r['depth']: r for r in records if r['row'] == row and r['n'] == n and r['seed'] == 0}
        ds = [d for d in depths if d in by]
        for ax, fn in zip(axes, (top1, gain, grad_ratio)):
            pts = [(d, fn(by[d])) for d in ds if fn(by[d]) is not None]
            if pts:
                ax.plot(*zip(*pts), 'o-', ms=4, label=f'{row} n={n}')
            for d in ds:
                if by[d]['nonfinite'] or by[d]['blow_up']:
                    y = fn(by[d]) if fn(by[d]) is not None else (1 if fn is not top1 else 0)
                    ax.plot([d], [y], 'rx', ms=10, mew=2)
    axes[0].set(title='final test top-1 % (x: NaN / blow-up)', xlabel='depth')
    axes[1].set(title='max composite gain of H_res at the end', xlabel='depth', yscale='log')
    axes[2].set(title='grad norm, first block / last block', xlabel='depth', yscale='log')
    for ax in axes:
        ax.set_xticks(depths)
        ax.grid(alpha=0.3, which='both')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(records, rows, depths, streams, path):
    from kromhc_vision.extras import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths), 3.8), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for row in rows:
            n = streams if stream_row(row) else 1
            run = next((r for r in records if r['row'] == row and r['n'] == n and r['seed'] == 0 and r['depth'] == d),
                       None)
            if run is None or not run['losses']:
                continue
            line, = ax.plot(range(1, len(run['losses']) + 1), smooth(run['losses']), lw=1.2, label=f'{row} n={n}')
            if run['nonfinite']:
                ax.plot([len(run['losses'])], [smooth(run['losses'])[-1]], 'x', color=line.get_color(), ms=10, mew=2)
        ax.set(title=f'depth {d}: update loss (5-step mean)', xlabel='update')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reading(args, depth_records, table, wide, depth_rows) -> list:
    out = []
    for d in args.depths:
        at = [r for r in depth_records if r['depth'] == d]
        bad = [f"{r['row']} ({status(r)})" for r in at if status(r)]
        if at:
            chance = [r['row'] for r in at if top1(r) is not None and top1(r) <= 100 / 10 + 0.5]
            parts = ['Top-1: ' + ', '.join(f"{r['row']} {fmt(top1(r), '.2f', 'NaN')}" for r in at)]
            gains = [f"{r['row']} {fmt(gain(r), '.4g')}" for r in at if gain(r) is not None]
            grads = [f"{r['row']} {fmt(grad_ratio(r), '.3g')}" for r in at if grad_ratio(r) is not None]
            if gains:
                parts.append('composite gain: ' + ', '.join(gains))
            if grads:
                parts.append('first/last block gradient norm: ' + ', '.join(grads))
            out.append(f'**Depth {d}.** ' + (f"Diverged or blew up: {', '.join(bad)}. " if bad else
                                             'No run diverged or blew up. ')
                       + (f"At chance (10 % top-1): {', '.join(chance)}. " if chance else '')
                       + '; '.join(parts) + '.')
    hc = sorted((r for r in depth_records if r['row'] == 'hc' and gain(r) is not None), key=lambda r: r['depth'])
    exact = [r for r in depth_records if r['row'] in ('mhclite', 'kromhc') and gain(r) is not None]
    if len(hc) > 1:
        out.append('HC\'s composite gain against depth: ' + ', '.join(f"{fmt(gain(r), '.4g')} at {r['depth']}"
                                                                        for r in hc)
                   + (f"; {' and '.join(sorted({r['row'] for r in exact}))} stay at "
                      f"{max(gain(r) for r in exact):.7f} at every depth run "
                      '(a product of doubly stochastic matrices has gain 1).' if exact else '.'))
    if len(args.depths) and args.seeds:
        out.append('The depth study has one seed per depth: a top-1 difference there is not tested against noise '
                   '(the grid below gives the seed-to-seed spread at depth '
                   f'{args.grid_depth}).')
    base = next((r for r in table if r['row'] == 'residual'), None)
    tested = [r for r in table if r.get('se') is not None]
    if base and tested:
        above = [r for r in tested if r['diff'] > 2 * r['se']]
        below = [r for r in tested if -r['diff'] > 2 * r['se']]
        spreads = [r['top1'][1] for r in table if r['top1'][1] is not None and not math.isnan(r['top1'][1])]
        text = (f"**Grid (n = {args.streams}, depth {args.grid_depth}).** Residual: {fmt(base['top1'][0])} ± "
                f"{fmt(base['top1'][1])} % over {base['seeds']} seeds. {len(tested) - len(above) - len(below)} of "
                f"{len(tested)} rows are within two standard errors of it")
        for word, group in (('above', above), ('below', below)):
            if group:
                text += f'; {word}: ' + ', '.join(f"{r['row']} ({r['diff']:+.2f})" for r in group)
        text += (f'. Seed-to-seed standard deviations: {min(spreads):.2f} to {max(spreads):.2f} points; one test '
                 'image is 0.01 points.')
        out.append(text)
    elif table:
        out.append('**Grid.** Fewer than two seeds per row so far: no difference in top-1 is tested against noise.')
    if wide:
        out.append(f"**n = {args.wide_streams}** (one seed): " + ', '.join(
            f"{r['row']} {fmt(r['top1'][0])} % (gain {fmt(r['gain'], '.4g')}, ds error {fmt(r['ds_error'], '.1e')})"
            for r in wide) + '.')
    images = 10 * args.train_per_class if args.train_per_class else 60000
    out.append(f'**What this cannot show.** {images:,} training images, {args.epochs} epoch(s), a 64-wide ViT: '
               'accuracies far below what these models reach with the full set and a full schedule (the published '
               'CNN figures above train for many epochs on all 60,000), and whether the ordering holds at ImageNet '
               'scale. What it can show is whether a variant becomes unstable as depth grows at the same recipe, '
               'and the exactness and cost of each.')
    return out


def recipe_note(report_rows) -> str:
    """Which rows' configs differ from the residual one beyond the model, and how (else: only in the model)."""
    rows = [r for part in PARTS for r in report_rows[part]]
    diffs = {r: recipe_differences(r) for r in dict.fromkeys(rows)}
    named = [f"{r}: " + ', '.join(f'{k} {v}' for k, v in d.items()) for r, d in diffs.items() if d]
    fixed = [r for r in diffs if not takes_depth(r)]
    return ('Rows differ from residual only in the model' + (', except ' + '; '.join(named) if named else '')
            + '.' + (f" {', '.join(fixed)}: a model of its own depth and width (its config), in the grid only."
                     if fixed else ''))


def write_results_section(path: Path, body: str):
    """RESULTS.md's fashion_mnist section, placed before the digits section when it is new."""
    text = path.read_text() if path.exists() else '# Results\n'
    begin, _ = markers(SECTION)
    before, _ = markers(BEFORE)
    if begin not in text and before in text:
        i = text.index(before)
        text = text[:i] + f"{begin}\n{body.strip()}\n{markers(SECTION)[1]}\n\n" + text[i:]
    else:
        text = replace_section(text, SECTION, body)
    path.write_text(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    prov = provenance(argv)
    commit = prov['commit']
    print(f"compare.py --dataset fashion_mnist at {commit} on {prov['device']}", flush=True)
    data_root(args)  # the data first: a missing package fails before any run
    todo = [] if args.no_train else plan(args, dict(depth=args.depth_rows if 'depth' in args.parts else [],
                                                    grid=args.grid_rows if 'grid' in args.parts else [],
                                                    wide=args.wide_rows if 'wide' in args.parts else []))
    refused, trained = {}, set()
    for k, (part, row, depth, n, seed) in enumerate(todo):
        why = refused.setdefault((row, depth, n), refusal(row, depth, n))
        if why:
            continue
        record = train_run(args, row, depth, n, seed, commit, prov['device'])
        if not record['reused']:
            trained.add(spec_name(row, depth, n, seed))
        t1 = top1(record)
        print(f"[{k + 1}/{len(todo)}] {part}: {spec_name(row, depth, n, seed)}: top-1 {fmt(t1, '.2f', 'NaN')}"
              f"{' ' + status(record) if status(record) else ''}{' (reused)' if record['reused'] else ''}", flush=True)
    union = lambda a, b: a + [r for r in b if r not in a]  # noqa: E731
    report_rows = dict(depth=union(DEPTH_ROWS, args.depth_rows), grid=union(GRID_ROWS, args.grid_rows),
                       wide=union(WIDE_ROWS, args.wide_rows))
    records, missing = [], []
    for part, row, depth, n, seed in plan(args, report_rows):
        why = refused.setdefault((row, depth, n), refusal(row, depth, n))
        record = None if why else train_run(args, row, depth, n, seed, commit, train=False)
        if record is None and not why:
            missing.append((part, spec_name(row, depth, n, seed)))
        elif record is not None:
            records.append(dict(record, part=part, reused=spec_name(row, depth, n, seed) not in trained))
    write_section_from(args, prov, records, missing, refused, report_rows, time.perf_counter() - start)


def write_section_from(args, prov, records, missing, refused, report_rows, wall):
    results = Path(args.results)
    figures = results.parent / 'results'
    figures.mkdir(parents=True, exist_ok=True)
    cfg = row_config('residual')
    facts = {}
    for r in records:
        key = (r['row'], r['depth'], r['n'])
        if key not in facts:
            facts[key] = model_facts(*key, cfg['batch_size'])
    depth_records = [r for r in records if r['seed'] == 0 and r['n'] in (args.streams, 1)
                     and r['row'] in report_rows['depth'] and r['depth'] in args.depths]
    grid = grid_rows([r for r in records if r['row'] in report_rows['grid']], facts, report_rows['grid'],
                     args.grid_depth, args.streams)
    wide = grid_rows([r for r in records if r['n'] == args.wide_streams], facts, report_rows['wide'],
                     args.grid_depth, args.wide_streams, ref=next((r for r in grid if r['row'] == 'residual'), None))
    wide_refused = [(row, n, why) for (row, d, n), why in refused.items()
                    if why and n == args.wide_streams and row in report_rows['wide']]
    minutes = sum(r['wall_s'] for r in records) / 60
    reused = sum(r['reused'] for r in records)
    images = 10 * args.train_per_class if args.train_per_class else 60000
    total = len(records) + len(missing)
    lines = ['## Fashion-MNIST', '',
             f"Generated by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']}; device: "
             f"{prov['device']}; torch {prov['torch']}, timm {prov['timm']}. {len(records)} of {total} planned "
             f"training runs are in it, {minutes:.1f} min of training, {made_at(records)}"
             + (f' ({reused} reused from earlier calls)' if reused else '')
             + f'; wall time of this call {wall / 60:.1f} min. Every number and figure in this section comes from '
             'that command.', '',
             '### Setup', '',
             f"- Data: Zalando's Fashion-MNIST (Debian's `dataset-fashion-mnist`, checked against the publisher's "
             f"SHA-256 of the decompressed files; `kromhc_vision.data`) through timm's `--dataset {DATASET}` "
             f"(torchvision). Training: the first {images // 10:,} images of each class, {images:,} in all "
             f"(`--train-per-class {args.train_per_class}`); test: all 10,000 images (one image is 0.01 points).",
             f"- Recipe: `configs/fashion_mnist_<row>.yaml` ({cfg['opt']}, lr {cfg['lr']}, {cfg['sched']} per "
             f"update, label smoothing {cfg['smoothing']}, batch {cfg['batch_size']}, random-resized crops "
             f"{cfg['scale']} and horizontal flips, grayscale with `in_chans=1`, mean {cfg['mean'][0]} / std "
             f"{cfg['std'][0]}) with `--epochs {args.epochs} --warmup-epochs {args.warmup_epochs}`; the model: "
             f"`{cfg['model']}` with {cfg['model_kwargs']} (28×28 input, 7×7 patches, 64 wide), `depth` and "
             '`num_streams` set per run. ' + recipe_note(report_rows),
             '- Chosen for the budget (2 shared CPU cores, about an hour of training for every run together): the '
             'training subset and the epoch count above; the test set is never cut.',
             '- Extra params and activations (bytes autograd keeps for one training batch, `kromhc_vision.memory`): '
             'against residual at the same depth. Throughput: training images/s of each run, mean over seeds; the '
             'runs shared the machine with other jobs, so its ratios are indicative only (BENCHMARKS.md has the '
             'controlled ones).',
             f"- Diagnostics on the first {args.diag_images} test images with the final weights: composite gain = "
             'largest absolute row or column sum of H_res^(l)…H_res^(1) over depth l and tokens (1 for doubly '
             'stochastic mixing); ‖∇first‖/‖∇last‖ = the gradient norm of the cross-entropy over the parameters of '
             'the first block divided by that of the last block. Divergence: train.py stops a run at a non-finite '
             f'loss (NaN); a loss blow-up is an update loss, after the first tenth of the run, above {BLOW_UP}× the '
             'first update\'s loss.', '']
    context = published_context()
    lines += ['### Published context', '']
    if context:
        lines += ['Simple CNNs from the benchmark table of the dataset\'s README (`/usr/share/doc/dataset-fashion-mnist/'
                  'README.md.gz`, zalandoresearch/fashion-mnist; submitted results, not verified by its authors), '
                  'trained on all 60,000 images:', '', '| model | preprocessing | test top-1 % | submitter |',
                  '|---|---|---|---|']
        lines += [f'| {m} | {p} | {a:.1f} | {s} |' for m, p, a, s in context]
    else:
        lines += [f'The dataset\'s README (with its benchmark table) is not installed here ({README}).']
    lines += ['', 'Classical classifiers (scikit-learn, 129 settings) are reported by Xiao, Rasul and Vollgraf, '
              '"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747 '
              '(Table 3) and on the benchmark site the README links; the package ships only their parameter grids '
              f"(`benchmark/baselines.json`{'' if BASELINES.exists() else ', not installed here'}), not the "
              'results, so none is quoted here.', '']
    lines += [f'### Depth study (n = {args.streams}, seed 0)', '',
              depth_table(depth_records, report_rows['depth'], args.depths, args.streams), '']
    if depth_records:
        plot_depth(depth_records, report_rows['depth'], args.depths, args.streams, figures / 'fashion_depth.png')
        plot_losses(depth_records, report_rows['depth'], args.depths, args.streams, figures / 'fashion_losses.png')
        lines += ['![depth](results/fashion_depth.png)', '', '![losses](results/fashion_losses.png)', '']
    lines += [f'### Every row at n = {args.streams}, depth {args.grid_depth}, seeds 0 … {args.seeds - 1}', '',
              grid_table(grid, []), '',
              f'### n = {args.wide_streams}, depth {args.grid_depth}, seed 0', '', grid_table(wide, wide_refused), '',
              '### Reading', '', *[f'- {s}' for s in reading(args, depth_records, grid, wide,
                                                              report_rows['depth'])], '']
    if missing:
        lines += ['### Not run', '', f'{len(missing)} planned runs have not been made (they run on the next call '
                  'without `--no-train`; finished runs are reused): '
                  + '; '.join(f'{part}: ' + ', '.join(f'`{n}`' for p, n in missing if p == part)
                              for part in PARTS if any(p == part for p, _ in missing)) + '.', '']
    write_results_section(results, '\n'.join(lines))
    print(f'wrote the {SECTION} section of {results} and {figures}/fashion_*.png '
          f'({len(records)} runs, {len(missing)} not run)')
