"""The LLM-as-critic path: a general LLM behind an OpenAI-compatible endpoint judges every step (SPEC §4).

The critic gets a system prompt, 0-2 worked examples and the sample as a query, and answers with JSON holding a
validity and a redundancy score per step. The request layout, the answer parsing, the labelling and what is stored
for a failed or unparseable answer reproduce the official toolkit's API adapter (``mr_eval/models/openai_models.py``
with ``mr_eval/utils/model_utils.py``); only the prompt and example *texts* are this repository's own wording, with
the same content and structure.

Layout of ``output_dir`` (on top of the :mod:`prmbench_fast.results_store` layout):
    responses.jsonl   one line per asked sample: {"idx", "response" (the last answer text, null if none arrived),
                      "attempts", "errors"}, written (and fsync'ed) before the sample's result line, so every stored
                      result has its raw answer; :func:`results_from_responses` re-parses them without asking again.

The API key is never written to the folder nor shown in a message: the run identity holds the endpoint's URL without
credentials, and every error text stored or raised has the key masked.

``task="processbench"`` asks ProcessBench's critique question instead (SPEC §9, the official ``code/run_eval.py``):
one user message with the problem and the tagged paragraphs, the index of the earliest wrong paragraph (-1: none)
read from the last ``\\boxed{}`` (:mod:`prmbench_fast.tasks.processbench`), the same machinery around it. What
differs between the two is a :class:`CriticProtocol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import threading
import time
from typing import Any, Callable, Mapping

from .data import PRMBenchDataset, Sample, load_prmbench
from .endpoint import EndpointError, RetryPolicy, ask_all, call_with_retries, check_api_base, masker, public_url
from .evaluate import Report, evaluate
from .tasks import check_task_dataset
from .families.text import clean_step
from .io import FileWriteError
from .progress import progress_bar
from .results_store import ResultsStore, ordered_predictions

RESPONSES_FILE = "responses.jsonl"

#: Models the official adapter treats as o1-style: the system prompt goes as a "user" turn, temperature 1.0.
O1_MODELS = ("o1-mini", "o1-preview")

SYSTEM_PROMPT = """\
You are a careful grader of step-by-step mathematical reasoning. You will receive a math question and a solution \
split into numbered steps. Judge every step on its own and give it two scores.

1. Validity, a number from -1 to 1: is the step mathematically and logically sound, given the question and the \
steps before it?
   - 1 means the step is entirely correct;
   - 0 means the step is partly correct or only partly justified;
   - -1 means the step is entirely wrong.
   Values in between (for example 0.5 or -0.5) express intermediate judgements.

2. Redundancy, a number from -1 to 1: how much does the solution need this step to reach its answer?
   - -1 means the step is essential and cannot be removed;
   - 0 means the step helps but is of moderate importance;
   - 1 means the step is entirely redundant and could be dropped without loss.
   Values in between express intermediate judgements.

Reply in strict JSON with exactly two keys, "validity" and "redundancy". Each maps to a list with one number per \
step, in step order, so both lists are as long as the solution has steps. For a solution of three steps a reply \
looks like:
{"validity": [1, 0.5, -1], "redundancy": [-1, 0, 1]}"""

_SHOT_1_QUESTION = """\
Question:

A bakery sells muffins at 3 for $4. How many dollars do 18 muffins cost?

Solution:

Step 1. We need the price of 18 muffins when every 3 muffins cost $4.

Step 2. One muffin therefore costs 4/3 dollars, roughly 1.33 dollars.

Step 3. 18 muffins make 18 / 3 = 6 groups of three.

Step 4. Each group costs $4, so the 6 groups cost 6 * 4 = 24 dollars.

Step 5. Checking with the price of one muffin: 18 * 1.33 = 23.94, which rounds to 24.

Step 6. Buying the muffins one at a time might cost more than buying them in groups.

Step 7. So 18 muffins cost 24 dollars.

