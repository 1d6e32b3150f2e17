"""The Lightning PRMBenchCallback in a real Lightning fit: a tiny token-classification PRM trained on CPU, scored at every
validation, logged through pl_module.log so that ModelCheckpoint(monitor="prmbench/Overall") keeps the best checkpoint
and EarlyStopping stops on the series; under DDP (two gloo ranks) every rank logs the same values; mistakes raise when
the callback is built or in setup(), before the first step."""

import sys

import numpy as np
import pytest
import torch
from transformers import DataCollatorForTokenClassification

# The `lightning` extra: stacks without it (the floor stack) test the missing-package message elsewhere.
pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402

from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.extras import MissingExtraError
from prmbench_fast.integrations import lightning as pb_lightning
from prmbench_fast.integrations.lightning import PRMBenchCallback
from prmbench_fast.testing.tiny_models import tiny_llama
from subprocess_testing import rank_results, run_two_ranks
from test_callback import make_tokenizer, prm_examples

SCORE_OPTIONS = dict(family="generic", max_length=512)


@pytest.fixture(scope="module")
def subset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=1)


@pytest.fixture(scope="module")
def tokenizer(subset):
    return make_tokenizer(subset)


class PRMSteps:
    """A token-classification PRM as a LightningModule (the PRM in ``self.model``, as the callback looks for it)."""

    def __init__(self, model, learning_rate=3e-2):
        super().__init__()
        self.model, self.learning_rate = model, learning_rate

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate)


class PRMModule(PRMSteps, pl.LightningModule):
    pass


class Series(pl.Callback):
    """What a monitor sees after each validation: (global step, prmbench/Overall)."""

    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append((trainer.global_step, float(trainer.callback_metrics["prmbench/Overall"])))


def loaders(tokenizer):
    examples = prm_examples(tokenizer)
    collate = DataCollatorForTokenClassification(tokenizer, return_tensors="pt")
    return (torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=collate),
            torch.utils.data.DataLoader(examples[:2], batch_size=2, collate_fn=collate))


def fit(tmp_path, module, tokenizer, callbacks, *, max_steps, **trainer_options):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=1,
                         check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=callbacks, **trainer_options)
    train, val = loaders(tokenizer)
    trainer.fit(module, train, val)
    return trainer


