"""Rerun presets at their full settings and rewrite their rows of the results table in docs/RESULTS.md.

    python scripts/reproduce.py                      # every preset that has a rule (superposition.claims.RULES)
    python scripts/reproduce.py pentagon geometry    # only these
    python scripts/reproduce.py --collect pentagon   # re-read finished run folders, do not train
    python scripts/reproduce.py --quick pentagon     # a smoke pass with the presets' [quick] settings

Each preset trains into ``--out/<preset>`` (a run folder, or a sweep folder for presets with a ``[sweep]``
section), then its rule reads the measured numbers next to the source's numbers, and the preset's row of the
table between the ``results:begin`` / ``results:end`` markers of RESULTS.md is replaced (rows of other presets are
kept, so engineers can add rows for their own presets). A ``--quick`` pass never writes RESULTS.md.

The verdict column is computed from the numbers by the rule printed next to it; a "no" is reported, never tuned
away. Wall time is the whole command (training, evaluation, metrics, report) on this machine.

The rules live in the package (``superposition.claims``) and the loop in ``superposition.reproduce.reproduce``;
this script is the command line over them (the names below are re-exported for older callers and tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from superposition.claims import RULES, Row
from superposition.claims.saes import sae_recovery
from superposition.reproduce import (
    BEGIN,
    END,
    HEADER,
    format_row,
    load_result,
    reproduce,
    train_preset,
    update_table,
    where,
)

__all__ = [  # for older callers (tests import this file) and for main
    "BEGIN",
    "END",
    "EXTRACTORS",
    "HEADER",
    "RULES",
    "Row",
    "format_row",
    "load_result",
    "main",
    "reproduce",
    "sae_recovery",
    "train_preset",
    "update_table",
    "where",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
EXTRACTORS = RULES  # the old name of the table of rules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="presets to rerun (default: every preset with an extractor)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce", help="folder for the run folders")
    parser.add_argument("--quick", action="store_true", help="use the [quick] settings; never writes RESULTS.md")
    parser.add_argument("--collect", action="store_true", help="only re-read finished runs (wall time from the log)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the wall-time column names it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra section.field=value")
    parser.add_argument("--machine", default="", help="a note on the machine, kept with the wall time")
    parser.add_argument("--workers", type=int, default=1, help="parallel workers for presets with a [sweep]")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file whose table is rewritten")
    args = parser.parse_args(argv)
    unknown = [n for n in args.presets if n not in RULES]
    if unknown:
        print(f"error: no extractor for {', '.join(unknown)} (known: {', '.join(RULES)})", file=sys.stderr)
        return 2
    reproduce(
        args.presets or None,
        out=args.out,
        collect=args.collect,
        quick=args.quick,
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        overrides=args.overrides,
        machine=args.machine,
        results_md=args.results,
        progress=lambda message: print(message, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
