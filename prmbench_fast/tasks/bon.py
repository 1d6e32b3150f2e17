"""The official best-of-n task ``prmbench_bon`` (SPEC §5): pick one of n responses per question with the PRM.

Input rows (jsonl): ``id`` (the dataset name before the first "_", e.g. ``math_17``), ``question``, ``responses``
(n strings), ``ans_str``, ``answer`` (read, never used by the official evaluator) and ``labels`` (one per response;
``"correct"`` marks a correct one). Response k of question ``id`` is the sample ``{id}/k``; its steps are the
response split on "\\n\\n", stripped, empty pieces dropped. A repeated sample id keeps its first occurrence.

The official evaluator, reproduced exactly (quirks included):

- ``pass_at_n``: the fraction of a dataset's questions with at least one response labelled correct.
- ``maj_of_n``: the last non-nested ``\\boxed{...}`` answer of each response is counted, None (no box) included, so
  the majority count may be None's; the candidates are the responses whose answer is a non-None answer with that
  count, and one of them is drawn at random. A question where None is the strict majority has no candidate and
  counts as a miss.
- ``prm_bon``: over the questions that have at least one prediction, the valid predictions' step validity scores
  are shifted by ``-(min over all of them - 0.01)`` so they are positive, a response's score is the product of its
  shifted scores (1 for a response without scores), and the first response (in prediction order) with the largest
  product is picked. A question without a valid prediction gets a random response and counts as not qualified.
  ``result`` is the fraction of picks labelled correct, ``qualified_rate`` the fraction of questions with a pick.

The random draws use ``random.Random(seed)`` (the official code uses the unseeded global generator), in the official
order: all maj@n draws (datasets in order of first appearance, questions in data order), then the PRM-BoN draws.

Beside the official numbers, ``aggregations`` holds what PRM papers report: the response picked by the min, last,
mean or product of its raw step scores (first of equal values in response order wins), over all of a dataset's
questions; a question without a scored response counts as a miss.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import random
import re
from typing import Any, Iterable, Iterator, Mapping

from ..data import PRMBenchDataError, SampleSet
from ..evaluate import PredictionError
from ..predictions import check_predictions_argument

VALIDITY_SCORES = "step_level_validity_scores"
CORRECT_LABEL = "correct"
#: The official answer extraction: the last non-nested \boxed{...} of a response.
BOXED = re.compile(r"\\boxed\{(.*?)\}")
AGGREGATIONS = ("min", "last", "mean", "product")


@dataclasses.dataclass(frozen=True)
class BoNSample:
    """Response k of a question, as a sample a PRM family scores (``question`` and ``steps``).

    ``source_idx`` is the question id, so that score() keeps a question's responses together (prefix sharing).
    """

    id: str
    question: str
    steps: tuple[str, ...]
    source_idx: str
    dataset: str
    response: str
    label: Any


class BoNDataset(SampleSet[BoNSample]):
    """The BoN evaluation set: every response of every question, in data order."""

    def __init__(self, samples: Iterable[BoNSample], diagnostics: dict[str, Any] | None = None):
        super().__init__(samples)
        self.diagnostics = diagnostics or {}

    @functools.cached_property
    def questions(self) -> dict[str, list[BoNSample]]:
        """Question id -> its responses, questions in order of first appearance."""
        out: dict[str, list[BoNSample]] = {}
        for s in self.samples:
            out.setdefault(s.source_idx, []).append(s)
        return out

    @functools.cached_property
    def dataset_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.dataset for s in self.samples))


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _field(row: dict, name: str, kind: type | None, source: str, line: int) -> Any:
    if name not in row:
        raise PRMBenchDataError(source, line, name, "missing field")
    value = row[name]
    if kind is not None and not isinstance(value, kind):
        raise PRMBenchDataError(source, line, name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def response_steps(response: str) -> tuple[str, ...]:
    """The official split: on "\\n\\n", each piece stripped, empty pieces dropped."""
    return tuple(piece.strip() for piece in response.split("\n\n") if piece.strip())


def _row_samples(row: Any, source: str, line: int) -> list[BoNSample]:
    if not isinstance(row, dict):
        raise PRMBenchDataError(source, line, None, f"expected a JSON object, got {type(row).__name__}")
    question_id = _field(row, "id", str, source, line)
    if not question_id.strip() or "/" in question_id:
        # The official evaluator groups responses by the sample id before its first "/": a "/" in the question id
        # would merge different questions.
        raise PRMBenchDataError(source, line, "id", f"must be non-empty and contain no '/', got {question_id!r}")
    question = _field(row, "question", str, source, line)
    responses = _field(row, "responses", list, source, line)
    if not responses:
        raise PRMBenchDataError(source, line, "responses", "no responses")
    for k, response in enumerate(responses):
        if not isinstance(response, str):
            raise PRMBenchDataError(source, line, f"responses[{k}]", f"expected str, got {type(response).__name__}")
    labels = _field(row, "labels", list, source, line)
    if len(labels) != len(responses):
        raise PRMBenchDataError(source, line, "labels", f"{len(labels)} labels for {len(responses)} responses")
    _field(row, "ans_str", None, source, line)  # required by the official loader, not used by its evaluator
    _field(row, "answer", None, source, line)
    dataset = question_id.split("_")[0].strip()
    return [
        BoNSample(f"{question_id}/{k}", question, response_steps(response), question_id, dataset, response, labels[k])
        for k, response in enumerate(responses)
    ]


def load_bon(source: str | os.PathLike) -> BoNDataset:
    """Load BoN data: a ``.jsonl`` file or a folder of them (read in file-name order, not recursively).

    Raises:
        PRMBenchDataError: a malformed row; the message names the file, the line and the field.
        FileNotFoundError: no such file or folder.
    """
    if source is None:
        raise ValueError("the bon task has no default data: pass the BoN jsonl file or folder")
    path = pathlib.Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise FileNotFoundError(f"no .jsonl files in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"BoN data not found: {source}")
    samples: dict[str, BoNSample] = {}
    duplicates: list[tuple[str, int, str]] = []
    rows = 0
    for file in files:
        for line, row in _jsonl_rows(file):
            rows += 1
            for sample in _row_samples(row, str(file), line):
                if sample.id in samples:
                    duplicates.append((str(file), line, sample.id))  # first occurrence wins, as officially
                else:
                    samples[sample.id] = sample
    diagnostics = {
        "sources": [str(f) for f in files],
        "raw_rows": rows,
        "duplicate_responses": len(duplicates),
        "responses_without_steps": sum(1 for s in samples.values() if not s.steps),
    }
    return BoNDataset(samples.values(), diagnostics)


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield line_number, json.loads(text)
            except json.JSONDecodeError as err:
                raise PRMBenchDataError(str(path), line_number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def extract_answer(response: str) -> str | None:
    """The official maj@n answer: the content of the last non-nested ``\\boxed{...}``, None without one."""
    matches = BOXED.findall(response)
    return str(matches[-1]) if matches else None


@dataclasses.dataclass
class BoNReport:
    """The result of the BoN evaluator.

    Attributes:
        official: exactly what the official ``evaluate_function`` returns: ``pass_at_n``, ``maj_of_n`` ({dataset:
            fraction}) and ``prm_bon`` ({"result": {dataset: fraction}, "qualified_rate": {dataset: fraction}});
            -1 for a dataset without questions (prm_bon: without predictions).
        aggregations: {"min"|"last"|"mean"|"product": {dataset: fraction of questions whose pick is correct}}.
        seed: the seed of the random tie-breaks.
        diagnostics: predictions used, unknown ids, duplicates, invalid predictions, questions without predictions.
    """

    official: dict[str, Any]
    aggregations: dict[str, dict[str, float]]
    seed: int
    diagnostics: dict[str, Any]
    run: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": "bon", "official": self.official, "aggregations": self.aggregations, "seed": self.seed,
                "diagnostics": self.diagnostics, "run": self.run}

    def format_table(self) -> str:
        """One row per dataset (×100, one decimal): pass@n, maj@n, PRM-BoN, qualified, then the aggregations."""
        columns = ["pass@n", "maj@n", "PRM-BoN", "qualified", *AGGREGATIONS]
        sources = [self.official["pass_at_n"], self.official["maj_of_n"], self.official["prm_bon"]["result"],
                   self.official["prm_bon"]["qualified_rate"], *(self.aggregations[a] for a in AGGREGATIONS)]
        names = list(self.official["pass_at_n"])
        width = max([len("dataset"), *map(len, names)])
        lines = [" | ".join(["dataset".ljust(width), *(c.rjust(9) for c in columns)])]
        lines.append("-" * len(lines[0]))
        for name in names:
            cells = [("-" if v[name] == -1 else f"{100 * v[name]:.1f}").rjust(9) for v in sources]
            lines.append(" | ".join([name.ljust(width), *cells]))
        return "\n".join(lines)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator > 0 else -1


def _kept_results(dataset: BoNDataset, predictions: Any) -> tuple[list[dict], list[str], int]:
    """First result per known sample id, in prediction order; plus the unknown ids and the number of duplicates."""
    if hasattr(predictions, "to_results"):  # flat step predictions (prmbench_fast.predictions.StepPredictions)
        predictions = predictions.to_results([s.id for s in dataset.samples])
    if isinstance(predictions, Mapping):
        items = [(k, v) for k, v in predictions.items()]
    else:
        items = []
        for i, result in enumerate(predictions):
            if not isinstance(result, Mapping) or "idx" not in result:
                raise PredictionError(f"prediction #{i}: a result in a list must be a dict with an 'idx' field")
            items.append((result["idx"], result))
    kept, seen, unknown, duplicates = [], set(), [], 0
    for sample_id, result in items:
        if sample_id not in dataset.by_id:
            unknown.append(sample_id)
        elif sample_id in seen:
            duplicates += 1
        else:
            if not isinstance(result, Mapping):
                raise PredictionError(
                    f"prediction for sample {sample_id!r}: expected a dict, got {type(result).__name__}", sample_id
                )
            seen.add(sample_id)
            kept.append({**result, "idx": sample_id})
    return kept, unknown, duplicates


def _is_valid(result: Mapping) -> bool:
    return not ("validity" in result and not result["validity"])


def _step_scores(result: Mapping) -> list[float]:
    """The prediction's validity scores ([] without them, as officially); anything but finite numbers raises."""
    scores = result.get("scores")
    if not isinstance(scores, Mapping):
        raise PredictionError(f"prediction for sample {result['idx']!r}, field 'scores': missing or not a dict",
                              result["idx"])
    values = scores.get(VALIDITY_SCORES, [])
    if not isinstance(values, (list, tuple)):
        raise PredictionError(f"prediction for sample {result['idx']!r}, field {VALIDITY_SCORES!r}: expected a list",
                              result["idx"])
    for i, v in enumerate(values):
        # NaN would make the official max and sort order-dependent; infinities make the min shift inf - inf.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PredictionError(
                f"prediction for sample {result['idx']!r}, field {VALIDITY_SCORES!r}[{i}]: not a finite number: {v!r}",
                result["idx"],
            )
    return list(values)