def test_model_checkpoint_keeps_the_best_prmbench_checkpoint_and_early_stopping_reads_it(tmp_path, subset, tokenizer):
    torch.manual_seed(0)
    module = PRMModule(tiny_llama(len(tokenizer), head="token_classification"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="prmbench/Overall", mode="max", save_top_k=1,
                                 filename="{step}")
    stopper = EarlyStopping(monitor="prmbench/Overall", mode="max", patience=2)
    series = Series()
    fit(tmp_path, module, tokenizer, [PRMBenchCallback(subset, tokenizer=tokenizer, **SCORE_OPTIONS), series,
                                      checkpoint, stopper], max_steps=12)
    steps = [step for step, _ in series.values]
    overall = np.array([value for _, value in series.values])
    # Early stopping (patience 2): the second validation in a row that does not beat the best before it.
    worse = [i for i in range(1, len(overall)) if overall[i] <= overall[:i].max()]
    stop = next((steps[i] for k, i in enumerate(worse[1:]) if i == worse[k] + 1), 12)
    assert steps == list(range(1, stop + 1))
    best = steps[int(np.argmax(overall))]
    assert best != steps[-1], f"the series {overall} does not test keeping an earlier checkpoint"
    assert float(checkpoint.best_model_score) == overall.max()
    assert checkpoint.best_model_path.endswith(f"step={best}.ckpt")
    # The checkpoint kept holds the weights that scored the best Overall (logged in float32 by Lightning).
    best_module = PRMModule(tiny_llama(len(tokenizer), head="token_classification"))
    best_module.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    report = score(best_module.model, subset, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert np.float32(report.table["Overall"]) == overall.max()


def test_every_n_steps_and_validation_score_once_per_step(tmp_path, subset, tokenizer):
    """every_n_steps=2 and a validation at every step: steps 2 and 4 are scored once each, and the values logged at a
    step are a fresh score() of that step's weights (the last one checked)."""
    calls = []
    callback = PRMBenchCallback({"all": subset}, tokenizer=tokenizer, every_n_steps=2, **SCORE_OPTIONS)
    original = callback.scoring.score
    callback.scoring.score = lambda model, step: calls.append(step) or original(model, step)
    module = PRMModule(tiny_llama(len(tokenizer), head="token_classification"))
    trainer = fit(tmp_path, module, tokenizer, [callback], max_steps=4)
    assert calls == [1, 2, 3, 4]  # the sanity check is not scored; steps 2 and 4 once although both hooks log
    report = score(module.model, subset, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert float(trainer.callback_metrics["prmbench/all/Overall"]) == np.float32(report.table["Overall"])


@pytest.mark.parametrize("options,error,message", [
    (dict(evry_n_steps=5), TypeError, "unexpected keyword argument 'evry_n_steps' .did you mean 'every_n_steps'"),
    (dict(max_lenght=512), TypeError, "did you mean 'max_length'"),
    (dict(family="generik"), ValueError, "unknown PRM family 'generik'"),
    (dict(tokenizer="HuggingFaceTB/SmolLM2-135M"), TypeError, "tokenizer must be a tokenizer object, not a path"),
    (dict(dataset=str(PRMBENCH_JSONL)), TypeError, "dataset must be a PRMBenchDataset .* got a path"),
    (dict(dataset=[]), TypeError, "dataset must be a PRMBenchDataset .* got list"),
    (dict(every_n_steps=0), ValueError, "every_n_steps must be a positive int"),
    (dict(on_validation=False), ValueError, "would never score"),
    (dict(model=3), TypeError, "model must be an attribute name"),
], ids=["misspelled keyword", "misspelled score option", "unknown family", "tokenizer path", "data path", "list",
        "every_n_steps 0", "never scores", "model"])
def test_mistakes_raise_at_construction(subset, tokenizer, options, error, message):
    options = {"dataset": subset, "tokenizer": tokenizer, **options}
    with pytest.raises(error, match=message):
        PRMBenchCallback(options.pop("dataset"), **options)


def test_output_dir_that_is_a_file_is_refused(tmp_path, subset, tokenizer):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output_dir .* exists and is not a folder"):
        PRMBenchCallback(subset, tokenizer=tokenizer, output_dir=tmp_path / "file")


@pytest.mark.parametrize("callback_options,extra,message", [
    (dict(model="prm"), [], "model='prm': PRMModule has no attribute 'prm'"),
    (dict(family="auto", strict=True), [], r"\(family 'generic'\) got an unexpected keyword argument 'strict'"),
    ({}, [ModelCheckpoint(monitor="prmbench/Overal", mode="max")], r"monitor='prmbench/Overal'\) names no value"),
    (dict(tokenizer=None), [], "tokenizer is needed"),
], ids=["no such attribute", "option of another family", "monitor typo", "no tokenizer"])
def test_mistakes_that_need_the_model_raise_in_setup_before_training(tmp_path, subset, tokenizer, callback_options,
                                                                     extra, message):
    options = {"tokenizer": tokenizer, "max_length": 512, **callback_options}
    callback = PRMBenchCallback(subset, **options)
    module = PRMModule(tiny_llama(len(tokenizer), head="token_classification"))
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        fit(tmp_path, module, tokenizer, [callback, *extra], max_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # not one training step ran


def test_family_auto_is_generic_for_token_classification(tmp_path, subset, tokenizer):
    callback = PRMBenchCallback(subset, tokenizer=tokenizer, max_length=512)
    fit(tmp_path, PRMModule(tiny_llama(len(tokenizer), head="token_classification")), tokenizer, [callback],
        max_steps=1)
    assert callback.family == "generic"


def test_the_pytorch_lightning_package_has_its_own_class(tmp_path, subset, tokenizer):
    import pytorch_lightning

    class Module(PRMSteps, pytorch_lightning.LightningModule):
        pass

    callback = pb_lightning.PyTorchLightningPRMBenchCallback(subset, tokenizer=tokenizer, **SCORE_OPTIONS)
    assert isinstance(callback, pytorch_lightning.Callback) and not isinstance(callback, pl.Callback)
    trainer = pytorch_lightning.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1,
                                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                                        default_root_dir=tmp_path, callbacks=[callback])
    train, val = loaders(tokenizer)
    trainer.fit(Module(tiny_llama(len(tokenizer), head="token_classification")), train, val)
    assert "prmbench/Overall" in trainer.callback_metrics


def test_without_lightning_the_error_names_the_install(monkeypatch):
    monkeypatch.setattr(pb_lightning, "_CLASSES", {})
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # what an environment without it gives an import
    with pytest.raises(MissingExtraError, match=r"pip install lightning.*pip install 'prmbench-fast\[lightning\]'"):
        pb_lightning.PRMBenchCallback


DDP_CHILD = r"""
import sys
import lightning.pytorch as pl
import torch
sys.path.insert(0, sys.argv[1])
from lightning.pytorch.callbacks import ModelCheckpoint
from prmbench_fast import load_prmbench
from prmbench_fast.integrations.lightning import PRMBenchCallback
from prmbench_fast.testing.tiny_models import tiny_llama
from subprocess_testing import leave_group, write_rank_result
from test_callback import make_tokenizer
from test_lightning import SCORE_OPTIONS, PRMModule, Series, loaders

data = load_prmbench(sys.argv[2], limit_per_class=1)
tokenizer = make_tokenizer(data)
torch.manual_seed(0)
module = PRMModule(tiny_llama(len(tokenizer), head="token_classification"))
series = Series()
checkpoint = ModelCheckpoint(dirpath=sys.argv[3] + "/ckpt", monitor="prmbench/Overall", mode="max", filename="{step}")
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, val_check_interval=1,
                     check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[3],
                     callbacks=[PRMBenchCallback(data, tokenizer=tokenizer, **SCORE_OPTIONS), series, checkpoint])
train, val = loaders(tokenizer)
trainer.fit(module, train, val)
write_rank_result(sys.argv[3], trainer.global_rank, {"world": trainer.world_size, "series": series.values,
                                                     "best": checkpoint.best_model_path})
leave_group()
"""


def test_under_ddp_every_rank_logs_the_same_values(tmp_path):
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    run_two_ranks(script, REPO_ROOT / "tests", PRMBENCH_JSONL, tmp_path)
    ranks = rank_results(tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [step for step, _ in ranks[0]["series"]] == [1, 2, 3]
    # Both ranks scored (score() is collective) and logged the same values: their checkpoints agree.
    assert ranks[0]["series"] == ranks[1]["series"] and ranks[0]["best"] == ranks[1]["best"]
