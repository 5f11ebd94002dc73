#!/usr/bin/env python
"""Check this implementation against reference fixtures of the official ECLIPSE code.

Usage: python tools/check_reference.py FIXTURE_DIR [FIXTURE_DIR ...]

Prints one table per fixture and exits with status 1 if any check fails. The fixture format
is described in tests/fixtures/README.md; distillation fixtures (manifest ``"kind":
"distillation"``, tests/fixtures/distillation/README.md) are checked by
continual.distillation_reference.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from continual.distillation_reference import format_checks, run_distillation_checks  # noqa: E402
from continual.reference_check import format_table, run_checks  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="+", help="fixture folders (each with manifest.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the fixtures were made with 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    failed = 0
    for path in args.fixtures:
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            print(f"{path}: not a fixture folder (no manifest.json)", file=sys.stderr)
            failed += 1
            continue
        with open(os.path.join(path, "manifest.json")) as f:
            kind = json.load(f).get("kind")
        if kind == "distillation":
            results = run_distillation_checks(path)
            table = format_checks(results)
        else:
            results = run_checks(path)
            table = format_table(results)
        print(f"== {path}")
        print(table)
        failed += sum(not r.ok for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
