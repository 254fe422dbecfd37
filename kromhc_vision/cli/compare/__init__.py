"""compare.py: residual, HC, mHC, mHC-lite and KromHC side by side; regenerates RESULTS.md, figures, BENCHMARKS.md.

    python compare.py                 # every variant at n = 2, 4, 8, 3 seeds, on the embedded digits (CPU)
    python compare.py --seeds 1 --epochs 2 --variants residual kromhc --streams 4   # a quick look
    python compare.py --dataset fashion_mnist   # Fashion-MNIST: depth study, n = 4 grid, n = 8 (see .fashion)

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

Modules: :mod:`.runs` (the training runs, their diagnostics), :mod:`.stats` (over seeds, relative to residual),
:mod:`.figures`, :mod:`.benchmarks` (the benchmark scripts), :mod:`.report` (RESULTS.md, BENCHMARKS.md);
:mod:`.fashion` is `--dataset fashion_mnist`, its own comparison (depth study, grid, n = 8) and RESULTS.md section.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from timm.data import create_dataset

import kromhc_vision as kv

from ...data import digits_folder
from .benchmarks import run_benchmarks
from .report import provenance, write_benchmarks, write_results
from .runs import ROOT, SIZES, configurations, digits_config, model_facts, train_run
from .stats import summarize, throughput

__all__ = ['parse_args', 'main', 'configurations']

DATASETS = ('digits', 'fashion_mnist')


def dataset_of(argv) -> str:
    """The ``--dataset`` of a command line (default digits); the datasets' comparisons take different options."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--dataset', choices=DATASETS, default='digits')
    return pre.parse_known_args(argv)[0].dataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', choices=DATASETS, default='digits',
                   help='fashion_mnist: another comparison with its own options (compare.py --dataset fashion_mnist -h)')
    p.add_argument('--variants', nargs='+', default=list(kv.CONNECTIONS), choices=list(kv.CONNECTIONS))
    p.add_argument('--streams', nargs='+', type=int, default=[2, 4, 8], help='stream counts n (residual: 1)')
    p.add_argument('--seeds', type=int, default=3, help='seeds 0 .. seeds-1')
    p.add_argument('--epochs', type=int, default=10, help='epochs per run (default: 10; the configs say 30)')
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
    for key in ('variants', 'streams', 'sizes', 'bench_streams'):  # a repeat would run, and count, a run twice
        values = getattr(args, key)
        if values is not None and len(set(values)) < len(values):
            p.error(f'--{key.replace("_", "-")}: {sorted({v for v in values if values.count(v) > 1})} given more '
                    f'than once ({" ".join(map(str, values))})')
    if args.sizes is None:
        args.sizes = ['micro', 'tiny'] if torch.cuda.is_available() else ['micro']
    for key in ('seeds', 'epochs', 'bench_rounds', 'bench_batch', 'diag_images'):  # before any benchmark or run
        if getattr(args, key) < 1:
            p.error(f'--{key.replace("_", "-")} must be >= 1, got {getattr(args, key)}')
    bad = [n for n in args.streams + args.bench_streams if n < 2]
    if bad:
        p.error(f'stream counts must be >= 2 (got {bad}); residual always runs with one stream')
    refusals = [why for *_, why in configurations(args)]
    if all(refusals):  # else the benchmarks run first, for minutes, and the report lists only refusals
        p.error(f"no run to make: {'; '.join(dict.fromkeys(refusals))}")
    return args



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if dataset_of(argv) == 'fashion_mnist':
        from .fashion import main as fashion_main
        return fashion_main(argv)
    args = parse_args(argv)
    if not (ROOT / 'train.py').is_file():
        raise SystemExit(f'compare.py: error: runs train.py and configs/ from a checkout of the repository; '
                         f'{ROOT} is not one')
    start = time.perf_counter()
    prov = provenance(argv)
    print(f"compare.py at {prov['commit']} on {prov['device']}", flush=True)
    outputs = run_benchmarks(args)  # first, on a quiet machine
    for command, output in outputs:
        print(f'$ {command}\n{output}', flush=True)
    configs = list(configurations(args))
    refused = [(s, v, n, why) for s, v, n, why in configs if why]
    runnable = [(s, v, n) for s, v, n, why in configs if not why]
    recipe = yaml.safe_load(digits_config('residual').read_text())  # the configs share it
    facts = {c: model_facts(*c, recipe['batch_size']) for c in runnable}
    records = []
    total = len(runnable) * args.seeds
    for seed in range(args.seeds):
        for size, variant, n in runnable:
            record = train_run(args, size, variant, n, seed, prov['commit'], prov['device'])
            records.append(record)
            print(f"[{len(records)}/{total}] {size} {variant} n={n} seed {seed}: top-1 "
                  f"{record['epochs'][-1]['eval_top1']:.2f}%, {throughput(record):.0f} img/s", flush=True)
    counts = {split: len(create_dataset('', root=str(digits_folder()), split=split))
              for split in ('train', 'validation')}
    wall = time.perf_counter() - start
    results, benchmarks = Path(args.results), Path(args.benchmarks)
    tables = {size: summarize(records, facts, size) for size in args.sizes}
    write_results(results, args, prov, records, tables, refused, counts, wall, recipe)
    write_benchmarks(benchmarks, prov, outputs, tables, args, records)
    print(f'wrote {results}, {results.parent / "results"}/ and {benchmarks} in {wall / 60:.1f} min')
