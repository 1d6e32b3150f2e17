"""The PRMBench loader: the official evaluation set from every kind of source, and clear errors on bad input."""

import json

import pytest

from prmbench_fast.testing.official_oracle import build_eval_set
from prmbench_fast import PRMBenchDataError, load_prmbench
from prmbench_fast.classes import ERROR_CLASSES

# SPEC §1.4, obtained by running the official loader on the full data: samples, steps, positive steps, in-range
# error steps per class.
SPEC_CLASS_TABLE = {
    "correct": (758, 10832, 10832, 0),
    "redundency": (758, 11613, 10076, 1537),
    "circular": (758, 7813, 5678, 2135),
    "step_contradiction": (758, 10765, 9573, 1192),
    "confidence": (757, 10748, 9444, 1304),
    "counterfactual": (757, 10477, 8403, 2074),
    "domain_inconsistency": (757, 10031, 8693, 1338),
    "missing_condition": (756, 9613, 7744, 1869),
    "deception": (750, 10070, 8370, 1700),
    "multi_solutions": (160, 2241, 2241, 0),
}


@pytest.fixture(scope="module")
def raw_rows(prmbench_jsonl):
    with open(prmbench_jsonl) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl)


def test_full_data_gives_the_official_evaluation_set(full):
    assert len(full) == 6969
    table = {}
    for s in full:
        n, steps, pos, neg = table.get(s.classification, (0, 0, 0, 0))
        in_range = len({e for e in s.error_steps if e <= len(s.steps)})
        table[s.classification] = (n + 1, steps + len(s.steps), pos + len(s.steps) - in_range, neg + in_range)
    assert table == SPEC_CLASS_TABLE
    assert sum(1 for s in full if s.classification != "correct") == 6211


def test_samples_equal_the_plain_loader_transcription(full, raw_rows):
    expected = build_eval_set(raw_rows)
    assert [s.id for s in full] == [e["idx"] for e in expected]
    for sample, e in zip(full, expected):
        assert list(sample.steps) == e["steps"]
        assert list(sample.error_steps) == e["error_steps"]
        assert sample.classification == e["classification"]


def test_every_error_sample_has_its_correct_partner(full):
    for s in full:
        if s.classification == "correct":
            assert s.partner_id is None and s.domain is None
        else:
            assert s.partner_id in full
            assert full.by_id[s.partner_id].source_idx == s.source_idx


def test_tolerated_anomalies_are_kept_and_counted(full):
    diag = full.diagnostics
    assert diag.raw_rows == 6216
    # multi_solutions holds 5 duplicated idx; the first line in the file wins, as in the official loader.
    assert [d[2] for d in diag.duplicate_rows] == [f"multi_solutions_prm_test_p2_{n}" for n in (863, 889, 997, 1053, 1058)]
    assert len(diag.out_of_range_error_steps) == 100
    assert sum(len(v) for v in diag.out_of_range_error_steps.values()) == 151
    for sample_id, past_end in diag.out_of_range_error_steps.items():
        assert set(past_end) <= set(full.by_id[sample_id].error_steps)  # kept in the sample
    assert len(diag.unsorted_error_steps) == 3
    summary = diag.summary()
    assert summary["duplicate_rows"] == 5 and summary["out_of_range_error_steps"] == 151


def _write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_first_of_two_duplicate_rows_is_kept(tmp_path, raw_rows):
    rows = [r for r in raw_rows if r["idx"] == "prm_test_p2_863" and r["classification"] == "multi_solutions"]
    ds = load_prmbench(_write_rows(tmp_path, rows))
    assert [s.id for s in ds] == ["multi_solutions_prm_test_p2_863"]
    assert list(ds[0].steps) == rows[0]["modified_process"]
    assert ds.diagnostics.duplicate_rows == [(str(tmp_path / "data.jsonl"), 2, "multi_solutions_prm_test_p2_863")]


def test_class_prefixed_ids_give_the_same_samples(tmp_path, raw_rows):
    rows = raw_rows[:400]
    prefixed = [dict(r, idx=f"{r['classification']}_{r['idx']}") for r in rows]
    bare = load_prmbench(_write_rows(tmp_path, rows, "bare.jsonl"))
    hub_form = load_prmbench(_write_rows(tmp_path, prefixed, "prefixed.jsonl"))
    assert [s.id for s in hub_form] == [s.id for s in bare]
    assert [s.partner_id for s in hub_form] == [s.partner_id for s in bare]


