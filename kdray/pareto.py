"""Two objectives at once: accuracy and transparency. Pareto fronts, and an asynchronous
successive-halving scheduler that promotes trials by them.

ASHA compares one number per trial at each rung (here the epochs 4, 12, ... of a trial) and stops
a trial below the top ``1 / reduction_factor`` of those recorded there. Cutting on validation
accuracy alone would stop a trial whose maps localise best because its accuracy at epoch 4 was in
the lower two thirds, before the champion rule, which looks at transparency, could see it.
:class:`ParetoASHA` keeps ASHA's rungs and budget but ranks a rung by non-dominated sorting of
(accuracy, transparency), as MO-ASHA does (Schmucker et al., "Multi-objective Asynchronous
Successive Halving", 2021): a trial goes on unless at least ``ceil(n / reduction_factor)`` of the
``n`` trials recorded at its rung (itself included) lie on strictly better fronts. A trial no other
dominates always goes on, whichever objective it is best at.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["ParetoASHA", "dominates", "front_ranks", "pareto_front", "rungs"]

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one (maximising)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def front_ranks(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting: 0 for the Pareto front, 1 for the front once it is removed, ..."""
    ranks = [-1] * len(points)
    left = set(range(len(points)))
    rank = 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates, in their order."""
    return [i for i, r in enumerate(front_ranks(points)) if r == 0]


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The rungs of one ASHA bracket below ``max_t`` (where a trial stops anyway): ``grace_period
    * reduction_factor ** k``."""
    out, milestone = [], float(grace_period)
    while milestone < max_t:
        out.append(milestone)
        milestone *= reduction_factor
    return out


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving over several objectives (maximised), one bracket.

    Args:
        metrics: the result keys of the objectives (e.g. ``best_val_accuracy``,
            ``transparency``); a result without all of them is not judged.
        max_t: the most ``time_attr`` units a trial runs; trials stop there.
        grace_period: the first rung.
        reduction_factor: rungs at ``grace_period * reduction_factor ** k`` below ``max_t``; about
            ``1 / reduction_factor`` of the trials go on at each.
        time_attr: the result key of progress (Tune's ``training_iteration``: reports so far).
    """

    def __init__(
        self,
        metrics: Sequence[str],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        time_attr: str = "training_iteration",
    ) -> None:
        if grace_period < 1 or max_t < grace_period or reduction_factor <= 1:
            raise ValueError("need 1 <= grace_period <= max_t and reduction_factor > 1")
        super().__init__()
        self.metrics = list(metrics)
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.time_attr = time_attr
        self.rungs: list[tuple[float, dict[str, tuple[float, ...]]]] = [
            (m, {}) for m in rungs(grace_period, reduction_factor, max_t)
        ]
        self.num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are this scheduler's own

    def milestones(self) -> list[float]:
        return [m for m, _ in self.rungs]

    def _decide(self, trial_id: str, t: float, point: tuple[float, ...]) -> str:
        for milestone, recorded in self.rungs:
            if t < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = point
            ids = list(recorded)
            ranks = dict(zip(ids, front_ranks([recorded[i] for i in ids]), strict=True))
            ahead = sum(1 for i in ids if ranks[i] < ranks[trial_id])
            if ahead >= math.ceil(len(ids) / self.reduction_factor):
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def _point(self, result: dict[str, Any]) -> tuple[float, ...] | None:
        if self.time_attr not in result or any(m not in result for m in self.metrics):
            return None
        values = tuple(float(result[m]) for m in self.metrics)
        return values if all(math.isfinite(v) for v in values) else None

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        t = result.get(self.time_attr)
        if t is not None and t >= self.max_t:
            self.num_stopped += 1
            return TrialScheduler.STOP
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        action = self._decide(trial.trial_id, float(t), point)
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        point = self._point(result or {})
        if point is not None:
            self._decide(trial.trial_id, float(result[self.time_attr]), point)

    def debug_string(self) -> str:
        rungs = " | ".join(f"t={m:g}: {len(r)} recorded" for m, r in self.rungs)
        return f"Using ParetoASHA over {self.metrics}: num_stopped={self.num_stopped}; {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
