"""projUNN's cost and accuracy: step time against N and k, the exact O(N³) baselines, drift, and how much of the
base optimizer's step the rank-k approximation keeps.

1. **Step time** of one orthogonal update of an N×N weight ``U`` from a step ``Δ`` (float32, fastest of timed
   calls): projUNN-T and projUNN-D with the LSI sampler (sampler included) for each ``k``, against the dense
   updates they replace, ``U · matrix_exp(½(UᵀΔ − ΔᵀU))`` (the tangent step) and the SVD polar factor of
   ``U + Δ`` (the direct step). The log-log slope of time against N over ``N >= --fit-from`` is printed per
   method (≈2 for projUNN, ≈3 for the dense ones, once N is large enough that the matrix products dominate).
2. **Kept fraction** ``‖G‖_F / ‖Δ‖_F`` of the rank-k approximation ``G`` of real steps: the orthogonal block
   weights of ``vit_micro_patch4_32_orthogonal`` on the digits (16px, batch 32), SGD (Δ = −lr·∇) and AdamW steps
   after ``--warm-steps`` projUNN-T steps of each, for both samplers, mean over the weights' square blocks.
3. **Drift** ``max ‖UᵀU − I‖₂`` after ``--drift-steps`` ProjUNN steps (AdamW base, Gaussian gradients, N=64,
   k=1) for T and D in float32 and float64, and in float32 with ``reorthogonalize_every=100``.

    python benchmarks/bench_projunn.py [--sizes 64 128 256 512 1024 2048] [--ranks 1 4 16] [--drift-steps 10000]
        [--threads 2] [--write-section]

One thread by default: on a shared machine a multi-threaded small op waits for a descheduled worker (a
scheduler quantum, ~10 ms), which swamps the small sizes.

``--write-section`` writes the output into BENCHMARKS.md's ``bench_projunn`` section with the command, commit
and CPU.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import timm
import torch

import kromhc_vision  # noqa: F401  (registers the models and the projunn* optimizers)
from kromhc_vision.cli.sections import write_command_section
from kromhc_vision.optim import (ProjUNN, is_orthogonal, lowrank_factors, orthogonality_error, polar,
                                 projunn_direct, projunn_tangent, square_blocks)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models_cpu import commit, cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def best_ms(fn, budget_s: float = 2.0, max_reps: int = 15) -> float:
    """Fastest of up to ``max_reps`` timed calls (at least 2, within ``budget_s``) after a warm-up call: on a
    shared machine the minimum estimates the op's own cost, the median mostly the other processes'."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def slope(ns, ms):
    x = [math.log(n) for n in ns]
    y = [math.log(t) for t in ms]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def step_times(sizes, ranks, fit_from, lines):
    gen = torch.Generator().manual_seed(0)
    methods = [f'{m}{k}' for m in ('T', 'D') for k in ranks] + ['expm', 'polar']
    table = {m: [] for m in methods}
    lines.append('step time (ms, float32) of one N x N update from U and Delta; T<k>/D<k>: projUNN-T/D with the '
                 'LSI sampler at rank k; expm: U matrix_exp(1/2(U^T Delta - Delta^T U)); polar: SVD polar of U + Delta')
    lines.append(f"{'N':>6} " + ' '.join(f'{m:>9}' for m in methods))
    for n in [sizes[0]] + list(sizes):  # the first row twice: the first LAPACK calls of a process are slow
        u = torch.linalg.qr(torch.randn(n, n, generator=gen))[0][None].contiguous()  # row-major, as weights
        delta = 1e-3 * torch.randn(1, n, n, generator=gen)
        row = {}
        for k in ranks:
            for name, update in (('T', projunn_tangent), ('D', projunn_direct)):
                row[f'{name}{k}'] = best_ms(lambda: update(u, *lowrank_factors(delta, k, 'lsi', gen)))
        row['expm'] = best_ms(lambda: u @ torch.linalg.matrix_exp(0.5 * (u.mT @ delta - delta.mT @ u)))
        row['polar'] = best_ms(lambda: polar(u + delta))
        if len(table['polar']) == 0 and not getattr(step_times, '_warm', False):
            step_times._warm = True
            continue
        for m in methods:
            table[m].append(row[m])
        lines.append(f'{n:>6} ' + ' '.join(f'{row[m]:>9.3f}' for m in methods))
        print(lines[-1], flush=True)
    fit = [i for i, n in enumerate(sizes) if n >= fit_from]
    if len(fit) >= 2:
        lines.append(f"log-log slope over N >= {fit_from}: " + ', '.join(
            f'{m} {slope([sizes[i] for i in fit], [table[m][i] for i in fit]):.2f}' for m in methods))
        lines.append('dense / projUNN at N = {}: '.format(sizes[-1]) + ', '.join(
            f'expm/T{k} {table["expm"][-1] / table[f"T{k}"][-1]:.1f}x, polar/D{k} '
            f'{table["polar"][-1] / table[f"D{k}"][-1]:.1f}x' for k in ranks))
    lines.append('')


