"""Run every ``tests/bench/bench_*.py`` module's ``main()`` and print its report."""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    only = set(sys.argv[1:])
    failed = 0
    for name in names:
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        began = time.monotonic()
        try:
            module = importlib.import_module(f"tests.bench.{name}")
            report = module.main()
        except Exception:
            failed += 1
            traceback.print_exc()
            continue
        if report:
            print(str(report).rstrip())
        print(f"({name}: {time.monotonic() - began:.0f} s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
