"""Pruning two-stage trials: stop what is hopeless, keep what may still win.

Stage 1 (the head on a frozen backbone) can rank trials poorly (on lfw_12people its rank
correlation with the final values was -0.14 to 0.06; on cuhk03_30people 0.66 to 0.89): stage
2's learning rate and freeze depth reorder them, and without its warmup
(`FitConfig.warmup_epochs_stage2`) stage 2's first epoch at a high learning rate often
dropped the score before it climbed past everything (on lfw_12people, one trial went 0.41,
0.34, then 0.69 in four more epochs). A percentile pruner over every step (Optuna's, which
this replaces) stopped the eventual best trial during stage 1 in two of three longer
searches. So:

- during stage 1, never: on cached features it costs about a second, nothing worth saving,
  and its early epochs say least;
- between the stages (stage 1's last step, which every trial reports: `trial.run_two_stages`),
  stop only a hopeless trial: one whose stage-1 best is below half the worst stage-1 best of
  the completed trials, once two have completed (a head that learned next to nothing, from a
  diverged or far too low learning rate). Stopping every trial below the worst completed
  one, the rule until stage 2 got its warmup, stopped the eventual best in two of the
  recorded searches: a low stage-1 rate with a high stage-2 rate makes a poor stage 1 and,
  warmed up, the best stage 2;
- in stage 2, from its third epoch (the second after its warmup, one epoch by default), stop
  a trial whose best so far is below the bottom quartile of the completed trials' values at
  that step, once four have completed. The first epoch is still warming up and the second
  says little: across three recorded searches without pruning (the benchmark's at 96 px over
  8 and over 40 trials, and at 160 px over 8), the rank correlation of a trial's best so far
  with its final value was 0.60-0.79 after stage 2's second epoch and 0.74-0.83 after its
  third. Judged from the second, the rule stopped trial 11 of the 40, which would have
  finished at 0.6855, the second best of the 12 run by then; from the third, it stops three
  that finished 35th, 37th and 38th. On two datasets the rule was not chosen on (40 trials
  each on cuhk03_30people and att_orl_faces), the third epoch also ranked better (0.99 and
  0.76 against 0.95 and 0.60), and the trials it stopped finished 31st or lower. It never
  stops a trial at stage 2's last epoch: nothing is left to save.

Steps are `trial.run_two_stages`'s: stage 1 at 0..E1-1, stage 2 at E1 + epoch. The rule is a
pure function of the trial's and the completed trials' intermediate values, so
`benchmarks/replay_pruning.py` applies exactly the search's rule to a recorded run (exact up
to the first trial it stops: after that a real search's sampler sees other results).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .config import FitConfig


@dataclass(frozen=True)
class PruningRule:
    """When a maximised two-stage trial stops; the defaults are the search's."""

    stage1_steps: int  # --max-epochs of stage 1: stage 2 starts at this step
    # stage 2's epochs: 0 means no stage 2 (nothing is saved by stopping at the boundary);
    # None, a stage 2 of unknown length (every step may stop)
    stage2_steps: int | None = None
    boundary_min_completed: int = 2
    boundary_fraction: float = 0.5  # of the worst completed stage-1 best; 0 never stops there
    stage2_min_completed: int = 4
    stage2_skip_epochs: int = 2  # stage 2's first epochs, not judged: its warmup's and one more
    stage2_percentile: float = 25.0  # the bottom share of completed trials that stops

    @classmethod
    def for_fit(cls, fit: FitConfig) -> PruningRule:
        """The search's rule for its training settings: the stages' lengths, and stage 2
        judged from the second epoch after its warmup."""
        return cls(fit.max_epochs_stage1, fit.max_epochs_stage2,
                   stage2_skip_epochs=fit.warmup_epochs_stage2 + 1)

    def stops(self, history: dict[int, float], completed: list[dict[int, float]],
              step: int) -> bool:
        """Whether a trial with intermediate values `history` (step -> value) stops at `step`,
        given the intermediate values of the completed trials."""
        if self.stage2_steps == 0 or step not in history:
            return False
        if self.stage2_steps is not None and step >= self.stage1_steps + self.stage2_steps - 1:
            return False  # the trial's last epoch: stopping it would save nothing
        best = max(v for s, v in history.items() if s <= step)
        boundary = self.stage1_steps - 1
        if step == boundary:
            if len(completed) < self.boundary_min_completed:
                return False
            stage1_bests = [max(v for s, v in c.items() if s <= boundary)
                            for c in completed if any(s <= boundary for s in c)]
            return bool(stage1_bests) and best < self.boundary_fraction * min(stage1_bests)
        if step < self.stage1_steps + self.stage2_skip_epochs:
            return False
        at = [c[step] for c in completed if step in c]
        if len(completed) < self.stage2_min_completed or not at:
            return False
        return best < float(np.percentile(at, self.stage2_percentile))


def optuna_pruner(rule: PruningRule):
    """The rule as an Optuna pruner (studies here always maximise)."""
    import optuna
    from optuna.trial import TrialState

    class TwoStagePruner(optuna.pruners.BasePruner):
        def __init__(self):
            self.rule = rule

        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None:
                return False
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return self.rule.stops(trial.intermediate_values,
                                   [t.intermediate_values for t in done], step)

    return TwoStagePruner()
