"""The benchmark scripts compare.py runs (benchmarks/), and the backend the training runs use."""
import subprocess
import sys
from pathlib import Path

import torch

from kromhc_vision.ops import backend_for

from .runs import ROOT

KERNEL_BENCHMARKS = ('bench_stream_pre.py', 'bench_stream_post.py', 'bench_sinkhorn.py')


def default_backend() -> str:
    """The backend the training runs get from ``auto`` on this machine (dispatch's rules)."""
    return backend_for('auto', torch.device('cuda' if torch.cuda.is_available() else 'cpu'))


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
    numba = backend_for('auto', torch.device('cpu')) == 'numba'
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

