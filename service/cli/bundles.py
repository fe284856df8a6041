"""The `dscguard bundle` subcommands: create (from a profile's burn-in or from the user's pieces), check, show.

A bundle (`service/core/bundle/`, docs/bundles.md) is a directory with a manifest and safetensors files: the user's
model, its earlier checkpoint and its trusted data. A problem with a bundle or a file given is one line naming the
file and the field (exit status 1); a problem with the command line itself, exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from service.cli.options import (
    CommandLineError,
    build_config,
    check_device,
    experiment_options,
    invalid_message,
    parse_overrides,
    validation_lines,
    writable_output,
)
from service.core.config import PROFILES

_PIECES = ("weights", "trusted", "auxiliary", "optimizer_state", "classes", "class_names", "input_shape",
           "model_kwargs", "mean", "std", "value_range", "feature_bounds", "description")
_REQUIRED_PIECES = ("weights", "trusted", "classes")
# manifest fields as the options that set them, for the errors of `bundle create --model`
_FLAGS = {("model", "architecture"): "--model", ("model", "kwargs"): "--model-kwargs",
          ("model", "normalization"): "--mean/--std", ("input", "num_classes"): "--classes",
          ("input", "class_names"): "--class-names", ("input", "value_range"): "--value-range",
          ("input", "feature_bounds"): "--feature-bounds"}


def bundle_experiments(args: argparse.Namespace, config):
    """For `eval`/`attack --bundle DIR --data FILE`: the config with the bundle's stream, strategy and calibration
    settings (then --set), the function that gives a seed's experiment (the bundle, the data split with the seed),
    and what the reports name as measured (the data and the architecture); (config, None, {}) without --bundle."""
    if args.bundle is None:
        if args.data is not None:
            raise CommandLineError("--data goes with --bundle (a profile reads its own dataset: --data-dir)")
        return config, None, {}
    if args.data is None:
        raise CommandLineError("--bundle needs --data: the samples the stream, the attacker and the test draw from "
                               "(the bundle's trusted set is for calibration only)")
    from service.core.bundle import load_bundle
    from service.core.bundle.serving import bundle_config, bundle_experiment, read_data
    from service.core.device import resolve_device

    bundle = load_bundle(args.bundle)
    data = read_data(args.data, bundle.manifest)
    config = bundle_config(bundle.manifest, config, overrides=parse_overrides(args.set))
    device = resolve_device(config.device)
    subject = {"dataset": Path(args.data).name, "model": f"{bundle.manifest.model.architecture} (bundle "
                                                         f"{Path(args.bundle).name})"}
    return config, lambda seed_config: bundle_experiment(bundle, seed_config, data, device), subject


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def cmd_bundle_create(args: argparse.Namespace) -> int:
    given = [_flag(name) for name in _PIECES if getattr(args, name) is not None]
    if args.profile is not None:
        if given:
            raise CommandLineError(f"{', '.join(given)}: these go with --model; --profile takes everything from the "
                                   f"profile's burn-in")
        config = build_config(args)
        out = writable_output(args.out)
        from service.core.bundle import create_bundle_from_profile

        create_bundle_from_profile(config, out, progress=not args.no_progress)
    else:
        missing = [_flag(name) for name in _REQUIRED_PIECES if getattr(args, name) is None]
        if missing:
            raise CommandLineError(f"--model needs --weights, --trusted and --classes (missing: {', '.join(missing)})")
        if args.data_dir:
            raise CommandLineError("--data-dir goes with --profile: a bundle from --model reads only the files given")
        overrides, kwargs = _piece_settings(args)
        out = writable_output(args.out)
        manifest = _manifest_from_pieces(args, overrides, kwargs)
        from service.core.bundle import create_bundle
        from service.core.bundle.serving import read_data

        trusted = read_data(args.trusted, manifest)  # a file of x and y, or an image-folder tree
        create_bundle(out, manifest, args.weights, (trusted.x, trusted.y), args.auxiliary, args.optimizer_state)
    print(f"wrote bundle {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"check it with: dscguard bundle check {out}")
    return 0


def _piece_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """The --set overrides (stream, strategy and calibration only) and the --model-kwargs of `bundle create --model`."""
    from service.core.bundle.serving import BUNDLE_SECTIONS  # what --set may change in a bundle made from pieces

    overrides = parse_overrides(args.set)
    other = [section for section in overrides if section not in BUNDLE_SECTIONS]
    if other:
        raise CommandLineError(f"--set {other[0]}.*: a bundle keeps only {', '.join(BUNDLE_SECTIONS)} settings")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as exc:
        raise CommandLineError(f"--model-kwargs: not JSON ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise CommandLineError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    return overrides, kwargs


def _json_option(value: str, flag: str):
    """A JSON option given inline, or as the path of a JSON file."""
    text = Path(value).read_text() if not value.lstrip().startswith(("[", "{")) and Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandLineError(f"{flag}: neither JSON nor a JSON file ({exc})") from exc


def _manifest_from_pieces(args: argparse.Namespace, overrides: dict, kwargs: dict):
    """The manifest of `bundle create --model`: the input shape from --input-shape or else the trusted set's x, the
    rest from options."""
    from service.core.bundle import SCHEMA_VERSION, BundleError, BundleManifest, read_trusted
    from service.core.bundle.serving import is_image_tree

    if args.input_shape is not None:
        shape = args.input_shape
    elif is_image_tree(args.trusted):
        raise CommandLineError(f"--trusted {args.trusted}: an image-folder tree needs --input-shape C H W (the "
                               f"images' channels, height and width)")
    else:
        trusted = read_trusted(args.trusted)
        if "x" not in trusted:
            raise BundleError(args.trusted, "x", "missing: a trusted set holds x (inputs) and y (labels)")
        shape = list(trusted["x"].shape[1:])
    normalization = None if args.mean is None and args.std is None else {"mean": args.mean, "std": args.std}
    fields = {"schema_version": SCHEMA_VERSION, "description": args.description or f"{args.model} from "
                                                                                    f"{Path(args.weights).name}",
              "model": {"architecture": args.model, "kwargs": kwargs, "normalization": normalization},
              "input": {"shape": shape, "num_classes": args.classes,
                        "class_names": args.class_names.split(",") if args.class_names else None,
                        **({"value_range": args.value_range} if args.value_range else {}),
                        **({"feature_bounds": _json_option(args.feature_bounds, "--feature-bounds")}
                           if args.feature_bounds else {})},
              **overrides}

    def name(loc) -> str:
        if tuple(loc[:2]) == ("input", "shape"):
            return "--input-shape" if args.input_shape is not None else f"{args.trusted}: x: shape"
        if tuple(loc[:2]) in _FLAGS:
            return _FLAGS[tuple(loc[:2])]
        return "--set " + ".".join(map(str, loc)) if loc else "--model"  # the model against its input

    try:
        return BundleManifest.model_validate(fields)
    except ValidationError as exc:
        raise CommandLineError(invalid_message("invalid bundle", validation_lines(exc, name))) from exc


def cmd_bundle_check(args: argparse.Namespace) -> int:
    from service.core.bundle import check_bundle

    report = check_bundle(args.directory, device=check_device(args.device))
    manifest = report.manifest
    accuracy = f"online {report.online_accuracy:.4f}"
    if report.auxiliary_accuracy is not None:
        accuracy += f", auxiliary {report.auxiliary_accuracy:.4f}"
    print(f"bundle {report.directory}: ok")
    print(f"  model: {manifest.model.architecture}, {report.parameters:,} parameters; input {_input_line(manifest)}")
    print(f"  trusted set: {report.trusted_samples} samples; accuracy: {accuracy}")
    print(f"  guard's gate: threshold {report.gate_threshold:.6g} for a target false-flag rate of "
          f"{report.target_false_flag_rate:.0%} (from {report.gate_updates} clean trusted updates of "
          f"{manifest.stream.batch_size} samples)")
    if manifest.files.optimizer is not None:
        unused = " (unused while stream.momentum is 0)" if not manifest.stream.momentum else ""
        print(f"  stream optimizer: starts from {manifest.files.optimizer} ({report.optimizer_tensors} momentum "
              f"buffers){unused}")
    print(f"  strategy: {manifest.strategy.name}")
    return 0


def cmd_bundle_show(args: argparse.Namespace) -> int:
    from service.core.bundle import read_manifest

    manifest = read_manifest(args.directory)
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    directory = Path(args.directory)
    section = manifest.model
    normalization = ("" if section.normalization is None else
                     f"; normalisation mean {section.normalization.mean} std {section.normalization.std}")
    files = [name for name in (manifest.files.online, manifest.files.auxiliary, manifest.files.trusted,
                               manifest.files.optimizer) if name]
    changed = manifest.strategy.model_dump(exclude_defaults=True, exclude={"name"})
    print(f"bundle {directory} (schema version {manifest.schema_version})")
    if manifest.description:
        print(f"  description: {manifest.description}")
    print(f"  model: {section.architecture}" + (f" {json.dumps(section.kwargs)}" if section.kwargs else "")
          + normalization)
    print(f"  input: {_input_line(manifest)}")
    print(f"  files: {', '.join(_file_line(directory / name) for name in files)}")
    print(f"  stream: {_settings(manifest.stream.model_dump())}")
    print(f"  strategy: {manifest.strategy.name}" + (f" ({_settings(changed)})" if changed else ""))
    print(f"  calibration: {_settings(manifest.calibration.model_dump())}")
    return 0


def _input_line(manifest) -> str:
    spec = manifest.input
    low, high = spec.value_range
    names = f" ({', '.join(spec.class_names)})" if spec.class_names else ""
    bounds = ", per-feature bounds" if spec.feature_bounds else ""
    return f"{spec.shape} in [{low:g}, {high:g}]{bounds}, {spec.num_classes} classes{names}"


def _file_line(path: Path) -> str:
    return f"{path.name} ({path.stat().st_size / 1024:.1f} KiB)" if path.is_file() else f"{path.name} (missing)"


def _settings(values: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())


def add_bundle_commands(sub) -> None:
    """Add `bundle create|check|show` to the `dscguard` subcommands."""
    p = sub.add_parser("bundle", help="model bundles: the user's model, weights and trusted data for the defense "
                                      "(create, check, show)")
    bundle = p.add_subparsers(dest="bundle_command", required=True, metavar="SUBCOMMAND")

    p = bundle.add_parser("create", help="write a bundle from a profile's burn-in (--profile) or from your own model, "
                                         "weights and trusted data (--model)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", choices=sorted(PROFILES), help="bundle this profile's burn-in (trained, or "
                                                                    "loaded from the cache)")
    source.add_argument("--model", metavar="ARCH", help="the architecture: a built-in (digitscnn, smallcnn, resnet18, "
                                                        "vgg11), torchvision:NAME, or package.module:function")
    p.add_argument("--out", required=True, help="the bundle directory to write (new or empty)")
    experiment_options(p, profile=False)
    pieces = p.add_argument_group("with --model")
    pieces.add_argument("--weights", metavar="FILE", help="the online model's weights (.safetensors)")
    pieces.add_argument("--trusted", metavar="PATH", help="the trusted clean set: x and y in .safetensors or .npz "
                                                          "(the input shape is read from x), or an image-folder tree "
                                                          "(a directory or .tar.gz of train/<class>/* and "
                                                          "test/<class>/* images, both parts pooled; needs "
                                                          "--input-shape; class folders named by --class-names, or "
                                                          "0, 1, ...)")
    pieces.add_argument("--auxiliary", metavar="FILE", help="an earlier checkpoint of the same model (.safetensors; "
                                                            "default: none)")
    pieces.add_argument("--optimizer-state", metavar="FILE",
                        help="the stream optimizer's state to start from (.safetensors of momentum_buffer.<parameter "
                             "name> tensors; default: none, a fresh optimizer)")
    pieces.add_argument("--classes", type=int, help="the number of classes")
    pieces.add_argument("--class-names", metavar="A,B,...", help="class names, comma-separated, in label order")
    pieces.add_argument("--input-shape", type=int, nargs="+", metavar="N",
                        help="the input shape without the batch, e.g. 3 32 32 (default: read from the trusted x)")
    pieces.add_argument("--model-kwargs", metavar="JSON", help="constructor keyword arguments, a JSON object")
    pieces.add_argument("--mean", type=float, nargs="+", help="per-channel mean the model subtracts, inside it")
    pieces.add_argument("--std", type=float, nargs="+", help="per-channel std the model divides by, inside it")
    pieces.add_argument("--value-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of every input value (default: 0 1)")
    pieces.add_argument("--feature-bounds", metavar="JSON", help="feature vectors: [[low, high], ...] per feature, "
                                                                 "inline or a JSON file (default: none)")
    pieces.add_argument("--description", help="a line about the bundle, kept in its manifest")
    p.set_defaults(func=cmd_bundle_create)

    p = bundle.add_parser("check", help="load a bundle, predict its trusted set, calibrate guard's gate; non-zero "
                                        "exit naming the file and field on any problem")
    p.add_argument("directory", metavar="DIR", help="the bundle directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (CUDA when present)")
    p.set_defaults(func=cmd_bundle_check)

    p = bundle.add_parser("show", help="print a bundle's manifest: model, input, files, stream and defense settings")
    p.add_argument("directory", metavar="DIR", help="the bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_bundle_show)
