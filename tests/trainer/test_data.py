import pickle

import numpy as np
import pytest
import torch

from tests.trainer.cifar_files import write_cifar_python
from trainer.data import PAD, DataError, Dataset, DeviceData, load, load_splits
from trainer.spec import AugmentSpec, DataSpec


def test_cifar_python_directory_loads(tmp_path):
    root = write_cifar_python(tmp_path / "cifar", per_batch=20)
    train = load(str(root), "auto", "train")
    test = load(str(root), "cifar10-python", "test")
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32) and train.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "missing CIFAR-10 batch file"),
        ("garbage", "not a CIFAR-10 python batch"),
        ("shape", "N×3072 uint8"),
        ("label", "out of range"),
    ],
)
def test_corrupt_cifar_python_fails_clearly(tmp_path, damage, message):
    root = write_cifar_python(tmp_path / "cifar", per_batch=4)
    victim = root / "data_batch_3"
    if damage == "missing":
        victim.unlink()
    elif damage == "garbage":
        victim.write_bytes(b"this is not a pickle")
    elif damage == "shape":
        victim.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    else:
        victim.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 12]}))
    with pytest.raises(DataError, match=message) as info:
        load(str(root), "cifar10-python", "train")
    if damage != "label":
        assert "data_batch_3" in str(info.value)


def test_parquet_slice_of_the_real_dataset(cifar_parquet):
    data = load(str(cifar_parquet), "auto", limit=300)
    assert data.images.shape == (300, 3, 32, 32)
    assert 0 <= int(data.labels.min()) and int(data.labels.max()) <= 9
    assert len(set(data.labels.tolist())) == 10  # the file is shuffled: a prefix holds every class


def test_bad_parquet_fails_clearly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"img": [{"bytes": b"not a jpeg", "path": "x.jpg"}], "label": [3]}), bad)
    with pytest.raises(DataError, match="row 0: undecodable image"):
        load(str(bad))
    with pytest.raises(DataError, match="file not found"):
        load(str(tmp_path / "nope.parquet"))


def test_seeded_split_and_max_train_images(tmp_path):
    root = write_cifar_python(tmp_path / "cifar", per_batch=40)
    spec = DataSpec(train=str(root), val_fraction=0.2, max_train_images=120)
    train, val = load_splits(spec, seed=1, num_classes=10)
    again, _ = load_splits(spec, seed=1, num_classes=10)
    assert len(train) == 120 and len(val) == 30
    assert torch.equal(train.images, again.images)


def tagged_dataset(n: int) -> Dataset:
    """Image i has the constant pixel value i % 251 + 1 and label i: crops never lose the tag."""
    images = (torch.arange(n) % 251 + 1).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    return Dataset(images, torch.arange(n))


def test_every_image_is_seen_once_per_epoch_across_ranks():
    n, world, batch = 103, 2, 8
    data = DeviceData(tagged_dataset(n), torch.device("cpu"), channels_last=False)
    seen = []
    steps = []
    for rank in range(world):
        batches = list(data.train_batches(epoch=3, seed=0, rank=rank, world=world, local_batch=batch))
        steps.append(len(batches))
        seen += [int(v) for _, y in batches for v in y]
    assert steps[0] == steps[1] == data.steps_per_epoch(batch, world)
    assert set(seen) == set(range(n)) and len(seen) == 104  # one image padded in, as DistributedSampler
    other_epoch = [
        int(v) for _, y in data.train_batches(epoch=4, seed=0, rank=0, world=world, local_batch=batch) for v in y
    ]
    assert other_epoch != seen[: len(other_epoch)]


def test_augmentation_is_a_crop_with_zero_padding_and_a_flip():
    # one image whose columns are numbered: a crop shifts them, a flip reverses them
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., :] = torch.arange(1, 33, dtype=torch.uint8)
    data = DeviceData(
        Dataset(img.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.int64)), torch.device("cpu"), channels_last=False
    )
    gen = torch.Generator().manual_seed(0)
    out = data._augment(data.padded, gen)
    assert out.shape == (64, 3, 32, 32)
    flipped = 0
    for crop in out[:, 0, 16]:  # the middle row of channel 0
        values = [int(v) for v in crop if v > 0]
        zeros = 32 - len(values)
        assert zeros <= PAD and values in (
            list(range(values[0], values[0] + len(values))),
            list(range(values[0], values[0] - len(values), -1)),
        )
        flipped += values[0] > values[-1]
    assert 10 < flipped < 54  # about half are flipped


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_the_crop_shifts_at_most_crop_padding_pixels(padding):
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., :] = torch.arange(1, 33, dtype=torch.uint8)  # numbered columns: the first value seen is the shift
    data = DeviceData(
        Dataset(img.repeat(256, 1, 1, 1), torch.zeros(256, dtype=torch.int64)),
        torch.device("cpu"),
        channels_last=False,
        augment=AugmentSpec(flip=False, crop_padding=padding),
    )
    rows = data._augment(data.padded, torch.Generator().manual_seed(0))[:, 0, 16]
    # a window shifted right by s starts at column s + 1; shifted left by s starts with s zeros
    shifts = {int(r[0]) - 1 if r[0] > 0 else -int((r == 0).sum()) for r in rows}
    assert shifts == set(range(-padding, padding + 1))


