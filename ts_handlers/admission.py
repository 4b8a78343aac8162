"""Which requests of a batch run now, and which get 429 + Retry-After: pure of any handler.

TorchServe sends a batch's answers together when ``handle`` returns, and the worker takes no
new batch before that, so the work one batch admits delays every request in it and every
request queued behind it. Two budgets bound that work, each set by a config key:

* :func:`over_budget`: predictions past the batch's token budget (what
  text-embeddings-inference calls max_batch_tokens);
* :class:`ExplanationScheduler`: explanation work per batch, and predictions first for as long
  as the last explanation work took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ts_handlers.errors import TooManyRequests

# The Retry-After of an explanation deferred because its batch's budget was taken: the worker
# takes the next batch as soon as this one is answered, and the request has waited through this.
EXPLANATION_RETRY_AFTER_S = 1
# Likewise for a prediction past its batch's token budget: the next batch takes it.
PREDICTION_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Budget:
    """Work one handled batch may spend, and the config key that sets it."""

    limit: int
    key: str


def over_budget(costs: Sequence[int], budget: Budget | None) -> tuple[list[int], TooManyRequests]:
    """(positions in ``costs`` past ``budget``, the 429 they get).

    Requests run in batch order; the first always fits (a per-request limit is never above the
    batch budget), so a batch of worst requests still finishes inside responseTimeout.
    """
    spent, deferred = 0, []
    for position, cost in enumerate(costs):
        if budget is not None and spent and spent + cost > budget.limit:
            deferred.append(position)
        else:
            spent += cost
    limit, key = (budget.limit, budget.key) if budget else (0, "")
    error = TooManyRequests(
        f"this batch already carries {spent} of the {limit} tokens a batch may run "
        f"({key}); retry after {PREDICTION_RETRY_AFTER_S} s",
        PREDICTION_RETRY_AFTER_S,
    )
    return deferred, error


@dataclass
class Admitted:
    """An explanation plan for one batch: who runs, who waits, and when it began."""

    run: list[int]
    deferred: list[int]
    error: TooManyRequests | None
    started: float


@dataclass
class ExplanationScheduler:
    """Explanation work per batch, over batches: one per worker.

    * a batch spends at most its budget on explanations (the requests, in batch order, that
      fit), so a prediction waits behind at most one budget of work;
    * after explanation work that took T seconds, batches that hold predictions run no
      explanations for the next T seconds, so while both wait, predictions get at least half
      of the worker's time, and explanations the rest (all of it when no prediction comes).
    """

    clock: Callable[[], float] = time.monotonic
    # Until when (on ``clock``) batches holding predictions run no explanations.
    predictions_first_until: float = field(default=0.0)

    def admit(self, costs: Sequence[int], budget: Budget | None, predictions: bool) -> Admitted:
        """Which of a batch's explanations (their ``costs``, in batch order) run now;
        ``predictions``: the batch also holds predictions."""
        started = self.clock()
        allowed = None if budget is None else budget.limit
        yield_to_predictions = (
            budget is not None and predictions and started < self.predictions_first_until
        )
        if yield_to_predictions:
            allowed = 0
        spent, run, deferred = 0, [], []
        for position, cost in enumerate(costs):
            if allowed is not None and spent + cost > allowed:
                deferred.append(position)
            else:
                spent += cost
                run.append(position)
        if not deferred or budget is None:
            return Admitted(run, deferred, None, started)
        if yield_to_predictions:
            retry_after = max(
                EXPLANATION_RETRY_AFTER_S, math.ceil(self.predictions_first_until - started)
            )
            reason = (
                "predictions go first: after explanation work, batches that hold predictions "
                "run none for as long as it took"
            )
        else:
            retry_after = EXPLANATION_RETRY_AFTER_S
            reason = "earlier explanation requests in this batch took its share"
        error = TooManyRequests(
            f"explanation work per batch is limited to {budget.limit} ({budget.key}) and "
            f"{reason}; retry after {retry_after} s",
            retry_after,
        )
        return Admitted(run, deferred, error, started)

    def ran(self, admitted: Admitted) -> None:
        """Records the admitted explanations as run, now: predictions go first for as long."""
        if admitted.run:
            finished = self.clock()
            self.predictions_first_until = finished + (finished - admitted.started)
