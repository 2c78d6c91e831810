"""The activation caches: computed once per backbone setting, reused, and as good as the naive path."""
from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import WAIT_FOR_GO, side_by_side
from tuner.config import FitConfig, ScanConfig, SplitConfig, TrialParams
from tuner.data import scan, split
from tuner import backbones
from tuner.features import FeatureCache, extract, feature_extractor, split_at
from tuner.hypermodel import base_of, build_model
from tuner.pipeline import ImageCache
from tuner.trial import TrialData, release, run_two_stages, score

PARAMS = TrialParams(backbone="MobileNet", alpha=0.25, input_size=96, dense_units=0, dropout=0.1,
                     l2=1e-5, label_smoothing=0.0, lr_stage1=3e-3, lr_stage2=1e-4,
                     freeze_block=10, augment=0.0, batch_size=16)


@pytest.fixture(scope="module")
def orl(datasets: Path):
    scanned = scan(ScanConfig(datasets / "att_orl_faces"))
    return split(scanned.images, SplitConfig(seed=3)), scanned.classes, datasets / "att_orl_faces"


def _stage1(orl, weights, features: FeatureCache | None, params: TrialParams = PARAMS,
            views: int = 4):
    split_df, classes, root = orl
    data = TrialData(split_df, classes, ImageCache(root), features=features)
    cfg = FitConfig(max_epochs_stage1=8, max_epochs_stage2=0, patience=8, weights=str(weights),
                    augment_views=views)
    release()
    keras.utils.set_random_seed(cfg.seed)  # as a search builds each trial
    model = build_model(params, len(classes), cfg.weights, seed=cfg.seed)
    return run_two_stages(model, params, data, cfg), model, data, cfg


def test_cached_features_are_the_frozen_backbone_output(orl, mobilenet_025_weights, tmp_path):
    cache = FeatureCache(tmp_path)
    result, model, data, cfg = _stage1(orl, mobilenet_025_weights, cache)
    feats = cache.for_trial(model, PARAMS, data, cfg).pooled
    assert cache.computed == 1  # the trial computed them, this call reused them
    assert feats.train.shape[0] == 1  # no augmentation: one view
    val = data.arrays("val", PARAMS.input_size)
    direct = feature_extractor(model)(val.x[:8].astype(np.float32), training=False)
    np.testing.assert_allclose(feats.val[:8], np.asarray(direct), atol=1e-4)
    # A new cache over the same folder loads them from disk instead of computing.
    again = FeatureCache(tmp_path)
    assert np.array_equal(again.for_trial(model, PARAMS, data, cfg).pooled.val, feats.val)
    assert again.computed == 0


def test_every_prediction_pass_traces_once(orl, mobilenet_025_weights):
    """Batches are padded to one shape, so a short last batch costs no second trace: the
    train views and the validation set share the extractor's one predict function, as do
    all of a trial's validation passes. The padding changes no real row."""
    result, model, data, cfg = _stage1(orl, mobilenet_025_weights, None)  # the naive path
    val = data.arrays("val", PARAMS.input_size)
    assert len(val.y) % 64, "the validation set must end in a short batch for this test"
    assert result.epochs_stage1 > 1
    assert model.predict_function.experimental_get_tracing_count() == 1

    extractor = feature_extractor(model)
    feats = extract(extractor, PARAMS, data, cfg)
    assert feats.train.shape[1] % 64
    assert extractor.predict_function.experimental_get_tracing_count() == 1
    direct = extractor(val.x.astype(np.float32), training=False)
    np.testing.assert_allclose(feats.val, np.asarray(direct), atol=1e-4)


def _losses(result) -> np.ndarray:
    return np.array([h["loss"] for h in result.history])


def test_stage1_on_cached_features_matches_the_naive_path(orl, mobilenet_025_weights):
    """Same trial, stage 1 only, with augmentation and dropout: through the backbone every
    epoch vs on cached features. Both train on the same batches of the same augmented
    copies with the same dropout draws, so they compute the same thing, epoch by epoch."""
    params = TrialParams(**{**PARAMS.to_dict(), "augment": 0.5, "dense_units": 64,
                            "dropout": 0.3})
    naive, *_ = _stage1(orl, mobilenet_025_weights, None, params, views=2)
    fast, *_ = _stage1(orl, mobilenet_025_weights, FeatureCache(None), params, views=2)
    assert naive.epochs_stage1 == fast.epochs_stage1 == 8
    np.testing.assert_allclose(_losses(fast), _losses(naive), rtol=5e-3)
    assert fast.stage1_best > 10 / 40
    # Validation scores: only a near-tie or two may flip (float rounding), of 63 faces.
    assert abs(fast.stage1_best - naive.stage1_best) < 0.04, (naive.stage1_best, fast.stage1_best)


