"""The HTML report of one or more run folders (``prmbench-fast report RUN_DIR ...``) and the demo's console summary.

A run folder is what ``prmbench-fast score --output-dir`` and ``prmbench-fast evaluate --output-dir`` write; the report
reads its ``report.json`` only (``official``, ``table``, ``diagnostics``, ``run`` and ``analysis``). For a folder
written before analyses were stored, pass ``data=`` (the PRMBench data) and the analyses are computed from its
``results.jsonl``. matplotlib (the ``[report]`` extra) is imported by this package only.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import textwrap
from typing import Any, Mapping, Sequence

from ..io import FileError, read_json, write_bytes_atomic, write_text_atomic
from ..ratios import TABLE_COLUMNS
from .leaderboard import leaderboard_text, published

__all__ = ["RunView", "load_run", "summary_text", "write_report"]


@dataclasses.dataclass
class RunView:
    """What the report shows of one run folder."""

    name: str
    path: pathlib.Path
    report: dict[str, Any]  # report.json
    analysis: dict[str, Any]
    note: str = ""  # why something is missing

    @property
    def is_bon(self) -> bool:
        return "pass_at_n" in self.report.get("official", {})

    @property
    def is_processbench(self) -> bool:
        return self.report.get("task") == "processbench"

    @property
    def is_prmbench(self) -> bool:
        """A PRMBench run (the main task or subset400): a leaderboard row and the PRMBench analyses."""
        return not (self.is_bon or self.is_processbench)

    @property
    def official(self) -> dict[str, Any]:
        return self.report["official"]

    @property
    def table(self) -> dict[str, float | None]:
        return self.report.get("table", {})

    @property
    def settings(self) -> dict[str, Any]:
        return self.report.get("run") or {}

    @property
    def diagnostics(self) -> dict[str, Any]:
        return self.report.get("diagnostics") or {}

    @property
    def task(self) -> str:
        return self.report.get("task") or self.settings.get("task", "prmbench")


def load_run(path: str | os.PathLike, *, data: str | os.PathLike | None = None, name: str | None = None) -> RunView:
    """Read a run folder. Without ``analysis`` in its report.json, the analyses are computed from results.jsonl
    when ``data`` (the PRMBench data the run used) is given, and left out otherwise."""
    path = pathlib.Path(path)
    report_file = path / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{path} is not a run folder: no report.json (write one with score/evaluate --output-dir)")
    report = read_json(report_file)
    _check_layout(report, report_file)
    view = RunView(name or path.resolve().name, path, report, report.get("analysis") or {})
    if not view.analysis and view.is_prmbench:
        if data is not None and (path / "results.jsonl").is_file():
            view.analysis = _analysis_from_results(view, data)
        else:
            view.note = "no analyses in report.json; pass the data (report --data) to compute them from results.jsonl"
    return view


def _check_layout(report: Any, report_file: pathlib.Path) -> None:
    """Raise FileError naming ``report_file`` unless it has the layout score/evaluate --output-dir write."""
    def bad(problem: str) -> FileError:
        return FileError(report_file, None, None, f"{problem}: not a report.json of score/evaluate --output-dir "
                         "(or of another version); write it again with `prmbench-fast evaluate --predictions "
                         "<its results.jsonl> --output-dir <folder>`")

    if not isinstance(report, dict):
        raise bad(f"a JSON {type(report).__name__}, expected an object")
    for key in ("official", "table", "run", "diagnostics", "analysis"):
        if report.get(key) is not None and not isinstance(report[key], dict):
            raise bad(f"'{key}' is a JSON {type(report[key]).__name__}, expected an object")
    if not isinstance(report.get("official"), dict):
        raise bad("no 'official' results")
    if "pass_at_n" in report["official"]:
        return  # BoN: its own layout, shown as it is
    if report.get("task") == "processbench":
        if "average_f1" not in report["official"]:
            raise bad("'official' lacks 'average_f1' (a ProcessBench report)")
        return
    missing = [c for c in TABLE_COLUMNS if c not in report.get("table", {})]
    if missing:
        raise bad(f"'table' lacks the column(s) {', '.join(missing)}")


def _analysis_from_results(view: RunView, data) -> dict[str, Any]:
    from ..analysis import analyze
    from ..io import read_predictions
    from ..tasks import get_task

    task = get_task(view.task)
    results = read_predictions(view.path / "results.jsonl")
    dataset = task.load(data)
    if view.task == "prmbench":  # a run on a stratified subset: its own samples, as `evaluate --only-predicted`
        dataset = dataset.restrict_to(r["idx"] for r in results)
    report = task.evaluate(dataset, results, keep_scores=True)  # the analyses read the scores
    # The run's threshold: in report.json's settings, else in the run's identity (run.json of score --output-dir).
    threshold = view.settings.get("validity_threshold")
    if threshold is None and (view.path / "run.json").is_file():
        identity = read_json(view.path / "run.json")
        threshold = identity.get("validity_threshold") if isinstance(identity, dict) else None
    return analyze(dataset, report, validity_threshold=threshold)


def _run_names(paths: Sequence[pathlib.Path]) -> list[str]:
    """Folder names, made unique with their parent folder's name where two runs share one."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


