"""ProcessBench (Zheng et al., ACL 2025; QwenLM/ProcessBench), beside PRMBench: SPEC §9.

Data: 3,400 single solutions in four splits (gsm8k 400, math 1,000, olympiadbench 1,000, omnimath 1,000). A row has
``id`` (``gsm8k-0``), ``generator``, ``problem``, ``steps`` (the solution's paragraphs), ``final_answer_correct`` and
``label``: the 0-based index of the earliest wrong step, -1 when every step is right. A row is one sample
(``question`` = ``problem``), so every PRM family scores it with its own input format and reward rule.

Prediction: the index of the first step the model labels wrong, -1 when it labels every step right (the official PRM
script stops at the first step not judged correct); an invalid prediction (an unparseable critic answer, None in the
official outputs) never matches.

Evaluator, per split (official ``code/run_eval.py``): ``match = prediction == label``; ``error_acc`` = mean of match
over the rows with label != -1, ×100; ``correct_acc`` = the same over the rows with label == -1; ``f1`` = their
harmonic mean ``2·a·c / (a + c)``. An empty group's mean is NaN, as numpy's is, and so is an F1 of two zero
accuracies. ``average_f1`` is the arithmetic mean of the F1 of the splits evaluated (what papers report). A split is
evaluated when at least one of its samples has a prediction; its samples without one count as not matching (the
official script predicts every row).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..data import PRMBenchDataError, SampleSet
from ..extras import require
from ..io import check_input_file, looks_like_hub_id, parse_json, read_lines
from ..predictions import PredictionError, StepPredictions, check_predictions_argument, parse_results

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
DEFAULT_HUB_DATASET = "Qwen/ProcessBench"
DATA_ENV_VAR = "PROCESSBENCH_DATA"
#: File suffixes read from a folder (each may also end in ``.gz``).
SUFFIXES = (".jsonl", ".json", ".parquet")

#: Prediction codes that never equal a label (labels are >= -1): no usable prediction, and no prediction at all.
INVALID = -2
MISSING = -3


class ProcessBenchDataError(PRMBenchDataError):
    """Malformed ProcessBench input, naming the file, the line (JSON lines) or row (JSON arrays, parquet, hub rows,
    1-based) and the field."""

    def __init__(self, source: str | os.PathLike, line: int | None, field: str | None, problem: str,
                 unit: str = "line"):
        super().__init__(source, line, field, problem)
        if line is not None and unit != "line":
            where = f"{self.source}, {unit} {line}" + (f", field '{field}'" if field else "")
            self.args = (f"{where}: {problem}",)


@dataclasses.dataclass(frozen=True)
class ProcessBenchSample:
    """One solution. ``label``: 0-based index of the earliest wrong step, -1 if none. ``source_idx`` is the id: each
    solution is its own problem for prefix sharing."""

    id: str
    question: str
    steps: tuple[str, ...]
    label: int
    split: str
    generator: str
    final_answer_correct: bool

    @property
    def source_idx(self) -> str:
        return self.id


class ProcessBenchDataset(SampleSet[ProcessBenchSample]):
    """The ProcessBench samples, splits in the order they were read."""

    def __init__(self, samples: Iterable[ProcessBenchSample], diagnostics: dict[str, Any] | None = None):
        super().__init__(samples)
        self.diagnostics = diagnostics or {}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.split for s in self.samples))

    def restrict_to(self, ids: Iterable[str]) -> "ProcessBenchDataset":
        keep = set(ids)
        return ProcessBenchDataset((s for s in self.samples if s.id in keep), self.diagnostics)

    def subset(self, limit_per_split: int) -> "ProcessBenchDataset":
        """A deterministic subset of at most ``limit_per_split`` solutions per split, in data order, balanced so
        that both official accuracies are defined: the first ⌈N/2⌉ correct solutions (label -1) and the first ⌊N/2⌋
        erroneous ones of each split, the other group filling in where a split has fewer of one."""
        if not isinstance(limit_per_split, int) or isinstance(limit_per_split, bool) or limit_per_split < 1:
            raise ValueError(f"limit_per_split must be a positive integer, got {limit_per_split!r}")
        keep: list[str] = []
        for split in self.splits:
            correct = [s.id for s in self.samples if s.split == split and s.label == -1]
            erroneous = [s.id for s in self.samples if s.split == split and s.label != -1]
            num_correct = min(len(correct), max((limit_per_split + 1) // 2, limit_per_split - len(erroneous)))
            keep += correct[:num_correct] + erroneous[:limit_per_split - num_correct]
        return self.restrict_to(keep)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _file_split(path: pathlib.Path) -> str | None:
    """The split a file holds when its name says so: ``gsm8k.jsonl``, ``math-00000-of-00001.parquet``, ``omnimath_x``."""
    name = path.name.lower().removesuffix(".gz")
    stem = name.rsplit(".", 1)[0]
    for split in SPLITS:
        if stem == split or (stem.startswith(split) and not stem[len(split)].isalnum()):
            return split
    return None


def _row_sample(row: Any, source: str, number: int, unit: str, file_split: str | None) -> ProcessBenchSample:
    def bad(field: str | None, problem: str) -> ProcessBenchDataError:
        return ProcessBenchDataError(source, number, field, problem, unit)

    if not isinstance(row, Mapping):
        raise bad(None, f"expected a JSON object, got {type(row).__name__}")

    def field(name: str, kind: type) -> Any:
        if name not in row:
            raise bad(name, "missing field")
        value = row[name]
        # bool is an int: a label true/false is refused, as is a final_answer_correct 0/1.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad(name, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    sample_id = field("id", str)
    if not sample_id.strip():
        raise bad("id", "empty")
    generator = field("generator", str)
    problem = field("problem", str)
    steps = field("steps", list)
    if not steps:
        raise bad("steps", "no steps")
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise bad(f"steps[{k}]", f"expected str, got {type(step).__name__}")
    final_answer_correct = field("final_answer_correct", bool)
    label = field("label", int)
    if not -1 <= label < len(steps):
        raise bad("label", f"{label} is not -1 or a step index of the {len(steps)} steps (0-based)")
    prefix = sample_id.rsplit("-", 1)[0]
    split = file_split or (prefix if prefix in SPLITS else pathlib.Path(source).name.split(".")[0])
    return ProcessBenchSample(sample_id, problem, tuple(steps), label, split, generator, final_answer_correct)


def _json_rows(path: pathlib.Path) -> Iterator[tuple[int, Any, str]]:
    """(number, row, unit) of a JSON array file (rows) or a JSON-lines file (lines), plain or gzip: the hub's
    ``.json`` exports are either (``Dataset.to_json`` writes lines unless ``lines=False``)."""
    lines = list(read_lines(path, ProcessBenchDataError))
    first = next((text for _, text in lines if text.strip()), "")
    if first.lstrip().startswith("["):
        rows = parse_json("".join(text for _, text in lines), path, 1, ProcessBenchDataError)
        for number, row in enumerate(rows, start=1):
            yield number, row, "row"
        return
    for number, text in lines:
        if text.strip():
            yield number, parse_json(text, path, number, ProcessBenchDataError), "line"


def _parquet_rows(path: pathlib.Path) -> Iterator[tuple[int, Any, str]]:
    parquet = require("pyarrow.parquet", "hub", "reading ProcessBench parquet files")
    try:
        rows = parquet.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 pyarrow's errors for a corrupt file (ArrowInvalid...) are not OSErrors
        raise ProcessBenchDataError(path, None, None, f"not a readable parquet file ({err})") from None
    for number, row in enumerate(rows, start=1):
        yield number, row, "row"


def _file_rows(path: pathlib.Path) -> Iterator[tuple[int, Any, str]]:
    name = path.name.lower().removesuffix(".gz")
    return _parquet_rows(path) if name.endswith(".parquet") else _json_rows(path)


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The data files of a folder, the official splits first in their order, then the rest by name."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().removesuffix(".gz").endswith(SUFFIXES)]
    if not files:
        raise ProcessBenchDataError(folder, None, None, f"no ProcessBench files ({', '.join(SUFFIXES)}) in this folder")
    order = {split: k for k, split in enumerate(SPLITS)}
    return sorted(files, key=lambda p: (order.get(_file_split(p) or "", len(SPLITS)), p.name))


def _hub_rows(dataset_id: str) -> Iterator[tuple[str, Iterator[tuple[int, Any, str]], str]]:
    datasets = require("datasets", "hub", "loading ProcessBench from the Hugging Face hub")
    try:
        splits = datasets.load_dataset(dataset_id)
    except Exception as err:  # noqa: BLE001 the hub client's error types vary by version; all mean "not loaded"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ProcessBenchDataError(f"hub:{dataset_id}", None, None, f"cannot be loaded from the hub ({message})") from None
    for split, table in splits.items():
        yield f"hub:{dataset_id}:{split}", ((n, row, "row") for n, row in enumerate(table, start=1)), split


def load_processbench(source: str | os.PathLike | None = None) -> ProcessBenchDataset:
    """Load ProcessBench in the official format.

    Args:
        source: a ``.jsonl``, ``.json`` (JSON lines or one array) or ``.parquet`` file, gzip-compressed or not; a
            folder holding such files (one per split, e.g. ``gsm8k.jsonl``: the official splits first, in order); or a
            hub id ``owner/name`` (every split, with ``datasets``). Default: ``$PROCESSBENCH_DATA``, else
            ``Qwen/ProcessBench``. A sample's split is the one its file is named after, else its id's prefix
            (``gsm8k-0``), else the file's name.

    Raises:
        ProcessBenchDataError: a malformed row (file, line or row, field), a duplicate id, an unreadable or empty file.
        MissingFileError: a path that does not exist.
        MissingExtraError: a parquet file or the hub without pyarrow / datasets (the ``hub`` extra).
    """
    source = os.fspath(source if source is not None else os.environ.get(DATA_ENV_VAR) or DEFAULT_HUB_DATASET)
    path = pathlib.Path(source)
    if path.is_dir():
        parts = [(str(p), _file_rows(p), _file_split(p)) for p in _folder_files(path)]
    elif path.exists() or not looks_like_hub_id(source):
        check_input_file(path, ProcessBenchDataError)  # a missing path: "not found", as the PRMBench loader says
        parts = [(str(path), _file_rows(path), _file_split(path))]
    else:
        parts = list(_hub_rows(source))
    samples: dict[str, ProcessBenchSample] = {}
    where: dict[str, str] = {}
    for name, rows, split in parts:
        for number, row, unit in rows:
            sample = _row_sample(row, name, number, unit, split)
            if sample.id in samples:
                raise ProcessBenchDataError(name, number, "id", f"duplicate id {sample.id!r} (first at {where[sample.id]})",
                                            unit)
            samples[sample.id] = sample
            where[sample.id] = f"{name}, {unit} {number}"
    if not samples:
        raise ProcessBenchDataError(source, None, None, "no ProcessBench rows (empty)")
    return ProcessBenchDataset(samples.values(), {"sources": [name for name, _, _ in parts], "rows": len(samples)})


# ---------------------------------------------------------------------------------------------------------------------
# Predictions


def first_error_steps(preds: StepPredictions) -> torch.Tensor:
    """(B,) int64 on the predictions' device: per prediction, the 0-based index of its first step labelled wrong
    (``validity_labels`` False), -1 when none is; :data:`INVALID` for a prediction marked invalid. A segmented min
    over the flat layout, without a host sync."""
    labels, cu = preds.validity_labels, preds.cu_steps.long()
    num_samples, num_steps = preds.num_samples, labels.numel()
    segment = torch.repeat_interleave(torch.arange(num_samples, device=labels.device), cu.diff(),
                                      output_size=num_steps)
    local = torch.arange(num_steps, device=labels.device) - cu[:-1][segment]
    # num_steps is past every local index: a segment left at it has no wrong step.
    wrong_at = torch.where(labels.bool(), num_steps, local)
    first = torch.full((num_samples,), num_steps, dtype=torch.int64, device=labels.device)
    first.scatter_reduce_(0, segment, wrong_at, "amin")
    first = torch.where(first == num_steps, -1, first)
    if preds.valid is not None:
        first = torch.where(preds.valid.bool(), first, INVALID)
    return first


def dataset_predictions(preds: StepPredictions, num_dataset_samples: int) -> torch.Tensor:
    """(N,) int64: the prediction of every dataset position, the first prediction of a repeated sample winning;
    :data:`MISSING` where a sample has none."""
    preds.check(num_dataset_samples)
    device = preds.sample_pos.device
    out = torch.full((num_dataset_samples,), MISSING, dtype=torch.int64, device=device)
    if preds.num_samples == 0:
        return out
    order = torch.arange(preds.num_samples, device=device)
    first_index = torch.full((num_dataset_samples,), preds.num_samples, dtype=torch.int64, device=device)
    first_index.scatter_reduce_(0, preds.sample_pos.long(), order, "amin")
    taken = first_index < preds.num_samples
    values = first_error_steps(preds)[first_index.clamp(max=preds.num_samples - 1)]
    return torch.where(taken, values, out)


def _record_id(record: Mapping, k: int) -> str:
    sample_id = record.get("id", record.get("idx"))
    if not isinstance(sample_id, str):
        raise PredictionError(f"prediction #{k}: needs a string 'id' (or 'idx'), got {sample_id!r}")
    return sample_id


def _results_predictions(dataset: ProcessBenchDataset, results: Any, validity_threshold: float,
                         redundancy_threshold: float) -> tuple[torch.Tensor, list[str], int, StepPredictions | None]:
    """Result dicts -> (N,) predictions, unknown ids, repeats, and the flat predictions with their scores (None for
    ProcessBench outputs). ProcessBench outputs carry ``prediction`` (an int or None); the toolkit's result lines
    (``scores``, ``validity``) go through the flat layout."""
    if isinstance(results, Mapping):
        items = [(k, v) for k, v in results.items()]
    else:
        items = []
        for k, record in enumerate(results):
            if not isinstance(record, Mapping):
                raise PredictionError(f"prediction #{k}: expected a dict, got {type(record).__name__}")
            items.append((_record_id(record, k), record))
    if not any(isinstance(r, Mapping) and "prediction" in r for _, r in items):
        records = results if isinstance(results, Mapping) else [{**r, "idx": i} for i, r in items]
        parsed = parse_results(dataset, records, validity_threshold=validity_threshold,
                               redundancy_threshold=redundancy_threshold, keep_scores=True)
        flat = parsed.predictions
        return dataset_predictions(flat, len(dataset)), parsed.unknown_ids, parsed.duplicates, flat
    out = [MISSING] * len(dataset)
    unknown, repeats = [], 0
    for sample_id, record in items:
        position = dataset.position.get(sample_id)
        if position is None:
            unknown.append(sample_id)
            continue
        if out[position] != MISSING:
            repeats += 1  # the first prediction of a sample wins
            continue
        if isinstance(record, Mapping) and "prediction" not in record and record.get("validity", True) is False:
            out[position] = INVALID  # an invalid result line without a prediction (a critic request that failed)
            continue
        if not isinstance(record, Mapping) or "prediction" not in record:
            raise PredictionError(f"prediction for sample {sample_id!r}, field 'prediction': missing", sample_id)
        value = record["prediction"]
        if value is None:
            out[position] = INVALID
        elif isinstance(value, int) and not isinstance(value, bool):
            out[position] = value if value >= -1 else INVALID  # below -1 can never match a label
        else:
            raise PredictionError(f"prediction for sample {sample_id!r}, field 'prediction': expected an int or null, "
                                  f"got {value!r}", sample_id)
    return torch.tensor(out, dtype=torch.int64), unknown, repeats, None


# ---------------------------------------------------------------------------------------------------------------------
# LLM critics (official ``code/run_eval.py``)

#: The critique prompt: one user message. Same structure and content as the official
#: ``code/templates/critique_template.txt`` (the problem, the solution as paragraphs tagged and indexed from 0, the
#: index of the earliest wrong paragraph or -1 asked for in ``\boxed{}``); the wording is this repository's own. To
#: send the official text itself, pass its file's contents as ``critique_template`` (``--critique-template FILE``).
#: A ``str.format`` template with the fields ``{problem}`` and ``{tagged_response}`` (literal braces doubled).
CRITIQUE_TEMPLATE = """\
Below are a math problem and a proposed solution. The solution is split into paragraphs; each paragraph is enclosed \
in tags that carry its index, counted from 0.

