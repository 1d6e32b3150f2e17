"""Files: reading official prediction files, writing results atomically."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator


class PredictionFileError(ValueError):
    """A malformed predictions file; the message names the file, the line and the field."""

    def __init__(self, path: str, line: int, field: str | None, problem: str):
        where = f"{path}, line {line}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


def _open_text(path: pathlib.Path):
    # Prediction files of a full run are tens of MB; gzip is accepted so examples can ship compressed.
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the official toolkit's outputs: result lines ``{"idx", "scores", ["validity"]}`` and checkpoint lines
    ``{"task_name", "model_name", "results": {...}}``, in file order (the evaluator keeps the first per id)."""
    path = pathlib.Path(path)
    results = []
    for line_number, record in _jsonl(path):
        if "results" in record and "task_name" in record:
            record = record["results"]
            if not isinstance(record, dict):
                raise PredictionFileError(str(path), line_number, "results", "expected a JSON object")
        if "idx" not in record:
            raise PredictionFileError(str(path), line_number, "idx", "missing field")
        if not isinstance(record["idx"], str):
            raise PredictionFileError(str(path), line_number, "idx", f"expected str, got {type(record['idx']).__name__}")
        # An invalid prediction (an unparseable critic answer) is stored without scores, as the official toolkit does.
        invalid = "validity" in record and not record["validity"]
        if not invalid and not isinstance(record.get("scores"), dict):
            raise PredictionFileError(str(path), line_number, "scores", "missing field or not a JSON object")
        results.append(record)
    return results


def _jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for line_number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise PredictionFileError(str(path), line_number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise PredictionFileError(str(path), line_number, None, "expected a JSON object")
            yield line_number, record


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that ``path`` holds either its old content or the whole new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