def _pass_at_n(dataset: BoNDataset) -> dict[str, float]:
    out = {}
    for name in dataset.dataset_names:
        questions = [q for q in dataset.questions.values() if q[0].dataset == name]
        solved = sum(any(s.label == CORRECT_LABEL for s in q) for q in questions)
        out[name] = _ratio(solved, len(questions))
    return out


def _maj_of_n(dataset: BoNDataset, rng: random.Random) -> dict[str, float]:
    out = {}
    for name in dataset.dataset_names:
        total = solved = 0
        for responses in dataset.questions.values():
            if responses[0].dataset != name:
                continue
            total += 1
            answers = [extract_answer(s.response) for s in responses]
            counts: dict[str | None, int] = {}
            for a in answers:
                counts[a] = counts.get(a, 0) + 1
            top = max(counts.values())  # None's count competes for the maximum ...
            winners = {a for a, c in counts.items() if c == top and a is not None}  # ... but is never a winner
            candidates = [k for k, a in enumerate(answers) if a in winners]
            if candidates:
                solved += responses[rng.choice(candidates)].label == CORRECT_LABEL
        out[name] = _ratio(solved, total)
    return out


def _prm_bon(dataset: BoNDataset, kept: list[dict], rng: random.Random) -> dict[str, dict[str, float]]:
    by_question: dict[str, list[dict]] = {}  # questions in order of their first prediction
    for result in kept:
        by_question.setdefault(dataset.by_id[result["idx"]].source_idx, []).append(result)
    out: dict[str, dict[str, float]] = {"qualified_rate": {}, "result": {}}
    for name in dataset.dataset_names:
        total = solved = not_qualified = 0
        for question_id, results in by_question.items():
            responses = dataset.questions[question_id]
            if responses[0].dataset != name:
                continue
            total += 1
            valid = [(r["idx"], _step_scores(r)) for r in results if _is_valid(r)]
            pooled = [v for _, scores in valid for v in scores]
            shift = min(pooled) - 0.01 if pooled else -0.01
            best_id, best = None, None
            for sample_id, scores in valid:
                product = math.prod([v - shift for v in scores])
                if best is None or product > best:  # strict: the first of equal products wins
                    best_id, best = sample_id, product
            if best_id is None:
                not_qualified += 1
                picked = rng.choice(responses)
            else:
                picked = dataset.by_id[best_id]
            solved += picked.label == CORRECT_LABEL
        out["result"][name] = _ratio(solved, total)
        out["qualified_rate"][name] = _ratio(total - not_qualified, total)
    return out


