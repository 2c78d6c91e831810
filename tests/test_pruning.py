"""The two-stage pruner: what it stops, where, and that the search uses it.

The recorded histories are a real search: lfw_12people, MobileNetV2 at 160 px, 8 trials of
5+5 epochs without pruning (the speed benchmark's space at 160 px; the cached search repeats
the naive one exactly). Stage 1 is steps 0-4, stage 2 steps 5-9; the value is validation
balanced accuracy per epoch. Trial 7 is the best; Optuna's percentile pruner, which the
search used before, stopped it during stage 1 (`benchmarks/replay_pruning.py` on that run).
"""
from __future__ import annotations

from pathlib import Path

import optuna

from tuner.config import FitConfig, SearchConfig
from tuner.pruning import PruningRule, optuna_pruner
from tuner.search import open_study

LFW_160 = [
    [0.2924, 0.3200, 0.4615, 0.5320, 0.5761, 0.6444, 0.6564, 0.7769, 0.7420, 0.7950],  # 0.7950
    [0.2011, 0.3120, 0.4372, 0.5696, 0.5639, 0.5879, 0.6336, 0.6592, 0.6779, 0.7125],  # 0.7125
    [0.2853, 0.3214, 0.4101, 0.4905, 0.4750, 0.5229, 0.5311, 0.5759, 0.6271, 0.5862],  # 0.6271
    [0.3987, 0.5046, 0.5887, 0.6091, 0.6822, 0.7418, 0.7681, 0.7497, 0.7714, 0.7378],  # 0.7714
    [0.2007, 0.2615, 0.4247, 0.5325, 0.5202, 0.3042, 0.3020, 0.4421, 0.6395, 0.7204],  # 0.7204
    [0.3920, 0.4371, 0.5574, 0.6322, 0.6564, 0.7316, 0.7381, 0.7154, 0.7607, 0.7485],  # 0.7607
    [0.3501, 0.4029, 0.5472, 0.6093, 0.5987, 0.6588, 0.7041, 0.7560, 0.7530, 0.7385],  # 0.7560
    [0.2009, 0.3767, 0.4404, 0.5691, 0.6119, 0.6970, 0.6908, 0.7527, 0.8021, 0.8154],  # 0.8154
]
E1 = 5
# The speed benchmark's search (lfw_12people, MobileNetV2 at 96 px, 8 trials of 5 + 5 epochs)
# with stage 2's one-epoch warmup, without pruning. Trial 4 (stage-2 rate 2.5e-4) is the
# best: its stage 1 is the second worst, and its stage 2 climbs to the end.
LFW_96_WARMUP = [
    [0.2726, 0.3114, 0.3946, 0.4040, 0.4344, 0.4573, 0.5311, 0.5915, 0.5502, 0.6096],  # 0.6096
    [0.2198, 0.3267, 0.3652, 0.4012, 0.3854, 0.3990, 0.4237, 0.4813, 0.4606, 0.4684],  # 0.4813
    [0.1799, 0.2188, 0.2602, 0.2978, 0.4392, 0.4030, 0.4623, 0.4633, 0.4211, 0.5363],  # 0.5363
    [0.3241, 0.4099, 0.4383, 0.4673, 0.5024, 0.5423, 0.5511, 0.5580, 0.5268, 0.5454],  # 0.5580
    [0.2015, 0.3048, 0.3223, 0.3800, 0.3787, 0.4164, 0.4940, 0.5472, 0.5740, 0.7132],  # 0.7132
    [0.2766, 0.3982, 0.4430, 0.4442, 0.4881, 0.4863, 0.4896, 0.5387, 0.4858, 0.5269],  # 0.5387
    [0.1976, 0.3382, 0.3189, 0.3422, 0.3635, 0.3998, 0.3331, 0.4564, 0.4608, 0.4572],  # 0.4608
    [0.2330, 0.3391, 0.3509, 0.4079, 0.4135, 0.4842, 0.5157, 0.5771, 0.5495, 0.5991],  # 0.5991
]


def history(values: list[float], upto: int | None = None) -> dict[int, float]:
    return {s: v for s, v in enumerate(values) if upto is None or s <= upto}


def replay(rule, trials=LFW_160) -> dict[int, int]:
    """Trial -> the step it stops at, replaying the recorded trials in order."""
    done, stopped = [], {}
    for number, values in enumerate(trials):
        h = history(values)
        step = next((s for s in sorted(h) if rule(h, done, s)), None)
        if step is None:
            done.append(h)
        else:
            stopped[number] = step
    return stopped


def test_recorded_search_keeps_its_best_trial():
    stopped = replay(PruningRule(E1).stops)
    # No trial here is hopeless after stage 1 (the lowest stage-1 best, trial 2's 0.4905, is
    # far above half the worst completed one); trial 4 stops in stage 2's second epoch, and
    # trial 7, the best (0.8154), runs to the end.
    assert stopped == {4: E1 + 1}
    # The rule before stage 2's warmup stopped every trial below the worst completed stage 1.
    assert replay(PruningRule(E1, boundary_fraction=1.0).stops) == {2: E1 - 1, 4: E1 - 1}