Step 8. The answer is 24.

# Answer

24"""
_SHOT_1_ANSWER = '{"validity": [1, 1, 1, 1, 0.5, 0, 1, 1], "redundancy": [0.5, -0.5, -1, -1, 1, 1, 0, 0.5]}'

_SHOT_2_QUESTION = """\
Question:

Two fair six-sided dice are rolled. What is the probability that the two numbers shown add up to 8?

Solution:

Step 1. Each die shows a number from 1 to 6, so there are 6 * 6 = 36 equally likely outcomes.

Step 2. We count the ordered pairs (a, b) with a + b = 8.

Step 3. If a = 1, then b would have to be 7, which a die cannot show.

Step 4. For a from 2 to 6 the pairs are (2, 6), (3, 5), (4, 4), (5, 3) and (6, 2).

Step 5. The rolls (3, 5) and (5, 3) are the same roll, so we count them once, and the same holds for (2, 6) and (6, 2).

Step 6. This leaves 3 favourable outcomes.

Step 7. The probability is 3 / 36 = 1/12.

Step 8. As a check, the most likely sum is 7, with probability 6/36.

Step 9. A sum of 8 is next to 7, so its probability should be a little smaller, and 1/12 is smaller.

Step 10. The probability that the sum is 8 is 1/12.

# Answer

\\frac{1}{12}"""
_SHOT_2_ANSWER = (
    '{"validity": [1, 1, 1, 1, -1, -1, -1, 1, 0, -1], "redundancy": [-1, -0.5, 0, -1, -1, -0.5, -0.5, 1, 1, 0]}'
)

#: The worked examples as (user turn, assistant answer) pairs; ``shots=k`` uses the first k.
FEW_SHOTS: tuple[tuple[str, str], ...] = ((_SHOT_1_QUESTION, _SHOT_1_ANSWER), (_SHOT_2_QUESTION, _SHOT_2_ANSWER))

#: Identifies the prompt texts in run.json, so a resume never mixes answers to two different prompts.
PROMPT_VERSION = hashlib.sha256(
    json.dumps([SYSTEM_PROMPT, FEW_SHOTS]).encode("utf-8")
).hexdigest()[:12]


#: The endpoint refuses every request or cannot be reached (:class:`prmbench_fast.endpoint.EndpointError`): the
#: run stops, and nothing is stored for the samples in flight, because storing them invalid would keep a resume from
#: asking again. The name critic callers catch.
CriticEndpointError = EndpointError


# --------------------------------------------------------------------------------------------------- prompt


def default_system_role(api_model: str) -> str:
    """The role of the system prompt: "user" for the o1 models the official adapter lists, else "system"."""
    return "user" if api_model in O1_MODELS else "system"


def default_temperature(api_model: str) -> float:
    """The official sampling temperature: 1.0 for the o1 models (they accept no other), else 0."""
    return 1.0 if api_model in O1_MODELS else 0.0


def critic_query(sample: Sample) -> str:
    """The user turn for a sample, with the official quirks kept: a space before "Solutions", "Step i:" with a colon
    (the worked examples use "Step i."), a space after each step, and step numbers removed by ``clean_step`` first."""
    steps = "".join(f"Step {i}: {clean_step(step)} \n\n" for i, step in enumerate(sample.steps, start=1))
    return f"Question: {sample.question}\n\n Solutions: {steps}"


def build_messages(sample: Sample, *, shots: int = 2, system_role: str = "system") -> list[dict[str, str]]:
    """The chat messages for one sample: the system prompt (as ``system_role``), ``shots`` (user, assistant) example
    pairs, then the query."""
    if not 0 <= shots <= len(FEW_SHOTS):
        raise ValueError(f"shots must be 0, 1 or 2, got {shots}")
    messages = [{"role": system_role, "content": SYSTEM_PROMPT}]
    for question, answer in FEW_SHOTS[:shots]:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": critic_query(sample)})
    return messages


# --------------------------------------------------------------------------------------------------- parsing

# A "//" or "#" comment runs to the end of its line. Like the official cleaner this is blind to JSON strings:
# "http://x" or "#3" inside a string is cut too, which then usually fails to parse (as it does officially).
_COMMENT = re.compile(r"(?://|#)[^\n]*")


def parse_critic_response(text: str | None) -> dict | None:
    """The critic's JSON answer, or None when the answer is unusable (the official rules exactly).

    The text is scanned for brace-balanced ``{...}`` blocks, counting every brace (also those inside JSON
    strings). Each complete block in turn has its // and # comments removed and is parsed as JSON; a block that
    fails to parse is skipped. The first block that parses is the answer, and it must hold both "validity" and
    "redundancy" (their lengths are not checked against the step count). A "}" met with no "{" open before the
    scan reaches a parsing block makes the whole answer unusable.
    """
    if not isinstance(text, str):
        return None  # e.g. a null message content: the official parser fails on it and stores the sample invalid
    depth = start = 0
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}":
            if depth == 0:
                return None  # unbalanced: the official scan raises here and the whole answer is invalid
            depth -= 1
            if depth == 0:
                try:
                    answer = json.loads(_COMMENT.sub("", text[start : i + 1]))
                except json.JSONDecodeError:
                    continue  # try the next block
                except Exception:  # noqa: BLE001 (e.g. RecursionError on absurd nesting: invalid, as officially)
                    return None
                if isinstance(answer, dict) and "validity" in answer and "redundancy" in answer:
                    return answer
                return None  # the first block that parses decides, even without the keys
    return None


def _score_fields(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The official scores dict of a parsed answer; labels are score > 0. Raises TypeError when a score is not
    comparable with 0 (a string, null, a list...): the official adapter treats that as a failed request."""
    validity, redundancy = answer["validity"], answer["redundancy"]
    return {
        "step_level_validity_scores": validity,
        "step_level_redundancy_scores": redundancy,
        "step_level_validity_labels": [v > 0 for v in validity],
        "step_level_redundancy_labels": [v > 0 for v in redundancy],
    }