def _aggregate(scores: list[float], how: str) -> float:
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "mean":
        return sum(scores) / len(scores)
    return math.prod(scores)


def _aggregations(dataset: BoNDataset, kept: list[dict]) -> dict[str, dict[str, float]]:
    scores = {r["idx"]: _step_scores(r) for r in kept if _is_valid(r)}
    out: dict[str, dict[str, float]] = {how: {} for how in AGGREGATIONS}
    for name in dataset.dataset_names:
        questions = [q for q in dataset.questions.values() if q[0].dataset == name]
        for how in AGGREGATIONS:
            solved = 0
            for responses in questions:
                scored = [(s, _aggregate(scores[s.id], how)) for s in responses if scores.get(s.id)]
                if scored:
                    best = max(scored, key=lambda pair: pair[1])  # max() keeps the first of equal values
                    solved += best[0].label == CORRECT_LABEL
            out[how][name] = _ratio(solved, len(questions))
    return out


def evaluate_bon(dataset: BoNDataset, predictions: Any, *, seed: int = 0) -> BoNReport:
    """Score PRM predictions on BoN data as the official ``prmbench_bon`` evaluator does (module docstring).

    Args:
        dataset: from :func:`load_bon`.
        predictions: official result dicts with ``idx`` (``{id}/{k}``), ``{id: result}``, or flat step predictions;
            a result's ``scores`` holds ``step_level_validity_scores``; ``validity: false`` marks an invalid one.
        seed: seeds the random tie-breaks (maj@n ties, PRM-BoN questions without a valid prediction).

    Raises:
        TypeError: ``dataset`` is not BoN data, or ``predictions`` is a path rather than predictions.
        PredictionError: a malformed prediction (the message names the sample and the field).
    """
    from . import check_task_dataset

    check_task_dataset("bon", dataset)
    check_predictions_argument(predictions)
    kept, unknown, duplicates = _kept_results(dataset, predictions)
    rng = random.Random(seed)
    official = {"pass_at_n": _pass_at_n(dataset), "maj_of_n": _maj_of_n(dataset, rng), "prm_bon": _prm_bon(dataset, kept, rng)}
    predicted_questions = {dataset.by_id[r["idx"]].source_idx for r in kept}
    diagnostics = {
        "questions": len(dataset.questions),
        "responses": len(dataset),
        "predictions_used": len(kept),
        "unknown_prediction_ids": unknown,
        "duplicate_predictions": duplicates,
        "invalid_predictions": [r["idx"] for r in kept if not _is_valid(r)],
        # Left out of prm_bon's denominator, as officially; the aggregations count them as misses.
        "questions_without_predictions": [q for q in dataset.questions if q not in predicted_questions],
        "data": dataset.diagnostics,
    }
    return BoNReport(official, _aggregations(dataset, kept), seed, diagnostics)


