"""EMA as frozen copies: diffusers' EMAModel numbers bit for bit, one extra set of trained weights, nothing else."""

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from lightning_modules.ema import EmaParts, ema_decay_at


def small_part(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    part = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Dropout(0.5), nn.Linear(8, 3))
    part[1].requires_grad_(False)  # a parameter the objective never uses: not trained, not averaged
    return part


def training_steps(parts: dict[str, nn.Module], count: int):
    """Fake optimizer steps: every trained parameter moves by a random amount."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(count):
        with torch.no_grad():
            for part in parts.values():
                for parameter in part.parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn(parameter.shape, generator=generator))
        yield


@pytest.mark.parametrize("decay", [0.9999, 0.8])
def test_averages_equal_diffusers_emamodel_bit_for_bit(decay):
    """Both the (1+n)/(10+n) warm-up (decay 0.9999) and the cap (decay 0.8 is reached at step 36) are EMAModel's."""
    parts = {"unet": small_part(0), "text_encoder": small_part(1)}
    ours = EmaParts(parts, decay)
    theirs = EMAModel([p for part in parts.values() for p in part.parameters()], decay=decay)
    for _ in training_steps(parts, 40):
        ours.step(parts)
        theirs.step([p for part in parts.values() for p in part.parameters()])
        assert ema_decay_at(ours.optimization_step, decay) == theirs.cur_decay_value
        averaged = [p for name in parts for p in ours.copies[name].parameters()]
        assert all(torch.equal(a, b) for a, b in zip(averaged, theirs.shadow_params, strict=True))
    assert ours.optimization_step == theirs.optimization_step == 40


def test_copies_are_frozen_eval_copies_sharing_the_untrained_parameters():
    parts = {"unet": small_part(0)}
    ema = EmaParts(parts, 0.99).train()
    copy = ema.copies["unet"]
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    assert copy[1].weight is parts["unet"][1].weight  # not trained: shared, never duplicated
    assert copy[0].weight is not parts["unet"][0].weight
    assert set(ema.checkpoint_state()["weights"]) == {"unet.0.weight", "unet.0.bias", "unet.3.weight", "unet.3.bias"}


def test_checkpoint_state_round_trips_and_old_emamodel_states_load():
    parts = {"unet": small_part(0)}
    ema = EmaParts(parts, 0.9)
    for _ in training_steps(parts, 3):
        ema.step(parts)
    state = ema.checkpoint_state()
    again = EmaParts({"unet": small_part(0)}, 0.9)
    again.load_checkpoint_state(state, parts)
    assert again.optimization_step == 3
    pairs = zip(again.copies["unet"].parameters(), ema.copies["unet"].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    old = EMAModel(list(parts["unet"].parameters()), decay=0.9)  # checkpoints written before held this
    for _ in training_steps(parts, 2):
        old.step(list(parts["unet"].parameters()))
    again.load_checkpoint_state(old.state_dict(), parts)
    assert again.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(again.copies["unet"].parameters(), old.shadow_params, strict=True))


def test_averages_follow_parameters_whose_storage_moved_and_parts_passed_anew():
    """The parameter lists are kept between steps: they must still be the live ones after ``.to()`` swaps a
    parameter's storage (``param.data = ...``) and when other part objects are passed."""
    parts = {"unet": small_part(0)}
    ours = EmaParts(parts, 0.8)
    theirs = EMAModel(list(parts["unet"].parameters()), decay=0.8)
    for step, _ in enumerate(training_steps(parts, 6)):
        if step == 3:
            for parameter in parts["unet"].parameters():
                parameter.data = parameter.data.clone()  # what Module.to(device) does to each parameter
        ours.step(parts)
        theirs.step(list(parts["unet"].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ours.copies["unet"].parameters(), theirs.shadow_params, strict=True))

    other = {"unet": small_part(5)}
    ours.step(other)
    theirs.step(list(other["unet"].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ours.copies["unet"].parameters(), theirs.shadow_params, strict=True))
