"""Exponential moving averages of the trained parts, kept as separate frozen copies of those parts.

Evaluation (validation, sampling, grounding, FID, export) runs on the copies, so the training weights are never
swapped out: a checkpoint written at any moment (SIGTERM, SLURM's SIGUSR1) holds them, and nothing is copied to
the CPU and back per evaluation. The copies own only the trained parameters (requires_grad=True); the others are
shared with the training part (they never change), so memory and checkpoints hold one extra set of trained
weights, as diffusers' EMAModel does. The decay schedule is EMAModel's default: ``min(decay, (1+n)/(10+n))`` with
n the optimisation step - 1 (0 at the first step), updated with the same arithmetic, so the numbers are its own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def ema_decay_at(optimization_step: int, decay: float) -> float:
    """diffusers' ``EMAModel.get_decay`` with its defaults (no warm-up, min_decay 0, update_after_step 0)."""
    step = max(0, optimization_step - 1)
    if step <= 0:
        return 0.0
    return min((1 + step) / (10 + step), decay)


def trained_parameters(part: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in part.named_parameters() if parameter.requires_grad}


def frozen_copy(part: nn.Module) -> nn.Module:
    """An eval-mode copy of ``part`` owning copies of its trained parameters and sharing every other parameter."""
    shared = {id(parameter): parameter for parameter in part.parameters() if not parameter.requires_grad}
    twin = copy.deepcopy(part, memo=dict(shared))
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin.eval()


class EmaParts(nn.Module):
    """The EMA copies of the trained parts, by part name (``copies["unet"]``, ...), always in eval mode."""

    CHUNK = 32  # tensors per fused update

    def __init__(self, parts: Mapping[str, nn.Module], decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.optimization_step = 0
        self.trained_names = {name: list(trained_parameters(part)) for name, part in parts.items()}
        self.copies = nn.ModuleDict({name: frozen_copy(part) for name, part in parts.items()})
        self._paired: tuple[tuple, list[nn.Parameter], list[nn.Parameter]] | None = None  # see _pairs

    def train(self, mode: bool = True) -> EmaParts:
        """Evaluation copies never leave eval mode (dropout, norms), whatever the parent module's mode."""
        return super().train(False)

    def _pairs(self, parts: Mapping[str, nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The averaged parameters and the trained ones they follow, in the same order. Listed once per set of part
        objects (walking the modules costs ~1 ms a step): a Parameter object stays the same when its values change
        (optimizer steps, ``.to(device)``, ``load_state_dict``), so the lists stay valid; ``step`` reads them
        under ``no_grad``."""
        listed = tuple(parts.items())  # holds the parts: their ids below cannot be reused while they are cached
        if self._paired is not None and [(n, id(p)) for n, p in listed] == [(n, id(p)) for n, p in self._paired[0]]:
            return self._paired[1], self._paired[2]
        averages, currents = [], []
        for name, names in self.trained_names.items():
            own, training = dict(self.copies[name].named_parameters()), trained_parameters(parts[name])
            averages += [own[key] for key in names]
            currents += [training[key] for key in names]
        self._paired = (listed, averages, currents)
        return averages, currents

    @torch.no_grad()
    def step(self, parts: Mapping[str, nn.Module]) -> None:
        """Move each average towards the trained weights after an optimizer step: s -= (1 - decay) * (s - p)."""
        self.optimization_step += 1
        one_minus_decay = 1 - ema_decay_at(self.optimization_step, self.decay)
        averages, currents = self._pairs(parts)
        for start in range(0, len(averages), self.CHUNK):  # bounded temporaries, not a second copy of the model
            chunk = slice(start, start + self.CHUNK)
            differences = torch._foreach_sub(averages[chunk], currents[chunk])
            torch._foreach_mul_(differences, one_minus_decay)
            torch._foreach_sub_(averages[chunk], differences)

    def checkpoint_state(self) -> dict:
        """The step count, the decay and the averages of the trained parameters only ("part.parameter" keys)."""
        weights = {}
        for name, names in self.trained_names.items():
            own = dict(self.copies[name].named_parameters())
            weights |= {f"{name}.{key}": own[key].detach() for key in names}
        return {"decay": self.decay, "optimization_step": self.optimization_step, "weights": weights}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict, parts: Mapping[str, nn.Module]) -> None:
        """Take back ``checkpoint_state()``'s dict, or the ``EMAModel.state_dict()`` of checkpoints written before
        (its ``shadow_params`` follow every parameter of ``parts`` in order)."""
        if "shadow_params" in state:
            names = [f"{name}.{key}" for name, part in parts.items() for key, _ in part.named_parameters()]
            weights = dict(zip(names, state["shadow_params"], strict=True))
        else:
            weights = state["weights"]
        for name, names in self.trained_names.items():
            own = dict(self.copies[name].named_parameters())
            missing = [f"{name}.{key}" for key in names if f"{name}.{key}" not in weights]
            if missing:
                raise ValueError(f"checkpoint EMA lacks averages of trained parameters, e.g. {missing[:3]}")
            for key in names:
                own[key].copy_(weights[f"{name}.{key}"])
        self.optimization_step = int(state["optimization_step"])