def test_eval_batches_cover_each_image_once():
    data = DeviceData(tagged_dataset(37), torch.device("cpu"), channels_last=True)
    labels = [int(v) for rank in range(3) for _, y in data.eval_batches(rank, 3, 5) for v in y]
    assert sorted(labels) == list(range(37))
    x, _ = next(data.eval_batches(0, 1, 5))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


def test_torchvision_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    # The real download path, run offline (this machine has no internet): a DataError naming the fix.
    monkeypatch.setattr("trainer.data.DOWNLOAD_CACHE", str(tmp_path / "cifar-download"))
    with pytest.raises(DataError, match="could not download CIFAR-10.*point data.train at a local copy"):
        load(str(tmp_path / "cifar-download"), "auto")


def test_a_folder_of_images_names_the_formats_and_converts(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from torchvision.io import encode_png

    from trainer.data import DataError, load

    folder = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in ["airplane", "cat"]:
        (folder / name).mkdir(parents=True)
        for i in range(3):
            img = torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
            (folder / name / f"{i}.png").write_bytes(bytes(encode_png(img).numpy()))
    with pytest.raises(DataError) as exc:
        load(str(folder))
    message = str(exc.value)
    assert "PNG/JPEG" in message and "parquet" in message and "data_batch_1" in message
    assert f"python -m trainer convert-images {folder}" in message
    out = tmp_path / "train.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "convert-images", str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = load(str(out))
    assert len(data) == 6 and sorted(data.labels.tolist()) == [0, 0, 0, 3, 3, 3]  # CIFAR-10's own labels


def test_test_split_defaults_to_the_cifar_directorys_test_batch(tmp_path):
    from trainer.data import test_source

    root = write_cifar_python(tmp_path / "cifar", per_batch=4)
    assert test_source(DataSpec(train=str(root))) == (str(root), "cifar10-python")
    nested = tmp_path / "outer"
    (nested / "cifar-10-batches-py").parent.mkdir()
    root.rename(nested / "cifar-10-batches-py")
    uri, fmt = test_source(DataSpec(train=str(nested)))
    assert uri.endswith("cifar-10-batches-py") and fmt == "cifar10-python"
    assert load(uri, fmt, "test").images.shape == (4, 3, 32, 32)
    # data.test wins; a parquet of training images has no test split
    assert test_source(DataSpec(train=str(nested), test="/x/test.parquet")) == ("/x/test.parquet", "auto")
    assert test_source(DataSpec(train=str(tmp_path / "train.parquet"))) is None


def test_alternating_flip_shows_every_image_both_ways_in_two_epochs():
    # numbered columns: an image is flipped when its first column reads higher than its last
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., :] = torch.arange(1, 33, dtype=torch.uint8)
    n = 64
    data = DeviceData(
        Dataset(img.repeat(n, 1, 1, 1), torch.arange(n)),
        torch.device("cpu"),
        channels_last=False,
        augment=AugmentSpec(crop=False, flip_alternate=True),
    )

    def flipped(epoch: int) -> dict[int, bool]:
        out = {}
        for x, y in data.train_batches(epoch, seed=3, rank=0, world=1, local_batch=16):
            for row, label in zip(x[:, 0, 16], y, strict=True):
                out[int(label)] = bool(row[0] > row[-1])
        return out

    first, second, third = flipped(1), flipped(2), flipped(3)
    assert 10 < sum(first.values()) < 54  # a random half
    assert all(second[i] != first[i] for i in range(n))  # each image the other way
    assert third == first  # and back: a pure function of seed and epoch parity, so a resume repeats it
    # the ordinary coin repeats an image's side about half the time
    data.augment = AugmentSpec(crop=False)
    coin_first, coin_second = flipped(1), flipped(2)
    assert 10 < sum(coin_first[i] == coin_second[i] for i in range(n)) < 54