def test_warmed_up_search_keeps_the_best_trial_the_old_boundary_rule_stopped():
    # Its 8 trials are the sampler's random start-up trials, so the replay is exact.
    assert replay(PruningRule(E1).stops, LFW_96_WARMUP) == {6: E1 + 1}
    assert replay(PruningRule(E1, boundary_fraction=1.0).stops, LFW_96_WARMUP) == \
        {4: E1 - 1, 6: E1 - 1}


def test_stage1_is_never_judged_before_its_last_step():
    rule = PruningRule(E1)
    done = [history(v) for v in LFW_160[:6]]
    worst = {s: 0.0 for s in range(E1)}  # below everything at every stage-1 step
    assert not any(rule.stops(worst, done, s) for s in range(E1 - 1))
    assert rule.stops(worst, done, E1 - 1)


def test_boundary_stops_only_a_hopeless_trial_once_two_have_completed():
    rule = PruningRule(E1)
    two = [history(LFW_160[0]), history(LFW_160[1])]
    # Trial 1's stage-1 best is 0.5696 (step 3), though its last stage-1 value is 0.5639: the
    # worst completed stage-1 best is 0.5696, half of it 0.2848.
    trial4 = history(LFW_160[4], upto=E1 - 1)  # stage-1 best 0.5325: behind, not hopeless
    assert not rule.stops(trial4, two, E1 - 1)
    assert PruningRule(E1, boundary_fraction=1.0).stops(trial4, two, E1 - 1)
    hopeless = {s: 0.28 for s in range(E1)}
    assert rule.stops(hopeless, two, E1 - 1)
    assert not rule.stops(hopeless, two[:1], E1 - 1)  # one completed trial is not enough
    assert not rule.stops({s: 0.2848 for s in range(E1)}, two, E1 - 1)  # at the line: goes on
    assert not PruningRule(E1, boundary_fraction=0.0).stops(hopeless, two, E1 - 1)
    # Nothing to save without a stage 2.
    assert not PruningRule(E1, has_stage2=False).stops(hopeless, two, E1 - 1)


def test_stage2_skips_its_first_epoch_then_stops_the_bottom_quartile():
    rule = PruningRule(E1)
    done = [history(v) for v in LFW_160[:4]]
    # Trial 4's stage 2 starts with a drop to 0.30 (below its own stage 1); at stage 2's
    # first epoch nothing is judged, from the second its best so far (0.5325) is compared
    # with the bottom quartile of the completed trials at that step.
    trial4 = history(LFW_160[4])
    assert not rule.stops(trial4, done, E1)
    assert rule.stops(trial4, done, E1 + 1)  # 0.5325 < quartile of 0.6564, 0.6336, 0.5311, 0.7681
    # Fewer than four completed trials: no stage-2 quartile yet.
    assert not rule.stops(trial4, done[:3], E1 + 1)
    # A trial above the quartile goes on.
    assert not rule.stops(history(LFW_160[7]), done, E1 + 1)


def test_optuna_pruner_stops_at_the_boundary_through_a_study():
    study = optuna.create_study(direction="maximize", pruner=optuna_pruner(PruningRule(E1)))
    for values in LFW_160[:2]:  # two completed trials
        trial = study.ask()
        for step, v in enumerate(values):
            trial.report(v, step)
        study.tell(trial, max(values))
    trial = study.ask()
    verdicts = []
    for step, v in enumerate([0.10, 0.15, 0.20, 0.25, 0.28]):  # stage 1 of a hopeless trial
        trial.report(v, step)
        verdicts.append(trial.should_prune())
    assert verdicts == [False] * (E1 - 1) + [True]


def test_search_uses_the_two_stage_pruner(tmp_path: Path):
    def config(**kw) -> SearchConfig:
        return SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "run",
                            fit=FitConfig(max_epochs_stage1=3, max_epochs_stage2=2), **kw)

    (tmp_path / "run").mkdir()
    (tmp_path / "other").mkdir()
    study = open_study(config())
    assert type(study.pruner).__name__ == "TwoStagePruner"
    # It applies the search's stage-1 length: a trial at less than half of both completed ones
    # stops at step 2.
    for value in (0.5, 0.6):
        trial = study.ask()
        for step in range(5):
            trial.report(value, step)
        study.tell(trial, value)
    trial = study.ask()
    for step in range(3):
        trial.report(0.1, step)
    assert trial.should_prune()
    no_pruning = tmp_path / "other"
    assert isinstance(open_study(SearchConfig(data_dir=tmp_path / "data", run_dir=no_pruning,
                                              pruning=False)).pruner,
                      optuna.pruners.NopPruner)