[Math Problem]

{problem}

[Solution]

{tagged_response}

Check the solution paragraph by paragraph. If a paragraph contains an error, give the index of the earliest \
paragraph that does. If no paragraph contains an error, give -1, which stands for "no error found".

Write your final answer (the index alone) inside \\boxed{{}}."""

# The official extraction: the text of the LAST \boxed{...} whose braces hold no "}" (so \boxed{\text{2}} gives
# "\text{2", which is not an int).
_BOXED = re.compile(r"\\boxed\{([^}]*)\}")


def tagged_response(steps: Iterable[str]) -> str:
    """The solution as the official prompt shows it: ``<paragraph_i>\\n{step}\\n</paragraph_i>`` per step (0-based),
    separated by blank lines (the official builder appends one after every paragraph and strips the whole)."""
    return "\n\n".join(f"<paragraph_{i}>\n{step}\n</paragraph_{i}>" for i, step in enumerate(steps))


def check_critique_template(template: str) -> str:
    """``template`` stripped (the official script strips the file it reads); a ValueError when it cannot be filled
    with exactly ``problem`` and ``tagged_response``."""
    if not isinstance(template, str):
        raise TypeError(f"critique_template must be a str, got {type(template).__name__}")
    try:
        template.format(problem="", tagged_response="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"critique_template: not a template with the fields {{problem}} and {{tagged_response}} "
                         f"(literal braces doubled, as in \\boxed{{{{}}}}): {type(err).__name__}: {err}") from None
    return template.strip()


def critique_messages(sample: ProcessBenchSample, template: str = CRITIQUE_TEMPLATE) -> list[dict[str, str]]:
    """The chat messages of one sample: a single user turn, as the official script sends before the chat
    template's generation prompt."""
    prompt = template.format(problem=sample.question, tagged_response=tagged_response(sample.steps))
    return [{"role": "user", "content": prompt}]


