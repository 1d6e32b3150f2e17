"""A run's output folder: per-sample results as they finish, so an interrupted run resumes where it stopped.

Layout of ``output_dir``:
    run.json              the run's identity: its kind (the tool that writes the folder: "score", "critic" or
                          "evaluate") and what its results depend on (model name, weights fingerprint, family and
                          options, task, thresholds, max_length, dtype; for a critic its endpoint, model, prompt...;
                          for evaluate the predictions file). A run of another kind or identity is refused unless
                          ``overwrite`` starts the run over
    results.jsonl         one official result line per finished sample ({"idx", "scores": {...}}); rank r > 0 of a
                          distributed run writes results.rank<r>.jsonl
    results.lock          held (flock) by the process writing results.jsonl; rank r > 0: results.rank<r>.lock
    report.json, table.txt  the final report, written atomically once every sample is scored
    cache/                tokenized samples (safetensors), so a resumed run does not tokenize again (kept by overwrite)

Result lines are appended a batch at a time and fsync'ed (by :class:`ResultsWriter`, on a thread of its own, so the
host queues the next batch meanwhile), so a crash (even SIGKILL) loses at most the batches in flight;
a torn last line is cut off on the next open. A line that cannot be a result (torn, not JSON, no ``idx``...) is
skipped with a :class:`~prmbench_fast.io.FileWarning` naming file and line, never resumed; so is a line that parses
but whose scores the evaluator cannot read (``{"idx": ..., "scores": {"foo": 1}}``, a label "yes"), and its sample
is scored again. The files are the official
toolkit's format: ``prmbench-fast evaluate`` and the official tools read them as they are.

Under ``torch.distributed`` create rank 0's store first (it checks or writes run.json, and with ``overwrite`` clears
every rank's results), then a barrier, then the other ranks' stores (they only check run.json).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import queue
import threading
import warnings
from typing import Any, Callable, Iterable

from .io import (
    FileError,
    FileWarning,
    append_synced,
    parse_json,
    prepare_output_dir,
    read_json,
    result_problem,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

RUN_FILE = "run.json"
REPORT_FILES = ("report.json", "table.txt")
#: Values longer than this are shortened in the RunMismatchError message (a fingerprint fits).
SHOWN_VALUE_CHARS = 40


class RunMismatchError(ValueError):
    """``output_dir`` holds a run with another identity; resuming would mix two runs' results."""


class RunLockedError(OSError):
    """Another process (or another store in this process) is writing results to the same folder and rank."""


