"""The vLLM engines without vLLM: the families' STEP-pooling mapping and refusals, the checks on what an engine
returns, argument validation, and the pooling-API client against a stub server (tests/pooling_server.py) that
computes what vLLM computes with the transformers model."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from conftest import PRMBENCH_JSONL
from family_testing import ATOL, RTOL
from pooling_server import PoolingStub, save_tiny_qwen_prm
from prmbench_fast import load_prmbench, score
from prmbench_fast.cli import main
from prmbench_fast.endpoint import EndpointError
from prmbench_fast.engines.step_pooled import Prompt, chunk_predictions, chunked, prompts
from prmbench_fast.extras import MissingExtraError
from prmbench_fast.families import FAMILY_NAMES, Family, FamilyError, family_class
from prmbench_fast.families.base import Encoded
from prmbench_fast.families.qwen_prm import QwenPRMFamily
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

MAX_LENGTH = 512  # some PRMBench samples fit whole, others lose steps to the cut
NAME = "served-prm"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen_prm(tmp_path_factory.mktemp("tiny_qwen_prm"), MAX_LENGTH)


@pytest.fixture(scope="module")
def family(checkpoint):
    import transformers

    return QwenPRMFamily(transformers.AutoTokenizer.from_pretrained(str(checkpoint)))


@pytest.fixture(scope="module")
def dataset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=1)


@pytest.fixture
def stub(checkpoint, family):
    pytest.importorskip("openai")  # the pooling-API client's HTTP client (the critic extra)
    servers = []

    def start(script=("ok",)):
        model = QwenPRMFamily.load_model(str(checkpoint)).eval()
        servers.append(PoolingStub(model, family.separator_id, script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def api_score(checkpoint, dataset, url, **options):
    options = {"family": "qwen_prm", "max_length": MAX_LENGTH, "batch_tokens": 1024, "progress": False,
               "retry_interval": 0.01, **options}
    return score(str(checkpoint), dataset, engine="pooling-api", api_base=url, api_model=NAME, **options)


# -- the families' mapping --------------------------------------------------------------------------------------------
def test_qwen_prm_maps_to_its_own_head_at_the_separator(family):
    pooling = family.step_pooling()
    assert pooling.step_tag_id == family.separator_id and pooling.lm_head_tokens is None
    assert pooling.pooler_config() == {"pooling_type": "STEP", "step_tag_id": family.separator_id}
    assert pooling.engine_args() == {}
    probs = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    assert torch.equal(pooling.scores(probs), torch.tensor([0.75, 0.1]))
    with pytest.raises(FamilyError, match="qwen_prm: official_mixed_precision='bf16' is a reading of the torch"):
        QwenPRMFamily(family.tokenizer, official_mixed_precision="bf16").step_pooling()


def test_math_shepherd_maps_to_a_head_of_its_two_lm_head_rows():
    from family_testing import llama_tokenizer

    tokenizer = llama_tokenizer(["Step 1: x ки\n+ - + -", "a + b - c ки"] * 4, vocab_size=120,
                                extra_alphabet=["к", "и"])
    fam = family_class("math_shepherd")(tokenizer)
    pooling = fam.step_pooling()
    assert pooling.step_tag_id == fam.tag_id and pooling.score_class == 0  # P("+")
    assert tokenizer.convert_tokens_to_ids(list(pooling.lm_head_tokens)) == list(fam.good_bad_ids)
    assert pooling.engine_args() == {"convert": "classify", "hf_overrides": {
        "classifier_from_token": list(pooling.lm_head_tokens), "method": "no_post_processing"}}
    args = pooling.server_args()
    assert args[args.index("--convert") + 1] == "classify"
    assert json.loads(args[args.index("--hf-overrides") + 1])["classifier_from_token"] == list(pooling.lm_head_tokens)


def test_every_family_maps_or_says_why_not():
    for name in FAMILY_NAMES:
        cls = family_class(name)
        maps = cls.step_pooling is not Family.step_pooling
        assert maps or cls.step_pooling_refusal != Family.step_pooling_refusal, name
    assert {n for n in FAMILY_NAMES if family_class(n).step_pooling is not Family.step_pooling} == {
        "qwen_prm", "math_shepherd"}


def test_a_refused_family_is_named_with_its_reason(tmp_path, dataset):
    tokenizer = train_tokenizer(["What is 1 + 1? Step one. Verdict: + -"] * 4)
    with pytest.raises(FamilyError, match=r"^generic: cannot be scored with STEP pooling \(vLLM\): its head is"):
        family_class("generic")(tokenizer).step_pooling()
    # Through score(): refused before anything is asked or written.
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    with pytest.raises(FamilyError, match="lm_judge: cannot be scored with STEP pooling"):
        score(str(tmp_path / "llama"), dataset, family="lm_judge", engine="pooling-api", api_base="http://127.0.0.1:9",
              api_model=NAME, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- prompts and the engine's answers ----------------------------------------------------------------------------------
class _SkipsATag(QwenPRMFamily):
    """Reads rewards at all separators but the first: STEP pooling would read one more."""

    name = "qwen_prm_skipping_a_tag"  # its own encoding cache key

    def encode_many(self, samples):
        return [Encoded(e.input_ids, e.reward_pos[1:]) for e in super().encode_many(samples)]


def test_prompts_are_the_familys_ids_cut_and_their_tags_must_be_the_reward_positions(family, dataset):
    positions = list(range(len(dataset)))
    got = prompts(family, family.step_pooling(), dataset, positions, max_length=MAX_LENGTH, cache_dir=None)
    for prompt, sample in zip(got, dataset.samples):
        full = family.encode(sample)
        assert prompt.ids == full.input_ids[:MAX_LENGTH]
        assert prompt.num_steps == sum(p < MAX_LENGTH for p in full.reward_pos)
        assert prompt.dropped == len(full.reward_pos) - prompt.num_steps
    assert any(p.dropped for p in got) and any(not p.dropped for p in got)  # the cut is exercised
    skipping = _SkipsATag(family.tokenizer)
    with pytest.raises(FamilyError, match=f"sample {dataset.samples[0].id!r}: STEP pooling reads at every token"):
        prompts(skipping, skipping.step_pooling(), dataset, positions, max_length=MAX_LENGTH, cache_dir=None)


def test_chunks_hold_at_most_batch_tokens_tokens():
    items = [Prompt(i, [0] * n, 0, 0) for i, n in enumerate([3, 4, 9, 1, 1, 12, 2])]
    chunks = chunked(items, 8)
    assert [[p.position for p in c] for c in chunks] == [[0, 1], [2], [3, 4], [5], [6]]
    assert chunked([], 8) == []


def test_the_engines_answer_is_checked_per_sample(family, dataset):
    pooling = family.step_pooling()
    chunk = [Prompt(0, [1, 2], 2, 0), Prompt(1, [3], 0, 0)]
    good = [torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.zeros(0, 2)]
    part = chunk_predictions(family, pooling, dataset, chunk, good)
    assert part.cu_steps.tolist() == [0, 2, 2] and part.sample_pos.tolist() == [0, 1]
    assert part.validity_scores.tolist() == pytest.approx([0.8, 0.4]) and part.validity_labels.tolist() == [True, False]
    first = dataset.samples[0].id
    with pytest.raises(FamilyError, match=rf"sample {first!r}: the engine returned probabilities of shape \(1, 2\) for 2"):
        chunk_predictions(family, pooling, dataset, chunk, [good[0][:1], good[1]])
    with pytest.raises(FamilyError, match=rf"sample {first!r}: .* shape \(2, 3\)"):
        chunk_predictions(family, pooling, dataset, chunk, [torch.full((2, 3), 0.3), good[1]])
    with pytest.raises(FamilyError, match=rf"sample {first!r}: the engine returned values outside \[0, 1\]"):
        chunk_predictions(family, pooling, dataset, chunk, [good[0] * 3, good[1]])
    with pytest.raises(FamilyError, match="returned 1 outputs for 2 prompts"):
        chunk_predictions(family, pooling, dataset, chunk, good[:1])


# -- argument validation -----------------------------------------------------------------------------------------------
def test_engine_arguments_are_checked_up_front(checkpoint, dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'; choose one of: torch, vllm, pooling-api"):
        score(str(checkpoint), dataset, engine="tensorrt")
    live = QwenPRMFamily.load_model(str(checkpoint))
    with pytest.raises(TypeError, match="engine='vllm' needs the checkpoint folder .* got Qwen2ForProcessRewardModel"):
        score(live, dataset, engine="vllm")
    with pytest.raises(ValueError, match="device: options of engine='torch'"):
        score(str(checkpoint), dataset, engine="vllm", device="cpu")
    with pytest.raises(ValueError, match="family='critic' asks an OpenAI-compatible chat endpoint"):
        score("gpt", dataset, family="critic", engine="vllm")
    with pytest.raises(ValueError, match="needs api_base .* and api_model"):
        score(str(checkpoint), dataset, engine="pooling-api", api_base="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="--pooling-api / api_base must be an http:// or https:// URL"):
        score(str(checkpoint), dataset, engine="pooling-api", api_base="localhost:8000", api_model=NAME)


def test_without_vllm_the_error_says_where_to_get_it(checkpoint, dataset, tmp_path):
    if _has_vllm():
        pytest.skip("vLLM is installed in this environment")
    with pytest.raises(MissingExtraError, match=r"engine='vllm' needs vLLM.*make vllm-env.*pip install vllm"):
        score(str(checkpoint), dataset, engine="vllm", family="qwen_prm", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# -- the pooling-API client ------------------------------------------------------------------------------------------
def test_pooling_api_equals_score_and_resumes(stub, checkpoint, family, dataset, tmp_path):
    server = stub()
    out = tmp_path / "api"
    report = api_score(checkpoint, dataset, server.url, output_dir=out, concurrency=2)
    reference = score(str(checkpoint), dataset, family="qwen_prm", max_length=MAX_LENGTH, progress=False,
                      output_dir=tmp_path / "torch")
    # The requests: the family's ids cut at max_length, every sample once, at most batch_tokens tokens per request.
    sent = [ids for body in server.bodies for ids in body["input"]]
    assert all(b["path"] == "/pooling" and b["model"] == NAME and b["task"] == "token_classify" for b in server.bodies)
    assert sorted(map(tuple, sent)) == sorted(tuple(family.encode(s).input_ids[:MAX_LENGTH]) for s in dataset.samples)
    assert len(server.bodies) > 1
    assert all(sum(map(len, b["input"])) <= 1024 or len(b["input"]) == 1 for b in server.bodies)
    # The same predictions as score(): labels exact, scores within fp32 rounding of the packed forward.
    ours = {json.loads(line)["idx"]: json.loads(line)["scores"]
            for line in (out / "results.jsonl").read_text().splitlines()}
    theirs = {json.loads(line)["idx"]: json.loads(line)["scores"]
              for line in (tmp_path / "torch" / "results.jsonl").read_text().splitlines()}
    assert ours.keys() == theirs.keys()
    for sample_id, scores in ours.items():
        assert scores["step_level_validity_labels"] == theirs[sample_id]["step_level_validity_labels"]
        torch.testing.assert_close(torch.tensor(scores["step_level_validity_scores"]),
                                   torch.tensor(theirs[sample_id]["step_level_validity_scores"]), atol=ATOL, rtol=RTOL)
    assert report.official == reference.official
    for key in ("samples_scored", "tokens", "truncated_samples", "rewards_lost_to_truncation"):
        assert report.run[key] == reference.run[key], key
    assert (out / "report.json").is_file() and json.loads((out / "run.json").read_text())["engine"] == "pooling-api"
    # Resumed whole: nothing asked again, the same report.
    asked = len(server.bodies)
    again = api_score(checkpoint, dataset, server.url, output_dir=out)
    assert len(server.bodies) == asked and again.run["samples_resumed"] == len(dataset)
    assert again.official == report.official


def test_pooling_api_errors(stub, checkpoint, dataset, tmp_path):
    small = dataset
    first = small.samples[0].id
    with pytest.raises(FamilyError, match=f"sample {first!r}: the engine returned probabilities of shape"):
        api_score(checkpoint, small, stub(["drop"]).url, batch_tokens=10**6)
    server = stub([("status", 503), "ok"])
    assert api_score(checkpoint, small, server.url, batch_tokens=10**6).run["samples_scored"] == len(small)
    assert len(server.bodies) == 2  # retried once
    with pytest.raises(EndpointError, match=r"answered HTTP 404 .*check --pooling-api \(the server's root URL"):
        api_score(checkpoint, small, stub().url + "/v1")
    out = tmp_path / "run"
    with pytest.raises(EndpointError, match=r"gave no usable answer .* after 2 attempt\(s\): ValueError: the /pooling"):
        api_score(checkpoint, small, stub(["malformed"]).url, max_retries=2, batch_tokens=10**6, output_dir=out)
    results = out / "results.jsonl"
    assert not results.exists() or results.read_text() == ""  # nothing stored for the failed request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(EndpointError, match=r"cannot be reached .* after 2 attempt\(s\); check --pooling-api"):
        api_score(checkpoint, small, f"http://127.0.0.1:{closed}", max_retries=2)


def test_the_command_line_scores_through_a_pooling_api(stub, checkpoint, capsys, tmp_path):
    server = stub()
    common = ["score", "--model", str(checkpoint), "--family", "qwen_prm", "--data", str(PRMBENCH_JSONL),
              "--limit-per-class", "1", "--max-length", str(MAX_LENGTH), "--no-progress"]
    assert main(common + ["--pooling-api", server.url]) == 2
    assert "--pooling-api needs --api-model" in capsys.readouterr().err
    assert main(common + ["--pooling-api", server.url, "--api-model", NAME, "--device", "cpu"]) == 2
    assert "--device: not for --pooling-api" in capsys.readouterr().err
    assert main(common + ["--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size applies to --engine vllm only" in capsys.readouterr().err
    assert main(common + ["--pooling-api", server.url, "--api-model", NAME, "--output-dir", str(tmp_path / "r")]) == 0
    assert "qwen_prm on" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "run.json").read_text())["api_model"] == NAME
