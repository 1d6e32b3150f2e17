"""score() on FSDP2 models, layer by layer: on 2 and 4 gloo CPU ranks a model whose decoder layers and root are
``fully_shard``-ed scores exactly like the unsharded model while each rank holds at most its shards, the root group and
two layers unsharded; ranks with fewer batches pad their forwards; the run identity is one for every rank and every
layout; prefix sharing and DeepSpeed ZeRO-3 are refused with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.fingerprint import _figures
from prmbench_fast.live_model import ZERO3_REFUSAL
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from subprocess_testing import cpu_child_env

# Runs under torchrun; argv: tests folder, data, output folder. Each rank writes result.rank<r>.json there.
CHILD = r"""
import json, os, pathlib, sys
from datetime import timedelta
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from prmbench_fast import load_prmbench, score
from prmbench_fast.compat import fsdp_param_groups
from prmbench_fast.fingerprint import weights_fingerprint
from prmbench_fast.live_model import shards_layers
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from subprocess_testing import leave_group, train_step

LAYERS = 6  # enough that a root and two layers are well below the whole model
data = load_prmbench(sys.argv[2], limit_per_class=1)
out = pathlib.Path(sys.argv[3])
tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
OPTIONS = dict(tokenizer=tokenizer, family="generic", max_length=512, batch_tokens=300, progress=False)
# Three samples (two and their `correct` partner), each a batch of its own (every sample is longer than one token):
# rank 0 has more batches than the last rank, which has none with four ranks.
few = data.restrict_to([s.id for s in data.samples[:2]])
FEW = dict(OPTIONS, batch_tokens=1)


def build():
    return tiny_llama(len(tokenizer), head="token_classification", layers=LAYERS)  # seeded: the same weights


def report(result):
    return [result.official, result.table]


single = {}
if int(os.environ["RANK"]) == 0:  # before the process group exists: one process, unsharded
    # Without prefix sharing, as the layer-sharded model runs (prefix sharing agrees within fp32 rounding only).
    single = {"data": report(score(build(), data, share_prefixes=False, **OPTIONS)),
              "few": report(score(build(), few, share_prefixes=False, **FEW))}
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a collective one rank skips fails, not hangs
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))


def sharded(layers=True):
    model = build().train()
    if layers:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered_bytes(model):
    # The unsharded parameter storage FSDP2 holds now: its all-gather outputs (resized to 0 bytes when resharded).
    return sum(t.untyped_storage().nbytes()
               for m in model.modules() if isinstance(m, FSDPModule)
               for group in fsdp_param_groups(m._get_fsdp_state()) for p in group.fsdp_params
               for t in p.all_gather_outputs)


def padded_bytes(parameters):
    # FSDP2 pads dim 0 to a multiple of the world size, and all-gathers that padded tensor.
    return sum(-(-p.shape[0] // world) * world * (p.numel() // p.shape[0]) * p.element_size() for p in parameters)


model = sharded()
peak = [0]
def probe(*_):
    peak[0] = max(peak[0], gathered_bytes(model))
for module in model.model.modules():  # after FSDP2's own pre-forward hooks: inside every layer's forward
    module.register_forward_pre_hook(probe)
real_forwards = []  # per backbone forward: whether it ran a batch (a padding forward runs one token)
model.model.register_forward_hook(  # score() passes input_ids by keyword, training positionally
    lambda m, args, kwargs, o: real_forwards.append((args or (kwargs["input_ids"],))[0].numel() > 1), with_kwargs=True)

layer_bytes = padded_bytes(model.model.layers[0].parameters())
whole_bytes = padded_bytes(model.parameters())
result = {
    "single": single,
    "sharded": report(score(model, data, **OPTIONS)),
    "peak": peak[0],
    "root_bytes": whole_bytes - LAYERS * layer_bytes,
    "layer_bytes": layer_bytes,
    "whole_bytes": whole_bytes,
    "after_scoring": gathered_bytes(model),
}
del real_forwards[:]
result["few"] = report(score(model, few, **FEW))
result["few_forwards"] = [len(few.samples), sum(real_forwards), len(real_forwards)]

# The run identity: one fingerprint on every rank, the same for every world size; run.json records it.
result["fingerprint"] = weights_fingerprint(model)
in_folder = score(model, data, output_dir=out / "run", **OPTIONS)
result["in_folder"] = report(in_folder)
result["run_json_weights"] = json.loads((out / "run" / "run.json").read_text())["weights"]

# Prefix sharing: the default turns it off (with a note), asking for it is refused on every rank.
result["prefix_sharing"] = [in_folder.run["prefix_sharing"], in_folder.run["prefix_sharing_note"]]
try:
    score(model, few, share_prefixes=True, **FEW)
    result["share_error"] = None
except ValueError as error:
    result["share_error"] = str(error)
result["root_only_shards_layers"] = shards_layers(sharded(layers=False))

# Training after scoring (each rank its own batch): the same losses and weights as a model that was never scored.
untouched = sharded()
losses = [train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-2), len(tokenizer), seed=rank)
          for m in (model, untouched)]
full = [{n: p.full_tensor() for n, p in m.named_parameters()} for m in (model, untouched)]
result["losses"] = losses
result["weights_equal"] = all(torch.equal(full[0][n], p) for n, p in full[1].items())

# The trained model in the first model's folder: rank 0 finds another identity, and every rank raises (none hangs).
try:
    score(model, data, output_dir=out / "run", **OPTIONS)
    result["mismatch"] = None
except (ValueError, RuntimeError) as error:
    result["mismatch"] = [type(error).__name__, str(error)]