def ordered_predictions(dataset, finished: dict[str, Any], new_results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Resumed and new results together, in dataset order; the first result per id wins (as in the official tools)."""
    predictions = dict(finished)
    for result in new_results:
        predictions.setdefault(result["idx"], result)
    return {s.id: predictions[s.id] for s in dataset.samples if s.id in predictions}


def results_file(output_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return output_dir / ("results.jsonl" if rank == 0 else f"results.rank{rank}.jsonl")


def lock_file(output_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return output_dir / ("results.lock" if rank == 0 else f"results.rank{rank}.lock")


class ResultsStore:
    """The run folder of one process: identity check, exclusive lock, atomic appends, resume.

    Args:
        output_dir: the run folder (created if needed).
        identity: what the results depend on, JSON-like (non-JSON values such as a ``torch.dtype`` are stored as
            their ``str``). Never put secrets in it: it is written to run.json and shown in error messages.
        kind: the tool writing the folder ("score", "critic", "evaluate"), recorded in run.json: a folder belongs
            to one kind of run, so another tool's run there is refused whatever its settings.
        rank: this process's rank under ``torch.distributed`` (0 otherwise).
        overwrite: on rank 0, delete the folder's results, report and run.json first (not ``cache/``) and start a new
            run with this identity.

    Raises:
        RunMismatchError: the folder holds a run with another identity, results without a run.json, or an
            unreadable run.json; the message names what differs and the way out.
        RunLockedError: another live store holds this folder and rank.
        FileError: the folder is a file or cannot be written.

    Use it as a context manager (or call :meth:`close`): the lock is held until then.
    """

    def __init__(self, output_dir: str | os.PathLike, identity: dict[str, Any], *, rank: int = 0,
                 overwrite: bool = False, kind: str = "score"):
        self.dir = prepare_output_dir(output_dir)
        self.rank = rank
        self.path = results_file(self.dir, rank)
        # tuples -> lists, dtypes -> str
        self.identity = json.loads(json.dumps({"kind": kind, **identity}, sort_keys=True, default=str))
        #: Ids of results in the folder that are not in the data given to :meth:`finished` (first seen first).
        self.unknown_ids: list[str] = []
        # A file object rather than a raw descriptor: a store that is never closed still releases its lock when it is
        # garbage collected (e.g. when the score() call that made it returns).
        self._lock = _acquire_lock(lock_file(self.dir, rank), self.dir)
        try:
            if overwrite and rank == 0:
                self._clear()
            self._check_identity()
            self._cut_torn_tail()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's lock (closing the file releases the flock)."""
        self._lock.close()

    def _clear(self) -> None:
        run_files = [self.dir / RUN_FILE, *(self.dir / name for name in REPORT_FILES)]
        for path in [*run_files, *self.dir.glob("results*.jsonl")]:
            path.unlink(missing_ok=True)

    def _check_identity(self) -> None:
        run_file = self.dir / RUN_FILE
        if not run_file.exists():
            if any(self.dir.glob("results*.jsonl")):
                raise RunMismatchError(
                    f"{self.dir} holds results but no {RUN_FILE}, so which model made them is unknown; "
                    f"{_WAY_OUT}"
                )
            if self.rank == 0:
                write_json_atomic(run_file, self.identity)
            return
        try:
            previous = read_json(run_file)
        except FileError as err:
            raise RunMismatchError(f"{err}; {_WAY_OUT}") from None
        if not isinstance(previous, dict):
            raise RunMismatchError(f"{run_file} is not a JSON object; {_WAY_OUT}")
        # Folders written before run.json recorded a kind were written by score() or the critic.
        previous_kind = previous.setdefault("kind", "critic" if previous.get("family") == "critic" else "score")
        if previous_kind != self.identity["kind"]:
            raise RunMismatchError(
                f"{self.dir} holds a `{previous_kind}` run (see its {RUN_FILE}); a `{self.identity['kind']}` run "
                f"cannot write there; {_WAY_OUT}"
            )
        if previous != self.identity:
            raise RunMismatchError(
                f"{self.dir} holds a run with other settings: {_differences(previous, self.identity)}; {_WAY_OUT}"
            )

    def _cut_torn_tail(self) -> None:
        # A kill during a write can leave a last line without its newline; drop it so the next append starts clean.
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            line = data.count(b"\n") + 1
            warnings.warn(
                f"{self.path}, line {line}: an unfinished last line (an interrupted write) was removed; its sample "
                "is scored again",
                FileWarning, stacklevel=3,
            )
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def finished(self, dataset=None) -> dict[str, dict[str, Any]]:
        """The results already written by any rank (the first line per id wins, as in the official evaluator).

        With ``dataset``, only results whose id is in it are returned; the others are listed in
        :attr:`unknown_ids` and reported in one :class:`~prmbench_fast.io.FileWarning` (their count and one example),
        never counted as resumed. Lines that cannot be results are skipped, one warning per file naming the first;
        with ``dataset``, so are results the evaluator cannot read (one warning each, naming file and line).
        """
        lines: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # id -> ("<file>, line N", result), in file order
        unknown: dict[str, None] = {}
        for path in sorted(self.dir.glob("results*.jsonl")):
            for number, record in _read_results(path):
                if dataset is not None and record["idx"] not in dataset:
                    unknown.setdefault(record["idx"])
                else:
                    lines.setdefault(record["idx"], []).append((f"{path}, line {number}", record))
        if dataset is None:
            results = {sample_id: found[0][1] for sample_id, found in lines.items()}
        else:
            results = _first_readable(dataset, lines)
        self.unknown_ids = list(unknown)
        if self.unknown_ids:
            warnings.warn(
                f"{self.dir}: {len(self.unknown_ids)} stored result(s) have ids not in the data "
                f"(e.g. {self.unknown_ids[0]!r}); they are not resumed",
                FileWarning, stacklevel=2,
            )
        return results

    def append(self, results: Iterable[dict[str, Any]]) -> None:
        """Append result lines, fsync'ed; a failure (a full disk) names the file, and the torn line it may leave is
        cut on the next open."""
        append_synced(self.path, "".join(json.dumps(r) + "\n" for r in results))

    def replace_results(self, results: Iterable[dict[str, Any]]) -> None:
        """This rank's results file replaced, atomically, by ``results`` (a run that is not resumed but redone)."""
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in results))

    def forget(self, sample_ids: Iterable[str]) -> None:
        """Remove the results of ``sample_ids`` from this rank's results file (rewritten atomically), so that they
        are scored again and the new result is the one a resume reads."""
        drop = set(sample_ids)
        if not drop or not self.path.exists():
            return
        kept = [line for line in self.path.read_bytes().splitlines(keepends=True) if _line_idx(line) not in drop]
        write_bytes_atomic(self.path, b"".join(kept))

    def write_report(self, report) -> None:
        """The final report.json and table.txt, each written atomically."""
        write_json_atomic(self.dir / "report.json", report.to_json())
        write_text_atomic(self.dir / "table.txt", report.format_table() + "\n")


