"""``python -m kromhc_vision table``: the variants, their guarantees and parameter counts (markdown).

``python -m kromhc_vision check-kernels [--archs 80,90] [--jobs N] [--full]``: compile every Triton kernel for
real GPU targets (no GPU needed) and report shared memory, registers and spills
(:mod:`kromhc_vision.ops.triton.check`)."""
import argparse
import math

from .connections import CONNECTIONS, connection_num_params
from .permutations import PermutationSizeError

GUARANTEES = {
    "residual": ("1 stream", "trivially"),
    "hc": ("reshape(a_res), unconstrained", "no"),
    "mhc": ("Sinkhorn-Knopp, log domain, T iterations", "approximately (error after T steps)"),
    "mhclite": ("softmax over all n! permutations", "exactly"),
    "kromhc": ("Kronecker product of small Birkhoff factors", "exactly"),
}


def parameter_table(dim: int, streams: list) -> str:
    """Markdown table: per variant, H_res map, double stochasticity, parameters per connection at each n."""
    head = "| variant | H_res | doubly stochastic | " + " | ".join(f"params, n={n}" for n in streams) + " |"
    rows = [head, "|" + "---|" * (3 + len(streams))]
    for variant in CONNECTIONS:
        cells = []
        for n in (1,) * len(streams) if variant == "residual" else streams:
            try:
                cells.append(f"{connection_num_params(variant, n, dim):,}")
            except PermutationSizeError as e:  # any other error (a bad $KROMHC_BACKEND, ...) is raised, not tabled
                cells.append(f"refused ({e.size}! = {math.factorial(e.size):,} logits)")
        how, exact = GUARANTEES[variant]
        rows.append(f"| {variant} | {how} | {exact} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _check_arguments(parser):
    try:
        from .ops.triton.check import add_arguments
    except ImportError as e:  # no triton: the subcommand says so when run
        parser.set_defaults(_import_error=str(e))
        return
    add_arguments(parser)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kromhc_vision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="parameter counts per connection, as a markdown table")
    table.add_argument("--dim", type=int, default=768, help="channels per stream C (default 768)")
    table.add_argument("--streams", type=int, nargs="+", default=[4, 8, 16], help="stream counts n")
    check = sub.add_parser("check-kernels", help="compile every Triton kernel for sm_80 / sm_90 (no GPU needed)")
    _check_arguments(check)
    args = parser.parse_args(argv)
    if args.command == "table" and args.dim < 1:
        parser.error(f"table --dim must be >= 1, got {args.dim}")
    if args.command == "table" and min(args.streams) < 2:
        parser.error(f"table --streams must each be >= 2 (the residual row has 1), got {min(args.streams)}")
    if args.command == "check-kernels":
        from .ops.triton.check import run
        raise SystemExit(run(args))
    print(f"Parameters of one connection at C = {args.dim} (`python -m kromhc_vision table --dim {args.dim}`):\n")
    try:
        table = parameter_table(args.dim, args.streams)
    except ValueError as e:  # e.g. an unknown $KROMHC_BACKEND
        parser.error(str(e))
    print(table)


if __name__ == "__main__":
    main()
