"""Per-process randomness of training, and its state in checkpoints for every process.

Each process draws its timesteps, noise, caption dropout and posterior samples from its own generator, seeded by
(seed, global rank): under DDP the processes see different draws, and every run sees the same ones. The generator
lives on the training device: drawing SD-2's noise on the CPU and copying it costs milliseconds a step, on the GPU
nothing (the draws then differ between a CPU and a GPU run, as the arithmetic does anyway). The global
generators (dropout inside the networks) are seeded per process too. A checkpoint stores every process's state;
on resume each process takes back its own.

The states are gathered while training, at a point every process reaches together (each step, after its draws),
never when a checkpoint is saved: process 0 may save alone (after another process crashed, or on SLURM's
time-limit signal), and a collective there would wait forever for processes that are elsewhere.

When the number of processes changes, a process with a saved state takes it back (the run continues, though its
data shards, and so its draws, differ from an uninterrupted run's anyway) and a process without one is seeded from
(seed, rank, step), with a warning; so is a process resuming on another kind of device than it saved on.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

TRAINING_STREAM, GLOBAL_STREAM = 0, 1


def process_seed(seed: int, rank: int, stream: int, step: int = 0) -> int:
    """A 63-bit seed for this (seed, rank, stream, step): independent streams per process, the same every run."""
    return int(np.random.SeedSequence([seed, rank, stream, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_training_generator(generator: torch.Generator, seed: int, rank: int, step: int = 0) -> torch.Generator:
    return generator.manual_seed(process_seed(seed, rank, TRAINING_STREAM, step))


def seed_process(generator: torch.Generator, seed: int, rank: int, step: int = 0) -> None:
    """Seed the training generator and the global generators (CPU and every CUDA device) of this process."""
    seed_training_generator(generator, seed, rank, step)
    torch.manual_seed(process_seed(seed, rank, GLOBAL_STREAM, step))


def capture_rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's state: its training generator, the global CPU generator and its own CUDA device's."""
    state = {"generator": generator.get_state(), "generator_device": generator.device.type}
    state["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_from_every_rank(state: dict) -> list[dict]:
    """Every process's ``state`` (a ``capture_rng_state`` dict), in rank order, on every process; a single process
    enters no collective.

    It runs every training step, so the state's byte tensors travel as one flat tensor in a single all_gather rather
    than pickled (``all_gather_object`` pickles the state and unpickles every process's, a cost that grows with the
    number of processes). Every process's state has the same layout: the same generators on the same kind of device.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return [state]
    names = [name for name, value in state.items() if isinstance(value, torch.Tensor)]
    flat = torch.cat([state[name] for name in names])
    if torch.distributed.get_backend() == torch.distributed.Backend.NCCL:  # NCCL gathers CUDA tensors only
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, flat)
    sizes = [state[name].numel() for name in names]
    return [
        {**state, **{name: part.cpu().clone() for name, part in zip(names, row.split(sizes), strict=True)}}
        for row in gathered
    ]


def every_rank_state(generator: torch.Generator, device: torch.device) -> dict[str, list[dict]]:
    """The checkpoint's ``rng_states``: every process's state, in rank order. A collective under DDP: call it only
    where every process arrives."""
    return {"per_rank": gather_from_every_rank(capture_rng_state(generator, device))}


def state_for_rank(saved: dict | None, rank: int) -> dict | None:
    """The state process ``rank`` saved, or None (an older checkpoint, or more processes than saved)."""
    per_rank = (saved or {}).get("per_rank", [])
    return per_rank[rank] if rank < len(per_rank) else None


def restore_rng_state(
    saved: dict | None,
    generator: torch.Generator,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    step: int,
) -> None:
    """Give this process back its saved state (see the module docstring for a changed number of processes).

    The CUDA state is set on this process's own device, whatever index it has here and however many devices
    are visible: a process saves and restores the state of the one device it trains on.
    """
    state = state_for_rank(saved, rank)
    saved_world_size = len((saved or {}).get("per_rank", []))
    if state is None or state.get("generator_device") != generator.device.type:
        why = (
            f"no random state for rank {rank} (saved by {saved_world_size} process(es), resumed on {world_size})"
            if state is None
            else f"rank {rank}'s random state was saved on {state.get('generator_device')}, resumed on "
            f"{generator.device.type}"
        )
        log.warning(
            "checkpoint has %s: seeding it from (seed, rank, step=%d); the run continues but is not a replay of an "
            "uninterrupted one",
            why,
            step,
        )
        seed_process(generator, seed, rank, step)
        return
    if saved_world_size != world_size and rank == 0:
        log.warning(
            "checkpoint saved by %d process(es), resumed on %d: each process with a saved random state takes it back, "
            "but data shards differ, so the run is not a replay of an uninterrupted one",
            saved_world_size,
            world_size,
        )
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