def parse_critique(text: str | None) -> int | None:
    """The critic's predicted index: the last ``\\boxed{...}``'s content, stripped, as Python's ``int()`` reads it
    (so "+2", " 3 " and "-1" are read; "2.0", "two", an empty box are not); None when there is none or it is no
    int, as officially (a None prediction never matches)."""
    if not isinstance(text, str):
        return None  # a null message content: no answer to read
    boxes = _BOXED.findall(text)
    if not boxes:
        return None
    try:
        return int(boxes[-1].strip())
    except ValueError:
        return None


def critique_result(sample: ProcessBenchSample, text: str | None) -> dict[str, Any]:
    """The result line of a critic's answer: ``{"idx", "prediction", "validity", ...}``.

    ``prediction`` (the parsed index or None) is what the evaluator reads. A prediction that names a step or -1 also
    carries the equivalent step labels (the steps before it correct, it wrong, the rest correct), so that tools
    reading the flat layout find the same first wrong step; None, or an index that names no step (it can never
    match a label), is stored ``"validity": false`` with the answer as ``original_response``, as the PRMBench
    critic stores an unusable answer.
    """
    prediction = parse_critique(text)
    if prediction is None or not -1 <= prediction < len(sample.steps):
        return {"idx": sample.id, "prediction": prediction, "validity": False, "original_response": text}
    labels = [k != prediction for k in range(len(sample.steps))]
    return {"idx": sample.id, "prediction": prediction, "validity": True,
            "scores": {"step_level_validity_labels": labels}}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class ProcessBenchReport:
    """The ProcessBench numbers.

    Attributes:
        official: per split evaluated, ``{"error_acc", "correct_acc", "f1"}`` (×100, unrounded: the values
            ``run_eval.py`` prints to one decimal), and ``average_f1``.
        counts: per split, ``error_samples``, ``error_matches``, ``correct_samples``, ``correct_matches``,
            ``invalid`` (predictions that never match) and ``missing`` (samples without a prediction).
        predictions: sample id -> prediction (the first wrong step, -1, or None: invalid), for the samples predicted.
        diagnostics: unknown prediction ids and repeated predictions.
        step_predictions: the flat predictions the numbers come from, when they were step labels (with their scores).
        analysis: ``{"calibration": ...}``, :func:`prmbench_fast.analysis.processbench_calibration` of the step
            scores (F1 per split against the threshold, the gsm8k-calibrated threshold on every split); computed by
            :meth:`analyze`, which :meth:`to_json` calls (a run folder's report.json carries it), None until then.
    """

    official: dict[str, Any]
    counts: dict[str, dict[str, int]]
    predictions: dict[str, int | None]
    diagnostics: dict[str, Any]
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    task: str = "processbench"
    dataset: ProcessBenchDataset | None = dataclasses.field(default=None, repr=False)
    step_predictions: StepPredictions | None = dataclasses.field(default=None, repr=False)
    analysis: dict[str, Any] | None = None

    def analyze(self) -> dict[str, Any] | None:
        """The analyses of the step scores (``analysis``), computed once; None without step predictions."""
        if self.analysis is None and self.step_predictions is not None and self.dataset is not None:
            from ..analysis import processbench_calibration

            self.analysis = {"calibration": processbench_calibration(
                self.dataset, self.step_predictions, validity_threshold=self.run.get("validity_threshold"))}
        return self.analysis

    @property
    def splits(self) -> list[str]:
        return [k for k in self.official if k != "average_f1"]

    @property
    def table(self) -> dict[str, float]:
        """Split -> F1, and ``F1``: their average (the columns papers report)."""
        return {**{s: self.official[s]["f1"] for s in self.splits}, "F1": self.official["average_f1"]}

    def format_table(self) -> str:
        columns = ["error acc", "correct acc", "F1"]
        width = max([len("average"), *map(len, self.splits)])
        lines = [" | ".join(["split".ljust(width), *(c.rjust(11) for c in columns)])]
        lines.append("-" * len(lines[0]))
        for split in self.splits:
            row = self.official[split]
            cells = [f"{row[k]:.1f}".rjust(11) for k in ("error_acc", "correct_acc", "f1")]
            lines.append(" | ".join([split.ljust(width), *cells]))
        lines.append(" | ".join(["average".ljust(width), "".rjust(11), "".rjust(11),
                                 f"{self.official['average_f1']:.1f}".rjust(11)]))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def finite(value: Any) -> Any:  # NaN (an empty group) is not JSON
            if isinstance(value, dict):
                return {k: finite(v) for k, v in value.items()}
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {"task": self.task, "official": finite(self.official), "table": finite(self.table),
                "counts": self.counts, "diagnostics": self.diagnostics, "run": self.run, "analysis": self.analyze()}


