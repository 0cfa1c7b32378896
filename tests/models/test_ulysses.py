"""DeepSpeed-Ulysses sequence parallelism (models/ulysses.py): the slices, and real ranks over gloo, where the
sequence-parallel groups reach DeepSpeed as an mpu (Switchyard's route) or through its JSON keys (the mesh route,
which pretrain/ds_config.py refuses: shown here to leave gradients unreduced across the sequence-parallel ranks)."""

import json

import pytest
import torch

from models.registry import MODEL_FAMILIES
from models.ulysses import SequenceSlice, sequence_slice
from tests.distributed import REPO, start_ranks, wait_ranks

SCRIPT = REPO / "tests" / "models" / "ulysses_ranks.py"
STEPS = 3


def test_slices_cover_the_window_and_each_keeps_its_next_target():
    window = torch.arange(2 * 9).reshape(2, 9)  # 8 inputs and the target after the last
    slices = [sequence_slice(window, rank, 4) for rank in range(4)]
    assert all(s.shape == (2, 3) for s in slices)
    assert torch.equal(torch.cat([s[:, :-1] for s in slices], dim=1), window[:, :-1])  # the inputs, in order
    assert torch.equal(torch.cat([s[:, 1:] for s in slices], dim=1), window[:, 1:])  # the targets, in order
    assert [SequenceSlice(rank, 4).first_position(2) for rank in range(4)] == [0, 2, 4, 6]


def test_families_that_split_sequences_are_the_dense_decoders():
    assert sorted(name for name, family in MODEL_FAMILIES.items() if family.sequence_parallel) == ["gpt", "llama"]


def ranks_run(tmp_path, model, world, route):
    out = tmp_path / f"{world}-{route}.json"
    logs = tmp_path / f"logs-{world}-{route}"
    results = wait_ranks(start_ranks([model, route, STEPS, out], world, logs, {"PYTHONPATH": str(REPO)}, script=SCRIPT), logs, timeout=300)
    assert all(r.returncode == 0 for r in results), "\n".join(r.output[-3000:] for r in results)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def llama_one_rank(tmp_path_factory):
    """tiny-llama (rotary positions, 4 query heads on 2 kv heads) trained on whole sequences by one rank."""
    return ranks_run(tmp_path_factory.mktemp("ulysses_one_rank"), "tiny-llama.json", 1, "mpu")


def test_two_sequence_parallel_ranks_through_the_mpu_train_as_one_rank(tmp_path, llama_one_rank):
    """Each rank holds half of every sequence and one kv head with its two query heads; the loss at every step is
    the one-rank run's and, under ZeRO-0, where each rank steps its own copy of the weights, they stay alike."""
    split = ranks_run(tmp_path, "tiny-llama.json", 2, "mpu")
    assert split["losses"] == pytest.approx(llama_one_rank["losses"], rel=1e-6)
    assert split["weight_spread"] == 0.0


def test_the_json_mesh_route_leaves_sequence_parallel_gradients_unreduced(tmp_path, llama_one_rank):
    """sequence_parallel_size and data_parallel_size in the JSON: DeepSpeed's mesh reduces no gradient across the
    sequence-parallel ranks, so each steps with its own slice's part only and their weights drift apart, silently.
    The checks above catch it: the loss leaves the one-rank run's after the first step."""
    mesh = ranks_run(tmp_path, "tiny-llama.json", 2, "mesh")
    assert mesh["losses"][0] == pytest.approx(llama_one_rank["losses"][0], rel=1e-6)  # the first step is before any update
    assert mesh["losses"][1:] != pytest.approx(llama_one_rank["losses"][1:], rel=1e-4)
    assert mesh["weight_spread"] > 1e-3
