"""Asking an HTTP endpoint many times: concurrency, retries with the official backoff, errors that stop the run, and
credentials kept out of every message. Shared by the LLM critic (:mod:`prmbench_fast.critic`, chat completions) and
the pooling-API client (:mod:`prmbench_fast.engines.pooling_api`, a vLLM server's ``/pooling``); both talk through
an ``openai.OpenAI`` client, whose errors this module sorts.
"""

from __future__ import annotations

import base64
import dataclasses
import queue
import threading
import urllib.parse
from typing import Any, Callable, Iterator, Sequence


class EndpointError(ConnectionError):
    """The endpoint refuses every request (bad key, no access, unknown model or path) or cannot be reached (a closed
    port, an unknown host): the run stops, and nothing is stored for the work in flight, because storing it would
    keep a resume from asking again."""


# Statuses that no retry can fix for any request: stop the run.
FATAL_STATUSES = (401, 403, 404)
# Statuses that no retry fixes for this request (malformed or too long for the model): no further attempt.
REJECTED_STATUSES = (400, 413, 422)


@dataclasses.dataclass
class Attempts:
    """What :func:`call_with_retries` got: the value of the attempt that succeeded (``succeeded``), the number of
    attempts made and one line per failed attempt."""

    value: Any
    succeeded: bool
    attempts: int
    errors: list[str]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one endpoint is asked, and what its errors tell the user.

    Attributes:
        max_retries: attempts per request.
        retry_interval: seconds; the wait after a failure is ``retry_interval * (1 + failures so far)`` (the
            official backoff).
        stop: set to abandon every request (Ctrl-C, another worker's fatal error); a wait ends early on it.
        endpoint: the endpoint's URL without credentials, for messages.
        mask: removes the credentials from a text (:func:`masker`).
        refused_hint: completes "(check ...)" after an HTTP 401/403/404, e.g. "--api-base, --api-model and
            OPENAI_API_KEY".
        unreachable_hint: names the option that gives the URL, e.g. "--api-base (or $OPENAI_BASE_URL)".
        what: what the endpoint was asked about, e.g. "model 'x'".
    """

    max_retries: int
    retry_interval: float
    stop: threading.Event
    endpoint: str
    mask: Callable[[str], str]
    refused_hint: str
    unreachable_hint: str
    what: str


def call_with_retries(call: Callable[[], Any], policy: RetryPolicy) -> Attempts | None:
    """``call()`` until it returns, at most ``policy.max_retries`` times; None when ``policy.stop`` was set first.

    Timeouts, connection errors, HTTP 429/5xx and any other exception of ``call`` (e.g. an answer it cannot use)
    are retried. HTTP 400/413/422 end the attempts at once (no retry can change them). HTTP 401/403/404 raise
    :class:`EndpointError` (no request can succeed), and so does a connection that could not be made on the last
    attempt: no answer ever arrived, so nothing about the request may be stored.
    """
    import openai

    errors: list[str] = []
    for attempt in range(1, policy.max_retries + 1):
        if policy.stop.is_set():
            return None
        try:
            return Attempts(call(), True, attempt, errors)
        except openai.APIStatusError as err:
            errors.append(f"HTTP {err.status_code}: {policy.mask(short(err))}")
            if err.status_code in FATAL_STATUSES:
                raise EndpointError(
                    f"{policy.endpoint} answered HTTP {err.status_code} for {policy.what}: "
                    f"{policy.mask(short(err))} (check {policy.refused_hint})"
                ) from None
            if err.status_code in REJECTED_STATUSES:
                break
        except Exception as err:  # noqa: BLE001 timeouts, connection errors, malformed bodies, unusable answers
            errors.append(f"{type(err).__name__}: {policy.mask(short(err))}")
            if _unreachable(err) and attempt == policy.max_retries:
                raise EndpointError(
                    f"{policy.endpoint} cannot be reached ({policy.mask(short(_cause(err)))}) after {attempt} "
                    f"attempt(s); check {policy.unreachable_hint} and that the server is running, then run the "
                    "same command again to resume"
                ) from None
        if attempt < policy.max_retries:
            policy.stop.wait(policy.retry_interval * (1 + len(errors)))
    return Attempts(None, False, len(errors), errors)


def ask_all(ask: Callable[[Any], Any], items: Sequence[Any], concurrency: int,
            stop: threading.Event) -> Iterator[tuple[Any, Any]]:
    """(item, ``ask(item)``) as the answers arrive, from ``concurrency`` worker threads.

    The workers are daemon threads, not a ThreadPoolExecutor's: at exit the interpreter joins an executor's threads,
    so after Ctrl-C the process would wait for every request in flight (up to the timeout per attempt); daemon
    threads are abandoned instead, and whatever finished is already stored. A worker's exception (e.g.
    :class:`EndpointError`) is raised here. Workers take no new item once ``stop`` is set.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)

    def work() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, ask(item), None))
            except BaseException as err:  # noqa: BLE001 handed to the main thread, which raises it
                done.put((item, None, err))

    for _ in range(min(concurrency, len(items))):
        threading.Thread(target=work, name="prmbench-endpoint", daemon=True).start()
    for _ in range(len(items)):
        while True:
            try:
                # A timed wait: the main thread gets back to the interpreter often, so Ctrl-C is handled at once.
                item, answer, err = done.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if err is not None:
            raise err
        yield item, answer


def _unreachable(err: BaseException) -> bool:
    """A connection that could not be made or broke before an answer; a timeout is not one (the server may be slow
    on this request only)."""
    import openai

    return isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError)


def _cause(err: BaseException) -> BaseException:
    """The underlying error of the client's generic "Connection error." (refused, unknown host, bad URL...)."""
    return err.__cause__ or err


def check_api_base(api_base: str, option: str = "--api-base / api_base", example: str = "http://localhost:8000/v1"
                   ) -> None:
    """Raise ValueError unless ``api_base`` is an http(s) URL with a host (shown without credentials); ``option``
    names where it came from."""
    parts = urllib.parse.urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{option} must be an http:// or https:// URL with a host, e.g. {example}, got "
                         f"{public_url(api_base)!r}")


def short(err: BaseException, limit: int = 300) -> str:
    message = str(err).replace("\n", " ")
    return message if len(message) <= limit else message[:limit] + "..."


def public_url(url: str) -> str:
    """``url`` without what may be a credential: the user:password part and the query string."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def masker(api_key: str, url: str) -> Callable[[str], str]:
    """A function that replaces every form of the credentials in a text: the key, and a password in the URL (as
    written, URL-decoded, and base64-encoded with its user as HTTP basic auth sends it). An endpoint may echo the
    request's Authorization header in an error message."""
    parts = urllib.parse.urlsplit(url)
    secrets = {api_key, urllib.parse.quote(api_key, safe="")}
    if parts.password:
        user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password)
        secrets |= {parts.password, password, base64.b64encode(f"{user}:{password}".encode()).decode()}
    secrets.discard("")

    def mask(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    return mask