def _accuracy(matches: int, total: int) -> float:
    # np.mean of booleans is the float64 quotient matches / total (NaN for none); run_eval.py then multiplies by 100.
    return matches / total * 100 if total else math.nan


def _f1(error_acc: float, correct_acc: float) -> float:
    denominator = error_acc + correct_acc
    return 2 * error_acc * correct_acc / denominator if denominator else math.nan


def evaluate_processbench(dataset: ProcessBenchDataset, predictions: Any, *, validity_threshold: float = 0.5,
                          redundancy_threshold: float = 0.15) -> ProcessBenchReport:
    """The official ProcessBench numbers (module docstring) of ``predictions`` on ``dataset``.

    Args:
        dataset: from :func:`load_processbench`.
        predictions: flat :class:`~prmbench_fast.predictions.StepPredictions` (what ``score()`` makes), official
            ProcessBench outputs (dicts with ``id`` and ``prediction``: int or None), or the toolkit's result dicts
            with ``idx`` and step ``scores`` (labelled ``score > validity_threshold`` where they carry no labels).

    Raises:
        TypeError: ``dataset`` is not ProcessBench data, or ``predictions`` is a path.
        PredictionError: a malformed prediction (sample and field named), or none for a sample of the data.
    """
    from . import check_task_dataset

    check_task_dataset("processbench", dataset)
    check_predictions_argument(predictions)
    unknown: list[str] = []
    repeats = 0
    if isinstance(predictions, StepPredictions):
        per_sample, flat = dataset_predictions(predictions, len(dataset)), predictions
    else:
        per_sample, unknown, repeats, flat = _results_predictions(dataset, predictions, validity_threshold,
                                                                  redundancy_threshold)
    device = per_sample.device
    split_names = dataset.splits
    split_of = {name: k for k, name in enumerate(split_names)}
    labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.int64, device=device)
    split_ids = torch.tensor([split_of[s.split] for s in dataset.samples], dtype=torch.int64, device=device)
    # One (split, group) cell per sample: group 0 = erroneous (label != -1), 1 = correct. Five counts per cell,
    # gathered by index arithmetic on the device and read by the host once.
    cell = split_ids * 2 + (labels == -1).long()
    figures = torch.stack([torch.ones_like(labels), (per_sample == labels).long(), (per_sample == INVALID).long(),
                           (per_sample == MISSING).long()], dim=1)
    table = torch.zeros((2 * len(split_names), 4), dtype=torch.int64, device=device).index_add_(0, cell, figures)
    table = table.view(len(split_names), 2, 4).tolist()
    official: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, (error, correct) in zip(split_names, table):
        predicted = error[0] + correct[0] - error[3] - correct[3]
        if predicted == 0:
            continue
        counts[name] = {"error_samples": error[0], "error_matches": error[1], "correct_samples": correct[0],
                        "correct_matches": correct[1], "invalid": error[2] + correct[2], "missing": error[3] + correct[3]}
        error_acc, correct_acc = _accuracy(error[1], error[0]), _accuracy(correct[1], correct[0])
        official[name] = {"error_acc": error_acc, "correct_acc": correct_acc, "f1": _f1(error_acc, correct_acc)}
    if not official:
        raise PredictionError(f"none of the predictions matches a sample of the data ({len(unknown)} unknown ids"
                              + (f", e.g. {unknown[0]!r}" if unknown else "") + ")")
    f1s = [official[name]["f1"] for name in official]
    official["average_f1"] = sum(f1s) / len(f1s)
    values = per_sample.tolist()
    kept = {s.id: (None if v == INVALID else v) for s, v in zip(dataset.samples, values) if v != MISSING}
    diagnostics = {"samples": len(dataset), "predicted": len(kept), "unknown_prediction_ids": unknown,
                   "duplicate_predictions": repeats, "data": dataset.diagnostics}
    return ProcessBenchReport(official, counts, kept, diagnostics, dataset=dataset, step_predictions=flat)


