"""Search-space files, `define()` on both engines' hp, and the errors a bad file gives (no training)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from tuner import backbones
from tuner.config import TrialParams
from tuner.errors import SpaceError, UsageError
from tuner.space import (
    GLOBAL_PARAMS,
    OptunaHP,
    SearchSpace,
    define,
    default_values,
    hp_from_params,
    load_space,
    params_to_row,
)

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
BUNDLED = ["default.yaml", "edge.yaml", "cpu-quick.yaml"]

kt = pytest.importorskip("keras_tuner")
optuna = pytest.importorskip("optuna")


def in_space(p: TrialParams, space: SearchSpace) -> None:
    """Assert every value of `p` lies inside `space`."""
    entry = space.backbones[p.backbone]
    assert p.input_size in entry.input_size
    assert (p.alpha is None) == (not entry.alpha)
    if entry.alpha:
        assert p.alpha in entry.alpha
    low, high = entry.freeze_block
    assert low <= p.freeze_block <= high
    for name, spec in space.params.items():
        value = getattr(p, name)
        if spec.kind in ("choice", "fixed", "bool"):
            assert value in spec.values, name
        else:
            assert spec.min - 1e-12 <= value <= spec.max + 1e-12, name


# ---- bundled spaces --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_spaces_load_and_use_valid_backbones(name):
    space = load_space(SPACES / name)
    assert space.backbones and space.source.endswith(name)
    for canonical, entry in space.backbones.items():
        spec = backbones.get(canonical)
        assert spec.name == canonical == entry.name
        assert set(entry.input_size) <= set(spec.sizes)
        assert set(entry.alpha) <= set(spec.alphas)
        assert 0 <= entry.freeze_block[0] <= entry.freeze_block[1] <= FREEZE_POINTS[canonical]
    assert set(space.params) <= set(GLOBAL_PARAMS)


@pytest.mark.slow
def test_freeze_point_table_matches_registry():
    import keras

    for name, count in FREEZE_POINTS.items():
        spec = backbones.get(name)
        base = backbones.build_base(spec, spec.default_size, None)
        assert len(spec.freeze_points(base)) == count, name
        keras.backend.clear_session()


def test_default_space_has_every_backbone_and_edge_only_edge_tpu():
    assert set(load_space(SPACES / "default.yaml").backbones) == {
        backbones.get(n).name for n in backbones.names()
    }
    edge = load_space(SPACES / "edge.yaml")
    assert edge.backbones and all(backbones.get(n).edge_tpu for n in edge.backbones)
    assert set(edge.backbones) == {n for n in load_space(SPACES / "default.yaml").backbones
                                   if backbones.get(n).edge_tpu}


def test_cpu_quick_is_small():
    space = load_space(SPACES / "cpu-quick.yaml")
    assert set(space.backbones) == {"MobileNet", "MobileNetV2"}
    assert all(max(b.input_size) <= 160 for b in space.backbones.values())
    assert set(space.params["batch_size"].values) <= {16, 32}


# The origin's hand-tuned values (goruck/smart-zoneminder person-class/train.py, commit 3bd7f3a8).
ORIGIN = {
    "dense_units": 128, "dropout": 0.2, "l2": 1e-4, "label_smoothing": 0.1,
    "lr_stage1": [5e-4, 1e-4], "lr_stage2": [5e-5, 1e-5], "batch_size": [32, 16], "augment": 1.0,
}
# Backbone: (input size, its layer freeze mapped onto tuner.backbones' freeze points).
# NASNetLarge (331 px, batch 16) is not registered.
ORIGIN_BACKBONES = {"MobileNetV2": (224, 9), "ResNet50": (224, 4), "VGG16": (224, 3),
                    "NASNetMobile": (224, 3), "InceptionResNetV2": (299, 8)}
# len(spec.freeze_points(base)) per backbone, the table a space is checked against when it
# loads; the slow test checks it against built models.
FREEZE_POINTS = backbones.FREEZE_POINT_COUNTS


def test_default_space_contains_the_origin():
    space = load_space(SPACES / "default.yaml")
    for name, values in ORIGIN.items():
        spec = space.params[name]
        for value in values if isinstance(values, list) else [values]:
            if spec.kind == "choice":
                if name == "batch_size" and value == 16:
                    continue  # NASNetLarge only: not a registered backbone
                assert value in spec.values, (name, value)
            else:
                assert spec.min <= value <= spec.max, (name, value)
    for name, (size, freeze) in ORIGIN_BACKBONES.items():
        entry = space.backbones[name]
        assert size in entry.input_size
        assert entry.freeze_block[0] <= freeze <= entry.freeze_block[1]
    mnv2 = space.backbones["MobileNetV2"]
    assert 1.0 in mnv2.alpha and 224 in mnv2.input_size
    # A fresh KerasTuner hp (and default_values) is the origin's MobileNetV2 run.
    p = define(kt.HyperParameters(), space)
    assert (p.backbone, p.input_size, p.alpha, p.dense_units, p.batch_size) == (
        "MobileNetV2", 224, 1.0, 128, 32)
    assert math.isclose(p.dropout, 0.2) and math.isclose(p.lr_stage1, 5e-4)
    assert math.isclose(p.lr_stage2, 5e-5) and math.isclose(p.label_smoothing, 0.1)
    assert default_values(space)["backbone"] == "MobileNetV2"


# ---- KerasTuner ----------------------------------------------------------------------------


def test_define_with_keras_tuner_hp_marks_only_chosen_backbone_active():
    space = load_space(SPACES / "default.yaml")
    hp = kt.HyperParameters()
    p = define(hp, space)
    assert isinstance(p, TrialParams)
    in_space(p, space)
    names = {h.name for h in hp.space}
    for name, entry in space.backbones.items():
        assert f"{name}/input_size" in names and f"{name}/freeze_block" in names
        assert (f"{name}/alpha" in names) == bool(entry.alpha)
        assert hp.is_active(f"{name}/input_size") == (name == p.backbone)
    assert set(GLOBAL_PARAMS) <= names

    # Choose another backbone: its parameters become the active ones.
    hp.values["backbone"] = "ResNet50"
    hp.ensure_active_values()  # what KerasTuner's Tuner does when it activates a scope
    p = define(hp, space)
    assert p.backbone == "ResNet50" and p.alpha is None
    assert hp.is_active("ResNet50/freeze_block")
    assert not hp.is_active("MobileNetV2/input_size")


def test_random_search_oracle_drives_define(tmp_path):
    space = load_space(SPACES / "default.yaml")
    hp = kt.HyperParameters()
    define(hp, space)
    oracle = kt.oracles.RandomSearchOracle(
        objective=kt.Objective("val_loss", "min"), max_trials=20, hyperparameters=hp, seed=1
    )
    oracle._set_project_dir(str(tmp_path), "space")
    seen = set()
    for i in range(20):
        values = oracle.populate_space(str(i))["values"]
        trial_hp = oracle.get_space()
        trial_hp.values = values
        p = define(trial_hp, space)
        in_space(p, space)
        seen.add(p.backbone)
        # Only the chosen backbone's conditional values were populated.
        conditional = {k.split("/")[0] for k in values if "/" in k}
        assert conditional <= {p.backbone}
    assert len(seen) > 1


def test_keras_tuner_tuner_learns_the_conditional_space(tmp_path):
    space = load_space(SPACES / "cpu-quick.yaml")

    class SpaceOnly(kt.HyperModel):  # declares the space, builds nothing
        def build(self, hp):
            self.params = define(hp, space)

    tuner = kt.RandomSearch(hypermodel=SpaceOnly(), objective=kt.Objective("score", "max"),
                            max_trials=4, directory=str(tmp_path), seed=0)
    names = [h.name for h in tuner.oracle.hyperparameters.space]
    assert names[0] == "backbone"
    keys = ("input_size", "alpha", "freeze_block")
    assert {f"{b}/{k}" for b in space.backbones for k in keys} <= set(names)
    for i in range(4):
        trial = tuner.oracle.create_trial(f"worker{i}")
        model = SpaceOnly()
        model.build(trial.hyperparameters)
        in_space(model.params, space)


# ---- Optuna --------------------------------------------------------------------------------


def run_study(space, n=20, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    results = []

    def objective(trial):
        p = define(OptunaHP(trial), space)
        results.append(p)
        return p.dropout + p.lr_stage1  # any number

    study.optimize(objective, n_trials=n)
    return study, results


def test_define_with_optuna_is_in_range_reproducible_and_static():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(SPACES / "default.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study, first = run_study(space)
    assert not [w for w in caught if "optuna" in (w.filename + str(w.message)).lower()]
    assert len(first) == 20
    for p in first:
        in_space(p, space)
    _, second = run_study(space)
    assert first == second
    # One distribution per parameter name, whatever backbone a trial chose.
    distributions: dict = {}
    for trial in study.trials:
        backbone = trial.params["backbone"]
        for name, dist in trial.distributions.items():
            assert distributions.setdefault(name, dist) == dist
            if "/" in name:
                assert name.startswith(backbone + "/")
    # Replaying a finished trial gives its TrialParams back.
    best = study.best_trial
    assert define(OptunaHP(best), space) == first[best.number]


def test_optuna_hp_adapter_methods():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    hp = OptunaHP(trial)
    assert hp.Choice("c", ["a", "b"]) in ("a", "b")
    assert 1 <= hp.Int("i", 1, 64, sampling="log") <= 64
    assert hp.Int("j", 16, 64, step=2, sampling="log") in (16, 32, 64)
    g = hp.Float("g", 1e-4, 1e-1, step=10, sampling="log")  # KerasTuner's geometric grid
    assert any(math.isclose(g, v) for v in (1e-4, 1e-3, 1e-2, 1e-1))
    assert 0.0 <= hp.Float("f", 0.0, 0.5, step=0.1) <= 0.5
    assert hp.Boolean("b") in (False, True)
    assert hp.Fixed("x", 7) == 7 and hp.get("x") == 7 and "x" not in trial.params
    with hp.conditional_scope("c", ["zzz"]):
        assert hp.Float("inactive", 0.0, 1.0) is None
    assert "inactive" not in trial.params and not hp.is_active("inactive")
    with pytest.raises(KeyError):
        hp.get("inactive")
    with pytest.raises(ValueError):
        with hp.conditional_scope("undefined", [1]):
            pass
    assert set(hp.values) == {"c", "i", "j", "g", "f", "b", "x"}


# ---- stored params -------------------------------------------------------------------------


def test_hp_from_params_replays_a_row_and_hp_values():
    space = load_space(SPACES / "default.yaml")
    p = TrialParams(backbone="MobileNet", alpha=0.5, input_size=160, dense_units=256,
                    dropout=0.3, l2=1e-3, label_smoothing=0.05, lr_stage1=1e-3,
                    lr_stage2=1e-5, freeze_block=4, augment=0.5, batch_size=16)
    row = params_to_row(p)
    assert list(row)[0] == "backbone" and row["alpha"] == 0.5
    assert define(hp_from_params(row), space) == p
    hp = kt.HyperParameters()
    hp.values.update({"backbone": "ResNet50"})
    want = define(hp, space)
    assert define(hp_from_params(dict(hp.values)), space) == want
    with pytest.raises(SpaceError, match="not in this search space"):
        define(hp_from_params({**row, "backbone": "NoSuchNet"}), space)


# ---- restriction ---------------------------------------------------------------------------


def test_restriction_keeps_named_backbones_only():
    space = load_space(SPACES / "default.yaml", backbones=["mobilenetv2"])
    assert list(space.backbones) == ["MobileNetV2"]
    assert define(kt.HyperParameters(), space).backbone == "MobileNetV2"
    assert load_space(SPACES / "default.yaml", backbones=None).backbones.keys() >= {"MobileNetV2"}


def test_restriction_errors():
    with pytest.raises(SpaceError, match=r"cpu-quick\.yaml.*'ResNet50' is not in this search space"):
        load_space(SPACES / "cpu-quick.yaml", backbones=["ResNet50"])
    with pytest.raises(UsageError):
        load_space(SPACES / "default.yaml", backbones=["NoSuchNet"])


# ---- bad files -----------------------------------------------------------------------------

GOOD_HEAD = "backbones:\n  MobileNetV2: {input_size: [96, 224], freeze_block: [0, 4]}\n"

BAD = {
    # name: (file text, line, substrings the message must contain)
    "syntax": ("backbones:\n  MobileNetV2: {input_size: [96, 224}\n", 2, ["YAML syntax error"]),
    "top_key": (GOOD_HEAD + "hyperparams:\n  dropout: 0.1\n", 3,
                ["hyperparams", "unknown top-level key", "did you mean 'hyperparameters'"]),
    "unknown_hp": (GOOD_HEAD + "hyperparameters:\n  droput: {float: [0.0, 0.5]}\n", 4,
                   ["hyperparameters.droput", "unknown hyperparameter", "dropout"]),
    "per_backbone_hp": (GOOD_HEAD + "hyperparameters:\n  input_size: {choice: [96]}\n", 4,
                        ["set per backbone"]),
    "unknown_backbone": ("backbones:\n  MobileNetV2: {}\n  MobileNetV9: {}\n", 3,
                         ["backbones.MobileNetV9", "unknown backbone", "MobileNetV2"]),
    "size": ("backbones:\n  MobileNetV2:\n    input_size: [96,\n      100]\n", 4,
             ["backbones.MobileNetV2.input_size", "100 is not an input size"]),
    "alpha": ("backbones:\n  MobileNetV2:\n    alpha: [0.5, 0.6]\n", 3, ["0.6 is not an alpha"]),
    "alpha_none": ("backbones:\n  ResNet50:\n    alpha: [1.0]\n", 3, ["no width multiplier"]),
    "min_max": (GOOD_HEAD + "hyperparameters:\n  dropout:\n    float: [0.5, 0.1]\n", 5,
                ["hyperparameters.dropout.float", "min 0.5 > max 0.1"]),
    "freeze_three": ("backbones:\n  MobileNetV2:\n    freeze_block: [4, 8, 12]\n", 3,
                     ["inclusive range, e.g. [0, 8]) or one index", "got 3"]),
    "freeze_min_max": ("backbones:\n  MobileNetV2:\n    freeze_block: [8, 2]\n", 3, ["min 8 > max 2"]),
    "log_min": (GOOD_HEAD + "hyperparameters:\n  l2: {float: [0.0, 1.0e-2],\n       sampling: log}\n", 5,
                ["log sampling needs min > 0"]),
    "log_default_off_grid": (GOOD_HEAD + "hyperparameters:\n  l2: {float: [1.0e-6, 1.0e-2],"
                             "\n       sampling: log, step: 10, default: 5.0e-5}\n", 5,
                             ["hyperparameters.l2.default",
                              "5e-05 is not on the grid 1e-06 * 10**k (1e-06, 1e-05, 0.0001"]),
    "empty_choice": (GOOD_HEAD + "hyperparameters:\n  dense_units: {choice: []}\n", 4,
                     ["hyperparameters.dense_units.choice", "empty list"]),
    "not_number": (GOOD_HEAD + "hyperparameters:\n  dropout: {float: [0.0, abc]}\n", 4,
                   ["hyperparameters.dropout.float[1]", "expected a number, got 'abc'"]),
    "int_for_float": (GOOD_HEAD + "hyperparameters:\n  dense_units: {float: [1, 8]}\n", 4,
                      ["is an integer"]),
    "not_integer": (GOOD_HEAD + "hyperparameters:\n  batch_size: {choice: [16, 32.5]}\n", 4,
                    ["expected an integer"]),
    "kind_missing": (GOOD_HEAD + "hyperparameters:\n  dropout: {range: [0.0, 0.5]}\n", 4,
                     ["expected exactly one of"]),
    "not_mapping": ("backbones: [MobileNetV2]\n", 1, ["expected a mapping"]),
    "duplicate": ("backbones:\n  MobileNetV2: {}\n  mobilenetv2: {}\n", 3, ["listed twice"]),
    "duplicate_key": (GOOD_HEAD + "hyperparameters:\n  dropout: 0.1\n  dropout: 0.2\n", 5,
                      ["duplicate key", "line 4"]),
    "out_of_bounds": (GOOD_HEAD + "hyperparameters:\n  dropout: {choice: [0.1, 1.5]}\n", 4,
                      ["1.5 is out of range for dropout"]),
    "step_grid": (GOOD_HEAD + "hyperparameters:\n  dropout: {float: [0.0, 0.5], step: 0.2}\n", 4,
                  ["not a multiple of step"]),
    "no_backbones": ("hyperparameters:\n  dropout: 0.1\n", 1, ["backbones", "missing"]),
    "empty_file": ("# nothing\n", 1, ["empty"]),
    # tags the safe loader does not know or cannot apply: still one line, never a traceback
    "unknown_tag": (GOOD_HEAD + "hyperparameters:\n  dropout: !foo 0.2\n", 4,
                    ["cannot read '0.2' tagged !foo; remove the tag"]),
    "bad_int_tag": (GOOD_HEAD + "hyperparameters:\n  batch_size: !!int x\n", 4,
                    ["cannot read 'x' tagged tag:yaml.org,2002:int"]),
    "bad_bool_tag": (GOOD_HEAD + "hyperparameters:\n  dropout: !!bool maybe\n", 4,
                     ["cannot read 'maybe'"]),
    "tagged_key": (GOOD_HEAD + "hyperparameters:\n  !foo dropout: 0.2\n", 4,
                   ["cannot read 'dropout' tagged !foo"]),
    "freeze_past_last": ("backbones:\n  MobileNetV2: {input_size: [96], freeze_block: [0, 99]}\n",
                         2, ["max 99 is past MobileNetV2's last freeze point (18)"]),
    "duplicate_sizes": ("backbones:\n  MobileNetV2: {input_size: [96, 96], freeze_block: [0, 4]}\n",
                        2, ["MobileNetV2.input_size", "has duplicate values"]),
    "duplicate_alphas": ("backbones:\n  MobileNetV2: {input_size: [96], alpha: [1.0, 1]}\n", 2,
                         ["MobileNetV2.alpha", "has duplicate values"]),
    "sampling_list": (GOOD_HEAD + "hyperparameters:\n  l2: {float: [1.0e-5, 1.0e-3], "
                      "sampling: [log]}\n", 4, ["expected linear or log, got a list"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_gives_one_line_error_with_file_and_line(tmp_path, case):
    text, line, parts = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    for part in parts:
        assert part in message, message


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SpaceError, match="nope.yaml.*not found"):
        load_space(tmp_path / "nope.yaml")


def test_plain_scientific_notation_and_fixed_values(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD_HEAD + "hyperparameters:\n  l2: {float: [1e-6, 1e-2], sampling: log}\n"
                    "  label_smoothing: 0.1\n  dense_units: {choice: [64]}\n")
    space = load_space(path)
    assert space.params["l2"].min == 1e-6
    hp = kt.HyperParameters()
    p = define(hp, space)
    # Single values and omitted hyperparameters are Fixed at their value / the TrialParams default.
    assert p.label_smoothing == 0.1 and p.dense_units == 64 and p.batch_size == TrialParams().batch_size
    assert {h.name: type(h).__name__ for h in hp.space}["batch_size"] == "Fixed"


@pytest.mark.parametrize("text", ["12", "[12]", "[12, 12]"])
def test_one_freeze_block_fixes_it(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(f"backbones:\n  MobileNetV2: {{input_size: [96], freeze_block: {text}}}\n")
    space = load_space(path)
    assert space.backbones["MobileNetV2"].freeze_block == (12, 12)
    p = define(kt.HyperParameters(), space)
    assert p.freeze_block == 12


def test_a_log_grid_default_is_a_grid_value_for_both_engines(tmp_path):
    """1e-6 * 10**2 is 9.999999999999999e-05 in floating point, so a default of 1e-4 was not
    among Optuna's choices and the search's first (baseline) trial crashed with a traceback."""
    path = tmp_path / "s.yaml"
    path.write_text(GOOD_HEAD + "hyperparameters:\n  l2: {float: [1.0e-6, 1.0e-2], "
                    "sampling: log, step: 10, default: 1.0e-4}\n")
    space = load_space(path)
    assert default_values(space)["l2"] == 1e-4
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(default_values(space))
    p = define(OptunaHP(study.ask()), space)
    assert p.l2 == 1e-4
