"""The in-training evaluation schedule survives resume: the step last evaluated is checkpointed."""

from types import SimpleNamespace

from callbacks.periodic import PeriodicCallback


class CountingEvaluation(PeriodicCallback):
    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps)
        self.steps: list[int] = []

    def run(self, trainer, module) -> None:
        self.steps.append(trainer.global_step)


def test_a_resumed_run_neither_repeats_nor_skips_an_evaluation():
    """Stopped right after the final step's evaluation (SIGTERM raised once the epoch ended): the resumed fit
    ends at once, and its on_train_end must not evaluate that step a second time."""
    trainer = SimpleNamespace(global_step=6, world_size=1)
    straight = CountingEvaluation(every_n_steps=3)
    straight.on_train_batch_end(trainer, None, None, None, 5)
    checkpointed = straight.state_dict()

    resumed = CountingEvaluation(every_n_steps=3)
    resumed.load_state_dict(checkpointed)
    resumed.on_train_end(trainer, None)
    assert straight.steps == [6] and resumed.steps == []
    trainer.global_step = 7
    resumed.on_train_end(trainer, None)  # a later step is still evaluated at the end
    assert resumed.steps == [7]
