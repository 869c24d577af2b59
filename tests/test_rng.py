"""Per-process random state: each rank restores its own, on its own device, whatever the device count or world size."""

import logging

import pytest
import torch

from lightning_modules.rng import (
    GLOBAL_STREAM,
    TRAINING_STREAM,
    capture_rng_state,
    gather_from_every_rank,
    process_seed,
    restore_rng_state,
    seed_training_generator,
)

SEED = 42


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(5, generator=generator)


def fake_rank_state(rank: int) -> dict[str, torch.Tensor]:
    """What rank ``rank`` saved on a GPU machine: its generator after a few draws, its CPU and CUDA states."""
    generator = seed_training_generator(torch.Generator(), SEED, rank)
    draws(generator)
    cpu = torch.Generator().manual_seed(1000 + rank)
    return {
        "generator": generator.get_state(),
        "generator_device": "cpu",
        "torch": cpu.get_state(),
        "cuda": torch.full((16,), rank, dtype=torch.uint8),
    }


@pytest.fixture
def cuda_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.device]]:
    """torch.cuda.set_rng_state recorded instead of run (no GPU here)."""
    calls: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    return calls


def test_streams_differ_by_rank_and_stream_and_repeat_across_runs():
    seeds = {process_seed(SEED, rank, stream) for rank in range(4) for stream in (TRAINING_STREAM, GLOBAL_STREAM)}
    assert len(seeds) == 8 and all(0 <= seed < 2**63 for seed in seeds)
    assert process_seed(SEED, 1, TRAINING_STREAM) == process_seed(SEED, 1, TRAINING_STREAM)
    rank0, rank1 = (draws(seed_training_generator(torch.Generator(), SEED, rank)) for rank in (0, 1))
    assert not torch.equal(rank0, rank1)


@pytest.mark.parametrize("visible_devices", [1, 2, 8])
def test_each_rank_restores_its_own_state_on_its_own_device(cuda_calls, visible_devices):
    """Two ranks saved on two GPUs; rank 1 resumes as the only process of its node that sees one GPU (cuda:0),
    or on a machine with more GPUs: it gets rank 1's states, set on the device it trains on."""
    saved = {"per_rank": [fake_rank_state(0), fake_rank_state(1)]}
    generator = torch.Generator()
    device = torch.device("cuda", min(1, visible_devices - 1))
    restore_rng_state(saved, generator, device, SEED, rank=1, world_size=2, step=10)
    assert torch.equal(generator.get_state(), saved["per_rank"][1]["generator"])
    assert torch.equal(torch.get_rng_state(), saved["per_rank"][1]["torch"])
    ((state, on),) = cuda_calls
    assert torch.equal(state, saved["per_rank"][1]["cuda"]) and on == device


def test_a_cpu_process_restores_a_gpu_checkpoint_without_touching_cuda(cuda_calls):
    saved = {"per_rank": [fake_rank_state(0)]}
    generator = torch.Generator()
    restore_rng_state(saved, generator, torch.device("cpu"), SEED, rank=0, world_size=1, step=3)
    assert torch.equal(generator.get_state(), saved["per_rank"][0]["generator"]) and cuda_calls == []


def test_ranks_without_a_saved_state_are_seeded_from_rank_and_step_with_a_warning(cuda_calls, caplog):
    saved = {"per_rank": [fake_rank_state(0), fake_rank_state(1)]}
    generator = torch.Generator()
    with caplog.at_level(logging.WARNING, logger="lightning_modules.rng"):
        restore_rng_state(saved, generator, torch.device("cuda", 0), SEED, rank=2, world_size=4, step=10)
    assert "no random state for rank 2 (saved by 2 process(es), resumed on 4)" in caplog.text
    expected = seed_training_generator(torch.Generator(), SEED, 2, step=10)
    assert torch.equal(draws(generator), draws(expected))
    fresh = seed_training_generator(torch.Generator(), SEED, 2)
    assert not torch.equal(draws(seed_training_generator(torch.Generator(), SEED, 2, step=10)), draws(fresh))
    assert cuda_calls == []


def test_a_checkpoint_without_per_rank_states_reseeds(caplog):
    """Checkpoints written before per-rank states (one global state for all ranks) are not replayed."""
    generator = torch.Generator()
    with caplog.at_level(logging.WARNING, logger="lightning_modules.rng"):
        restore_rng_state({"torch": torch.get_rng_state()}, generator, torch.device("cpu"), SEED, 0, 1, step=5)
    assert "no random state for rank 0" in caplog.text
    assert torch.equal(draws(generator), draws(seed_training_generator(torch.Generator(), SEED, 0, step=5)))


def test_a_single_process_gathers_without_a_collective(monkeypatch):
    for collective in ("all_gather", "all_gather_object"):
        monkeypatch.setattr(torch.distributed, collective, lambda *a: pytest.fail("entered a collective"))
    state = capture_rng_state(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert gather_from_every_rank(state) == [state] and set(state) == {"generator", "generator_device", "torch"}


def test_a_state_saved_on_another_kind_of_device_reseeds(caplog):
    """A CUDA generator's state (seed and offset) means nothing to a CPU generator: seed from (seed, rank, step)."""
    saved = {"per_rank": [{**fake_rank_state(0), "generator_device": "cuda"}]}
    generator = torch.Generator()
    with caplog.at_level(logging.WARNING, logger="lightning_modules.rng"):
        restore_rng_state(saved, generator, torch.device("cpu"), SEED, rank=0, world_size=1, step=7)
    assert "rank 0's random state was saved on cuda, resumed on cpu" in caplog.text
    assert torch.equal(draws(generator), draws(seed_training_generator(torch.Generator(), SEED, 0, step=7)))
