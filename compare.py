#!/usr/bin/env python3
"""Every variant side by side: regenerates RESULTS.md, its figures and BENCHMARKS.md (see kromhc_vision.cli.compare)."""
from kromhc_vision.cli.compare import main

if __name__ == '__main__':
    main()