def test_folder_of_jsonl_files_is_read_in_file_name_order(tmp_path, full, raw_rows):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "nested").mkdir()  # not read: the official loader is not recursive
    (folder / "nested" / "z.jsonl").write_text(json.dumps(raw_rows[0]) + "\n")
    (folder / "notes.txt").write_text("not data")
    for name, chunk in (("a.jsonl", raw_rows[:2000]), ("b.jsonl", raw_rows[2000:4000]), ("c.jsonl", raw_rows[4000:])):
        _write_rows(folder, chunk, name)
    from_folder = load_prmbench(folder)
    assert [s.id for s in from_folder] == [s.id for s in full]
    assert len(from_folder.diagnostics.sources) == 3


def test_hub_dataset_id_is_loaded_with_datasets(tmp_path, monkeypatch, raw_rows):
    datasets = pytest.importorskip("datasets")
    local = _write_rows(tmp_path, raw_rows[:300], "prmbench_preview.jsonl")
    real_load = datasets.load_dataset
    calls = []

    def offline_hub(name, *args, **kwargs):
        # No hub here: serve the hub id from a local copy with the same file layout, through datasets' own json builder.
        calls.append((name, kwargs.get("split")))
        return real_load("json", data_files=str(local), split=kwargs["split"], cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    monkeypatch.delenv("PRMBENCH_DATA", raising=False)
    from_hub = load_prmbench()
    assert calls == [("hitsmy/PRMBench_Preview", "train")]
    assert [s.id for s in from_hub] == [s.id for s in load_prmbench(local)]
    assert from_hub.diagnostics.sources == ["hub:hitsmy/PRMBench_Preview"]


def test_env_var_names_the_default_source(monkeypatch, tmp_path, raw_rows):
    path = _write_rows(tmp_path, raw_rows[:50])
    monkeypatch.setenv("PRMBENCH_DATA", str(path))
    assert [s.id for s in load_prmbench()] == [s.id for s in load_prmbench(path)]


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl: not found"):
        load_prmbench(tmp_path / "absent.jsonl")
    with pytest.raises(PRMBenchDataError, match="no .jsonl files"):
        load_prmbench(tmp_path)


def test_stratified_subset_is_deterministic_and_brings_partners(full):
    sub = full.subset(limit_per_class=4)
    again = full.subset(limit_per_class=4)
    assert [s.id for s in sub] == [s.id for s in again]
    counts = sub.class_counts()
    assert all(counts[c] == 4 for c in ERROR_CLASSES)
    for s in sub:
        if s.partner_id:
            assert s.partner_id in sub
    # The same source problems are chosen across classes where the data allows it.
    problems = {s.source_idx for s in sub if s.classification != "correct"}
    assert len(problems) == 4 and counts["correct"] == 4
    assert [s.id for s in sub] == [s.id for s in full if s.id in sub]  # data order kept


def test_subset_by_class(full, prmbench_jsonl):
    sub = load_prmbench(prmbench_jsonl, classes=["circular", "deception"], limit_per_class=10)
    counts = sub.class_counts()
    assert counts["circular"] == 10 and counts["deception"] == 10
    assert set(counts) == {"circular", "deception", "correct"}
    with pytest.raises(ValueError, match="unknown PRMBench classes"):
        full.subset(classes=["circle"])


GOOD_ROW = {
    "idx": "prm_test_p1_0",
    "classification": "redundency",
    "original_question": "q",
    "original_process": ["a", "b"],
    "modified_question": "q",
    "modified_process": ["a", "b", "c"],
    "error_steps": [2],
}


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda r: r.pop("modified_process"), "modified_process", "missing field"),
        (lambda r: r.update(modified_question=3), "modified_question", "expected str"),
        (lambda r: r.update(modified_process=[]), "modified_process", "empty solution"),
        (lambda r: r.update(modified_process=["a", 7]), r"modified_process\[1\]", "expected str"),
        (lambda r: r.update(error_steps=[0]), r"error_steps\[0\]", "positive"),
        (lambda r: r.update(error_steps=[2, -1]), r"error_steps\[1\]", "positive"),
        (lambda r: r.update(error_steps=[1.5]), r"error_steps\[0\]", "positive"),
        (lambda r: r.update(error_steps=[True]), r"error_steps\[0\]", "positive"),
        (lambda r: r.update(error_steps="2"), "error_steps", "expected list"),
        (lambda r: r.update(classification="circle"), "classification", "unknown class"),
        (lambda r: r.pop("idx"), "idx", "missing field"),
        (lambda r: r.update(original_process=[]), "original_process", "empty solution"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, mutate, field, problem):
    bad = dict(GOOD_ROW, modified_process=list(GOOD_ROW["modified_process"]))
    mutate(bad)
    path = _write_rows(tmp_path, [dict(GOOD_ROW, idx="prm_test_p1_1"), bad])
    with pytest.raises(PRMBenchDataError, match=rf"data\.jsonl, line 2, field '{field}': .*{problem}"):
        load_prmbench(path)


