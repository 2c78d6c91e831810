"""tuner.pipeline: decode once per size (memory and disk caches), split arrays, tf.data batches.

Runs on the bundled sample (sample/lfw_mini, 160 images) at small sizes so it stays fast.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock

from conftest import WAIT_FOR_GO, side_by_side
from tuner.config import ScanConfig, SplitConfig
from tuner.data import read_split, scan, split, write_split
from tuner.pipeline import (EpochPlan, ImageCache, SplitArrays, augmentation, building,
                            load_image, image_batches, make_dataset, split_arrays, train_stream,
                            view_batches, warp_draws)

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


def test_workers_needing_the_same_images_decode_them_once(sample, sample_dir, tmp_path):
    """Two workers of one run directory asking for the same size at the same moment: one
    decodes, the other waits and loads its file (before the build lock, both decoded)."""
    _, df = sample
    frame = df.sort_values("path").reset_index(drop=True)
    frame[["path", "sha256"]].to_csv(tmp_path / "frame.csv", index=False)
    script = f"""
import json, logging, sys
from pathlib import Path
import numpy as np
import pandas as pd
from tuner.pipeline import ImageCache
frame = pd.read_csv({str(tmp_path / "frame.csv")!r})
cache = ImageCache(Path({str(sample_dir)!r}), Path({str(tmp_path / "cache")!r}))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
notes = []
logging.getLogger("tuner.pipeline").addFilter(lambda r: notes.append(r.getMessage()) or True)
{WAIT_FOR_GO}
arr = cache.images(frame, {SIZE})
print(json.dumps({{"decoded": cache.decoded, "sum": int(arr.sum(dtype=np.int64)),
                  "waited": any(n.startswith("waiting for another worker") for n in notes)}}))
