"""`python -m trainer describe | evaluate | predict | export` — the trainer's small command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import get_args

from pydantic import ValidationError

from trainer.spec import (
    EXPORT_FORMATS,
    PRESETS,
    TtaMode,
    error_list,
    field_descriptions,
    model_cost,
    parse_override,
    resolve,
)


def describe(args: argparse.Namespace) -> int:
    import yaml

    base = None
    if args.spec:
        with open(args.spec) as f:
            base = yaml.safe_load(f) or {}
    spec = resolve(args.preset, dict(parse_override(s) for s in args.set), base=base)
    print(
        json.dumps(
            {
                "spec": spec.model_dump(mode="json"),
                "num_parameters": model_cost(spec.model)[0],
                "fields": field_descriptions(),  # what each top-level field means (also in /openapi.json)
            },
            indent=2,
        )
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_checkpoint

    # Without --data, the run's own validation split (the data it names); with --data, every image of it.
    split = args.split or ("val" if args.data is None else "all")
    result = evaluate_checkpoint(args.checkpoint, args.data, args.format, split, device=args.device, tta=args.tta)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"accuracy {result['accuracy']:.4f} on {result['n']} images")
        if "tta" in result:
            print(f"accuracy {result['tta']['accuracy']:.4f} with test-time augmentation ({args.tta})")
        for name, acc in result["per_class"].items():
            print(f"  {name:<11} {acc:.4f}")
    return 0


def predict(args: argparse.Namespace) -> int:
    from trainer.evaluate import predict_to_csv

    n = predict_to_csv(args.checkpoint, args.input, args.out)
    print(f"wrote {n} predictions to {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    from trainer.export import export_checkpoint

    for artifact in export_checkpoint(args.checkpoint, args.out_dir, [args.format]):
        print(f"wrote {artifact.uri} ({artifact.size} bytes, sha256 {artifact.sha256})")
    return 0


def convert_images(args: argparse.Namespace) -> int:
    from trainer.data import image_folder_to_parquet

    classes, n = image_folder_to_parquet(args.folder, args.out)
    print(
        f"wrote {n} images of {len(classes)} classes to {args.out}; labels: "
        + ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="print the resolved spec and the model's parameter count")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--spec", help="a YAML or JSON spec file (overrides go on top)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=describe)
    p = sub.add_parser("evaluate", help="accuracy (overall and per class) of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt (or its folder): path or URI")
    p.add_argument("--data", help="dataset path or URI (default with --split val/test: the run's own split)")
    p.add_argument("--format", default="auto", choices=["auto", "cifar10-python", "parquet", "torchvision"])
    p.add_argument(
        "--split",
        choices=["all", "train", "test", "val"],
        help="val = the run's own seeded validation split (the default without --data); "
        "all = every image of --data (the default with it)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:N, or auto (a GPU where there is one); a run's val_acc "
        "reproduces on the device kind it trained on",
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=get_args(TtaMode),
        help="test-time augmentation, reported beside the plain accuracy: flip = mean logits of each image and "
        "its mirror image; flip-shift = also of both shifted one pixel up-left and down-right (6 passes)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("predict", help="write Kaggle-style predictions (ID,Labels)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint.pt, or an exported model.safetensors (a .pt2 is refused: loading one can run code)",
    )
    p.add_argument(
        "--input",
        required=True,
        help="a folder of 32×32 PNG/JPEG images, a Hugging Face parquet, or a pickle with b'data' uint8 "
        "N×32×32×3 (the Kaggle file) or N×3072 (CIFAR-10's test_batch) and b'ids' (else 1..N)",
    )
    p.add_argument("--out", required=True, help="CSV path or URI")
    p.set_defaults(func=predict)
    p = sub.add_parser(
        "export", help="a checkpoint's model as safetensors or a torch.export program (what a run's `exports` writes)"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt: path or URI")
    p.add_argument("--format", required=True, choices=list(EXPORT_FORMATS))
    p.add_argument("--out-dir", required=True, help="folder (path or URI) for the model and its artifacts.json")
    p.set_defaults(func=export)
    p = sub.add_parser(
        "convert-images",
        help="a folder of PNG/JPEG images, one sub-folder per class, → a training parquet (img{bytes,path}, label)",
    )
    p.add_argument("folder", help="e.g. train/airplane/*.png, train/cat/*.png, ...")
    p.add_argument("out", help="the .parquet to write (path or URI)")
    p.set_defaults(func=convert_images)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        for e in error_list(exc):
            print(f"error: {e['field']}: {e['message']}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
