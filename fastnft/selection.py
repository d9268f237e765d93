"""Keeping the best: the held-out evaluation with the highest value of `eval.select` (an equal
later value does not replace it), the evaluations since, and the patience stop. A checkpoint
part, so a resumed run continues the same selection."""

from __future__ import annotations

import math
from typing import Any

from fastnft.config import ConfigError


class BestEvaluation:
    def __init__(self, key: str | None, patience: int) -> None:
        self.key = key
        self.patience = patience
        self.iteration = -1  # none yet
        self.value = -math.inf
        self.since = 0  # evaluations since the best

    def update(self, iteration: int, metrics: dict[str, float]) -> bool:
        """Takes an evaluation's row; True when it is the new best."""
        if self.key is None:
            return False
        if self.key not in metrics:
            raise ConfigError(
                f"eval.select: the evaluation rows have no key {self.key!r}; they have {', '.join(sorted(metrics))}"
            )
        if metrics[self.key] > self.value:
            self.iteration, self.value, self.since = iteration, float(metrics[self.key]), 0
            return True
        self.since += 1
        return False

    @property
    def out_of_patience(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def record(self) -> dict[str, Any] | None:
        """run.json's "best" entry."""
        if self.iteration < 0:
            return None
        return {"iteration": self.iteration, "metric": self.key, "value": self.value}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "value": self.value, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.value, self.since = int(state["iteration"]), float(state["value"]), int(state["since"])
