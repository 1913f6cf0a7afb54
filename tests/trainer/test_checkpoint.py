import json

from trainer import checkpoint as ckpt
from trainer.contract import CheckpointEntry, Manifest


def entry(epoch: int, acc: float, uri: str | None = None) -> CheckpointEntry:
    return CheckpointEntry(
        epoch=epoch, val_acc=acc, uri=uri or f"/r/run/epoch_{epoch:04d}/checkpoint.pt", sha256="x", size=1
    )


def test_retention_keeps_best_k_and_the_latest():
    entries = [entry(1, 0.3), entry(2, 0.5), entry(3, 0.4), entry(4, 0.1)]
    assert [e.epoch for e in ckpt.kept(entries, 1)] == [2, 4]
    assert [e.epoch for e in ckpt.kept(entries, 2)] == [2, 3, 4]
    assert Manifest(checkpoints=entries).best().epoch == 2


def test_record_drops_entries_a_resumed_run_rewrites(tmp_path):
    job = str(tmp_path)
    for e in (entry(1, 0.3), entry(2, 0.5), entry(3, 0.4)):
        ckpt.record(job, e, keep_best=5)
    manifest = ckpt.record(job, entry(2, 0.45), keep_best=5)  # resumed from epoch 1: epoch 2 ran again
    assert [(e.epoch, e.val_acc) for e in manifest.checkpoints] == [(1, 0.3), (2, 0.45)]
    assert manifest.latest_epoch == 2
    on_disk = json.loads((tmp_path / "manifest.json").read_text())  # the file itself, as the service reads it
    assert [e["epoch"] for e in on_disk["checkpoints"]] == [1, 2] and on_disk["latest_epoch"] == 2


def test_remove_orphans_spares_the_manifest_and_rays_snapshot(tmp_path):
    run = tmp_path / "run"
    for n in range(1, 5):
        (run / f"epoch_{n:04d}").mkdir(parents=True)
        (run / f"epoch_{n:04d}" / "checkpoint.pt").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "epoch_0003", "metrics": {}}]})
    )
    manifest = Manifest(checkpoints=[entry(4, 0.5, uri=str(run / "epoch_0004" / "checkpoint.pt"))])
    assert ckpt.remove_orphans(str(run), manifest) == ["epoch_0001", "epoch_0002"]
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0003", "epoch_0004"]