def critic_result(sample: Sample, response_text: str | None) -> dict[str, Any]:
    """The official result dict for a critic's answer to ``sample``.

    A usable answer gives ``{"scores": {validity/redundancy scores and labels (score > 0)}, "idx", "validity": True}``;
    an unusable one gives ``{"validity": False, "idx", "original_response": text}`` with no scores, as the official
    adapter stores it (the evaluator skips it; it only lowers the validity rate). An answer that parses but holds
    scores that cannot be compared with 0 is also invalid here; :func:`score_critic` asks again first, as the
    official adapter does.
    """
    return _stored_result(_answer_result, sample, response_text)


def _answer_result(sample: Sample, response_text: str | None) -> dict[str, Any]:
    """:func:`critic_result`, except that scores not comparable with 0 raise TypeError: the asker asks again."""
    answer = parse_critic_response(response_text)
    if answer is None:  # an answer arrived but is unusable: invalid, not asked again (official)
        return {"validity": False, "idx": sample.id, "original_response": response_text}
    return {"scores": _score_fields(answer), "idx": sample.id, "validity": True}


@dataclasses.dataclass(frozen=True)
class CriticProtocol:
    """What a task asks a critic and how an answer becomes a result line; the rest (requests, retries, storage,
    resume) is shared.

    Attributes:
        task: the task whose data and evaluator the results go to.
        messages: sample -> the chat messages of its request.
        result: (sample, answer text or None) -> its result line; raising TypeError means "ask again" (an answer
            that parses but cannot be used, e.g. scores that are not numbers).
        identity: what the answers depend on beside the endpoint and sampling settings (prompt version...), for
            run.json and report.run.
    """

    task: str
    messages: Callable[[Any], list[dict[str, str]]]
    result: Callable[[Any, str | None], dict[str, Any]]
    identity: dict[str, Any]