#: The figures a report may have, by file-name suffix.
FIGURES = ("radar", "recall", "scores", "sweep", "intervals", "error_positions", "calibration")


def _figures(runs: Sequence[RunView]) -> dict[str, bytes]:
    from . import figures

    prmbench = [r for r in runs if r.is_prmbench]
    with_analysis = [r for r in prmbench if r.analysis]
    drawn = {"calibration": figures.processbench_calibration([r for r in runs if r.is_processbench])}
    if not prmbench:
        return {name: png for name, png in drawn.items() if png is not None}
    baselines = next((r.analysis["baselines"] for r in with_analysis if r.analysis.get("baselines")), None)
    drawn.update({
        "radar": figures.radar(prmbench, baselines),
        "recall": figures.recall_by_position(with_analysis),
        "scores": figures.score_distributions(with_analysis),
        "sweep": figures.threshold_sweep(with_analysis),
        "intervals": figures.intervals(with_analysis),
        "error_positions": figures.error_positions(
            with_analysis[0].analysis.get("error_position_distribution") if with_analysis else None),
    })
    return {name: png for name, png in drawn.items() if png is not None}


def write_report(
    run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, *, data: str | os.PathLike | None = None
) -> pathlib.Path:
    """Write the HTML report of these run folders and its PNG figures beside it; return the HTML file's path.

    Args:
        run_dirs: run folders (several: compared side by side).
        output: the HTML file (default ``<first run folder>/report.html``); the figures go next to it as
            ``<name>.<figure>.png``.
        data: the PRMBench data, only needed for run folders whose report.json has no analyses.
    """
    from .. import __version__
    from .html import render

    if not run_dirs:
        raise ValueError("write_report needs at least one run folder")
    paths = [pathlib.Path(p) for p in run_dirs]
    runs = [load_run(p, data=data, name=n) for p, n in zip(paths, _run_names(paths))]
    output = pathlib.Path(output) if output is not None else paths[0] / "report.html"
    try:
        figures = _figures(runs)
        page = render(runs, figures, __version__)
    except (KeyError, TypeError, IndexError) as err:
        # The top level was checked on reading; a part deeper down (an analysis) has another layout.
        files = ", ".join(str(run.path / "report.json") for run in runs)
        raise FileError(files, None, None, f"an entry of another layout ({type(err).__name__}: {err}); write the run "
                        "folder again with this version (score/evaluate --output-dir)") from None
    for name in FIGURES:
        png_file = output.parent / f"{output.stem}.{name}.png"
        if name in figures:
            write_bytes_atomic(png_file, figures[name])  # never a truncated PNG, whatever stops the write
        else:
            png_file.unlink(missing_ok=True)  # a figure of an earlier report that this one does not have
    write_text_atomic(output, page)
    return output


def summary_text(
    table: Mapping[str, float | None],
    baselines: Mapping[str, Mapping[str, float | None]],
    *,
    name: str = "this run",
    samples: int | None = None,
    report_path: str | os.PathLike | None = None,
) -> str:
    """The console summary of a run: its row among the published leaderboard and the trivial predictors' rows (all
    steps positive / negative, as the evaluator scores them on the run's data), the source, and where the report is.

    ``baselines``: ``analysis["baselines"]`` or :func:`prmbench_fast.analysis.trivial_baselines` of the run's data;
    ``samples``: the number of samples the run evaluated (said, since published rows cover the whole benchmark).
    """
    lines = [leaderboard_text({name: table}, baselines), ""]
    if samples is not None:
        lines.append(f"{name} and the baselines: the {samples:,} samples evaluated; published rows: the whole benchmark "
                     "(6,969 samples).")
    lines += textwrap.wrap(f"Published rows: {published()[1]}", width=120)
    if report_path is not None:
        lines.append(f"report: {report_path}")
    return "\n".join(lines)