def test_invalid_json_and_non_object_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n{not json\n")
    with pytest.raises(PRMBenchDataError, match=r"data\.jsonl, line 3: invalid JSON"):
        load_prmbench(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(PRMBenchDataError, match=r"line 1: expected a JSON object"):
        load_prmbench(path)


def test_blank_steps_are_kept_and_counted(tmp_path):
    path = _write_rows(tmp_path, [dict(GOOD_ROW, modified_process=["a", "  ", "c"])])
    ds = load_prmbench(path)
    assert ds.by_id["redundency_prm_test_p1_0"].steps == ("a", "  ", "c")
    assert ds.diagnostics.blank_steps == 1


def test_content_hash_tells_apart_every_change_a_result_depends_on(full):
    """The run identity's data hash: equal for equal content however the set was built, different when a character
    moves across a field boundary, a step is split or dropped, or the error steps change."""
    import dataclasses

    from prmbench_fast.data import PRMBenchDataset

    base = list(full.samples[:3])
    first = base[0]
    assert len(first.steps) >= 2

    def varied(**changes):
        return PRMBenchDataset([dataclasses.replace(first, **changes), *base[1:]]).content_hash

    same = PRMBenchDataset([dataclasses.replace(s) for s in base]).content_hash
    assert same == PRMBenchDataset(base).content_hash
    s0, s1 = first.steps[0], first.steps[1]
    variants = {
        "a character moved from step 1 to step 2": varied(steps=(s0[:-1], s0[-1] + s1, *first.steps[2:])),
        "a character moved from the question to step 1": varied(question=first.question[:-1],
                                                                 steps=(first.question[-1] + s0, *first.steps[1:])),
        "steps 1 and 2 joined": varied(steps=(s0 + s1, *first.steps[2:])),
        "an empty step appended": varied(steps=(*first.steps, "")),
        "error steps changed": varied(error_steps=(*first.error_steps, 99)),
        "the id changed": varied(id=first.id + "x"),
        "a lone surrogate in a step": varied(steps=(s0 + "\ud800", *first.steps[1:])),
    }
    assert same not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


def test_content_hash_is_the_joined_text_with_its_lengths(full):
    """content_hash hashes runs of ASCII strings apart from the non-ASCII ones; the digest is the one its definition
    gives, computed here from the whole set's strings as one UTF-8 text, on the full benchmark (a few hundred non-ASCII
    strings among ~100k) and on a set whose ASCII and non-ASCII strings alternate, with a lone surrogate."""
    import dataclasses
    import hashlib

    import numpy as np

    from prmbench_fast.data import PRMBenchDataset

    def by_definition(samples):
        strings = [text for s in samples for text in (str(s.id), s.question, *s.steps)]
        digest = hashlib.sha256("".join(strings).encode("utf-8", "surrogatepass"))
        digest.update(np.array([len(t) for t in strings], dtype=np.int64).tobytes())
        digest.update(np.array([len(s.steps) for s in samples], dtype=np.int64).tobytes())
        digest.update(json.dumps([s.error_steps for s in samples]).encode("ascii"))
        return digest.hexdigest()[:16]

    first, second = full.samples[:2]
    mixed = [dataclasses.replace(first, question="x² ≤ y", steps=("plain", "π/2", "\ud800", "", "plain again")),
             dataclasses.replace(second, steps=("é", *second.steps))]
    assert sum(not t.isascii() for s in full.samples for t in (s.question, *s.steps)) > 0
    for samples in (full.samples, mixed):
        assert PRMBenchDataset(samples).content_hash == by_definition(samples)