_WAY_OUT = "pass --overwrite (overwrite=True in Python) to delete its results and start over, or use another folder"
_ABSENT = object()


class ResultsWriter:
    """Appends batches of result lines to a :class:`ResultsStore` on a thread of its own, in submission order.

    ``submit(ready, results)``: ``ready`` (an object with ``synchronize()``, e.g. the ``torch.cuda.Event`` recorded
    after the batch's device-to-host copy, or None) is waited for on the writer thread, then ``results()`` builds the
    lines from the host copy and :meth:`ResultsStore.append` writes them (one write, fsync'ed) exactly as a direct
    call would. At most ``depth`` batches wait in the queue, so a kill loses at most ``depth`` + 1 batches (the
    queued ones and the one being written), and nothing half-written: a torn line is cut on the next open.
    The first error (a full disk) stops the writing and is raised by the next :meth:`submit` or by :meth:`close`.
    """

    def __init__(self, store: ResultsStore, *, depth: int = 2):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prmbench-results-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                ready, results = item
                try:
                    if ready is not None:
                        ready.synchronize()
                    self.store.append(results())
                except BaseException as err:  # noqa: BLE001 handed to the scoring thread, which raises it
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, ready: Any, results: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._raise()
        self._queue.put((ready, results))

    def stop(self) -> None:
        """Write what was submitted and end the thread (also when the scoring loop failed or was interrupted)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        """:meth:`stop`, then raise the writer's error if it had one."""
        self.stop()
        self._raise()


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    return ", ".join(f"{k}: {_shown(old.get(k, _ABSENT))} -> {_shown(new.get(k, _ABSENT))}" for k in keys)


def _acquire_lock(path: pathlib.Path, folder: pathlib.Path):
    lock = open(path, "a+b", buffering=0)  # noqa: SIM115 held for the store's lifetime, closed by close()
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(32).decode("ascii", errors="replace").strip()
        lock.close()
        by = f"process {holder}" if holder.isdigit() else "another process"
        raise RunLockedError(
            f"{folder} is in use: {by} is writing results there (it holds {path.name}); wait for it to finish or "
            "use another folder"
        ) from None
    except BaseException:
        lock.close()
        raise
    # The holder's pid, for the message a second process gets; the lock itself is the flock, not this content.
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    return lock


def _line_idx(line: bytes) -> Any:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("idx") if isinstance(record, dict) else None


def _first_readable(dataset, lines: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """The first result per id that the evaluator can read; a refused one (bad labels or scores) is skipped with a
    warning naming its file and line, and the id's next line, if any, is taken instead (the first line of a sample
    scored again after a skip is the bad one). The whole set is parsed once; after a refusal the rest is parsed
    again, so the usual case (nothing bad) costs one parse."""
    from .predictions import PredictionError, parse_results

    results = {sample_id: found[0][1] for sample_id, found in lines.items()}
    taken = dict.fromkeys(lines, 0)  # id -> index of its line in use
    while results:
        try:
            parse_results(dataset, results)
            break
        except PredictionError as err:
            sample_id = err.sample_id
            if sample_id not in results:
                raise
            where = lines[sample_id][taken[sample_id]][0]
            warnings.warn(f"{where}: {err}; skipped", FileWarning, stacklevel=4)
            taken[sample_id] += 1
            if taken[sample_id] < len(lines[sample_id]):
                results[sample_id] = lines[sample_id][taken[sample_id]][1]
            else:
                del results[sample_id]
    return results


def _read_results(path: pathlib.Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, result) for the usable result lines of one results file; the others are skipped with one
    warning naming the first."""
    bad: list[str] = []
    with open(path, "rb") as f:
        for number, data in enumerate(f, start=1):
            if data.strip():
                record, problem = _parse_result_line(data, path, number)
                if problem is None:
                    yield number, record
                else:
                    bad.append(problem)
    if bad:
        more = f" (and {len(bad) - 1} more such line(s) in this file)" if len(bad) > 1 else ""
        warnings.warn(f"{bad[0]}; skipped{more}", FileWarning, stacklevel=3)


def _parse_result_line(data: bytes, path: pathlib.Path, number: int) -> tuple[Any, str | None]:
    """Line ``number`` of a results file as (result, None), or (None, why it is not a usable result) where the why
    reads ``<file>, line N[, field 'x']: problem``."""
    if not data.endswith(b"\n"):
        # Our own file's torn tail is cut on open; this is another rank's, interrupted or still being written.
        return None, f"{path}, line {number}: an unfinished last line (an interrupted write)"
    try:
        record = parse_json(data.decode("utf-8"), path, number)
    except UnicodeDecodeError:
        return None, f"{path}, line {number}: not UTF-8 text"
    except FileError as err:
        return None, str(err)
    problem = result_problem(record)
    if problem is not None:
        return None, str(FileError(path, number, *problem))
    return record, None
