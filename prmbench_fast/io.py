"""Files: reading the user's data and prediction files, checking output paths, writing results atomically.

Every problem with a file or folder the user named raises :class:`FileError` (a ``ValueError``) whose message names
it, and the line and field where there is one, in one style: ``<file>, line N, field 'x': problem``. The command
line prints that message as one line and exits with status 2. A path that does not exist raises
:class:`MissingFileError`, which is also a ``FileNotFoundError``.

Input files may be gzip-compressed whatever their name: gzip is recognised by its first two bytes. Text must be
UTF-8 (a byte-order mark on the first line is accepted).
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import uuid
import zlib
from typing import Any, Iterator

GZIP_MAGIC = b"\x1f\x8b"


class FileError(ValueError):
    """A file or folder the user named cannot be used as it is; the message names it (and the line and field)."""

    def __init__(self, source: str | os.PathLike, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = os.fspath(source), line, field, problem
        where = self.source + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")


class MissingFileError(FileError, FileNotFoundError):
    """A path the user named does not exist."""


class PredictionFileError(FileError):
    """A malformed predictions file; the message names the file, the line and the field."""


class FileWriteError(FileError, OSError):
    """Writing a file failed (a full disk, a file too large, no permission...); the message names the file."""

    def __init__(self, path: str | os.PathLike, err: OSError, hint: str = ""):
        super().__init__(path, None, None, f"cannot be written: {err.strerror or err}" + (f"; {hint}" if hint else ""))
        self.errno, self.os_error = err.errno, err


class FileWarning(UserWarning):
    """Content of a file that was skipped (e.g. a torn line in a results file); the message names file and line."""


# ------------------------------------------------------------------------------------------------------------ paths


def looks_like_hub_id(name: str) -> bool:
    """True for ``owner/name`` Hugging Face ids; anything else is a local path, and never sent to the hub."""
    owner_and_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name)
    # "data/prmbench.jsonl" has the shape of an id but names a file.
    return owner_and_name is not None and not name.lower().endswith((".jsonl", ".json", ".gz", ".txt", ".csv"))


def check_input_file(path: str | os.PathLike, error: type[FileError] = FileError) -> pathlib.Path:
    """``path`` as a Path, after checking that it is an existing, readable file (not a folder)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(path, None, None, "not found")
    if path.is_dir():
        raise error(path, None, None, "is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise error(path, None, None, "permission denied (the file is not readable)")
    return path


def check_output_file(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path, after checking that a file can be written there (before any long work starts)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileError(path, None, None, "is a folder, expected a file name to write")
    _check_writable_folder(path.parent, path)
    return path


def check_output_dir(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path, after checking that it is (or can be created as) a folder files can be written in."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileError(path, None, None, "is a file, expected an output folder")
    _check_writable_folder(path, path)
    return path


def check_not_an_input(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise :class:`FileError` when ``output`` is the same file as one of ``inputs`` ({option: path}), so that
    writing it would overwrite what the command reads (compared by resolved path and by device and inode)."""
    output = pathlib.Path(output)
    for option, path in inputs.items():
        if path is not None and _same_file(output, pathlib.Path(path)):
            raise FileError(output, None, None, f"is the {option} file; writing it would overwrite the input. "
                            "Choose another output path")


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist (yet)
        return False


def prepare_output_dir(path: str | os.PathLike) -> pathlib.Path:
    """Create the output folder ``path`` if needed, after :func:`check_output_dir`."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileError(path, None, None, f"cannot create the folder ({err.strerror})") from None
    return path


def _check_writable_folder(folder: pathlib.Path, named: pathlib.Path) -> None:
    # The nearest existing ancestor decides: the folders below it will be created in it.
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FileError(named, None, None, f"cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileError(named, None, None, f"permission denied (cannot write in {existing})")


# ------------------------------------------------------------------------------------------------------------ reading


def read_lines(path: str | os.PathLike, error: type[FileError] = FileError) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 text file, plain or gzip-compressed.

    Raises ``error`` naming the file (and the line) when the file is a folder, unreadable, corrupt gzip, or not
    UTF-8; :class:`MissingFileError` when it does not exist.
    """
    path = check_input_file(path, error)
    number = 0
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            # Lines are split as bytes and decoded one by one, so a decoding error names its line.
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            for number, data in enumerate(stream, start=1):
                yield number, _decode(data, path, number, error)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise error(path, number + 1, None, f"corrupt gzip data ({err or 'truncated'})") from None
    except PermissionError:
        raise error(path, None, None, "permission denied (the file is not readable)") from None
    except OSError as err:
        raise error(path, number + 1, None, f"cannot be read ({err.strerror or err})") from None


def _decode(data: bytes, path: pathlib.Path, line: int, error: type[FileError]) -> str:
    # A NUL byte is valid UTF-8 but never in a text file: say "binary" rather than "invalid JSON" (a checkpoint or
    # an archive passed by mistake).
    nul = data.find(b"\0")
    if nul >= 0:
        raise error(path, line, None, f"binary data (a NUL byte at column {nul + 1}), not a text file")
    try:
        return data.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise error(
            path, line, None,
            f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {err.start + 1}): a binary file, or text saved "
            "in another encoding (e.g. latin-1)? Save it as UTF-8",
        ) from None


def parse_json(text: str, source: str | os.PathLike, first_line: int = 1, error: type[FileError] = FileError) -> Any:
    """The JSON value in ``text``, which starts at line ``first_line`` of ``source``; any way it fails to parse becomes
    ``error`` naming the file and the line."""
    text = text.rstrip("\r\n")  # else an error at the end of a JSON line is reported on the next line
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = first_line + err.lineno - 1
        raise error(source, line, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    except (RecursionError, ValueError) as err:
        # Python refuses integers of more than 4,300 digits with a ValueError.
        problem = "nested too deeply" if isinstance(err, RecursionError) else "a number with too many digits"
        line = first_line if text.count("\n") <= 1 else None
        raise error(source, line, None, f"invalid JSON ({problem})") from None


def read_jsonl(path: str | os.PathLike, error: type[FileError] = FileError) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON-lines file (plain or gzip)."""
    for number, text in read_lines(path, error):
        if text.strip():
            yield number, parse_json(text, path, number, error)


def read_json(path: str | os.PathLike, error: type[FileError] = FileError) -> Any:
    """The JSON document in a file (plain or gzip); errors name the file and the line."""
    return parse_json("".join(line for _, line in read_lines(path, error)), path, 1, error)


def result_problem(record: Any) -> tuple[str | None, str] | None:
    """What makes ``record`` unusable as an official result line, as (field, problem); None when it is usable."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "idx" not in record:
        return "idx", "missing field"
    if not isinstance(record["idx"], str):
        return "idx", f"expected str, got {type(record['idx']).__name__}"
    # An invalid prediction (an unparseable critic answer) is stored without scores, as the official toolkit does.
    invalid = "validity" in record and not record["validity"]
    if not invalid and not isinstance(record.get("scores"), dict):
        return "scores", "missing field or not a JSON object"
    return None


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the official toolkit's outputs: result lines ``{"idx", "scores", ["validity"]}`` and checkpoint lines
    ``{"task_name", "model_name", "results": {...}}``, in file order (the evaluator keeps the first per id).

    Raises:
        PredictionFileError: the file is unreadable, not UTF-8, or a line is malformed (file, line and field named).
        MissingFileError: the file does not exist.
    """
    return [record for _, record in read_prediction_lines(path)]


def read_prediction_lines(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_predictions` with each result's line number, to name the line of a result the evaluator refuses."""
    results = []
    for line_number, record in read_jsonl(path, PredictionFileError):
        if isinstance(record, dict) and "results" in record and "task_name" in record:
            record = record["results"]
            if not isinstance(record, dict):
                raise PredictionFileError(path, line_number, "results", "expected a JSON object")
        problem = result_problem(record)
        if problem is not None:
            raise PredictionFileError(path, line_number, *problem)
        results.append((line_number, record))
    return results


#: The JSON files of a checkpoint folder that transformers parses (config, tokenizer).
CHECKPOINT_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "model.safetensors.index.json")


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Raise :class:`FileError` naming the file when a checkpoint folder's JSON files do not parse or a safetensors
    file is truncated or corrupt, before transformers reads them (its errors name neither)."""
    folder = pathlib.Path(folder)
    for name in CHECKPOINT_JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: pathlib.Path) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's byte range,
    then the data: the file must be at least as long as the header says (a download cut short is not)."""
    def bad(problem: str) -> FileError:
        return FileError(path, None, None, f"{problem}: a truncated or corrupt weights file; download or save the "
                         "checkpoint again")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes, shorter than a safetensors header")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise bad(f"the header claims {header_size} bytes but the file has {size}")
        try:
            header = json.loads(f.read(header_size))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            raise bad("its header is not a safetensors header") from None
    if 8 + header_size + end > size:
        raise bad(f"{size:,} bytes, but its header describes {8 + header_size + end:,}")


# ------------------------------------------------------------------------------------------------------------ writing


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) so that ``path`` holds either its old content or the whole new one, never a part."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or the whole new one, never a part.

    The file gets the permissions of a plain ``open(path, "w")`` (0666 less the umask, e.g. 0644): the temporary file
    is created with ``os.open(..., 0o666)`` rather than ``mkstemp``, whose 0600 would survive the rename.

    Raises:
        FileWriteError: the folder cannot be created or the file cannot be written (a full disk, a file too large...);
            the message names ``path``, and the temporary file is removed.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileWriteError(path, err) from None
    # A unique name (pid and a random uuid) and O_EXCL: never another writer's temporary file.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise FileWriteError(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise FileWriteError(path, err) from None
        raise


def append_synced(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path`` and fsync it; an error names ``path`` (:class:`FileWriteError`). A
    failure may leave a torn last line, which the readers of appended files cut or skip."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise FileWriteError(path, err) from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
