"""Loading PRMBench into the evaluation set the official toolkit builds (SPEC §1.4).

From each raw row, in file order: a ``redundency`` row first adds the clean ``correct_<idx>`` sample (once per idx),
then every row adds its perturbed sample ``<classification>_<idx>``; on a duplicate sample id the first occurrence
wins. The full data gives 6,969 samples: 758 ``correct`` and 6,211 others.

Every row is validated; bad input raises :class:`PRMBenchDataError` naming the file, the line and the field, and so
does a file that cannot be read (a folder, permission denied, not UTF-8, corrupt gzip) or holds no rows. A path that
does not exist raises :class:`~prmbench_fast.io.MissingFileError` (a ``FileNotFoundError``); only ``owner/name`` ids
are looked up on the hub. What the official loader tolerates (error steps past the last step, unsorted error steps,
empty step strings, duplicate ids) is kept exactly as the official loader keeps it and counted in
:attr:`PRMBenchDataset.diagnostics`.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pathlib
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .classes import CLASS_DOMAIN, CLASS_ID, CORRECT, CORRECT_SOURCE_CLASS, ERROR_CLASSES, REDUNDANCY_CLASSES
from . import task_lookup
from .extras import require
from .io import FileError, looks_like_hub_id, read_jsonl

DEFAULT_HUB_DATASET = "hitsmy/PRMBench_Preview"
DATA_ENV_VAR = "PRMBENCH_DATA"


#: The largest error step accepted. Error steps past the last step are kept (the official loader keeps them) and
#: only count when a model emits extra labels, so any bound far above real step counts changes no result; this one
#: keeps every step number exact in the evaluator's integer arrays (an error step of 10**30 would overflow them).
MAX_ERROR_STEP = 2**31 - 1


class PRMBenchDataError(FileError):
    """Malformed PRMBench input. The message names the source file, the 1-based line (row) and the field."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluation sample.

    ``id`` is the official sample idx (``correct_<idx>`` or ``<classification>_<idx>``); ``error_steps`` are 1-based,
    as in the data, and may exceed ``len(steps)``; ``partner_id`` is the clean ``correct_<idx>`` sample the
    similarity metric compares with (None for the correct samples themselves).
    """

    id: str
    question: str
    steps: tuple[str, ...]
    error_steps: tuple[int, ...]
    classification: str
    source_idx: str

    @property
    def domain(self) -> str | None:
        return CLASS_DOMAIN.get(self.classification)

    @property
    def partner_id(self) -> str | None:
        return None if self.classification == CORRECT else f"{CORRECT}_{self.source_idx}"


@dataclasses.dataclass
class LoadDiagnostics:
    """What the loader tolerated, as the official loader does: nothing here is dropped silently."""

    sources: list[str] = dataclasses.field(default_factory=list)
    raw_rows: int = 0
    #: (source, line, sample id) of every row whose sample id was already taken (dropped: first occurrence wins).
    duplicate_rows: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    #: sample id -> its error steps that lie past its last step (kept; never scored unless a model emits extra labels).
    out_of_range_error_steps: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    #: sample ids whose error steps are not in increasing order (kept as given).
    unsorted_error_steps: list[str] = dataclasses.field(default_factory=list)
    #: number of step strings that are empty or whitespace only (kept as given).
    blank_steps: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "raw_rows": self.raw_rows,
            "duplicate_rows": len(self.duplicate_rows),
            "samples_with_out_of_range_error_steps": len(self.out_of_range_error_steps),
            "out_of_range_error_steps": sum(len(v) for v in self.out_of_range_error_steps.values()),
            "samples_with_unsorted_error_steps": len(self.unsorted_error_steps),
            "blank_steps": self.blank_steps,
        }


SampleT = TypeVar("SampleT")


class SampleSet(Sequence[SampleT]):
    """Samples (objects with a unique ``id``) in order, indexable by position and by sample id."""

    def __init__(self, samples: Iterable[SampleT]):
        self.samples: list[SampleT] = list(samples)
        self.by_id: dict[str, SampleT] = {s.id: s for s in self.samples}
        if len(self.by_id) != len(self.samples):
            raise ValueError("sample ids must be unique")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[SampleT]:
        return iter(self.samples)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.by_id

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """Sample id -> its position in the set."""
        return {s.id: i for i, s in enumerate(self.samples)}

    @functools.cached_property
    def id_array(self) -> np.ndarray:
        """The sample ids as a numpy object array, for fancy indexing by positions."""
        return np.array([s.id for s in self.samples], dtype=object)

    @functools.cached_property
    def content_hash(self) -> str:
        """A hash of every sample's id, question, steps and error steps: what a sample's result depends on (a run
        folder's identity). Computed once per set: the strings are hashed as one UTF-8 text followed by their lengths
        (which make its split into strings unambiguous) and each sample's number of steps; the error steps as JSON.

        The text is hashed in runs of ASCII strings (joined and copied as they are) between the non-ASCII ones
        (encoded one by one): the same bytes as encoding the whole joined text, whose one wide character in a few
        hundred made every one of the full benchmark's 8.5M characters take the slow path (~0.035 s here, not 0.06 s).
        """
        strings: list[str] = []
        for s in self.samples:
            strings += (str(s.id), s.question)
            strings += s.steps
        digest = hashlib.sha256()
        for ascii_run, run in itertools.groupby(strings, str.isascii):
            text = "".join(run)
            # surrogatepass: a lone surrogate (a JSON "\ud800" escape) is still a distinct, encodable string.
            digest.update(text.encode("ascii") if ascii_run else text.encode("utf-8", "surrogatepass"))
        digest.update(array.array("q", map(len, strings)).tobytes())
        digest.update(array.array("q", [len(s.steps) for s in self.samples]).tobytes())
        digest.update(json.dumps([getattr(s, "error_steps", None) for s in self.samples]).encode("ascii"))
        return digest.hexdigest()[:16]


class PRMBenchDataset(SampleSet[Sample]):
    """The evaluation set: samples in the official order, indexable by position and by sample id."""

    def __init__(self, samples: Iterable[Sample], diagnostics: LoadDiagnostics | None = None):
        super().__init__(samples)
        self.diagnostics = diagnostics or LoadDiagnostics()

    @functools.cached_property
    def arrays(self) -> "DatasetArrays":
        """Per-sample figures as arrays, computed once, for the vectorised evaluator."""
        return DatasetArrays.of(self.samples)

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        """The classes present, in order of first appearance."""
        return tuple(dict.fromkeys(s.classification for s in self.samples))

    def class_counts(self) -> dict[str, int]:
        return dict(Counter(s.classification for s in self.samples))

    def subset(self, classes: Iterable[str] | None = None, limit_per_class: int | None = None) -> "PRMBenchDataset":
        """A deterministic stratified subset; the ``correct`` partners of the chosen samples come along.

        ``classes`` restricts to these error classes (``None``: all nine). ``limit_per_class`` keeps at most that many
        samples per class, choosing the same source problems across classes where the data allows (problems present
        in the most requested classes first, then in data order), so that the similarity metric and prefix sharing
        see complete problem groups.
        """
        wanted = _check_classes(classes)
        if limit_per_class is not None and (
            not isinstance(limit_per_class, int) or isinstance(limit_per_class, bool) or limit_per_class < 1
        ):
            raise ValueError(f"limit_per_class must be a positive integer, got {limit_per_class!r}")
        candidates = [s for s in self.samples if s.classification in wanted]
        if limit_per_class is not None:
            coverage = Counter(s.source_idx for s in candidates)
            first_seen: dict[str, int] = {}
            for position, s in enumerate(candidates):
                first_seen.setdefault(s.source_idx, position)
            rank = sorted(coverage, key=lambda idx: (-coverage[idx], first_seen[idx]))
            rank_of = {idx: r for r, idx in enumerate(rank)}
            chosen: set[str] = set()
            for cls in wanted:
                members = sorted((s for s in candidates if s.classification == cls), key=lambda s: rank_of[s.source_idx])
                chosen.update(s.id for s in members[:limit_per_class])
            candidates = [s for s in candidates if s.id in chosen]
        return _restrict(self, (s.id for s in candidates))

    def restrict_to(self, sample_ids: Iterable[str]) -> "PRMBenchDataset":
        """The samples with these ids (unknown ids are ignored) and their ``correct`` partners, in data order."""
        return _restrict(self, sample_ids)


@dataclasses.dataclass(frozen=True)
class DatasetArrays:
    """Per-sample figures of a dataset in sample order (int64 numpy arrays).

    ``error_steps`` holds every sample's error steps 0-based, concatenated, with ``error_offsets`` (len + 1);
    ``first_error`` is the smallest 0-based error step, -1 for a sample without error steps; ``partner_position``
    is the position of the sample's ``correct`` partner, -1 where there is none in the dataset; ``problem_ids`` rank
    the source problems in the order of their ``source_idx`` strings.
    """

    step_counts: np.ndarray
    class_ids: np.ndarray
    error_steps: np.ndarray
    error_offsets: np.ndarray
    first_error: np.ndarray
    partner_position: np.ndarray
    problem_ids: np.ndarray  # the sample's source problem (source_idx) as its rank among the distinct ones
    # Indexed per prediction in the evaluator's Python loop:
    is_correct: list[bool]
    # 1 for the classes scored by NOT(redundancy label) when a prediction has those labels: bytes, which the Python
    # loop indexes and the compiled walk of parse_results reads as they are.
    redundancy_rule: bytes

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> "DatasetArrays":
        errors = [e - 1 for s in samples for e in s.error_steps]
        position = {s.id: i for i, s in enumerate(samples)}
        return cls(
            step_counts=np.array([len(s.steps) for s in samples], dtype=np.int64),
            class_ids=np.array([CLASS_ID[s.classification] for s in samples], dtype=np.int64),
            error_steps=np.array(errors, dtype=np.int64),
            error_offsets=np.cumsum([0] + [len(s.error_steps) for s in samples], dtype=np.int64),
            first_error=np.array([min(s.error_steps) - 1 if s.error_steps else -1 for s in samples], dtype=np.int64),
            partner_position=np.array([position.get(s.partner_id, -1) for s in samples], dtype=np.int64),
            problem_ids=np.unique(np.array([s.source_idx for s in samples], dtype=str), return_inverse=True)[1]
            .astype(np.int64).reshape(len(samples)),
            is_correct=[s.classification == CORRECT for s in samples],
            redundancy_rule=bytes(s.classification in REDUNDANCY_CLASSES for s in samples),
        )

    def gather_errors(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The concatenated error steps and their offsets (len + 1) of the samples at ``positions``."""
        starts = self.error_offsets[positions]
        counts = self.error_offsets[positions + 1] - starts
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        # Index of each output entry in error_steps: its sample's start plus its rank within the sample.
        rank = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], counts)
        return self.error_steps[np.repeat(starts, counts) + rank], offsets