def kept_fraction(ranks, warm_steps, lines):
    from kromhc_vision.data import digits_folder
    from timm.data import create_dataset, create_loader

    ds = create_dataset('', root=str(digits_folder()), split='train')
    loader = create_loader(ds, input_size=(3, 16, 16), batch_size=32, is_training=False, num_workers=0, use_prefetcher=False,
                           interpolation='bicubic', crop_pct=1.0)
    batches = [b for _, b in zip(range(warm_steps + 1), loader)]
    lines.append(f'kept fraction ||G||_F / ||Delta||_F of rank-k approximations of real steps (vit_micro_patch4_32_'
                 f'orthogonal, digits 16px, batch 32, after {warm_steps} projUNN-T steps; mean over the 64x64 '
                 f'blocks of the 24 orthogonal weights that the step moved)')
    lines.append(f"{'base':>6} {'sampler':>7} " + ' '.join(f'{"k=" + str(k):>7}' for k in ranks))
    for base, lr in (('sgd', 0.05), ('adamw', 1e-3)):
        torch.manual_seed(0)
        model = timm.create_model('vit_micro_patch4_32_orthogonal', img_size=16, num_classes=10)
        opt = timm.optim.create_optimizer_v2(model, opt=f'projunn{base}', lr=lr, rank=4,
                                             **({'momentum': 0., 'nesterov': False} if base == 'sgd' else {}))
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i < warm_steps:
                opt.step()
        # the base step alone, on copies: Delta = (base step of U) - U
        params = [p for p in model.parameters() if is_orthogonal(p)]
        before = [p.detach().clone() for p in params]
        opt.base.step()
        deltas = torch.cat([square_blocks(p.detach()) - square_blocks(b) for p, b in zip(params, before)])
        for sampler in ('lsi', 'column'):
            row = []
            for k in ranks:
                a, b = lowrank_factors(deltas, k, sampler, torch.Generator().manual_seed(1))
                norms = torch.linalg.matrix_norm(deltas)
                moved = norms > 0  # blocks the step moved (a float32 SGD step below the rounding of U is 0)
                row.append((torch.linalg.matrix_norm(a @ b.mT)[moved] / norms[moved]).mean().item())
            lines.append(f'{base:>6} {sampler:>7} ' + ' '.join(f'{v:>7.3f}' for v in row))
            print(lines[-1], flush=True)
    lines.append('')


def drift(steps, lines):
    lines.append(f'drift max ||U^T U - I||_2 (N=64, k=1, AdamW base lr 1e-2, Gaussian gradients) after steps')
    marks = sorted({m for m in (1, 100, 1000, steps) if m <= steps})
    lines.append(f"{'config':>24} " + ' '.join(f'{m:>10}' for m in marks))
    for dtype, mode, every in ((torch.float64, 'tangent', 0), (torch.float64, 'direct', 0),
                               (torch.float32, 'tangent', 0), (torch.float32, 'direct', 0),
                               (torch.float32, 'tangent', 100), (torch.float32, 'direct', 100)):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=gen))[0].to(dtype))
        opt = ProjUNN([{'params': [w], 'orthogonal': True}], base='adamw', lr=1e-2, mode=mode, rank=1,
                      reorthogonalize_every=every)
        errs = []
        for i in range(1, steps + 1):
            w.grad = torch.randn(64, 64, dtype=dtype, generator=gen)
            opt.step()
            if i in marks:
                errs.append(orthogonality_error(w))
        name = f"{str(dtype)[6:]} {mode}" + (f' reorth/{every}' if every else '')
        lines.append(f'{name:>24} ' + ' '.join(f'{e:>10.2e}' for e in errs))
        print(lines[-1], flush=True)
    lines.append('')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 4, 16])
    parser.add_argument('--fit-from', type=int, default=256)
    parser.add_argument('--warm-steps', type=int, default=20)
    parser.add_argument('--drift-steps', type=int, default=10000)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--skip', nargs='*', default=[], choices=['time', 'kept', 'drift'])
    parser.add_argument('--write-section', action='store_true', help="write BENCHMARKS.md's bench_projunn section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f'CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; '
             f'commit {commit()}', '']
    print(lines[0], flush=True)
    if 'time' not in args.skip:
        step_times(args.sizes, args.ranks, args.fit_from, lines)
    if 'kept' not in args.skip:
        kept_fraction(args.ranks, args.warm_steps, lines)
    if 'drift' not in args.skip:
        drift(args.drift_steps, lines)
    print('\n'.join(lines), flush=True)
    if args.write_section:
        write_command_section(ROOT / 'BENCHMARKS.md', 'bench_projunn',
                              'projUNN: step time against N and k, kept fraction, drift',
                              'benchmarks/bench_projunn.py', argv, lines)


if __name__ == '__main__':
    main()
