"""What the training-framework callbacks share, with no framework imported: options checked when the callback is
built, the family resolved from the model, benchmark sets by name, and the values one scoring call logs.

Every mistake a user can make in a callback's arguments is found here before training starts (an unknown or
misspelled keyword, a family or family option that does not exist, a tokenizer or data set given as a path, an
``output_dir`` that is a file), never at the first scoring step hours later.
"""

from __future__ import annotations

import difflib
import inspect
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import analysis
from ..classes import CLASS_ABBREVIATIONS, CLASS_ID, DOMAINS, ERROR_CLASSES
from ..data import PRMBenchDataset
from ..evaluate import Report
from ..families import FAMILY_NAMES, FamilyError, detect_family, family_class
from ..ratios import TABLE_COLUMNS
from ..scoring import score
from ..tasks.processbench import ProcessBenchDataset

#: Logged beside the leaderboard columns: the threshold-free AUROC of the validity scores (0-1, correct steps above
#: error steps), the Overall a calibrated threshold would give and that threshold (``analysis.threshold_sweep``), and
#: 1.0 when every label the row counts is the same (the all-positive or all-negative predictor's row), else 0.0.
EXTRA_COLUMNS = ("AUROC", "Overall_at_best_threshold", "best_threshold", "trivial")

#: score() arguments the callbacks set themselves, or that do not apply to a live model.
_NOT_OPTIONS = {
    "model": "the callback scores the model being trained",
    "dataset": "pass it as the first argument",
    "tokenizer": "pass tokenizer=",
    "family": "pass family=",
    "output_dir": "pass output_dir= (the callback writes output_dir/step-<global step>)",
    "overwrite": "each step's folder is started over",
    "dtype": "a live model is scored in its own dtype",
    "device": "a live model is scored on its own device",
}
_TASKS = ("prmbench", "subset400")


class TrivialPredictorWarning(UserWarning):
    """A scoring call's row is a trivial predictor's: the model labels every step the same."""


def _score_parameters() -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(score).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD and name not in _NOT_OPTIONS}


def _family_parameters(name: str) -> set[str]:
    cls = family_class(name)
    init = inspect.signature(cls.__init__).parameters
    names = {n for n, p in init.items() if n not in ("self", "tokenizer") and p.kind is not inspect.Parameter.VAR_KEYWORD}
    names |= {"validity_threshold"} | ({"redundancy_threshold"} if cls.redundancy_threshold is not None else set())
    return names


def _unknown(owner: str, name: str, known: set[str]) -> TypeError:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TypeError(f"{owner} got an unexpected keyword argument {name!r}{hint}")


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError("tokenizer is needed: pass tokenizer= (the model's tokenizer object)")
    if isinstance(tokenizer, (str, os.PathLike)) or not callable(tokenizer):
        raise TypeError("tokenizer must be a tokenizer object, not a path: load it with "
                        f"transformers.AutoTokenizer.from_pretrained(path) (got {type(tokenizer).__name__})")


#: The benchmark sets a callback scores: PRMBench's, and ProcessBench's (``load_prmbench(path, task="processbench")``),
#: which is logged under its own prefix, ``processbench/`` (``processbench/<split>_f1``, ``processbench/f1``).
BENCHMARK_SETS = (PRMBenchDataset, ProcessBenchDataset)
PROCESSBENCH_PREFIX = "processbench/"


def datasets_by_name(dataset: Any) -> dict[str, PRMBenchDataset | ProcessBenchDataset]:
    """``{"": dataset}`` for one set, or the mapping name -> set; anything else is refused naming ``dataset``."""
    hint = "prmbench_fast.load_prmbench(...) or a mapping name -> one"
    if isinstance(dataset, BENCHMARK_SETS):
        return {"": dataset}
    if isinstance(dataset, Mapping):
        if not dataset:
            raise ValueError("dataset: an empty mapping; give at least one name -> PRMBenchDataset")
        for name, value in dataset.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"dataset: names must be non-empty strings without '/', got {name!r}")
            if not isinstance(value, BENCHMARK_SETS):
                raise TypeError(f"dataset[{name!r}] must be a PRMBenchDataset ({hint}), got {type(value).__name__}")
        return dict(dataset)
    what = "a path" if isinstance(dataset, (str, os.PathLike)) else type(dataset).__name__
    raise TypeError(f"dataset must be a PRMBenchDataset ({hint}), got {what}")