def read_prediction_lines(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a predictions file: ProcessBench outputs (``id``, ``prediction``; the official
    ``<split>_error.jsonl``/``<split>_correct.jsonl`` concatenated) or the toolkit's result lines (``idx``, ``scores``).

    Raises:
        PredictionFileError: naming the file, the line and the field of a record without a string id, or no records.
    """
    from ..io import PredictionFileError, read_jsonl

    lines = []
    for number, record in read_jsonl(path, PredictionFileError):
        if not isinstance(record, dict):
            raise PredictionFileError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
        key = "id" if "id" in record else "idx"
        if not isinstance(record.get(key), str):
            raise PredictionFileError(path, number, key, "missing field or not a string")
        lines.append((number, record))
    if not lines:
        raise PredictionFileError(path, None, None, "no predictions (the file is empty)")
    return lines


class ProcessBenchTask:
    name = "processbench"
    dataset_type = ProcessBenchDataset
    loaded_by = 'load_prmbench(path, task="processbench")'
    leaderboard = False
    evaluate_options = ("validity_threshold", "redundancy_threshold")

    def load(self, source: Any = None) -> ProcessBenchDataset:
        return load_processbench(source)

    def evaluate(self, dataset: ProcessBenchDataset, predictions: Any, **options: Any) -> ProcessBenchReport:
        return evaluate_processbench(dataset, predictions, **options)

    def evaluate_command(self, args: Any) -> int:
        """``prmbench-fast evaluate --task processbench``: print the table, write ``--output`` (the report JSON) and
        ``--output-dir`` (a run folder like score's: results.jsonl as read, report.json with the calibration,
        table.txt; redone for the same predictions and settings, refused for others unless ``--overwrite``)."""
        import contextlib

        from ..io import PredictionFileError, check_not_an_input, check_output_dir, check_output_file, write_json_atomic

        if args.only_predicted:
            raise ValueError("--only-predicted does not apply to --task processbench")
        if args.output:
            check_output_file(args.output)
            check_not_an_input(args.output, {"--predictions": args.predictions, "--data": args.data})
        if args.output_dir:
            check_output_dir(args.output_dir)
        dataset = self.load(args.data)
        lines = read_prediction_lines(args.predictions)
        records = [record for _, record in lines]
        with contextlib.ExitStack() as stack:
            # The run folder is claimed (identity and lock) before the work and held until its files are written.
            store = stack.enter_context(self._evaluate_store(args, dataset)) if args.output_dir else None
            try:
                report = self.evaluate(dataset, records, validity_threshold=args.validity_threshold,
                                       redundancy_threshold=args.redundancy_threshold)
            except PredictionError as err:
                line = next((n for n, r in lines if r.get("id", r.get("idx")) == err.sample_id), None)
                raise PredictionFileError(args.predictions, line, None, str(err)) from None
            report.run = {"task": self.name, "data": args.data, "predictions": str(args.predictions),
                          "validity_threshold": args.validity_threshold,
                          "redundancy_threshold": args.redundancy_threshold}
            self._print_summary(report)
            if args.output:
                write_json_atomic(args.output, report.to_json())
                print(f"wrote {args.output}")
            if store is not None:
                store.replace_results(records)  # redone, never resumed: the folder holds this evaluation's lines
                store.write_report(report)
                print(f"wrote the run folder {store.dir} (results.jsonl, report.json, table.txt); HTML: prmbench-fast "
                      f"report {store.dir}")
        return 0

    def _evaluate_store(self, args: Any, dataset: ProcessBenchDataset):
        """The evaluate run folder's store. Its identity: the data (with the labels, which the numbers depend on),
        the predictions file's content and the thresholds."""
        import hashlib
        import json

        from ..results_store import ResultsStore

        labels = hashlib.sha256(json.dumps([[s.id, s.split, s.label] for s in dataset]).encode()).hexdigest()[:16]
        identity = {"task": self.name, "data": dataset.content_hash, "labels": labels,
                    "predictions": hashlib.sha256(pathlib.Path(args.predictions).read_bytes()).hexdigest(),
                    "validity_threshold": args.validity_threshold, "redundancy_threshold": args.redundancy_threshold}
        return ResultsStore(args.output_dir, identity, overwrite=args.overwrite, kind="evaluate")

    @staticmethod
    def _print_summary(report: ProcessBenchReport) -> None:
        print(report.format_table())
        diag = report.diagnostics
        print(f"\n{diag['predicted']} samples predicted of {diag['samples']}; "
              f"{sum(c['invalid'] for c in report.counts.values())} invalid predictions")
        if diag["unknown_prediction_ids"]:
            print(f"{len(diag['unknown_prediction_ids'])} prediction id(s) are not in the data and were ignored "
                  f"(e.g. {diag['unknown_prediction_ids'][0]!r})")
        if diag["duplicate_predictions"]:
            print(f"{diag['duplicate_predictions']} repeated prediction(s) ignored: the first line of each id is used")


TASK = ProcessBenchTask()
