"""tuner.pipeline: decode once per size (memory and disk caches), split arrays, tf.data batches.

Runs on the bundled sample (sample/lfw_mini, 160 images) at small sizes so it stays fast.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tuner.config import ScanConfig, SplitConfig
from tuner.data import read_split, scan, split, write_split
from tuner.pipeline import ImageCache, SplitArrays, augmentation, load_image, make_dataset, split_arrays

SIZE = 32


@pytest.fixture(scope="module")
def sample(sample_dir):
    result = scan(ScanConfig(sample_dir))
    result.validate()
    return result, split(result.images, SplitConfig(seed=42))


@pytest.fixture(scope="module")
def train_arrays(sample, sample_dir) -> SplitArrays:
    result, df = sample
    return split_arrays(df, result.classes, ImageCache(sample_dir), SIZE, "train")


def test_image_cache_decodes_each_image_once_per_size(sample, sample_dir, tmp_path):
    _, df = sample
    frame = df.sort_values("path").reset_index(drop=True)
    cache = ImageCache(sample_dir, tmp_path / "cache")
    first = cache.images(frame, SIZE)
    assert cache.decoded == len(frame)
    assert first.shape == (len(frame), SIZE, SIZE, 3) and first.dtype == np.uint8
    again = cache.images(frame, SIZE)
    assert cache.decoded == len(frame), "second call decodes nothing"
    assert again is first
    assert len(list((tmp_path / "cache").glob(f"images-*-{SIZE}.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp*"))

    fresh = ImageCache(sample_dir, tmp_path / "cache")  # a new process, the same run directory
    from_disk = fresh.images(frame, SIZE)
    assert fresh.decoded == 0
    np.testing.assert_array_equal(from_disk, first)

    bigger = fresh.images(frame, SIZE + 8)
    assert fresh.decoded == len(frame), "a new size is decoded again"
    assert bigger.shape == (len(frame), SIZE + 8, SIZE + 8, 3)


def test_image_cache_key_survives_split_csv_round_trip(sample, sample_dir, tmp_path):
    """A resumed run reads split.csv back; the same rows must hit the same disk cache."""
    _, df = sample
    write_split(df, tmp_path / "split.csv")
    back = read_split(tmp_path / "split.csv", sample_dir)
    rows = df[df["split"] == "val"].sort_values("path").reset_index(drop=True)
    rows_back = back[back["split"] == "val"].sort_values("path").reset_index(drop=True)
    assert ImageCache.key(rows) == ImageCache.key(rows_back)
    ImageCache(sample_dir, tmp_path / "cache").images(rows, SIZE)
    resumed = ImageCache(sample_dir, tmp_path / "cache")
    resumed.images(rows_back, SIZE)
    assert resumed.decoded == 0


def test_damaged_disk_cache_is_rebuilt(sample, sample_dir, tmp_path):
    _, df = sample
    rows = df[df["split"] == "test"].reset_index(drop=True)
    good = ImageCache(sample_dir, tmp_path / "cache").images(rows, SIZE)
    (npy,) = (tmp_path / "cache").glob("*.npy")
    npy.write_bytes(b"not a numpy file")
    cache = ImageCache(sample_dir, tmp_path / "cache")
    np.testing.assert_array_equal(cache.images(rows, SIZE), good)
    assert cache.decoded == len(rows)


def test_split_arrays_shapes_and_dtypes(sample, sample_dir):
    result, df = sample
    cache = ImageCache(sample_dir)
    classes = result.classes
    total = 0
    for which in ("train", "val", "test"):
        arrays = split_arrays(df, classes, cache, SIZE, which)
        rows = df[df["split"] == which].sort_values("path")
        n = len(rows)
        total += n
        assert arrays.x.shape == (n, SIZE, SIZE, 3) and arrays.x.dtype == np.uint8
        assert arrays.y.shape == (n,) and arrays.y.dtype == np.int32
        assert arrays.y.min() >= 0 and arrays.y.max() < len(classes)
        assert list(arrays.paths) == list(rows["path"])
        assert [classes[i] for i in arrays.y] == list(rows["label"])
        assert set(arrays.views) <= {"face", "no_face"}
        assert set(arrays.y) == set(range(len(classes))), f"{which} has every class"
    assert total == len(df)
    # The cached array is what load_image gives for each file (same decode and resize).
    arrays = split_arrays(df, classes, cache, SIZE, "val")
    np.testing.assert_array_equal(arrays.x[0], load_image(sample_dir / arrays.paths[0], SIZE))


def test_make_dataset_batches(train_arrays, sample):
    import tensorflow as tf

    result, _ = sample
    k = len(result.classes)
    weights = {i: 1.0 + i for i in range(k)}
    ds = make_dataset(train_arrays, k, 16, training=True, class_weight=weights, seed=1)
    seen = 0
    for x, y, w in ds:
        assert x.dtype == tf.float32 and y.dtype == tf.float32 and w.dtype == tf.float32
        assert x.shape[1:] == (SIZE, SIZE, 3)
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0
        np.testing.assert_array_equal(y.numpy().sum(axis=1), 1.0)
        assert set(np.unique(y.numpy())) <= {0.0, 1.0}
        np.testing.assert_allclose(w.numpy(), [weights[i] for i in y.numpy().argmax(axis=1)])
        seen += int(x.shape[0])
    assert seen == len(train_arrays.x)

    # Evaluation: no weights, no shuffle, pixels unchanged.
    ds = make_dataset(train_arrays, k, 16, training=False, class_weight=weights)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(x.numpy(), train_arrays.x[:16].astype(np.float32))
    np.testing.assert_array_equal(y.numpy().argmax(axis=1), train_arrays.y[:16])
    x, y = next(iter(make_dataset(train_arrays, k, 16, training=True)))  # no class_weight
    assert x.shape[0] == 16 and y.shape == (16, k)


def test_augmentation(train_arrays, sample):
    import tensorflow as tf

    assert augmentation(0) is None and augmentation(0.0, seed=1) is None
    layers = augmentation(1.0, seed=3)
    x = tf.constant(train_arrays.x[:8].astype(np.float32))
    out = layers(x, training=True)
    assert tuple(out.shape) == tuple(x.shape)
    assert float(tf.reduce_mean(tf.abs(out - x))) > 1.0, "strength 1.0 changes images"

    k = len(sample[0].classes)
    ds = make_dataset(train_arrays, k, 16, training=True, augment_strength=1.0, seed=3)
    batches = [b[0].numpy() for b in ds]
    for xb in batches:
        assert xb.dtype == np.float32 and xb.shape[1:] == (SIZE, SIZE, 3)
        assert xb.min() >= 0.0 and xb.max() <= 255.0
    augmented = np.concatenate(batches)
    assert augmented.shape == train_arrays.x.shape
    # Shuffled order differs, so compare the multiset of per-image means: augmentation moves them.
    original = np.sort(train_arrays.x.reshape(len(augmented), -1).mean(axis=1))
    assert not np.allclose(np.sort(augmented.reshape(len(augmented), -1).mean(axis=1)), original)


def test_augmentation_differs_between_batches(train_arrays):
    """The random state must advance inside tf.data: the same image is not transformed the same way
    in every batch."""
    x = np.repeat(train_arrays.x[:1], 12, axis=0)
    arrays = SplitArrays(x, np.zeros(12, np.int32), np.array(["face"] * 12), np.array(["p"] * 12))
    batches = [b[0].numpy() for b in make_dataset(arrays, 2, 4, training=True, augment_strength=1.0,
                                                  seed=5)]
    flat = np.concatenate(batches).reshape(12, -1)
    assert len({row.tobytes() for row in flat}) > 6
    assert not pd.Series([b.tobytes() for b in batches]).duplicated().any()