def check_folder(name: str, folder: Any) -> pathlib.Path | None:
    """``folder`` as a path, unless it (or the first of its parents that exists) is not a folder."""
    if folder is None:
        return None
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path or None, got {type(folder).__name__}")
    path = pathlib.Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r}: {str(existing)!r} exists and is not a folder")
    return path


def resolve_family(model: torch.nn.Module | None, family: str) -> str | None:
    """The family name: ``family`` itself (checked), or for "auto" the one detected from the model's config and name,
    where a ``*ForTokenClassification`` model no official family claims is ``generic`` (its ``score`` head is what
    the generic family reads). None for "auto" without a model yet."""
    if not isinstance(family, str):
        raise TypeError(f"family must be a family name, got {type(family).__name__}")
    if family != "auto":
        family_class(family)  # FamilyError (a ValueError) naming the choices
        return family
    if model is None:
        return None
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    try:
        return detect_family(config, name)
    except FamilyError:
        if type(model).__name__.endswith("ForTokenClassification"):
            return "generic"
        raise


class ScoringSetup:
    """A callback's benchmark sets, tokenizer, family and options, checked; scores a live model and returns the values
    to log.

    Args:
        owner: the callback's name, for messages.
        own_parameters: the callback's own keyword names (for the "did you mean" of a misspelled one).
        analyses: also compute :data:`EXTRA_COLUMNS` (AUROC and best threshold read the step scores on the host).
    """

    def __init__(self, owner: str, dataset: Any, *, tokenizer: Any, family: str, prefix: str, output_dir: Any,
                 options: dict[str, Any], own_parameters: set[str], analyses: bool):
        self.owner = owner
        self.datasets = datasets_by_name(dataset)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        if not isinstance(analyses, bool):
            raise TypeError(f"analyses must be True or False, got {analyses!r}")
        self.prefix, self.analyses = prefix, analyses
        self.output_dir = check_folder("output_dir", output_dir)
        self.tokenizer = tokenizer
        self.family: str | None = resolve_family(None, family) if family != "auto" else None
        self.requested_family = family
        self.score_options: dict[str, Any] = {"progress": False}
        self.family_options: dict[str, Any] = {}
        score_parameters = _score_parameters()
        family_names = (_family_parameters(self.family) if self.family is not None
                        else set().union(*(_family_parameters(n) for n in FAMILY_NAMES)))
        known = own_parameters | set(score_parameters) | family_names
        for name, value in options.items():
            if name in _NOT_OPTIONS:
                raise TypeError(f"{owner}: {name}= is not an option here ({_NOT_OPTIONS[name]})")
            if name in score_parameters:
                self.score_options[name] = value
            elif name in family_names:
                self.family_options[name] = value
            else:
                raise _unknown(owner, name, known)
        _check_score_options(self.score_options)
        if self.output_dir is not None:
            self.score_options.setdefault("cache_dir", self.output_dir / "cache")
        if tokenizer is not None:
            check_tokenizer(tokenizer)
            if self.family is not None:
                self._build_family()

    def resolve(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Bind the model's tokenizer (when none was given) and resolve "auto"; builds the family once, so that a
        family option it refuses fails now."""
        if self.tokenizer is None:
            check_tokenizer(tokenizer)
            self.tokenizer = tokenizer
        if self.family is None:
            self.family = resolve_family(model, self.requested_family)
            unknown = set(self.family_options) - _family_parameters(self.family)
            if unknown:
                raise _unknown(f"{self.owner} (family {self.family!r})", sorted(unknown)[0], _family_parameters(self.family))
        self._build_family()

    def _build_family(self) -> None:
        cls = family_class(self.family)
        options = dict(self.family_options)
        if cls.takes_max_length:
            options["max_length"] = self.score_options.get("max_length", 2048)
        cls.build(self.tokenizer, **options)

    def column_names(self) -> set[str]:
        """Every key a scoring call can log (columns of classes absent from a set are never logged)."""
        names = set()
        for name, dataset in self.datasets.items():
            if isinstance(dataset, ProcessBenchDataset):
                names |= {self.key(name, c, dataset) for c in (*(f"{s}_f1" for s in dataset.splits), "f1")}
                continue
            present = {CLASS_ABBREVIATIONS[c] for c in dataset.classes if c in CLASS_ABBREVIATIONS}
            domains = {d for d, members in DOMAINS.items() if any(CLASS_ABBREVIATIONS[c] in present for c in members)}
            columns = [c for c in TABLE_COLUMNS if c == "Overall" or c in present or c in domains]
            names |= {self.key(name, c) for c in (*columns, *(EXTRA_COLUMNS if self.analyses else ("trivial",)))}
        return names

    def key(self, dataset_name: str, column: str, dataset: Any = None) -> str:
        if isinstance(dataset, ProcessBenchDataset):  # beside PRMBench's columns, under ProcessBench's own name
            inner = "" if dataset_name in ("", "processbench") else f"{dataset_name}/"
            return f"{PROCESSBENCH_PREFIX}{inner}{column}"
        return f"{self.prefix}{dataset_name}/{column}" if dataset_name else f"{self.prefix}{column}"

    def score(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Score ``model`` on every set (every rank must call it: score() is collective) and return the keyed values."""
        values: dict[str, float] = {}
        for name, dataset in self.datasets.items():
            options = dict(self.score_options)
            if self.output_dir is not None:
                folder = self.output_dir / name if name else self.output_dir
                options.update(output_dir=folder / f"step-{step}", overwrite=True)
            if isinstance(dataset, ProcessBenchDataset):
                options["task"] = "processbench"
            report = score(model, dataset, tokenizer=self.tokenizer, family=self.family, **options,
                           **self.family_options)
            row = (processbench_row(report) if isinstance(dataset, ProcessBenchDataset)
                   else self.row(report, dataset, step, name))
            for column, value in row.items():
                values[self.key(name, column, dataset)] = value
        return values

    def row(self, report: Report, dataset: PRMBenchDataset, step: int, name: str) -> dict[str, float]:
        row = {column: value for column, value in report.table.items() if value is not None}
        trivial = trivial_predictor(report)
        row["trivial"] = float(trivial is not None)
        if trivial is not None:
            warnings.warn(f"PRMBench{' ' + repr(name) if name else ''} at step {step}: the model labels every step "
                          f"{'correct' if trivial == 'all_positive' else 'an error'}, so its row is the {trivial} "
                          "predictor's; the threshold-free prmbench AUROC tells whether its scores rank the steps",
                          TrivialPredictorWarning, stacklevel=2)
        if self.analyses and report.step_predictions is not None:
            row.update(analysis.threshold_free(dataset, report))
        return row


def processbench_row(report: Any) -> dict[str, float]:
    """``<split>_f1`` per split and ``f1`` (their average); NaN values (a split without erroneous or without correct
    solutions) are not logged, as PRMBench's absent columns are not."""
    row = {f"{split}_f1": report.official[split]["f1"] for split in report.splits}
    row["f1"] = report.official["average_f1"]
    return {k: v for k, v in row.items() if not np.isnan(v)}


def trivial_predictor(report: Report) -> str | None:
    """"all_positive" or "all_negative" when every label the row counts (the error classes' steps) is the same."""
    counts = report.class_counts[[CLASS_ID[c] for c in ERROR_CLASSES]].sum(0).tolist()  # TP, FP, TN, FN
    positive, negative = counts[0] + counts[1], counts[2] + counts[3]
    if positive and not negative:
        return "all_positive"
    if negative and not positive:
        return "all_negative"
    return None


def _check_score_options(options: dict[str, Any]) -> None:
    for name in ("max_length", "batch_tokens"):
        if name in options:
            check_positive_int(name, options[name])
    for name in ("progress",):
        if not isinstance(options[name], bool):
            raise TypeError(f"{name} must be True or False, got {options[name]!r}")
    if options.get("share_prefixes") is not None and not isinstance(options["share_prefixes"], bool):
        raise TypeError(f"share_prefixes must be True, False or None, got {options['share_prefixes']!r}")
    if "backend" in options:
        from ..kernels.step_reward import BACKENDS

        if options["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {options['backend']!r}")
    if options.get("task", "prmbench") not in _TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, _TASKS))} in a callback, got {options['task']!r}")
    if options.get("cache_dir") is not None:
        check_folder("cache_dir", options["cache_dir"])
