"""The stage-1 feature cache: computed once per backbone setting, reused, and as good as the naive path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tuner.config import FitConfig, ScanConfig, SplitConfig, TrialParams
from tuner.data import scan, split
from tuner.features import FeatureCache, feature_extractor
from tuner.hypermodel import build_model
from tuner.pipeline import ImageCache
from tuner.trial import TrialData, release, run_two_stages

PARAMS = TrialParams(backbone="MobileNet", alpha=0.25, input_size=96, dense_units=0, dropout=0.1,
                     l2=1e-5, label_smoothing=0.0, lr_stage1=3e-3, lr_stage2=1e-4,
                     freeze_block=10, augment=0.0, batch_size=16)


@pytest.fixture(scope="module")
def orl(datasets: Path):
    scanned = scan(ScanConfig(datasets / "att_orl_faces"))
    return split(scanned.images, SplitConfig(seed=3)), scanned.classes, datasets / "att_orl_faces"


def _stage1(orl, weights, features: FeatureCache | None, params: TrialParams = PARAMS):
    split_df, classes, root = orl
    data = TrialData(split_df, classes, ImageCache(root), features=features)
    cfg = FitConfig(max_epochs_stage1=8, max_epochs_stage2=0, patience=8, weights=str(weights))
    release()
    model = build_model(params, len(classes), cfg.weights, seed=cfg.seed)
    return run_two_stages(model, params, data, cfg), model, data, cfg


def test_cached_features_are_the_frozen_backbone_output(orl, mobilenet_025_weights, tmp_path):
    cache = FeatureCache(tmp_path)
    result, model, data, cfg = _stage1(orl, mobilenet_025_weights, cache)
    feats = cache.get(model, PARAMS, data, cfg)
    assert cache.computed == 1  # the trial computed them, this call reused them
    assert feats.train.shape[0] == 1  # no augmentation: one view
    val = data.arrays("val", PARAMS.input_size)
    direct = feature_extractor(model)(val.x[:8].astype(np.float32), training=False)
    np.testing.assert_allclose(feats.val[:8], np.asarray(direct), atol=1e-4)
    # A new cache over the same folder loads them from disk instead of computing.
    again = FeatureCache(tmp_path)
    assert np.array_equal(again.get(model, PARAMS, data, cfg).val, feats.val)
    assert again.computed == 0


def test_stage1_on_cached_features_matches_the_naive_path(orl, mobilenet_025_weights):
    """Same trial, stage 1 only: through the backbone every epoch vs on cached features."""
    naive, *_ = _stage1(orl, mobilenet_025_weights, None)
    fast, *_ = _stage1(orl, mobilenet_025_weights, FeatureCache(None))
    chance = 1 / 40
    assert naive.stage1_best > 10 * chance and fast.stage1_best > 10 * chance
    # Different batch orders, same data and model: equal within noise (63 validation faces).
    assert abs(fast.stage1_best - naive.stage1_best) < 0.1, (naive.stage1_best, fast.stage1_best)


def test_augmented_views_differ_and_train(orl, mobilenet_025_weights):
    params = TrialParams(**{**PARAMS.to_dict(), "augment": 0.5})
    cache = FeatureCache(None, views=3)
    result, model, data, cfg = _stage1(orl, mobilenet_025_weights, cache, params)
    feats = cache.get(model, params, data, cfg)
    assert feats.train.shape[0] == 3
    assert not np.allclose(feats.train[0], feats.train[1])  # each view is a new augmentation draw
    assert result.stage1_best > 10 / 40
