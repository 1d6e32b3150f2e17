"""ProcessBench-format files built from PRMBench rows, for tests and the demo (the real data lives only on the hub).

Each PRMBench sample becomes one ProcessBench row: a clean ``correct_*`` solution gets label -1 and
``final_answer_correct`` true; a perturbed one the 0-based index of its first error step (its smallest 1-based error
step minus one) and ``final_answer_correct`` false. A perturbed sample whose error steps all lie past its last step
has no such index and is left out. Source problems are dealt to the four splits in turn (a problem's variants stay
in one split); ids are ``<split>-<n>``, as in the official data. One JSON-lines file per split.

    python -m prmbench_fast.testing.processbench_data PRMBENCH.jsonl OUT_FOLDER [--limit-per-class N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from ..classes import CORRECT
from ..data import load_prmbench
from ..tasks.processbench import SPLITS


def processbench_rows(prmbench_source: str | os.PathLike, limit_per_class: int | None = None) -> dict[str, list[dict]]:
    """Split -> rows in the official ProcessBench format, built from the PRMBench data at ``prmbench_source``."""
    dataset = load_prmbench(prmbench_source, limit_per_class=limit_per_class)
    problem_split: dict[str, str] = {}
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for sample in dataset.samples:
        if sample.classification == CORRECT:
            label = -1
        else:
            inside = [e for e in sample.error_steps if 1 <= e <= len(sample.steps)]
            if not inside:
                continue
            label = min(inside) - 1
        split = problem_split.setdefault(sample.source_idx, SPLITS[len(problem_split) % len(SPLITS)])
        rows[split].append({
            "id": f"{split}-{len(rows[split])}",
            "generator": f"PRMBench/{sample.classification}",
            "problem": sample.question,
            "steps": list(sample.steps),
            "final_answer_correct": label == -1,
            "label": label,
        })
    return rows


def write_processbench(prmbench_source: str | os.PathLike, folder: str | os.PathLike,
                       limit_per_class: int | None = None) -> list[pathlib.Path]:
    """Write ``<split>.jsonl`` for each split into ``folder``; returns the files."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for split, rows in processbench_rows(prmbench_source, limit_per_class).items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prmbench", help="the PRMBench jsonl file")
    parser.add_argument("folder", help="where to write gsm8k.jsonl, math.jsonl, olympiadbench.jsonl, omnimath.jsonl")
    parser.add_argument("--limit-per-class", type=int, default=None)
    args = parser.parse_args(argv)
    for path in write_processbench(args.prmbench, args.folder, args.limit_per_class):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