def test_augmented_views_differ_and_train(orl, mobilenet_025_weights):
    params = TrialParams(**{**PARAMS.to_dict(), "augment": 0.5})
    cache = FeatureCache(None)
    result, model, data, cfg = _stage1(orl, mobilenet_025_weights, cache, params, views=3)
    feats = cache.for_trial(model, params, data, cfg).pooled
    assert feats.train.shape[0] == 3
    assert not np.allclose(feats.train[0], feats.train[1])  # each view is a new augmentation draw
    assert result.stage1_best > 10 / 40


# --- stage 2 on cached activations at the freeze point ------------------------------------

STAGE2 = FitConfig(max_epochs_stage1=4, max_epochs_stage2=6, patience=6)


def _two_stages(orl, weights, features: FeatureCache | None, params: TrialParams = PARAMS):
    split_df, classes, root = orl
    data = TrialData(split_df, classes, ImageCache(root), features=features)
    cfg = FitConfig(**{**STAGE2.__dict__, "weights": str(weights)})
    release()
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(params, len(classes), cfg.weights, seed=cfg.seed)
    return run_two_stages(model, params, data, cfg), model, data


def test_cut_at_the_freeze_point_reproduces_the_model():
    """prefix -> suffix is the whole model, prefix -> pooled is the stage-1 features; a cut
    inside a residual block, or with nothing frozen, is refused."""
    params = TrialParams(backbone="MobileNetV2", alpha=1.0, input_size=96, freeze_block=12)
    model = build_model(params, 5, None, seed=1)
    base = base_of(model)
    spec = backbones.get("MobileNetV2")
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype(np.float32)
    for block in (12, 16):
        cut = split_at(model, backbones.first_trainable(base, spec, block))
        assert cut is not None
        acts = cut.prefix(x, training=False)
        np.testing.assert_allclose(np.asarray(cut.suffix(acts, training=False)),
                                   np.asarray(model(x, training=False)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(cut.pooled(acts)),
                                   np.asarray(feature_extractor(model)(x)), atol=1e-4)
    inside = [layer.name for layer in base.layers].index("block_12_depthwise")
    assert split_at(model, inside) is None  # block_12_add reads block_11's output across it
    assert split_at(model, 0) is None


def test_stage2_on_cached_activations_matches_the_naive_path(orl, mobilenet_025_weights):
    naive, *_ = _two_stages(orl, mobilenet_025_weights, None)
    cache = FeatureCache(None)
    fast, model, data = _two_stages(orl, mobilenet_025_weights, cache)
    assert cache.computed == 1  # one pass over the images: pooled features derive from it
    chance = 1 / 40
    assert naive.epochs_stage2 > 0 and fast.epochs_stage2 > 0
    assert fast.stage2_best > 10 * chance and naive.stage2_best > 10 * chance
    # The same computation in both stages (float32 activations fit the budget): the same
    # trial, epoch by epoch, up to float rounding.
    assert fast.epochs_stage2 == naive.epochs_stage2
    np.testing.assert_allclose(_losses(fast), _losses(naive), rtol=1e-3)
    np.testing.assert_allclose([h["val_loss"] for h in fast.history],
                               [h["val_loss"] for h in naive.history], rtol=1e-3)
    assert abs(fast.stage2_best - naive.stage2_best) < 0.02, (naive.stage2_best, fast.stage2_best)
    # The suffix trained the full model's own layers: the model scores what the trial reported.
    val = data.arrays("val", PARAMS.input_size)
    probs = model.predict(val.x.astype(np.float32), verbose=0)
    assert abs(score(val.y, probs)["balanced_accuracy"] - fast.best["val_balanced_accuracy"]) < 1e-6


def test_deeper_freeze_points_derive_from_the_shallowest(orl, mobilenet_025_weights):
    cache = FeatureCache(None, anchor_blocks={"MobileNet": 8})
    for block in (12, 10):
        params = TrialParams(**{**PARAMS.to_dict(), "freeze_block": block})
        result, model, data = _two_stages(orl, mobilenet_025_weights, cache, params)
        assert result.epochs_stage2 > 0
    assert cache.computed == 1  # the anchor at block 8; blocks 10 and 12 came from it
    # Derived activations equal a direct pass.
    base = base_of(model)
    first = backbones.first_trainable(base, backbones.get("MobileNet"), 10)
    cut = split_at(model, first)
    cfg = FitConfig(**{**STAGE2.__dict__, "weights": str(mobilenet_025_weights)})
    derived = cache.for_trial(model, params, data, cfg, first).stage2()[1].val
    assert cache.computed == 1
    direct = cut.prefix.predict(data.arrays("val", 96).x.astype(np.float32), verbose=0)
    np.testing.assert_allclose(derived.astype(np.float32), direct, rtol=0.02, atol=0.02)


def _block12_trial(orl, weights, cache: FeatureCache):
    """A fresh model for a trial frozen below block 12, with the cache as its trial data's:
    (model, params, data, cfg, index of the first trainable layer)."""
    split_df, classes, root = orl
    data = TrialData(split_df, classes, ImageCache(root), features=cache)
    cfg = FitConfig(**{**STAGE2.__dict__, "weights": str(weights)})
    params = TrialParams(**{**PARAMS.to_dict(), "freeze_block": 12})
    release()
    model = build_model(params, len(classes), cfg.weights, seed=cfg.seed)
    first = backbones.first_trainable(base_of(model), backbones.get("MobileNet"), 12)
    return model, params, data, cfg, first


def test_stage2_activations_wait_until_stage2(orl, mobilenet_025_weights):
    """A trial pruned after stage 1 never pays for its freeze point's activations: for_trial
    gives the pooled features (from the anchor) and derives the freeze point only on demand."""
    cache = FeatureCache(None, anchor_blocks={"MobileNet": 8})
    model, params, data, cfg, first = _block12_trial(orl, mobilenet_025_weights, cache)
    inputs = cache.for_trial(model, params, data, cfg, first)
    setting = cache.setting(params, cfg, data)
    cut = split_at(model, first)
    assert cache.in_memory(setting, cut.layer) is None  # not derived yet
    assert len(cache._memory) == 2 and cache.computed == 1  # the anchor and the pooled features
    direct = feature_extractor(model).predict(data.arrays("val", 96).x.astype(np.float32),
                                              verbose=0)
    np.testing.assert_allclose(inputs.pooled.val, direct, rtol=0.02, atol=0.02)
    suffix, acts = inputs.stage2()
    assert suffix is not None and acts.val.shape[1:] == tuple(cut.prefix.output.shape[1:])
    assert cache.computed == 1  # derived from the anchor, not from the images
    # Held by the trial only: memory keeps the anchor and the pooled features, however many
    # freeze points trials derive.
    assert cache.in_memory(setting, cut.layer) is None and len(cache._memory) == 2


def test_derived_activations_are_kept_on_disk_not_in_memory(orl, mobilenet_025_weights,
                                                            tmp_path, monkeypatch):
    """A freeze point derived for one trial is saved under the run's cache; the next trial at
    that freeze point loads it instead of deriving again, and memory never holds it."""
    import tuner.features as features

    cache = FeatureCache(tmp_path, anchor_blocks={"MobileNet": 8})
    model, params, data, cfg, first = _block12_trial(orl, mobilenet_025_weights, cache)
    inputs = cache.for_trial(model, params, data, cfg, first)
    files = set(tmp_path.iterdir())
    first_acts = inputs.stage2()[1]
    assert len(set(tmp_path.iterdir()) - files) == 1  # the derived freeze point
    assert len(cache._memory) == 2  # the anchor and the pooled features only

    def no_derivation(*args):
        raise AssertionError("derived again instead of loaded from disk")

    monkeypatch.setattr(features, "_derive", no_derivation)
    again = cache.for_trial(model, params, data, cfg, first).stage2()[1]
    assert np.array_equal(again.train, first_acts.train) and again is not first_acts


def test_workers_needing_the_same_activations_compute_them_once(tmp_path):
    """Two workers of one run directory whose first trials need the same activations: one
    computes them, the other waits for its file and loads it instead of computing them at
    the same time on the same cores."""
    script = f"""
import json, time
from pathlib import Path
import numpy as np
from tuner.features import FeatureCache, Features
cache = FeatureCache(Path({str(tmp_path / "cache")!r}))
computed = []

def compute():
    computed.append(1)
    time.sleep(1.0)  # a forward pass over the images: long enough to overlap the other's
    return Features(np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                    np.ones((3, 4), np.float32))
{WAIT_FOR_GO}
feats = cache._get("setting-key", compute)
print(json.dumps({{"computed": len(computed), "train": float(feats.train.sum())}}))
"""
    outs = [json.loads(o) for o in side_by_side(script, 2, tmp_path / "sync")]
    assert sorted(o["computed"] for o in outs) == [0, 1], outs
    assert [o["train"] for o in outs] == [276.0, 276.0]


def test_activations_fall_back_to_float16_where_float32_does_not_fit(orl, mobilenet_025_weights):
    split_df, classes, root = orl
    params = TrialParams(**{**PARAMS.to_dict(), "augment": 0.5})
    cfg = FitConfig(**{**STAGE2.__dict__, "weights": str(mobilenet_025_weights)})
    release()
    model = build_model(params, len(classes), cfg.weights, seed=cfg.seed)
    first = backbones.first_trainable(base_of(model), backbones.get("MobileNet"), 10)
    values = math.prod(split_at(model, first).prefix.output.shape[1:]) * (
        4 * int((split_df["split"] == "train").sum()) + int((split_df["split"] == "val").sum()))
    cache = FeatureCache(None, memory_mb=values * 3 / 2**20)  # 3 bytes a value
    data = TrialData(split_df, classes, ImageCache(root), features=cache)
    suffix, acts = cache.for_trial(model, params, data, cfg, first).stage2()
    assert acts.train.dtype == np.float16 and acts.train.shape[0] == 4


def test_activations_over_the_memory_budget_train_through_the_model(orl, mobilenet_025_weights):
    cache = FeatureCache(None, memory_mb=0.5)
    result, *_ = _two_stages(orl, mobilenet_025_weights, cache)
    assert result.epochs_stage2 > 0 and result.stage2_best > 10 / 40
    assert cache.computed == 1  # only the pooled features, from the images


def test_feature_keys_follow_the_split_and_the_weights_files_content(tmp_path):
    """Swapping a training and a validation photo in a hand-edited split.csv, or replacing the
    weights file at the same path, found the old features (measured before: a resumed trial
    scored exactly the old split's val_loss)."""
    import os
    from types import SimpleNamespace

    from tuner import features

    split_df = pd.DataFrame({"path": ["a/1.jpg", "a/2.jpg", "b/1.jpg"],
                             "sha256": ["11", "22", "33"], "split": ["train", "val", "train"]})
    swapped = split_df.assign(split=["val", "train", "train"])
    key = features._split_key(SimpleNamespace(split=split_df))
    assert key == features._split_key(SimpleNamespace(split=split_df.iloc[::-1]))  # row order
    assert key != features._split_key(SimpleNamespace(split=swapped))
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"one")
    before = features._weights_key(str(weights))
    weights.write_bytes(b"other")
    os.utime(weights, ns=(1, 1))
    assert features._weights_key(str(weights)) != before
    assert features._weights_key("imagenet") == "imagenet" and features._weights_key(None) == "None"