def _restrict(dataset: "PRMBenchDataset", ids) -> "PRMBenchDataset":
    keep = {i for i in ids if i in dataset.by_id}
    keep |= {dataset.by_id[i].partner_id for i in list(keep)} - {None}
    return PRMBenchDataset((s for s in dataset.samples if s.id in keep), dataset.diagnostics)


def _check_classes(classes: Iterable[str] | None) -> tuple[str, ...]:
    if classes is None:
        return ERROR_CLASSES
    if isinstance(classes, str):
        classes = [classes]
    wanted = tuple(dict.fromkeys(classes))
    if not wanted:
        raise ValueError(f"classes is empty; expected any of {list(ERROR_CLASSES)}")
    unknown = [c for c in wanted if c not in ERROR_CLASSES]
    if unknown:
        raise ValueError(f"unknown PRMBench classes {unknown}; expected any of {list(ERROR_CLASSES)}")
    return wanted


# ---------------------------------------------------------------------------------------------------------------------
# Row validation


def _field(row: dict, name: str, kind: type, source: str, line: int) -> Any:
    if name not in row:
        raise PRMBenchDataError(source, line, name, "missing field")
    value = row[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PRMBenchDataError(source, line, name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _steps(row: dict, name: str, source: str, line: int) -> tuple[str, ...]:
    steps = _field(row, name, list, source, line)
    if not steps:
        raise PRMBenchDataError(source, line, name, "empty solution (no steps)")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise PRMBenchDataError(source, line, f"{name}[{i}]", f"expected str, got {type(step).__name__}")
    return tuple(steps)


def _error_steps(row: dict, source: str, line: int) -> tuple[int, ...]:
    values = _field(row, "error_steps", list, source, line)
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PRMBenchDataError(source, line, f"error_steps[{i}]", f"expected a positive (1-based) integer, got {v!r}")
        if v > MAX_ERROR_STEP:
            shown = f"{v:.3e}" if v > 10**12 else str(v)
            raise PRMBenchDataError(source, line, f"error_steps[{i}]", f"{shown} is too large (at most {MAX_ERROR_STEP})")
    return tuple(values)


def _bare_idx(idx: str, classification: str) -> str:
    # The hub copy may carry the class prefix (circular_prm_test_p1_0); the in-repo files do not.
    prefix = f"{classification}_"
    return idx[len(prefix):] if idx.startswith(prefix) else idx


class _Builder:
    """Turns raw rows into samples exactly as the official ``load_data_function`` does, validating as it goes."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.taken: set[str] = set()
        self.diagnostics = LoadDiagnostics()

    def add_row(self, row: Any, source: str, line: int) -> None:
        if not isinstance(row, dict):
            raise PRMBenchDataError(source, line, None, f"expected a JSON object, got {type(row).__name__}")
        self.diagnostics.raw_rows += 1
        classification = _field(row, "classification", str, source, line)
        if classification not in ERROR_CLASSES:
            raise PRMBenchDataError(
                source, line, "classification", f"unknown class {classification!r}; expected one of {list(ERROR_CLASSES)}"
            )
        idx = _bare_idx(_field(row, "idx", str, source, line), classification)
        question = _field(row, "modified_question", str, source, line)
        steps = _steps(row, "modified_process", source, line)
        error_steps = _error_steps(row, source, line)

        if classification == CORRECT_SOURCE_CLASS:
            correct_id = f"{CORRECT}_{idx}"
            if correct_id not in self.taken:
                original_question = _field(row, "original_question", str, source, line)
                original_steps = _steps(row, "original_process", source, line)
                self._add(Sample(correct_id, original_question, original_steps, (), CORRECT, idx))

        sample_id = f"{classification}_{idx}"
        if sample_id in self.taken:
            self.diagnostics.duplicate_rows.append((source, line, sample_id))
            return
        self._add(Sample(sample_id, question, steps, error_steps, classification, idx))

    def _add(self, sample: Sample) -> None:
        self.taken.add(sample.id)
        self.samples.append(sample)
        diag = self.diagnostics
        diag.blank_steps += sum(1 for s in sample.steps if not s.strip())
        past_end = tuple(e for e in sample.error_steps if e > len(sample.steps))
        if past_end:
            diag.out_of_range_error_steps[sample.id] = past_end
        if list(sample.error_steps) != sorted(sample.error_steps):
            diag.unsorted_error_steps.append(sample.id)


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def _hub_rows(dataset_id: str) -> Iterator[tuple[int, Any]]:
    # Imported here: loading from a local file does not need it (the `hub` extra installs it).
    datasets = require("datasets", "hub", "loading PRMBench from the Hugging Face hub")

    try:
        table = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # noqa: BLE001 the hub client's error types vary by version; all mean "not loaded"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PRMBenchDataError(f"hub:{dataset_id}", None, None, f"cannot be loaded from the hub ({message})") from None
    for row_number, row in enumerate(table, start=1):
        yield row_number, row


def resolve_source(source: str | os.PathLike | None) -> str:
    """The data source to read: the argument, else ``$PRMBENCH_DATA``, else the hub dataset id."""
    if source is None:
        source = os.environ.get(DATA_ENV_VAR) or DEFAULT_HUB_DATASET
    return os.fspath(source)


def load_prmbench(
    source: str | os.PathLike | None = None,
    *,
    classes: Iterable[str] | None = None,
    limit_per_class: int | None = None,
    task: str = "prmbench",
):
    """Load PRMBench as the official toolkit's evaluation set.

    Args:
        source: a ``.jsonl`` file (gzip-compressed or not), a folder of ``.jsonl`` files (read in file-name order, not
            recursively, as the official loader reads its data folder), or a Hugging Face dataset id ``owner/name``.
            Default: ``$PRMBENCH_DATA`` if set, else ``hitsmy/PRMBench_Preview`` from the hub (loaded with
            ``datasets``). Sample ids may be bare (``prm_test_p1_0``) or class-prefixed (``circular_prm_test_p1_0``).
        classes: keep only these error classes (data spelling, e.g. ``"redundency"``); their ``correct`` partners
            come along.
        limit_per_class: keep at most this many samples per class (see :meth:`PRMBenchDataset.subset`).
        task: "prmbench" (the whole benchmark), "subset400" (the official quick task's samples, selected from the
            full data in ``source``) or "bon" (``source`` is a best-of-n file in the official BoN format); see
            ``prmbench_fast.tasks``.

    Raises:
        PRMBenchDataError: a row is malformed, a file cannot be read, or there are no rows; the message names the
            file, and the line and field where there is one.
        MissingFileError: ``source`` is not an ``owner/name`` hub id and does not exist (a ``FileNotFoundError``).
    """
    if task != "prmbench":  # another task's loader, from the task registry (above this module)
        subset = {k: v for k, v in (("classes", classes), ("limit_per_class", limit_per_class)) if v is not None}
        if subset:
            raise ValueError(f"task {task!r} has its own samples: {', '.join(subset)} do not apply")
        return task_lookup.get_task(task).load(source)
    source = resolve_source(source)
    path = pathlib.Path(source)
    builder = _Builder()
    if path.is_dir():
        for file in _folder_files(path):
            _add_rows(builder, str(file), read_jsonl(file, PRMBenchDataError))
    elif path.exists() or not looks_like_hub_id(source):
        _add_rows(builder, str(path), read_jsonl(path, PRMBenchDataError))  # a missing path: "not found"
    else:
        _add_rows(builder, f"hub:{source}", _hub_rows(source))
    if not builder.samples:
        raise PRMBenchDataError(source, None, None, "no PRMBench rows (empty)")
    dataset = PRMBenchDataset(builder.samples, builder.diagnostics)
    if classes is not None or limit_per_class is not None:
        dataset = dataset.subset(classes, limit_per_class)
        if not dataset.samples:
            raise PRMBenchDataError(source, None, "classification", f"no samples of the classes {list(classes or [])}")
    return dataset


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".jsonl" and p.is_file())
    except PermissionError:
        raise PRMBenchDataError(folder, None, None, "permission denied (the folder is not readable)") from None
    if not files:
        raise PRMBenchDataError(folder, None, None, "no .jsonl files in this folder")
    return files


def _add_rows(builder: "_Builder", source: str, rows: Iterable[tuple[int, Any]]) -> None:
    builder.diagnostics.sources.append(source)
    for line, row in rows:
        builder.add_row(row, source, line)
