"""The job's results on this machine: `best` (checkpoint), `export` (model files), `predict`, `plot`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service.client.cli import common
from service.client.cli.common import EXIT_ERROR, CliError
from service.client.http import ClientError, TrainctlClient
from trainer import contract


def cmd_best(args: argparse.Namespace) -> int:
    """Download the best checkpoint; written only once its sha256 matches what the server announced."""
    with common.client(args, timeout=300) as api:
        sha256, size, out = api.download_best(args.id, Path(args.output) if args.output else None)
    if args.json:
        common.print_json({"path": str(out), "sha256": sha256, "size": size})
    else:
        print(f"wrote {out} ({size} bytes, sha256 {sha256}, verified)")
    return 0


EXPORT_NAMES = contract.EXPORT_FILES  # format → file name under the job's artifacts/


def cmd_export(args: argparse.Namespace) -> int:
    """Download the job's best model as exported at the end of its run, sha256-verified; for a job whose run
    did not export that format, build it here from the best checkpoint (see `_fetch_export`)."""
    name = EXPORT_NAMES[args.format]
    out = Path(args.output or f"{args.id}-{name}")
    with common.client(args, timeout=300) as api:
        sha256, size, how = _fetch_export(api, args.id, args.format, out)
    if args.json:
        common.print_json({"path": str(out), "format": args.format, "sha256": sha256, "size": size, "source": how})
    else:
        detail = "verified" if how == "run" else "built here from the verified best checkpoint"
        print(f"wrote {out} ({args.format}, {size} bytes, sha256 {sha256}, {detail})")
    return 0


def _fetch_export(api: TrainctlClient, job_id: str, fmt: str, out: Path) -> tuple[str, int, str]:
    """The job's `fmt` export at `out`: (sha256, size, "run") as its run exported it; or, when the run did
    not (the spec's `exports` left it out, as the debug preset does), (sha256, size, "here"): exported on
    this machine from the job's best checkpoint (downloaded sha256-verified) by `python -m trainer export`,
    in a child process (the CLI itself never imports torch). Without the trainer installed here: an error
    that says how to get the model."""
    import hashlib
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    name = EXPORT_NAMES[fmt]
    try:
        sha256, size = api.download_artifact(job_id, name, out)
        return sha256, size, "run"
    except ClientError as exc:
        # Another 404 (no such job) is raised by the listing; a listed artifact that 404s is the server's.
        if exc.status != 404 or any(a["name"] == name for a in api.artifacts(job_id)["artifacts"]):
            raise
    exports = (api.job(job_id).get("spec") or {}).get("exports")
    why = f"job {job_id} has no {fmt} export: its spec's `exports` is {json.dumps(exports)}"
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trainer.export") is None:
        raise CliError(
            f"{why}. To build it from the job's best checkpoint on this machine, install the trainer "
            f"(pip install 'trainctl[train]') and run `trainctl export {job_id} --format {fmt}` again; or "
            f"submit the job again with `--set 'exports=[\"{fmt}\"]'` so its run exports it"
        )
    print(f"{why}; building it here from the job's best checkpoint", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="trainctl-export-") as tmp:
        checkpoint = Path(tmp) / "best.pt"
        api.download_best(job_id, checkpoint)  # sha256-verified; a job without one: the server's 409
        child = subprocess.run(
            [
                *(sys.executable, "-m", "trainer", "export"),
                *("--checkpoint", str(checkpoint), "--format", fmt, "--out-dir", str(Path(tmp) / "out")),
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode:
            raise CliError(f"exporting job {job_id}'s best checkpoint here failed: {child.stderr.strip()[-2000:]}")
        shutil.move(Path(tmp) / "out" / name, out)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), out.stat().st_size, "here"


def cmd_predict(args: argparse.Namespace) -> int:
    """Run the job's model here on images: plain torch, no cluster. The model runs in a `python -m trainer
    predict` child (the CLI itself never imports the trainer or torch). It is the job's model.safetensors (or,
    for a job that exported none, its best checkpoint): both load without unpickling code, unlike model.pt2,
    which torch.export.load unpickles (docs/security.md)."""
    import importlib.util
    import subprocess
    import tempfile

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trainer.evaluate") is None:
        raise CliError(
            "`trainctl predict` runs the model on this machine and needs torch and torchvision: "
            "pip install 'trainctl-ray[train]'"
        )
    with tempfile.TemporaryDirectory(prefix="trainctl-predict-") as tmp, common.client(args, timeout=300) as api:
        model = Path(tmp) / EXPORT_NAMES["safetensors"]
        try:
            api.download_artifact(args.id, EXPORT_NAMES["safetensors"], model)
        except ClientError as exc:
            if exc.status != 404:
                raise
            model = Path(tmp) / "best.pt"  # loaded weights-only (trainer/checkpoint.py)
            api.download_best(args.id, model)
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer",
                "predict",
                "--checkpoint",
                str(model),
                "--input",
                args.input,
                "--out",
                args.output,
            ]
        )
    return EXIT_ERROR if child.returncode else 0


PLOTS = ("curves", "lr", "confusion")


def cmd_plot(args: argparse.Namespace) -> int:
    """Save the job's pictures as DIR/<id>-<name>.png; one that has nothing to draw yet is skipped with a note
    (the confusion matrix exists only once the run has ended)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(PLOTS)
    unknown = [n for n in names if n not in PLOTS]
    if unknown:
        raise common.usage_error(
            f"--only: unknown plot(s) {', '.join(unknown)}; choose from {', '.join(PLOTS)}"
            + common.suggest(unknown[0], PLOTS)
        )
    written: dict[str, str] = {}
    skipped: list[str] = []
    with common.client(args, timeout=120) as api:
        for name in names:
            png = api.plot(args.id, name)
            if png is None:
                skipped.append(name)
                continue
            target = out / f"{args.id}-{name}.png"
            part = target.with_name(target.name + ".part")
            part.write_bytes(png)
            os.replace(part, target)
            written[name] = str(target)
    if args.json:
        common.print_json({"written": written, "skipped": skipped})
    else:
        for path in written.values():
            print(f"wrote {path}")
        for name in skipped:
            print(
                f"skipped {name}: nothing to draw yet"
                + (" (written when the run ends)" if name == "confusion" else ""),
                file=sys.stderr,
            )
    return 0 if written else EXIT_ERROR


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common_args: argparse.ArgumentParser,
    following: argparse.ArgumentParser,
) -> None:
    s = sub.add_parser("best", parents=[common_args], help="download the best checkpoint (sha256-verified)")
    s.add_argument("id")
    s.add_argument("-o", "--output", help="where to write the checkpoint (default <id>-epochN.pt here)")
    s.set_defaults(fn=cmd_best)

    s = sub.add_parser(
        "export",
        parents=[common_args],
        help="download the best model exported for use outside trainctl (a job whose run did not export it: "
        "built here from its best checkpoint, where the trainer is installed)",
    )
    s.add_argument("id")
    s.add_argument(
        "--format",
        type=common.choice("export format", sorted(EXPORT_NAMES)),
        choices=sorted(EXPORT_NAMES),
        metavar="FORMAT",
        default="pt2",
        help="pt2: a torch.export program (normalisation inside); safetensors: weights only; "
        "onnx: the pt2 program as ONNX (only if the job's spec asked for it: exports: [onnx])",
    )
    s.add_argument("-o", "--output", help="where to write it (default <id>-model.<format>)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("predict", parents=[common_args], help="predict labels with the job's exported model, here")
    s.add_argument("id")
    s.add_argument("--input", required=True, help="a folder of 32×32 PNG/JPEG images, a parquet, or the Kaggle pickle")
    s.add_argument("-o", "--output", required=True, help="CSV to write (ID,Labels)")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser(
        "plot",
        parents=[common_args],
        help="save the job's PNGs: curves (loss and accuracy per epoch), "
        "lr, confusion (the best checkpoint's, once the run ended)",
    )
    s.add_argument("id")
    s.add_argument("-o", "--output", required=True, help="directory to write <id>-<name>.png into")
    s.add_argument("--only", help="comma-separated subset of curves,lr,confusion")
    s.set_defaults(fn=cmd_plot)