(out / f"result.rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
leave_group()  # the sharded models keep the gloo group past its destruction: no finalization (subprocess_testing)
"""


def run_ranks(tmp_path, world: int) -> list[dict]:
    """The child under torchrun with ``world`` gloo ranks; what each rank wrote, in rank order."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(script), str(REPO_ROOT / "tests"), str(PRMBENCH_JSONL), str(tmp_path)]
    run = subprocess.run(command, env=cpu_child_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((tmp_path / f"result.rank{rank}.json").read_text()) for rank in range(world)]


# Four ranks share the machine's cores with everything else: about twice the time of two.
@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return run_ranks(tmp_path_factory.mktemp(f"world{request.param}"), request.param)


@pytest.fixture(scope="module")
def one_rank_fingerprint(tmp_path_factory) -> str:
    """The child's model sharded over a one-rank mesh in this process: its fingerprint, the whole tensors' figures."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prmbench_fast.fingerprint import weights_fingerprint

    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=1)
    tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
    store = tmp_path_factory.mktemp("store") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        model = tiny_llama(len(tokenizer), head="token_classification", layers=6)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return weights_fingerprint(fully_shard(model, mesh=mesh))
    finally:
        torch.distributed.destroy_process_group()


def test_layer_by_layer_scores_exactly_like_one_process(ranks):
    single = ranks[0]["single"]
    for result in ranks:
        assert result["sharded"] == result["in_folder"] == single["data"]
        assert result["few"] == single["few"]


def test_a_rank_holds_its_shards_the_root_and_at_most_two_layers_unsharded(ranks):
    for result in ranks:
        root, layer, whole = result["root_bytes"], result["layer_bytes"], result["whole_bytes"]
        # Unsharded at the peak: the root group (embeddings, final norm, head: held for the loop), the layer whose
        # forward runs, and at most one more (the all-gather result FSDP2 keeps to overlap the next copy-out). The
        # shards (whole / ranks) come on top; all together well below the whole model (6 layers).
        assert root + layer <= result["peak"] <= root + 2 * layer
        assert result["peak"] + whole // len(ranks) < whole
        assert result["after_scoring"] == 0  # everything resharded when score() returns


def test_ranks_with_fewer_batches_pad_their_forwards(ranks):
    # [samples, batches, backbone forwards] per rank: three one-sample batches dealt round-robin; rank 0 has the
    # most, and every rank runs as many forwards as it.
    world = len(ranks)
    assert [result["few_forwards"] for result in ranks] == [
        [3, len(range(rank, 3, world)), -(-3 // world)] for rank in range(world)]


def test_the_run_identity_is_one_for_every_rank_and_every_layout(ranks, one_rank_fingerprint):
    for result in ranks:
        # The same on every rank and for every number of ranks (one, in this process, included); in run.json.
        assert result["fingerprint"] == result["run_json_weights"] == one_rank_fingerprint
        # A changed model in the folder: rank 0 names the difference, the others name rank 0's error.
        kind, message = result["mismatch"]
        assert "weights" in message
        assert kind == ("RunMismatchError" if result is ranks[0] else "RuntimeError")


def test_prefix_sharing_is_off_by_default_and_refused_when_asked(ranks):
    for result in ranks:
        sharing, note = result["prefix_sharing"]
        assert sharing is False and "FSDP2" in note
        assert "share_prefixes=True" in result["share_error"] and "collective" in result["share_error"]
        assert result["root_only_shards_layers"] is False  # a model only sharded at its root shares prefixes


def test_training_after_layer_by_layer_scoring_is_untouched(ranks):
    for result in ranks:
        scored, untouched = result["losses"]
        assert scored == untouched and result["weights_equal"]


def test_deepspeed_zero3_partitioned_parameters_are_refused():
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=1)
    tokenizer = train_tokenizer([s.question for s in data])
    model = tiny_llama(len(tokenizer), head="token_classification")
    for i, parameter in enumerate(model.parameters()):  # what ZeRO-3 leaves on a partitioned parameter
        parameter.ds_id, parameter.ds_status, parameter.ds_numel = i, "NOT_AVAILABLE", parameter.numel()
    engine = torch.nn.Module()
    engine.module = model  # a DeepSpeedEngine keeps the model as .module
    for wrapped in (model, engine):
        with pytest.raises(ValueError, match="ZeRO-3") as error:
            score(wrapped, data, tokenizer=tokenizer, family="generic", progress=False)
        assert str(error.value) == ZERO3_REFUSAL
        assert "GatheredParameters" in ZERO3_REFUSAL and "fully_shard" in ZERO3_REFUSAL


@pytest.mark.parametrize("shape", [(301, 7), (10, 300), (5, 4, 3), (2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_fingerprint_figures_of_shards_sum_to_the_whole_tensors(shape, dtype):
    # The figures each rank computes of its shard (torch.chunk's boxes, as DTensor's Shard cuts them, empty ones
    # included) add up to the whole tensor's: what makes the fingerprint one for every layout.
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for dim in range(whole.dim()):
        for world in (2, 3, 4):
            chunk = -(-whole.shape[dim] // world)
            parts = []
            for rank in range(world):
                start = min(rank * chunk, whole.shape[dim])
                offset = [0] * whole.dim()
                offset[dim] = start
                shard = whole.narrow(dim, start, min(chunk, whole.shape[dim] - start))
                parts.append(_figures(shard, shape=tuple(shape), offset=offset))
            assert torch.equal(torch.stack(parts).sum(0), _figures(whole)), (dim, world)
