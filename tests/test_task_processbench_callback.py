"""One PRMBenchCallback logs PRMBench and ProcessBench side by side: ``processbench/<split>_f1`` and
``processbench/f1`` beside ``prmbench/...``, each equal to score() of the same weights."""

import math

import prmbench_fast
from prmbench_fast import score
from prmbench_fast.testing.processbench_data import write_processbench
from prmbench_fast.testing.tiny_models import tiny_llama
from test_callback import PREFIX, SCORE_OPTIONS, logged, make_tokenizer, train


def test_a_trainer_run_logs_prmbench_and_processbench_from_one_callback(tmp_path, prmbench_jsonl):
    prm = prmbench_fast.load_prmbench(prmbench_jsonl, limit_per_class=1)
    write_processbench(prmbench_jsonl, tmp_path / "pb", limit_per_class=1)
    pb = prmbench_fast.load_prmbench(tmp_path / "pb", task="processbench")
    tokenizer = make_tokenizer(prm)
    model = tiny_llama(len(tokenizer), head="token_classification")
    trainer, _, _ = train(tmp_path, model, tokenizer, {"prmbench": prm, "processbench": pb}, max_steps=2,
                          eval_steps=2, analyses=False)
    entry = next(e for e in trainer.state.log_history if any(k.startswith("processbench/") for k in e))
    expected_pb = score(model, pb, tokenizer=tokenizer, progress=False, task="processbench", **SCORE_OPTIONS)
    expected = {f"processbench/{s}_f1": expected_pb.official[s]["f1"] for s in expected_pb.splits}
    expected["processbench/f1"] = expected_pb.official["average_f1"]
    got = {k: v for k, v in entry.items() if k.startswith("processbench/")}
    assert got and got == {k: v for k, v in expected.items() if not math.isnan(v)}
    assert set(got) <= {f"processbench/{s}_f1" for s in pb.splits} | {"processbench/f1"}
    prm_report = score(model, prm, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert entry[f"{PREFIX}prmbench/Overall"] == logged(prm_report.table, f"{PREFIX}prmbench/")[f"{PREFIX}prmbench/Overall"]
