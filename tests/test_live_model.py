"""score() on wrapped live models: FSDP2 (``fully_shard``) scores exactly like the unsharded model on 2 gloo CPU ranks
(with or without a run folder), every rank running as many backbone forwards, and leaves training untouched; FSDP1 is
refused with a clear error."""

from conftest import PRMBENCH_JSONL, REPO_ROOT
from subprocess_testing import rank_results, run_two_ranks

# Runs under torchrun with 2 ranks; each rank writes its result to its own file beside the run folder (argv[3]).
FSDP_CHILD = r"""
import json, pathlib, sys
from datetime import timedelta
sys.path.insert(0, sys.argv[1])
from subprocess_testing import leave_group, train_step, write_rank_result
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from prmbench_fast import load_prmbench, score
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

data = load_prmbench(sys.argv[2], limit_per_class=3)
tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
# Small batches, so that the two ranks run different numbers of forward passes.
OPTIONS = dict(tokenizer=tokenizer, family="generic", max_length=512, batch_tokens=300, progress=False)


def build():
    return tiny_llama(len(tokenizer), head="token_classification")  # seeded: the same weights every time


single = score(build(), data, **OPTIONS)  # before the process group exists: one process, unsharded
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a collective one rank skips fails, not hangs
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))


def sharded():
    model = build().train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step_of(model, optimizer, step):  # training step `step`: each rank and step its own batch
    return train_step(model, optimizer, len(tokenizer), seed=100 * step + rank)


def full_state(model):
    return {name: p.full_tensor() for name, p in model.named_parameters()}


scored, scored_opt = sharded()
untouched, untouched_opt = sharded()
before_training = score(scored, data, **OPTIONS)  # before any forward through FSDP2's root

losses = [step_of(scored, scored_opt, 0)]
step_weights = full_state(scored)
real_forwards = []  # per backbone forward from here on: whether it ran a batch (padding runs one token)
scored.model.register_forward_hook(  # score() passes input_ids by keyword, training positionally
    lambda module, args, kwargs, output: real_forwards.append((args or (kwargs["input_ids"],))[0].numel() > 1),
    with_kwargs=True)
after_step = score(scored, data, **OPTIONS)
forwards_per_rank = [[None, None]]
dist.all_gather_object(forwards_per_rank[0], [sum(real_forwards), len(real_forwards)])
# With a run folder: its identity (the weights fingerprint, read from each rank's shards) must be one for every rank,
# or the ranks would disagree about the folder.
in_folder = score(scored, data, output_dir=sys.argv[3], **OPTIONS)
losses.append(step_of(scored, scored_opt, 1))
# One sample: rank 1 has no batch and runs a padding forward. FSDP2 must not keep the scoring forwards in the order it
# prefetches by in backward, or the next backward's all-gathers no longer pair up across ranks.
del real_forwards[:]
score(scored, data.restrict_to([next(s.id for s in data if s.classification == "correct")]), **OPTIONS)
forwards_per_rank.append([None, None])
dist.all_gather_object(forwards_per_rank[1], [sum(real_forwards), len(real_forwards)])
losses.append(step_of(scored, scored_opt, 2))
untouched_losses = [step_of(untouched, untouched_opt, step) for step in range(3)]

plain = build()  # unsharded, with the weights `scored` had when it was scored after its first step
with torch.no_grad():
    for name, p in plain.named_parameters():
        p.copy_(step_weights[name])
plain_after_step = score(plain, data, **OPTIONS)

trained = full_state(scored)
result = {
    "single": [single.official, single.table],
    "before_training": [before_training.official, before_training.table],
    "after_step": [after_step.official, after_step.table],
    "plain_after_step": [plain_after_step.official, plain_after_step.table],
    "in_folder": [in_folder.official, in_folder.table],
    "forwards_per_rank": forwards_per_rank,
    "losses": [losses, untouched_losses],
    "weights_equal": all(torch.equal(trained[n], p) for n, p in full_state(untouched).items()),
    "resharded": all(type(p).__name__ == "DTensor" for p in scored.parameters()),
    "train_mode": all(m.training for m in scored.modules()),
}

fsdp1_errors = []
for nested in (False, True):
    model = build()
    if nested:
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = FullyShardedDataParallel(layer, device_id=torch.device("cpu"))
    else:
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    try:
        score(model, data, **OPTIONS)
        fsdp1_errors.append(None)
    except ValueError as error:
        fsdp1_errors.append(str(error))
result["fsdp1_errors"] = fsdp1_errors
write_rank_result(pathlib.Path(sys.argv[3]).parent, rank, result)
leave_group()  # the sharded models keep the gloo group past its destruction: no finalization (subprocess_testing)
"""


def test_fsdp2_on_two_gloo_ranks_scores_like_the_unsharded_model_and_leaves_training_untouched(tmp_path):
    script = tmp_path / "fsdp_child.py"
    script.write_text(FSDP_CHILD)
    run_two_ranks(script, REPO_ROOT / "tests", PRMBENCH_JSONL, tmp_path / "run")
    ranks = rank_results(tmp_path)
    for result in ranks:
        # Never forwarded through its root yet, then after a training step: the sharded model's report is the
        # unsharded one's, exactly.
        assert result["before_training"] == result["single"]
        assert result["after_step"] == result["plain_after_step"] == result["in_folder"]
        assert result["after_step"] != result["single"], "the training step should change the report"
        # Every rank ran as many backbone forwards, so that FSDP2's per-layer all-gathers paired up; scoring one
        # sample, rank 1 had no batch and ran one padding forward: [batches, forwards] per rank.
        full_data, one_sample = result["forwards_per_rank"]
        assert len({forwards for _, forwards in full_data}) == 1
        assert one_sample == [[1, 1], [0, 1]]
        # Scoring between steps changed nothing in training: same losses, bit-identical weights, sharded again.
        losses, untouched_losses = result["losses"]
        assert losses == untouched_losses
        assert result["weights_equal"] and result["resharded"] and result["train_mode"]
        # FSDP1, wrapping the model or nested inside it, is refused before anything runs.
        for error in result["fsdp1_errors"]:
            assert error is not None and "FullyShardedDataParallel (FSDP1)" in error and "fully_shard" in error
