"""A run's output folder: per-sample results as they finish, so an interrupted run resumes where it stopped.

Layout of ``output_dir``:
    run.json              what was run (model, family, options, max_length): a resume with other settings is refused
    results.jsonl         one official result line per finished sample ({"idx", "scores": {...}}); rank r > 0 of a
                          distributed run writes results.rank<r>.jsonl
    report.json, table.txt  the final report, written atomically once every sample is scored
    cache/                tokenized samples (safetensors), so a resumed run does not tokenize again

Result lines are appended a batch at a time and fsync'ed, so a crash (even SIGKILL) loses at most the batch in flight;
a torn last line is cut off on the next open. The files are the official toolkit's format: ``prmbench-fast evaluate``
and the official tools read them as they are.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable

from .io import write_json_atomic, write_text_atomic

RUN_FILE = "run.json"


class RunMismatchError(ValueError):
    """``output_dir`` holds a run made with other settings; resuming would mix two runs."""


def ordered_predictions(dataset, finished: dict[str, Any], new_results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Resumed and new results together, in dataset order; the first result per id wins (as in the official tools)."""
    predictions = dict(finished)
    for result in new_results:
        predictions.setdefault(result["idx"], result)
    return {s.id: predictions[s.id] for s in dataset.samples if s.id in predictions}


def results_file(output_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return output_dir / ("results.jsonl" if rank == 0 else f"results.rank{rank}.jsonl")


class ResultsStore:
    def __init__(self, output_dir: str | os.PathLike, run_config: dict[str, Any], *, rank: int = 0):
        self.dir = pathlib.Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._check_run(run_config)
        self.path = results_file(self.dir, rank)
        self._cut_torn_tail(self.path)

    def _check_run(self, run_config: dict[str, Any]) -> None:
        run_file = self.dir / RUN_FILE
        config = json.loads(json.dumps(run_config))  # normalise (tuples -> lists) before comparing
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != config:
                changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
                raise RunMismatchError(
                    f"{self.dir} holds a run with other settings ({', '.join(changed)}); use another output_dir"
                )
        elif self.rank == 0:
            write_json_atomic(run_file, config)

    @staticmethod
    def _cut_torn_tail(path: pathlib.Path) -> None:
        # A kill during a write can leave a last line without its newline; drop it so the next append starts clean.
        if not path.exists():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(path, "r+b") as f:
                f.truncate(end)

    def finished(self) -> dict[str, dict[str, Any]]:
        """Every result already written by any rank (first line per id wins, as in the official evaluator)."""
        results: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("results*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # another rank's torn tail: that sample is simply not finished
                    record = json.loads(line)
                    results.setdefault(record["idx"], record)
        return results

    def append(self, results: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in results)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def write_report(self, report) -> None:
        """The final report.json and table.txt, each written atomically."""
        write_json_atomic(self.dir / "report.json", {"official": report.official, "table": report.table,
                                                      "diagnostics": report.diagnostics, "run": report.run})
        write_text_atomic(self.dir / "table.txt", report.format_table() + "\n")
