"""Named exceptions of the engine. Callers (CLI, API, worker) map them to messages and codes.

Each class has a stable `code` that the service records as a job's failure reason.
"""

from __future__ import annotations


class SwavError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "internal"


class ConfigError(SwavError):
    """The configuration cannot run (e.g. batch not divisible by the world size)."""

    code = "invalid_config"


class DataError(SwavError):
    """The dataset is unusable: missing folder, no readable image, too few images."""

    code = "invalid_data"


class NonFiniteLossError(SwavError):
    """The loss became NaN or inf; retrying the same run would repeat it."""

    code = "non_finite_loss"

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}; lower base_lr or use fp32/bf16")
        self.step = step
        self.loss = loss


class CheckpointError(SwavError):
    """A checkpoint cannot be written or none can be read back."""

    code = "checkpoint_failed"


class CollapsedError(SwavError):
    """The features collapsed again after the last allowed rollback (see swav_core.collapse)."""

    code = "collapsed"

    def __init__(self, step: int, recoveries: int) -> None:
        super().__init__(
            f"the features collapsed at step {step} (uniform codes, one prototype predicted) "
            f"after {recoveries} rollbacks with a sharper epsilon and a longer prototype "
            "freeze; try a lower base_lr, fewer prototypes or milder crops"
        )
        self.step = step
        self.recoveries = recoveries


class InvalidWeightsError(SwavError):
    """The starting weights are missing, unreadable or do not fit the job's model."""

    code = "invalid_weights"