class BoNTask:
    name = "bon"
    dataset_type = BoNDataset
    loaded_by = 'load_prmbench(path, task="bon")'
    leaderboard = False
    evaluate_options = ()

    def load(self, source: Any = None) -> BoNDataset:
        return load_bon(source)

    def evaluate(self, dataset: BoNDataset, predictions: Any, *, seed: int = 0) -> BoNReport:
        return evaluate_bon(dataset, predictions, seed=seed)

    def evaluate_command(self, args: Any) -> int:
        """``prmbench-fast evaluate --task bon``: print the table, write ``--output`` (the report JSON) and
        ``--output-dir`` (a run folder; its identity holds ``--seed``)."""
        import contextlib

        from ..io import write_json_atomic
        from ._commands import (
            check_outputs,
            evaluate_store,
            naming_the_line,
            print_duplicates,
            print_unknown_ids,
            read_result_lines,
            refuse_only_predicted,
            write_evaluate_run,
        )

        check_outputs(args)
        refuse_only_predicted(args, self.name)
        dataset = self.load(args.data)
        lines, predictions = read_result_lines(args.predictions, dataset)
        with contextlib.ExitStack() as stack:
            # The run folder is claimed (identity and lock) before the work, and held until its files are written.
            store = stack.enter_context(evaluate_store(args, dataset, {"seed": args.seed})) if args.output_dir else None
            with naming_the_line(args.predictions, lines):
                report = self.evaluate(dataset, predictions, seed=args.seed)
            print(report.format_table())
            print(f"\nrandom tie-breaks seeded with {report.seed}")
            print_unknown_ids(report.diagnostics["unknown_prediction_ids"])
            print_duplicates(predictions)
            if args.output:
                write_json_atomic(args.output, report.to_json())
                print(f"wrote {args.output}")
            if store is not None:
                report.run = {"task": args.task, "data": args.data, "predictions": str(args.predictions)}
                write_evaluate_run(store, report, predictions)
        return 0


TASK = BoNTask()