def prmbench_protocol(*, shots: int = 2, system_role: str = "system", task: str = "prmbench") -> CriticProtocol:
    """The official PRMBench critic: system prompt, ``shots`` worked examples, JSON validity/redundancy scores."""
    if not 0 <= shots <= len(FEW_SHOTS):
        raise ValueError(f"shots must be 0, 1 or 2, got {shots}")
    return CriticProtocol(task, lambda sample: build_messages(sample, shots=shots, system_role=system_role),
                          _answer_result, {"prompt": PROMPT_VERSION, "shots": shots, "system_role": system_role})


def processbench_protocol(critique_template: str | None = None) -> CriticProtocol:
    """The official ProcessBench critic (:mod:`prmbench_fast.tasks.processbench`): one user message from the
    critique template (default: this package's wording of it), the last ``\\boxed{}`` read as the index."""
    from .tasks import processbench

    template = processbench.check_critique_template(
        processbench.CRITIQUE_TEMPLATE if critique_template is None else critique_template)
    version = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    return CriticProtocol("processbench", lambda sample: processbench.critique_messages(sample, template),
                          processbench.critique_result, {"task": "processbench", "prompt": version})


def results_from_responses(dataset: PRMBenchDataset, output_dir: str | os.PathLike,
                           protocol: CriticProtocol | None = None) -> dict[str, dict[str, Any]]:
    """Re-parse the raw answers kept in ``output_dir/responses.jsonl`` (the last line per sample wins: an earlier one
    belongs to an attempt whose result was lost in a crash) with ``protocol``'s parsing (default: PRMBench's).
    Samples that never got an answer are invalid without ``original_response``, as the official adapter stores them.
    Ids not in ``dataset`` are left out."""
    protocol = protocol or prmbench_protocol()
    responses: dict[str, dict[str, Any]] = {}
    with open(pathlib.Path(output_dir) / RESPONSES_FILE, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                record = json.loads(line)
                responses[record["idx"]] = record
    results = {}
    for sample in dataset.samples:
        record = responses.get(sample.id)
        if record is None:
            continue
        if record["answered"]:
            results[sample.id] = _stored_result(protocol.result, sample, record["response"])
        else:
            results[sample.id] = {"validity": False, "idx": sample.id}
    return results


# --------------------------------------------------------------------------------------------------- asking


@dataclasses.dataclass
class _Outcome:
    """What asking about one sample gave: its result, the last answer text and the request figures."""

    result: dict[str, Any]
    response: str | None
    answered: bool  # an answer arrived and decided the result (usable or not); False: every attempt failed
    attempts: int
    errors: list[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _stored_result(result: Callable[[Any, str | None], dict[str, Any]], sample: Any,
                   text: str | None) -> dict[str, Any]:
    """``result(sample, text)``, or invalid where it raises TypeError (an answer the asker would ask again about is
    stored invalid after the last attempt)."""
    try:
        return result(sample, text)
    except TypeError:
        return {"validity": False, "idx": sample.id, "original_response": text}


class _Asker:
    """Asks about one sample with retries (:func:`prmbench_fast.endpoint.call_with_retries`). A failed request is
    retried; HTTP 400/413/422 store the sample invalid at once (the official adapter would ask max_retries times and
    store the same invalid result); 401/403/404 stop the run instead of storing every sample invalid."""

    def __init__(self, client, *, api_model, protocol: CriticProtocol, temperature, max_tokens, extra_body,
                 policy: RetryPolicy):
        self.client = client
        self.api_model = api_model
        self.protocol = protocol
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = extra_body
        self.policy = policy
        self.endpoint = policy.endpoint
        self.stop = policy.stop

    def _request(self, messages) -> Any:
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        if self.extra_body:
            options["extra_body"] = self.extra_body
        return self.client.chat.completions.create(
            model=self.api_model, messages=messages, temperature=self.temperature, **options
        )

    def __call__(self, sample: Sample) -> _Outcome | None:
        messages = self.protocol.messages(sample)
        # Across attempts: the last answer text and the tokens of every completion that arrived.
        answer: dict[str, Any] = {"text": None, "prompt_tokens": 0, "completion_tokens": 0}

        def attempt() -> dict[str, Any]:
            completion = self._request(messages)
            usage = getattr(completion, "usage", None)
            answer["prompt_tokens"] += getattr(usage, "prompt_tokens", 0) or 0
            answer["completion_tokens"] += getattr(usage, "completion_tokens", 0) or 0
            answer["text"] = completion.choices[0].message.content
            return self.protocol.result(sample, answer["text"])  # TypeError: an answer to ask again about

        tried = call_with_retries(attempt, self.policy)
        if tried is None:
            return None
        result = tried.value if tried.succeeded else {"validity": False, "idx": sample.id}
        return _Outcome(result, answer["text"], tried.succeeded, tried.attempts, tried.errors,
                        answer["prompt_tokens"], answer["completion_tokens"])


class _ResponseLog:
    """Appends one raw-answer line per sample, fsync'ed, before its result line is written."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        if path.exists():  # drop a line torn by a kill, so the next append starts clean
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                with open(path, "r+b") as f:
                    f.truncate(end)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, sample_id: str, outcome: _Outcome) -> None:
        record = {"idx": sample_id, "response": outcome.response, "answered": outcome.answered,
                  "attempts": outcome.attempts, "errors": outcome.errors}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:  # a full disk: name the file (a torn line is cut at the next open)
            raise FileWriteError(self.path, err) from None

    def close(self) -> None:
        self.file.close()


def score_critic(
    dataset: PRMBenchDataset | None = None,
    *,
    api_model: str,
    api_base: str | None = None,
    api_key: str | None = None,
    task: str = "prmbench",
    shots: int | None = None,
    critique_template: str | None = None,
    temperature: float | None = None,
    system_role: str | None = None,
    max_tokens: int | None = None,
    concurrency: int = 16,
    max_retries: int = 5,
    retry_interval: float = 1.0,
    timeout: float = 60.0,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    retry_invalid: bool = False,
    progress: bool = True,
    extra_body: Mapping[str, Any] | None = None,
) -> Report:
    """Evaluate an LLM prompted as a critic on PRMBench (or ProcessBench), through an OpenAI-compatible chat endpoint
    (vLLM, SGLang, a hosted API).

    Args:
        dataset: the evaluation set (default: ``load_prmbench(task=task)``).
        api_model: the model name the endpoint serves.
        api_base: the endpoint's base URL, e.g. ``http://localhost:8000/v1`` (default: ``$OPENAI_BASE_URL``, else
            the OpenAI API).
        api_key: the key (default: ``$OPENAI_API_KEY``, else the placeholder "EMPTY" that keyless local servers accept).
        task: "prmbench" (the PRMBench critic protocol) or "processbench" (ProcessBench's critique question: one
            user message, the earliest wrong paragraph's index read from the last ``\\boxed{}``, None when it is
            missing or no int; ``dataset`` from ``load_prmbench(path, task="processbench")``). The official
            ProcessBench runs sample greedily with ``seed=42`` and 8,192 new tokens: pass ``max_tokens=8192,
            extra_body={"seed": 42}`` to match them.
        shots: worked examples before the query, 0, 1 or 2 (official default 2); PRMBench only.
        critique_template: task "processbench": the prompt, a ``str.format`` template with ``{problem}`` and
            ``{tagged_response}`` (default: this package's wording of the official critique template; pass the
            official file's text to send it verbatim).
        temperature: default as the official adapter: 1.0 for o1-mini/o1-preview, else 0.
        system_role: the role of the system prompt; default "user" for o1-mini/o1-preview, else "system" (the
            official vLLM adapter sends it as "user": pass ``system_role="user"`` to match those runs); PRMBench only.
        max_tokens: the answer length limit sent with each request (default: none sent, as the official API adapter).
        concurrency: requests in flight at once.
        max_retries: attempts per sample. Timeouts, connection errors, HTTP 429/5xx and answers whose scores are not
            numbers are retried after ``retry_interval * (1 + failures so far)`` seconds; after the last failure the
            sample is stored invalid (``{"validity": False, "idx"}``), as officially. HTTP 400/413/422 store it invalid
            at once (no retry can change them); 401/403/404 stop the run with :class:`CriticEndpointError`.
        timeout: seconds per request (a Ctrl-C does not wait for requests in flight: it stops at once, keeping
            what finished).
        output_dir: results, raw answers, report.json and table.txt go there as they finish; a re-run with the same
            folder asks nothing about samples already stored, valid or invalid (the official resume reloads invalid
            results too). The folder's identity is the endpoint URL (without credentials), the model, the prompt
            version, shots, system role, temperature, max_tokens and extra_body; a re-run with any of them
            different raises :class:`~prmbench_fast.results_store.RunMismatchError`.
        overwrite: delete the results, raw answers and report in ``output_dir`` first and start over.
        retry_invalid: ask again about the samples stored invalid in ``output_dir`` (unusable answers and samples
            whose every attempt failed); their new results replace the old ones.
        progress: a progress bar on stderr.
        extra_body: extra JSON fields for each request (e.g. ``{"top_k": 1}`` for vLLM).

    Returns:
        The :class:`~prmbench_fast.evaluate.Report` of ``evaluate()`` on every sample's result, with
        ``report.predictions`` (the official result dicts) and ``report.run`` (requests, retries, invalid answers,
        tokens, seconds, requests/s). Task "processbench": the
        :class:`~prmbench_fast.tasks.processbench.ProcessBenchReport` (its ``predictions``: id -> index or None).
    """
    if task == "processbench":
        given = [name for name, value in (("shots", shots), ("system_role", system_role)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: PRMBench critic options; the ProcessBench critic sends one user "
                             "message without examples")
        protocol = processbench_protocol(critique_template)
    elif critique_template is not None:
        raise ValueError("critique_template applies to task='processbench' only")
    else:
        if task not in ("prmbench",):
            raise ValueError(f"critics score task 'prmbench' or 'processbench', not {task!r}")
        system_role = system_role or default_system_role(api_model)
        protocol = prmbench_protocol(shots=2 if shots is None else shots, system_role=system_role)
    if concurrency < 1 or max_retries < 1:
        raise ValueError("concurrency and max_retries must be at least 1")
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    dataset = dataset if dataset is not None else load_prmbench(task=task)
    check_task_dataset(task, dataset)
    temperature = default_temperature(api_model) if temperature is None else float(temperature)
    extra_body = dict(extra_body) if extra_body else None
    api_base = api_base or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or ""
    if api_base:
        check_api_base(api_base)
    elif not api_key:
        raise ValueError("no critic endpoint: pass --api-base (api_base=) or set $OPENAI_BASE_URL for a local server, "
                         "or set $OPENAI_API_KEY for the OpenAI API")
    client_options: dict[str, Any] = {"api_key": api_key or "EMPTY", "max_retries": 0, "timeout": timeout}
    if api_base:
        client_options["base_url"] = api_base
    # Imported once the arguments are known to be good: a mistake is reported whether or not the extra is installed.
    from .extras import require
    openai = require("openai", "critic", "LLM critics through an OpenAI-compatible API")
    # Retries are ours (the official backoff and accounting), hence max_retries=0 for the client.
    client = openai.OpenAI(**client_options)
    endpoint = public_url(str(client.base_url))

    store = None
    if output_dir is not None:
        identity = {"family": "critic", "endpoint": endpoint, "model": api_model, **protocol.identity,
                    "temperature": temperature, "max_tokens": max_tokens, "extra_body": extra_body}
        store = ResultsStore(output_dir, identity, overwrite=overwrite, kind="critic")
    policy = RetryPolicy(max_retries=max_retries, retry_interval=retry_interval, stop=threading.Event(),
                         endpoint=endpoint, mask=masker(api_key, str(client.base_url)),
                         refused_hint="--api-base, --api-model and OPENAI_API_KEY",
                         unreachable_hint="--api-base (or $OPENAI_BASE_URL)", what=f"model {api_model!r}")
    ask = _Asker(client, api_model=api_model, protocol=protocol, temperature=temperature, max_tokens=max_tokens,
                 extra_body=extra_body, policy=policy)
    # The store holds the folder's lock: released on every way out, an exception or Ctrl-C included.
    with store if store is not None else contextlib.nullcontext():
        report = _ask_and_evaluate(dataset, ask, store, concurrency=concurrency, overwrite=overwrite,
                                   retry_invalid=retry_invalid, progress=progress)
        if store is not None:
            store.write_report(report)
    return report


def _ask_and_evaluate(dataset: Any, ask: _Asker, store: ResultsStore | None, *, concurrency: int,
                      overwrite: bool, retry_invalid: bool, progress: bool) -> Any:
    """Resume from ``store``, ask about every other sample, store the answers as they arrive, evaluate them all."""
    finished: dict[str, dict[str, Any]] = {}
    responses = None
    if store is not None:
        if overwrite:
            (store.dir / RESPONSES_FILE).unlink(missing_ok=True)
        finished = store.finished(dataset)
        if retry_invalid:
            invalid = {i for i, r in finished.items() if "validity" in r and not r["validity"]}
            store.forget(invalid)
            finished = {i: r for i, r in finished.items() if i not in invalid}
        responses = _ResponseLog(store.dir / RESPONSES_FILE)
    todo = [s for s in dataset.samples if s.id not in finished]

    bar = progress_bar(progress, unit="sample", desc="prmbench critic", total=len(todo))
    new_results: list[dict[str, Any]] = []
    requests = unparseable = unanswered = prompt_tokens = completion_tokens = 0
    start = time.perf_counter()
    try:
        for sample, outcome in ask_all(ask, todo, concurrency, ask.stop):
            requests += outcome.attempts
            prompt_tokens += outcome.prompt_tokens
            completion_tokens += outcome.completion_tokens
            unanswered += not outcome.answered
            unparseable += outcome.answered and not outcome.result["validity"]
            if responses is not None:
                responses.write(sample.id, outcome)
                store.append([outcome.result])
            new_results.append(outcome.result)
            bar.set_postfix(invalid=unparseable + unanswered, refresh=False)
            bar.update(1)
    finally:
        ask.stop.set()
        bar.close()
        if responses is not None:
            responses.close()
    seconds = time.perf_counter() - start

    ordered = ordered_predictions(dataset, finished, new_results)
    task = ask.protocol.task
    report = evaluate(dataset, ordered, task=task)
    report.run = {
        "family": "critic",
        "task": task,
        "model": ask.api_model,
        "api_base": ask.endpoint,
        **ask.protocol.identity,
        "temperature": ask.temperature,
        "samples_scored": len(todo),
        "samples_resumed": len(finished),
        "unknown_stored_ids": len(store.unknown_ids) if store is not None else 0,
        "requests": requests,
        "retries": requests - len(todo),
        "invalid_answers": unparseable,
        "failed_samples": unanswered,
        "invalid_predictions": sum(1 for r in ordered.values() if "validity" in r and not r["validity"]),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "seconds": seconds,
        "requests_per_second": requests / seconds if seconds > 0 else None,
        "samples_per_second": len(todo) / seconds if seconds > 0 else None,
        "concurrency": concurrency,
    }
    if task != "processbench":  # a ProcessBench report's predictions are the indices its evaluator read
        report.predictions = ordered
    return report
