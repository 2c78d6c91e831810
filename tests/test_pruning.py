"""The two-stage pruner: what it stops, where, and that the search uses it.

The recorded histories are real searches without pruning (the cached search repeats the naive
one exactly), on lfw_12people with MobileNetV2 and 5 + 5 epochs: stage 1 is steps 0-4, stage 2
steps 5-9; the value is validation balanced accuracy per epoch. `benchmarks/replay_pruning.py`
replays rules on such a run.
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna

from tuner.config import FitConfig, SearchConfig
from tuner.pruning import PruningRule, optuna_pruner
from tuner.search import open_study

# At 160 px, 8 trials, before stage 2 had its warmup. Trial 7 is the best; Optuna's percentile
# pruner, which the search used before, stopped it during stage 1.
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
E2 = 5
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

# The same search over 40 trials (the tool's default count; TPE from trial 10 on), with the
# warmup and oneDNN's kernels. Trial 20 is the best. Early stopping ended trials 3 and 14
# before stage 2's last epoch.
LFW_96_40 = [
    [0.2726, 0.3114, 0.3946, 0.4040, 0.4344, 0.4613, 0.5258, 0.5707, 0.5394, 0.6318],  # 0.6318
    [0.2198, 0.3267, 0.3652, 0.4012, 0.3854, 0.4038, 0.4261, 0.4813, 0.4824, 0.4879],  # 0.4879
    [0.1799, 0.2188, 0.2602, 0.2978, 0.4392, 0.4030, 0.4659, 0.4728, 0.4033, 0.5026],  # 0.5026
    [0.3241, 0.4099, 0.4383, 0.4673, 0.5024, 0.5411, 0.5701, 0.5605, 0.5314],  # 0.5701
    [0.2015, 0.3048, 0.3223, 0.3800, 0.3787, 0.4299, 0.5030, 0.6085, 0.6669, 0.6573],  # 0.6669
    [0.2766, 0.3982, 0.4430, 0.4442, 0.4881, 0.4863, 0.4896, 0.5407, 0.4871, 0.5280],  # 0.5407
    [0.1976, 0.3382, 0.3189, 0.3422, 0.3635, 0.3998, 0.3146, 0.4859, 0.4829, 0.5547],  # 0.5547
    [0.2330, 0.3391, 0.3509, 0.4079, 0.4135, 0.4842, 0.5157, 0.5800, 0.5474, 0.5729],  # 0.5800
    [0.2919, 0.3522, 0.3900, 0.3996, 0.4146, 0.3532, 0.5503, 0.5634, 0.6808, 0.7363],  # 0.7363
    [0.2060, 0.2740, 0.3016, 0.3306, 0.3525, 0.3429, 0.3993, 0.4455, 0.5328, 0.5387],  # 0.5387
    [0.2869, 0.3550, 0.4441, 0.4356, 0.4664, 0.3802, 0.5678, 0.6221, 0.5923, 0.6532],  # 0.6532
    [0.2683, 0.3583, 0.3786, 0.4306, 0.4049, 0.4140, 0.4118, 0.5556, 0.6455, 0.6855],  # 0.6855
    [0.3262, 0.3664, 0.4408, 0.5084, 0.4997, 0.3447, 0.4208, 0.5485, 0.6116, 0.5697],  # 0.6116
    [0.3016, 0.3441, 0.4022, 0.4262, 0.4591, 0.4700, 0.5212, 0.5830, 0.6560, 0.6503],  # 0.6560
    [0.2460, 0.3147, 0.3800, 0.4155, 0.4213, 0.5374, 0.5356, 0.5354],  # 0.5374
    [0.2842, 0.3519, 0.4113, 0.4091, 0.4283, 0.4728, 0.5874, 0.5976, 0.6117, 0.7308],  # 0.7308
    [0.3215, 0.3628, 0.4193, 0.4365, 0.5146, 0.5621, 0.5523, 0.6112, 0.6650, 0.6057],  # 0.6650
    [0.2230, 0.3409, 0.3733, 0.4268, 0.4434, 0.4642, 0.6229, 0.6643, 0.6399, 0.6567],  # 0.6643
    [0.2891, 0.3457, 0.4223, 0.4149, 0.4545, 0.4675, 0.5714, 0.6440, 0.5765, 0.6954],  # 0.6954
    [0.3428, 0.3706, 0.4306, 0.4742, 0.5063, 0.3686, 0.4844, 0.7004, 0.6933, 0.7345],  # 0.7345
    [0.1792, 0.3082, 0.3354, 0.3695, 0.4091, 0.4402, 0.6479, 0.7293, 0.7511, 0.7920],  # 0.7920
    [0.3006, 0.3526, 0.4068, 0.4715, 0.5012, 0.5586, 0.5735, 0.6051, 0.6352, 0.6338],  # 0.6352
    [0.2611, 0.3994, 0.3971, 0.4777, 0.4506, 0.4403, 0.6329, 0.6657, 0.6442, 0.7393],  # 0.7393
    [0.2555, 0.3823, 0.3723, 0.4743, 0.4231, 0.4708, 0.5862, 0.6678, 0.6560, 0.6737],  # 0.6737
    [0.3005, 0.3396, 0.4155, 0.3980, 0.4573, 0.2737, 0.5331, 0.6390, 0.6458, 0.7435],  # 0.7435
    [0.2161, 0.3219, 0.3479, 0.3957, 0.3957, 0.3407, 0.5603, 0.6891, 0.7297, 0.7692],  # 0.7692
    [0.2161, 0.3219, 0.3467, 0.3905, 0.3994, 0.3867, 0.6022, 0.6882, 0.6405, 0.7065],  # 0.7065
    [0.1792, 0.3082, 0.3354, 0.3695, 0.4091, 0.4437, 0.5875, 0.6850, 0.5585, 0.7124],  # 0.7124
    [0.2161, 0.3219, 0.3479, 0.3916, 0.3957, 0.4683, 0.5903, 0.6391, 0.6603, 0.6160],  # 0.6603
    [0.1974, 0.3220, 0.3400, 0.4104, 0.4119, 0.4440, 0.6045, 0.6431, 0.6667, 0.6965],  # 0.6965
    [0.3077, 0.3463, 0.3978, 0.4157, 0.4645, 0.4814, 0.6008, 0.6363, 0.6604, 0.7111],  # 0.7111
    [0.2394, 0.3448, 0.3759, 0.4330, 0.4435, 0.3987, 0.5295, 0.6955, 0.6256, 0.7194],  # 0.7194
    [0.2369, 0.3278, 0.3773, 0.4426, 0.4424, 0.4240, 0.5993, 0.6698, 0.6175, 0.7361],  # 0.7361
    [0.2908, 0.3554, 0.3963, 0.4243, 0.4671, 0.4850, 0.4702, 0.6319, 0.6523, 0.6551],  # 0.6551
    [0.2170, 0.2905, 0.3258, 0.4081, 0.4048, 0.4124, 0.6108, 0.6710, 0.6550, 0.6770],  # 0.6770
    [0.2063, 0.3219, 0.3467, 0.3868, 0.3994, 0.3619, 0.5630, 0.6655, 0.6368, 0.7414],  # 0.7414
    [0.1974, 0.3347, 0.3520, 0.4092, 0.4244, 0.3732, 0.5726, 0.6463, 0.7513, 0.7782],  # 0.7782
    [0.1792, 0.2972, 0.3354, 0.3684, 0.4014, 0.4536, 0.6073, 0.7172, 0.5743, 0.7514],  # 0.7514
    [0.2620, 0.3717, 0.4220, 0.4446, 0.4723, 0.4098, 0.6074, 0.7341, 0.7098, 0.7897],  # 0.7897
    [0.2506, 0.3777, 0.3896, 0.4592, 0.4286, 0.4457, 0.6067, 0.6934, 0.7273, 0.7708],  # 0.7708
]


def history(values: list[float | None], upto: int | None = None) -> dict[int, float]:
    """Step -> value; None marks a step not reported (stage 1 stopped early)."""
    return {s: v for s, v in enumerate(values) if v is not None and (upto is None or s <= upto)}


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
    stopped = replay(PruningRule(E1, E2).stops)
    # No trial here is hopeless after stage 1 (the lowest stage-1 best, trial 2's 0.4905, is
    # far above half the worst completed one); trial 4 stops in stage 2's third epoch, and
    # trial 7, the best (0.8154), runs to the end.
    assert stopped == {4: E1 + 2}
    # The rule before stage 2's warmup stopped every trial below the worst completed stage 1.
    assert replay(PruningRule(E1, E2, boundary_fraction=1.0).stops) == {2: E1 - 1, 4: E1 - 1}


def test_warmed_up_search_keeps_the_best_trial_the_old_boundary_rule_stopped():
    # Its 8 trials are the sampler's random start-up trials, so the replay is exact.
    assert replay(PruningRule(E1, E2).stops, LFW_96_WARMUP) == {6: E1 + 2}
    assert replay(PruningRule(E1, E2, boundary_fraction=1.0).stops, LFW_96_WARMUP) == \
        {4: E1 - 1, 6: E1 - 1}


def test_long_search_stops_only_its_tail():
    stopped = replay(PruningRule(E1, E2).stops, LFW_96_40)
    finals = sorted((max(v) for v in LFW_96_40), reverse=True)
    # Three trials, all in stage 2's third epoch, that finished 35th, 37th and 38th of 40;
    # trial 20, the best (0.7920), runs to the end. (The search with this rule, the benchmark's
    # run V, stopped exactly these three and found 0.7920 too.)
    assert stopped == {6: E1 + 2, 9: E1 + 2, 14: E1 + 2}
    assert [finals.index(max(LFW_96_40[t])) + 1 for t in stopped] == [35, 37, 38]
    # Judged from stage 2's second epoch (the default before), the rule also stopped trial 11,
    # which finished at 0.6855, second only to trial 8 among the 12 run by then.
    early = replay(PruningRule(E1, E2, stage2_skip_epochs=1).stops, LFW_96_40)
    assert early == {6: E1 + 1, 9: E1 + 1, 11: E1 + 1, 14: E1 + 2, 33: E1 + 1}
    assert sorted((max(v) for v in LFW_96_40[:12]), reverse=True).index(max(LFW_96_40[11])) == 1


def test_stage1_is_never_judged_before_its_last_step():
    rule = PruningRule(E1, E2)
    done = [history(v) for v in LFW_160[:6]]
    worst = {s: 0.0 for s in range(E1)}  # below everything at every stage-1 step
    assert not any(rule.stops(worst, done, s) for s in range(E1 - 1))
    assert rule.stops(worst, done, E1 - 1)


def test_boundary_stops_only_a_hopeless_trial_once_two_have_completed():
    rule = PruningRule(E1, E2)
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
    assert not PruningRule(E1, stage2_steps=0).stops(hopeless, two, E1 - 1)


def test_stage2_skips_two_epochs_then_stops_the_bottom_quartile():
    rule = PruningRule(E1, E2)
    done = [history(v) for v in LFW_160[:4]]
    # Trial 4's stage 2 starts with a drop to 0.30 (below its own stage 1); in stage 2's first
    # two epochs nothing is judged, from the third its best so far (0.5325) is compared with
    # the bottom quartile of the completed trials at that step.
    trial4 = history(LFW_160[4])
    assert not rule.stops(trial4, done, E1)
    assert not rule.stops(trial4, done, E1 + 1)
    assert rule.stops(trial4, done, E1 + 2)  # 0.5325 < quartile of 0.7769, 0.6592, 0.5759, 0.7497
    # Fewer than four completed trials: no stage-2 quartile yet.
    assert not rule.stops(trial4, done[:3], E1 + 2)
    # A trial above the quartile goes on.
    assert not rule.stops(history(LFW_160[7]), done, E1 + 2)


def test_stage2_last_epoch_is_never_judged():
    done = [history(v) for v in LFW_160[:4]]
    # Above the quartile at step 8 (0.6652), below it at step 9 (0.6809): stopping it there
    # would save nothing and throw away a finished trial.
    trial = history([0.5] * E1 + [0.6, 0.62, 0.65, 0.67, 0.67])
    assert not PruningRule(E1, E2).stops(trial, done, E1 + 3)
    assert not PruningRule(E1, E2).stops(trial, done, E1 + E2 - 1)
    assert PruningRule(E1).stops(trial, done, E1 + E2 - 1)  # stage 2's length unknown


def test_optuna_pruner_stops_at_the_boundary_through_a_study():
    study = optuna.create_study(direction="maximize", pruner=optuna_pruner(PruningRule(E1, E2)))
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
    # Stage 2 (2 epochs) is judged from the second epoch after its one-epoch warmup.
    assert study.pruner.rule == PruningRule(3, 2, stage2_skip_epochs=2) == \
        PruningRule.for_fit(config().fit)
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

    # A longer warmup moves the first judged epoch with it.
    (tmp_path / "warm").mkdir()
    warm = SearchConfig(data_dir=tmp_path / "data", run_dir=tmp_path / "warm",
                        fit=FitConfig(max_epochs_stage1=3, max_epochs_stage2=6,
                                      warmup_epochs_stage2=3))
    assert open_study(warm).pruner.rule == PruningRule(3, 6, stage2_skip_epochs=4)


def test_rule_holds_on_searches_it_was_not_chosen_on():
    """The stage-2 rule was chosen on lfw_12people (LFW_96_40); on two other datasets' 40-trial
    searches it keeps the best trial and stops only trials that finish in the bottom quarter,
    and the searches with it (runs X and Y) stopped exactly these and found the same best."""
    records = json.loads((Path(__file__).parent / "data" / "pruning_40_trials.json").read_text())

    def places(record, stopped):
        finals = [max(v for v in trial if v is not None) for trial in record]
        return sorted(1 + sum(f > finals[t] for f in finals) for t in stopped)

    expected = {"cuhk03_30people": ({9: E1 + 2}, [39]),
                "att_orl_faces": ({9: E1 + 2, 15: E1 + 3, 16: E1 + 3, 19: E1 + 2},
                                  [31, 34, 35, 39])}
    for name, (stops, their_places) in expected.items():
        record = records[name]
        stopped = replay(PruningRule(E1, E2).stops, record)
        assert stopped == stops, name
        assert places(record, stopped) == their_places, name
    # Judged from stage 2's second epoch, as before run V, the rule would also have stopped
    # att_orl's trial 26, which finished 22nd of 40.
    early = replay(PruningRule(E1, E2, stage2_skip_epochs=1).stops, records["att_orl_faces"])
    assert 26 in early and places(records["att_orl_faces"], [26]) == [22]