"""
    outs = [json.loads(o) for o in side_by_side(script, 2, tmp_path / "sync")]
    assert sorted(o["decoded"] for o in outs) == [0, len(frame)], outs
    assert sorted(o["waited"] for o in outs) == [False, True], "the waiting worker says so"
    expected = ImageCache(sample_dir).images(frame, SIZE)
    assert [o["sum"] for o in outs] == [int(expected.sum(dtype=np.int64))] * 2


def test_a_killed_builder_releases_its_lock(tmp_path):
    """A worker killed while it builds a cache file does not leave the others waiting."""
    target = tmp_path / "cache" / "images-x-32.npy"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from tuner.pipeline import building
with building(Path({str(target)!r})):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with FileLock(target.parent / "locks" / f"{target.name}.lock", timeout=10):
        pass  # free (a Timeout here fails the test instead of hanging it)
    with building(target) as locked:
        assert locked
        with building(tmp_path / "cache" / "other.npy") as nested:
            assert not nested, "a thread holds one build lock at a time"


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


def test_train_stream_batches(train_arrays, sample):
    import tensorflow as tf

    result, _ = sample
    k = len(result.classes)
    n = len(train_arrays.x)
    weights = {i: 1.0 + i for i in range(k)}
    ds, steps = train_stream(train_arrays, k, 16, seed=1, epochs=2, views=1,
                             class_weight=weights)
    assert steps == n // 16
    rows = []
    for x, y, w in ds:
        assert x.dtype == tf.float32 and y.dtype == tf.float32 and w.dtype == tf.float32
        assert x.shape == (16, SIZE, SIZE, 3), "full batches only"
        np.testing.assert_array_equal(y.numpy().sum(axis=1), 1.0)
        assert set(np.unique(y.numpy())) <= {0.0, 1.0}
        np.testing.assert_allclose(w.numpy(), [weights[i] for i in y.numpy().argmax(axis=1)])
        # Without augmentation every row is one of the training images, unchanged.
        for img in x.numpy().astype(np.uint8):
            rows.append(int(np.flatnonzero((train_arrays.x == img).all(axis=(1, 2, 3)))[0]))
    assert len(rows) == 2 * steps * 16
    epoch1, epoch2 = rows[:steps * 16], rows[steps * 16:]
    assert len(set(epoch1)) == len(epoch1), "no image twice in one epoch"
    assert epoch1 != epoch2, "a fresh order every epoch"
    plan = EpochPlan.make(n, 16, seed=1, epochs=2, views=1)
    assert rows == plan.rows.tolist(), "the stream follows the plan the caches follow"

    # Evaluation: file order, pixels unchanged, last batch partial.
    ds = make_dataset(train_arrays, k, 16)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(x.numpy(), train_arrays.x[:16].astype(np.float32))
    np.testing.assert_array_equal(y.numpy().argmax(axis=1), train_arrays.y[:16])
    assert sum(int(b[0].shape[0]) for b in ds) == n
    # Prediction batches: the same pixels, in order, as float32, the last batch partial.
    batches = [b.numpy() for b in image_batches(train_arrays.x, 16)]
    assert all(b.dtype == np.float32 for b in batches)
    assert [len(b) for b in batches] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    np.testing.assert_array_equal(np.concatenate(batches), train_arrays.x.astype(np.float32))


def test_pipelines_run_without_the_autotune_model(train_arrays, monkeypatch):
    """Every stream the trials and caches read turns tf.data's autotuning model off (deleting an
    iterator waited for its thread: up to 6 s per fit here); PERSONCLF_TFDATA_AUTOTUNE=1 turns it
    back on for a host where tuning the parallelism pays."""
    from tuner.features import view_dataset

    k = int(train_arrays.y.max()) + 1
    n = len(train_arrays.y)
    cached = np.zeros((2, n, 4), np.float32)

    def streams():
        return {"train": train_stream(train_arrays, k, 8, seed=1, epochs=1, views=2,
                                      augment_strength=0.5)[0],
                "eval": make_dataset(train_arrays, k, 8),
                "predict": image_batches(train_arrays.x, 8),
                "copies": view_batches(train_arrays, range(2), 8, 0.5, 1, 2),
                "cached": view_dataset(cached, train_arrays.y, k, None, 8, 1, 1)[0]}

    assert {name: ds.options().autotune.enabled for name, ds in streams().items()} == \
        dict.fromkeys(["train", "eval", "predict", "copies", "cached"], False)
    # Off or on, the same batches: the model tunes speed only.
    off = [x.numpy() for x, _y in streams()["train"]]
    monkeypatch.setenv("PERSONCLF_TFDATA_AUTOTUNE", "1")
    on = streams()
    assert all(ds.options().autotune.enabled for ds in on.values())
    np.testing.assert_array_equal(np.stack(off), np.stack([x.numpy() for x, _y in on["train"]]))


def test_augmentation(train_arrays):
    import tensorflow as tf

    assert augmentation(0) is None and augmentation(0.0) is None
    x = tf.constant(train_arrays.x[:8].astype(np.float32))
    u = warp_draws(8, 1, seed=3)[0]
    out = augmentation(1.0)(x, tf.constant(u)).numpy()
    assert out.shape == tuple(x.shape)
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert float(np.abs(out - x.numpy()).mean()) > 1.0, "strength 1.0 changes images"
    # All-zero draws are the identity warp (a draw of exactly 0 means no flip).
    same = augmentation(1.0)(x, tf.zeros((8, 6))).numpy()
    np.testing.assert_allclose(same, x.numpy(), atol=1e-3)
    # A flip draw alone mirrors the image exactly.
    flip = np.zeros((8, 6), np.float32)
    flip[:, 0] = -1.0
    np.testing.assert_allclose(augmentation(1.0)(x, tf.constant(flip)).numpy(),
                               x.numpy()[:, :, ::-1], atol=1e-3)
    # A weaker strength moves pixels less than the full one, for the same draws.
    weak = augmentation(0.2)(x, tf.constant(u)).numpy()
    assert np.abs(weak - x.numpy()).mean() < np.abs(out - x.numpy()).mean()


def test_augmented_copies_are_fixed_and_distinct(train_arrays):
    """Copy v of image i depends on (seed, v, i) only: the same in every epoch that uses it and
    in any batching, different between copies, so a cache can hold exactly what training sees."""
    k = int(train_arrays.y.max()) + 1
    n = len(train_arrays.x)

    def by_row(ds, plan):
        out = {}
        for (x, _y), v, r in zip(ds.unbatch(), plan.view, plan.rows):
            out.setdefault((int(v), int(r)), []).append(x.numpy())
        return out

    ds, _ = train_stream(train_arrays, k, 8, seed=5, epochs=4, views=2, augment_strength=1.0)
    seen = by_row(ds, EpochPlan.make(n, 8, seed=5, epochs=4, views=2))
    repeats = [imgs for imgs in seen.values() if len(imgs) > 1]
    assert repeats, "epochs 0 and 2 share copy 0"
    for imgs in repeats:
        np.testing.assert_array_equal(imgs[0], imgs[1])
    both = [r for (v, r) in seen if v == 0 and (1, r) in seen]
    assert both and all(not np.array_equal(seen[(0, r)][0], seen[(1, r)][0]) for r in both)
    # Another batch size gives the same copies.
    ds16, _ = train_stream(train_arrays, k, 16, seed=5, epochs=1, views=2, augment_strength=1.0)
    other = by_row(ds16, EpochPlan.make(n, 16, seed=5, epochs=1, views=2))
    for key, imgs in other.items():
        if key in seen:
            np.testing.assert_allclose(imgs[0], seen[key][0], atol=1e-4)
