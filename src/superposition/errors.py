"""The exceptions every layer raises and the command line catches; importing this module loads nothing else."""

from __future__ import annotations

__all__ = ["SpecError", "RunFormatError", "NotOurs", "TrainingDiverged"]


class SpecError(ValueError):
    """Bad user input: the message is one line that names the field and what is allowed."""


class RunFormatError(SpecError):
    """A folder of this tool (run, sweep, SAE) that is missing, damaged or not such a folder."""


class NotOurs(SpecError):
    """A path a command would replace or delete that is not recognisably this tool's own output."""


class TrainingDiverged(RuntimeError):
    """The loss of some instances turned NaN/inf."""

    def __init__(self, step: int, instances: list[int]):
        shown = ", ".join(map(str, instances[:20])) + (" ..." if len(instances) > 20 else "")
        super().__init__(
            f"training diverged at step {step}: loss is NaN/inf for instance(s) {shown}; "
            "lower train.lr or set train.on_divergence = 'drop'"
        )
        self.step = step
        self.instances = instances