def test_damaged_or_inexact_cache_files_are_never_used_and_a_full_disk_is_a_warning(tmp_path,
                                                                                   caplog):
    from tuner.features import Features, _derive
    from tuner.pipeline import _load_images, save_atomically

    cache = FeatureCache(tmp_path)
    feats = Features(np.ones((2, 3, 4), np.float32), np.ones((3, 4), np.float32))
    cache._save("k", feats)
    path = tmp_path / "features-k.npz"
    data = path.read_bytes()
    for damaged in (b"", data[: len(data) // 2], data[:-40] + b"\0" * 40):
        path.write_bytes(damaged)
        assert cache._load("k") is None  # rebuilt, not an EOFError or BadZipFile
    images = tmp_path / "images.npy"
    images.write_bytes(b"")
    assert _load_images(images, (1, 2, 2, 3)) is None
    # Features derived from float16 activations are close to their key's, not equal: they stay
    # in memory only (and so does all that is derived from them).
    inputs = keras.Input((4,))
    net = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    assert _derive(net, feats, np.float32).exact
    half = _derive(net, Features(feats.train.astype(np.float16), feats.val.astype(np.float16)),
                   np.float32)
    assert not half.exact and not _derive(net, half, np.float32).exact
    cache._save("f16", half)
    assert not (tmp_path / "features-f16.npz").exists()
    # A cache that cannot be written (here its folder is a file) costs a warning, no error,
    # and leaves no temporary file behind.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    save_atomically(blocked / "x.npy", lambda tmp: np.save(tmp, np.zeros(3)), ".tmp.npy")
    assert "not written" in caplog.text and blocked.read_text() == "a file, not a folder"
    FeatureCache(blocked)._save("k", feats)
    assert caplog.text.count("not written") == 2
