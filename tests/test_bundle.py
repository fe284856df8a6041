"""Model bundles (service/core/bundle/, issue 14): a profile's burn-in, a user factory and a torchvision network each go
create -> load -> check, and every bad input of the issue is refused with one line naming the file and the field."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from service.cli import main
from service.core.bundle import (
    MANIFEST_FILE,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    BundleError,
    BundleManifest,
    check_bundle,
    create_bundle,
    create_bundle_from_profile,
    load_bundle,
)
from service.core.bundle.serving import TensorSet, bundle_config, bundle_experiment, bundle_fingerprint
from service.core.config import ExperimentConfig
from service.core.learner import OnlineLearner
from service.core.models import Normalized, build_model
from tests.bundle_factory import spare_head_mlp, tied_mlp, tiny_mlp
from tests.profiles import DIGITS_OVERRIDES
from tests.reproduce import assert_reproduced

# a trusted set above the 4 samples guard's gate needs, with every digit class, and quick to calibrate on
TRUSTED_SAMPLES = 20
CLASSES = 10
DIGITS_INPUT = {"shape": [1, 8, 8], "num_classes": CLASSES}
PROFILE_SETS = [f"burnin.{name}={value}" for name, value in DIGITS_OVERRIDES["burnin"].items()]


def _digits_manifest(**fields) -> BundleManifest:
    return BundleManifest(**{"schema_version": SCHEMA_VERSION, "model": {"architecture": "digitscnn"},
                             "input": DIGITS_INPUT, **fields})


@pytest.fixture
def small_bundle(tmp_path) -> Path:
    """A digitscnn bundle with random weights, an auxiliary and a random trusted set: written in a moment."""
    manifest = _digits_manifest()
    models = [build_model(**manifest.model_spec()) for _ in range(2)]
    trusted = (torch.rand(TRUSTED_SAMPLES, 1, 8, 8), torch.arange(TRUSTED_SAMPLES) % CLASSES)
    return create_bundle(tmp_path / "bundle", manifest, models[0], trusted, auxiliary=models[1])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---------------------------------------------------------------- a profile's burn-in


def test_a_profile_burn_in_round_trips(digits_config, digits_experiment, cache_dir, tmp_path):
    out = create_bundle_from_profile(digits_config, tmp_path / "digits", cache_dir=cache_dir, progress=False)
    bundle = load_bundle(out)
    burnin = digits_experiment.burnin
    # the manifest is the burn-in's model spec and the config's settings, not a second description of them
    assert bundle.manifest.model_spec() == burnin.model_spec
    assert (bundle.manifest.stream, bundle.manifest.strategy, bundle.manifest.calibration) == (
        digits_config.stream, digits_config.strategy, digits_config.calibration)
    assert bundle.manifest.input.class_names == list(digits_experiment.splits.calibration.classes)
    assert _states_equal(bundle.model.state_dict(), burnin.model.state_dict())
    assert _states_equal(bundle.auxiliary.state_dict(), burnin.auxiliary.state_dict())
    x, y = digits_experiment.calibration_tensors
    assert torch.equal(bundle.trusted[0], x) and torch.equal(bundle.trusted[1], y)

    # the check predicts and calibrates as the service's learner does from the same burn-in
    report = check_bundle(out)
    learner = digits_experiment.new_learner()  # guard, the default, on the same trusted split and seed
    assert report.online_accuracy == pytest.approx(learner.accuracy(x, y))
    assert_reproduced(report.gate_threshold, learner.strategy.gate.calibrate(learner.model, learner.optimizer),
                      learner.device, cpu_relative=1e-6)
    assert report.trusted_samples == len(x) and report.target_false_flag_rate == (
        digits_config.strategy.gate_target_false_flag_rate)


def test_the_published_schema_validates_the_manifest(small_bundle):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extras")
    schema = json.loads((small_bundle / SCHEMA_FILE).read_text())
    assert schema == BundleManifest.model_json_schema()
    manifest = json.loads((small_bundle / MANIFEST_FILE).read_text())
    jsonschema.validate(manifest, schema)
    manifest["model"]["weights_url"] = "https://example.org/w.pt"
    with pytest.raises(jsonschema.ValidationError, match="weights_url"):
        jsonschema.validate(manifest, schema)


def test_loading_leaves_the_callers_random_stream_alone(small_bundle):
    state = torch.get_rng_state()
    load_bundle(small_bundle)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- the user's own model


def test_a_user_factory_for_feature_vectors_with_bounds(tmp_path):
    bounds = [[-1.0, 1.0], [0.0, 1.0], [-0.5, 0.5], [0.0, 0.25]]
    manifest = BundleManifest(
        schema_version=SCHEMA_VERSION,
        model={"architecture": "tests.bundle_factory:tiny_mlp", "kwargs": {"features": len(bounds), "classes": 3}},
        input={"shape": [len(bounds)], "num_classes": 3, "value_range": [-1, 1], "feature_bounds": bounds,
               "class_names": ["low", "mid", "high"]})
    net = tiny_mlp(len(bounds), 3)
    low, high = torch.tensor(bounds).T
    x = low + torch.rand(TRUSTED_SAMPLES, len(bounds)) * (high - low)
    y = torch.arange(TRUSTED_SAMPLES) % 3
    out = create_bundle(tmp_path / "mlp", manifest, net, (x, y))
    bundle = load_bundle(out)
    assert type(bundle.model) is type(net) and _states_equal(bundle.model.state_dict(), net.state_dict())
    assert bundle.auxiliary is None and json.loads((out / MANIFEST_FILE).read_text())["files"]["auxiliary"] is None
    with torch.no_grad():
        expected = float((net(x).argmax(1) == y).float().mean())
    assert check_bundle(out).online_accuracy == pytest.approx(expected)

    # inside value_range but outside its own feature's bound: refused, naming the feature
    x[0, 3] = 0.5
    with pytest.raises(BundleError, match=r"trusted\.safetensors: x: feature\(s\) 3 fall outside"):
        create_bundle(tmp_path / "bad", manifest, net, (x, y))


def _feature_bundle(tmp_path: Path, factory: str, weights, features: int = 4, classes: int = 3) -> Path:
    manifest = BundleManifest(schema_version=SCHEMA_VERSION,
                              model={"architecture": f"tests.bundle_factory:{factory}",
                                     "kwargs": {"features": features, "classes": classes}},
                              input={"shape": [features], "num_classes": classes}, stream={"batch_size": 10})
    trusted = (torch.rand(TRUSTED_SAMPLES, features), torch.arange(TRUSTED_SAMPLES) % classes)
    return create_bundle(tmp_path / factory, manifest, weights, trusted)


def _guard_learner(bundle_dir: Path) -> OnlineLearner:
    """guard's learner on the bundle, made ready (its first calibration taken), over random feature vectors."""
    bundle = load_bundle(bundle_dir)
    config = bundle_config(bundle.manifest, ExperimentConfig.from_profile("digits"))
    data = TensorSet(torch.rand(80, *bundle.manifest.input.shape), torch.arange(80) % bundle.manifest.input.num_classes)
    return bundle_experiment(bundle, config, data).new_learner().ready()


def test_tied_weights_written_once_load_as_a_tie_and_round_trip_through_a_checkpoint(tmp_path):
    net = tied_mlp(4, 3)
    save_model(net, str(tmp_path / "tied.safetensors"))  # the user's way to write a tie: one of its names only
    assert len(load_file(tmp_path / "tied.safetensors")) == len(net.state_dict()) - 1
    bundle = load_bundle(_feature_bundle(tmp_path, "tied_mlp", tmp_path / "tied.safetensors"))
    assert bundle.model.second.weight is bundle.model.first.weight
    assert _states_equal(bundle.model.state_dict(), net.state_dict())

    learner = _guard_learner(bundle.directory)
    x, y = torch.rand(10, 4), torch.arange(10) % 3
    learner.step(x, y)
    learner.save(tmp_path / "checkpoint")  # safetensors refuses tensors that share memory: each name is a copy
    restored = OnlineLearner.load(tmp_path / "checkpoint")
    assert restored.model.second.weight is restored.model.first.weight
    assert _states_equal(restored.model.state_dict(), learner.model.state_dict())
    learner.step(x.flip(0), y.flip(0))
    restored.step(x.flip(0), y.flip(0))
    assert_reproduced(restored.model.state_dict(), learner.model.state_dict(), learner.device)


def test_guard_judges_a_network_with_a_parameter_its_forward_never_reaches(tmp_path):
    learner = _guard_learner(_feature_bundle(tmp_path, "spare_head_mlp", spare_head_mlp(4, 3)))
    spare = learner.model.spare.weight.detach().clone()
    for seed in range(3):
        x = torch.rand(10, 4, generator=torch.Generator().manual_seed(seed))
        report = learner.step(x, torch.arange(10) % 3)
    assert learner.batches_applied == 3 and report.batch_index == 2
    assert learner.strategy.gate.threshold is not None
    assert torch.equal(learner.model.spare.weight, spare)  # nothing learns what no loss reaches


def test_a_torchvision_architecture_at_a_small_size(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    name = "squeezenet1_1"  # 0.7 M parameters: builds and runs in a fraction of a second on a CPU
    net = torchvision.models.get_model(name, weights=None, num_classes=3).eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    manifest = BundleManifest(schema_version=SCHEMA_VERSION,
                              model={"architecture": f"torchvision:{name}",
                                     "normalization": {"mean": mean, "std": std}},
                              input={"shape": [3, 32, 32], "num_classes": 3})
    x, y = torch.rand(TRUSTED_SAMPLES, 3, 32, 32), torch.arange(TRUSTED_SAMPLES) % 3
    out = create_bundle(tmp_path / "tv", manifest, net.state_dict(), (x, y), auxiliary=net.state_dict())
    bundle = load_bundle(out)
    # the network's own weights, wrapped in the normalisation the manifest declares: inputs stay in [0, 1]
    assert isinstance(bundle.model, Normalized)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(bundle.model.eval()(x), net(normalised), atol=1e-5)
    report = check_bundle(out)
    assert report.parameters == sum(p.numel() for p in net.parameters())
    assert report.auxiliary_accuracy == report.online_accuracy  # the same weights twice


def test_torchvision_weights_never_come_from_a_hub():
    with pytest.raises(ValueError, match="weights cannot be set for torchvision:resnet18"):
        BundleManifest(schema_version=SCHEMA_VERSION, input={"shape": [3, 32, 32], "num_classes": 3},
                       model={"architecture": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}})


# ---------------------------------------------------------------- bad input


class _Touch:
    """A pickle that creates a file when it is loaded: proof that nothing unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _pickle_bomb(path: Path, marker: Path) -> None:
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists(), "the bomb must go off when it is unpickled, or its silence proves nothing"
    path.write_bytes(pickle.dumps(_Touch(marker)))


def _edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(data)
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))


def _load_copies(path: Path) -> dict:
    """The tensors of a safetensors file, as copies: the file can be rewritten in place under them."""
    return {name: tensor.clone() for name, tensor in load_file(path).items()}


def _edit_tensors(path: Path, edit) -> None:
    tensors = _load_copies(path)
    edit(tensors)
    save_file(tensors, path)


def _set(tensors: dict, name: str, index, value) -> None:
    tensors[name][index] = value


def _rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


def _torchvision_with_weights(data: dict) -> None:
    data["model"] = {"architecture": "torchvision:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}


def _pickle_named_in_the_manifest(bundle: Path) -> None:
    _pickle_bomb(bundle / "online.pt", bundle.parent / "unpickled")
    _edit_manifest(bundle, lambda data: data["files"].update(online="online.pt"))


def _torch_save_as_safetensors(bundle: Path) -> None:
    torch.save(_load_copies(bundle / "online.safetensors"), bundle / "online.safetensors")


def _auxiliary_of_another_width(bundle: Path) -> None:
    other = build_model("digitscnn", num_classes=CLASSES, input_shape=(1, 8, 8), width=16)
    save_file(other.state_dict(), bundle / "auxiliary.safetensors")


BAD_BUNDLES = {  # id: (what is done to a good bundle, the file named, the field named, words of the problem)
    "missing field": (lambda b: _edit_manifest(b, lambda d: d["input"].pop("num_classes")),
                      MANIFEST_FILE, "input.num_classes", "Field required"),
    "missing schema version": (lambda b: _edit_manifest(b, lambda d: d.pop("schema_version")),
                               MANIFEST_FILE, "schema_version", "Field required"),
    "unknown field": (lambda b: _edit_manifest(b, lambda d: d["model"].update(weights_url="https://x/w.pt")),
                      MANIFEST_FILE, "model.weights_url", "Extra inputs are not permitted"),
    "unknown schema version": (lambda b: _edit_manifest(b, lambda d: d.update(schema_version=3)),
                               MANIFEST_FILE, "schema_version", "(got 3)"),
    "hub weights": (lambda b: _edit_manifest(b, _torchvision_with_weights), MANIFEST_FILE, "model.kwargs",
                    "weights cannot be set for torchvision:resnet18"),
    "import fails": (lambda b: _edit_manifest(b, lambda d: d["model"].update(architecture="no_such_pkg.nets:cnn")),
                     MANIFEST_FILE, "model.architecture", "cannot import 'no_such_pkg.nets'"),
    "factory returns a non-module": (
        lambda b: _edit_manifest(b, lambda d: d["model"].update(architecture="tests.bundle_factory:not_a_module",
                                                                kwargs={"features": 64, "classes": CLASSES},
                                                                normalization=None)),
        MANIFEST_FILE, "model.architecture", "returned a dict, not a torch.nn.Module"),
    "weight names": (lambda b: _edit_tensors(b / "online.safetensors", lambda t: _rename(t, "net.0.weight", "conv")),
                     "online.safetensors", "net.0.weight", "missing net.0.weight; unexpected conv"),
    "weight shape": (lambda b: _edit_tensors(b / "online.safetensors",
                                             lambda t: t.update({"net.8.weight": torch.zeros(CLASSES, 32)})),
                     "online.safetensors", "net.8.weight", "shape [10, 32], but digitscnn expects [10, 64]"),
    "NaN weights": (lambda b: _edit_tensors(b / "online.safetensors", lambda t: _set(t, "net.0.bias", 0, np.nan)),
                    "online.safetensors", "net.0.bias", "NaN or infinite"),
    "Inf auxiliary weights": (lambda b: _edit_tensors(b / "auxiliary.safetensors",
                                                      lambda t: _set(t, "net.6.weight", (0, 0), np.inf)),
                              "auxiliary.safetensors", "net.6.weight", "NaN or infinite"),
    "auxiliary of another architecture": (_auxiliary_of_another_width, "auxiliary.safetensors", "net.0.weight",
                                          "shape [8, 1, 3, 3], but digitscnn expects [16, 1, 3, 3]"),
    "normalisation differs": (lambda b: _edit_tensors(b / "online.safetensors", lambda t: t["mean"].fill_(0.1)),
                              "online.safetensors", "mean", "[0.1] differs from the manifest's normalisation, "
                              "model.normalization.mean = [0.5] (not declared: the built-ins' default)"),
    "trusted shape": (lambda b: _edit_tensors(b / "trusted.safetensors",
                                              lambda t: t.update(x=torch.rand(TRUSTED_SAMPLES, 1, 8, 7))),
                      "trusted.safetensors", "x", "shape [20, 1, 8, 7], but input.shape [1, 8, 8]"),
    "label too large": (lambda b: _edit_tensors(b / "trusted.safetensors", lambda t: _set(t, "y", 0, CLASSES)),
                        "trusted.safetensors", "y", "labels in [0, 10] fall outside [0, 10)"),
    "negative label": (lambda b: _edit_tensors(b / "trusted.safetensors", lambda t: _set(t, "y", 0, -1)),
                       "trusted.safetensors", "y", "labels in [-1, 9] fall outside [0, 10)"),
    "too few trusted samples for the gate": (
        lambda b: _edit_tensors(b / "trusted.safetensors", lambda t: t.update(x=t["x"][:3], y=t["y"][:3])),
        "trusted.safetensors", "x", "the gate needs at least 4 labelled trusted samples"),
    "pickle named in the manifest": (_pickle_named_in_the_manifest, MANIFEST_FILE, "files.online",
                                     "'online.pt' is a pickle file"),
    "pickle content in a safetensors file": (_torch_save_as_safetensors, "online.safetensors", None,
                                             "holds a pickle (torch.save), not safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_a_bad_bundle_is_one_line_naming_the_file_and_the_field(case, small_bundle, capsys):
    spoil, file, field, problem = BAD_BUNDLES[case]
    spoil(small_bundle)
    with pytest.raises(BundleError) as info:
        check_bundle(small_bundle)
    error = info.value
    assert (error.file, error.field) == (small_bundle / file, field)
    message = str(error)
    assert message.startswith(f"{small_bundle / file}: {field}: " if field else f"{small_bundle / file}: ")
    assert problem in message and "\n" not in message
    assert not (small_bundle.parent / "unpickled").exists()
    # the command line: exit status 1 and the same single line
    assert main(["bundle", "check", str(small_bundle)]) == 1
    assert capsys.readouterr().err == f"dscguard: error: {message}\n"


@pytest.mark.parametrize("kind", ["a file", "missing"])
def test_a_bundle_path_that_is_not_a_directory(kind, tmp_path, capsys):
    path = tmp_path / "bundle"
    if kind == "a file":
        path.write_text("{}")
    with pytest.raises(BundleError, match=f"^{re.escape(str(path))}: not a directory"):
        load_bundle(path)
    assert main(["bundle", "show", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"dscguard: error: {path}: not a directory")


def test_a_directory_without_a_manifest(tmp_path):
    with pytest.raises(BundleError, match=f"^{re.escape(str(tmp_path / MANIFEST_FILE))}: missing: not a bundle"):
        load_bundle(tmp_path)


# ---------------------------------------------------------------- the stream optimizer's state


def _momentum(manifest: BundleManifest, leave_out: str | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random momentum buffer for every parameter of the manifest's model (but `leave_out`)."""
    generator = torch.Generator().manual_seed(seed)
    return {f"momentum_buffer.{name}": torch.randn(p.shape, generator=generator)
            for name, p in build_model(**manifest.model_spec()).named_parameters() if name != leave_out}


def _bundle_with_momentum(tmp_path: Path, state, manifest: BundleManifest | None = None) -> Path:
    manifest = manifest or _digits_manifest(stream={"batch_size": 10, "momentum": 0.9})
    trusted = (torch.rand(TRUSTED_SAMPLES, 1, 8, 8), torch.arange(TRUSTED_SAMPLES) % CLASSES)
    return create_bundle(tmp_path / "bundle", manifest, build_model(**manifest.model_spec()), trusted,
                         optimizer_state=state)


def test_an_optimizer_state_round_trips_into_the_served_learner(tmp_path, capsys):
    manifest = _digits_manifest(schema_version=1, stream={"batch_size": 10, "momentum": 0.9})
    state = _momentum(manifest, leave_out="net.0.bias")  # a parameter left out starts fresh, as torch's SGD does
    save_file(state, tmp_path / "momentum.safetensors")
    out = _bundle_with_momentum(tmp_path, tmp_path / "momentum.safetensors", manifest)
    written = json.loads((out / MANIFEST_FILE).read_text())
    assert written["files"]["optimizer"] == "optimizer.safetensors" and written["schema_version"] == 2
    assert _states_equal(load_file(out / "optimizer.safetensors"), state)

    bundle = load_bundle(out)
    config = bundle_config(bundle.manifest, ExperimentConfig.from_profile("digits"))
    experiment = bundle_experiment(bundle, config)
    learners = [experiment.new_learner(), experiment.new_learner(config.strategy.model_copy(update={"name": "st"}))]
    for learner in learners:  # each learner gets its own copy, exactly the bundle's buffers
        held = {f"momentum_buffer.{name}": learner.optimizer.state[p]["momentum_buffer"]
                for name, p in learner.model.named_parameters() if "momentum_buffer" in learner.optimizer.state[p]}
        assert _states_equal(held, state)
    first, second = (learner.optimizer.state[learner.model.net[0].weight]["momentum_buffer"] for learner in learners)
    assert first.data_ptr() != second.data_ptr()
    # the first step of the stream goes on from the buffers: lr * (momentum * buffer + gradient)
    st = learners[1]
    before = {name: p.detach().clone() for name, p in st.model.named_parameters()}
    st.step(torch.rand(10, 1, 8, 8), torch.arange(10))
    weight = st.model.net[0].weight
    buffer = state["momentum_buffer.net.0.weight"]
    assert torch.allclose(st.optimizer.state[weight]["momentum_buffer"], 0.9 * buffer + weight.grad)
    assert torch.allclose(weight.detach(), before["net.0.weight"] - config.stream.lr * (0.9 * buffer + weight.grad))

    # the check calibrates guard's gate from the same optimizer as the worker's learner; show lists the file
    report = check_bundle(out)
    assert report.optimizer_tensors == len(state)
    assert report.gate_threshold == pytest.approx(learners[0].strategy.gate.calibrate(learners[0].model,
                                                                                      learners[0].optimizer))
    assert main(["bundle", "check", str(out)]) == 0
    assert (f"  stream optimizer: starts from optimizer.safetensors ({len(state)} momentum buffers)\n"
            in capsys.readouterr().out)
    assert main(["bundle", "show", str(out)]) == 0
    assert "optimizer.safetensors (" in capsys.readouterr().out


def test_without_an_optimizer_state_the_optimizer_starts_fresh(small_bundle):
    bundle = load_bundle(small_bundle)
    assert bundle.optimizer_state is None
    assert json.loads((small_bundle / MANIFEST_FILE).read_text())["files"]["optimizer"] is None
    learner = bundle_experiment(bundle, bundle_config(bundle.manifest, ExperimentConfig.from_profile("digits"))
                                ).new_learner()
    assert not learner.optimizer.state
    assert check_bundle(small_bundle).optimizer_tensors == 0


def test_a_version_1_manifest_still_loads_and_cannot_name_an_optimizer_state(small_bundle, tmp_path):
    _edit_manifest(small_bundle, lambda d: (d.update(schema_version=1), d["files"].pop("optimizer")))
    assert load_bundle(small_bundle).manifest.schema_version == 1  # the bundles written before version 2
    save_file(_momentum(_digits_manifest()), small_bundle / "optimizer.safetensors")
    _edit_manifest(small_bundle, lambda d: d["files"].update(optimizer="optimizer.safetensors"))
    with pytest.raises(BundleError, match=r"bundle\.json: files\.optimizer needs schema_version 2, got 1"):
        load_bundle(small_bundle)
    _edit_manifest(small_bundle, lambda d: d.update(schema_version=2))
    assert load_bundle(small_bundle).optimizer_state is not None


def test_the_fingerprint_covers_the_optimizer_state(tmp_path):
    out = _bundle_with_momentum(tmp_path, _momentum(_digits_manifest()))
    before = bundle_fingerprint(out)
    _edit_tensors(out / "optimizer.safetensors", lambda t: t["momentum_buffer.net.0.bias"].add_(1.0))
    assert bundle_fingerprint(out) != before


def _optimizer_pickle(path: Path) -> Path:
    _pickle_bomb(path, path.parent / "unpickled")
    return path


def _optimizer_torch_save(path: Path) -> Path:
    torch.save(_momentum(_digits_manifest()), path)
    return path


def _optimizer_file(edit):
    def write(path: Path) -> Path:
        state = _momentum(_digits_manifest())
        edit(state)
        save_file(state, path)
        return path
    return write


BAD_OPTIMIZER_STATES = {  # id: (writes the user's file at a path, its name, the key named, words of the problem)
    "unknown parameter": (_optimizer_file(lambda t: t.update({"momentum_buffer.net.99.weight": torch.zeros(3)})),
                          "o.safetensors", "momentum_buffer.net.99.weight", "'net.99.weight' is not a parameter of "
                                                                            "digitscnn"),
    "a buffer, not a parameter": (_optimizer_file(lambda t: t.update({"momentum_buffer.mean": torch.zeros(1)})),
                                  "o.safetensors", "momentum_buffer.mean", "'mean' is not a parameter"),
    "another optimizer's state": (_optimizer_file(lambda t: _rename(t, "momentum_buffer.net.0.bias",
                                                                    "exp_avg.net.0.bias")),
                                  "o.safetensors", "exp_avg.net.0.bias", "not a state of the stream optimizer (SGD)"),
    "wrong shape": (_optimizer_file(lambda t: t.update({"momentum_buffer.net.8.weight": torch.zeros(CLASSES, 32)})),
                    "o.safetensors", "momentum_buffer.net.8.weight", "shape [10, 32], but digitscnn expects [10, 64]"),
    "NaN": (_optimizer_file(lambda t: _set(t, "momentum_buffer.net.0.bias", 0, np.nan)),
            "o.safetensors", "momentum_buffer.net.0.bias", "holds NaN or infinite values"),
    "Inf": (_optimizer_file(lambda t: _set(t, "momentum_buffer.net.6.weight", (0, 0), -np.inf)),
            "o.safetensors", "momentum_buffer.net.6.weight", "holds NaN or infinite values"),
    "integer values": (_optimizer_file(lambda t: t.update({"momentum_buffer.net.0.bias": torch.zeros(8).long()})),
                       "o.safetensors", "momentum_buffer.net.0.bias", "dtype torch.int64"),
    "empty": (lambda path: (save_file({}, path), path)[1], "o.safetensors", None, "holds no tensors"),
    "a pickle by name": (_optimizer_pickle, "o.pt", None, "a pickle file is never loaded"),
    "a torch.save file named .safetensors": (_optimizer_torch_save, "o.safetensors", None,
                                             "holds a pickle (torch.save), not safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIMIZER_STATES))
def test_bundle_create_refuses_a_bad_optimizer_state_naming_the_file_and_the_key(case, tmp_path, capsys):
    write, name, key, problem = BAD_OPTIMIZER_STATES[case]
    path = write(tmp_path / name)
    pieces = _pieces(tmp_path)
    out = tmp_path / "out"
    assert main(["bundle", "create", "--model", "digitscnn", "--classes", "10", *pieces, "--optimizer-state",
                 str(path), "--set", "stream.momentum=0.9", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dscguard: error: {path}: {key}: " if key else f"dscguard: error: {path}: ")
    assert problem in err and len(err.splitlines()) == 1
    assert list(out.iterdir()) == []  # every check before any file is written
    assert not (tmp_path / "unpickled").exists()
    # the same refusal from Python, and from a bundle whose own optimizer.safetensors is spoilt
    if path.suffix == ".safetensors":
        with pytest.raises(BundleError) as info:
            _bundle_with_momentum(tmp_path, path)
        assert (info.value.file, info.value.field) == (path, key)
        bundle = _bundle_with_momentum(tmp_path / "good", _momentum(_digits_manifest()))
        (bundle / "optimizer.safetensors").write_bytes(path.read_bytes())
        with pytest.raises(BundleError) as info:
            check_bundle(bundle)
        assert (info.value.file, info.value.field) == (bundle / "optimizer.safetensors", key)
        assert main(["bundle", "check", str(bundle)]) == 1
        assert capsys.readouterr().err == f"dscguard: error: {info.value}\n"


def test_an_optimizer_state_given_as_tensors_is_named_by_the_bundle_file(tmp_path):
    state = _momentum(_digits_manifest())
    state["momentum_buffer.net.0.bias"][0] = np.nan
    with pytest.raises(BundleError, match=r"optimizer\.safetensors: momentum_buffer\.net\.0\.bias: holds NaN"):
        _bundle_with_momentum(tmp_path, state)
    assert list((tmp_path / "bundle").iterdir()) == []


# ---------------------------------------------------------------- the command line


def test_bundle_create_check_show_from_the_profile(digits_experiment, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))  # the session's burn-in, from its cache
    out = tmp_path / "digits"
    sets = [arg for setting in PROFILE_SETS for arg in ("--set", setting)]
    assert main(["bundle", "create", "--profile", "digits", *sets, "--no-progress", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote bundle {out}: auxiliary.safetensors, bundle.json, bundle.schema.json, online.safetensors, "
        f"trusted.safetensors", f"check it with: dscguard bundle check {out}"]
    assert _states_equal(load_file(out / "online.safetensors"), digits_experiment.burnin.model.state_dict())

    assert main(["bundle", "check", str(out)]) == 0
    printed = capsys.readouterr().out
    report = check_bundle(out)
    assert printed.startswith(f"bundle {out}: ok\n  model: digitscnn, {report.parameters:,} parameters; input "
                              f"[1, 8, 8] in [0, 1], 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)\n")
    assert f"accuracy: online {report.online_accuracy:.4f}, auxiliary {report.auxiliary_accuracy:.4f}" in printed
    assert (f"threshold {report.gate_threshold:.6g} for a target false-flag rate of "
            f"{report.target_false_flag_rate:.0%}") in printed

    assert main(["bundle", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"model: digitscnn; normalisation mean {report.manifest.model.normalization.mean}" in shown
    assert "\n  input: [1, 8, 8] in [0, 1], 10 classes" in shown
    assert "files: online.safetensors (" in shown and "auxiliary.safetensors (" in shown
    assert main(["bundle", "show", str(out), "--json"]) == 0
    assert BundleManifest.model_validate_json(capsys.readouterr().out) == report.manifest


def test_bundle_create_from_the_users_pieces(digits_experiment, tmp_path, capsys):
    burnin, calibration = digits_experiment.burnin, digits_experiment.splits.calibration
    save_file(burnin.model.state_dict(), tmp_path / "weights.safetensors")
    np.savez(tmp_path / "trusted.npz", x=calibration.x, y=calibration.y)  # uint8 images, as the user keeps them
    spec = burnin.model_spec
    out = tmp_path / "bundle"
    assert main(["bundle", "create", "--model", "digitscnn", "--weights", str(tmp_path / "weights.safetensors"),
                 "--trusted", str(tmp_path / "trusted.npz"), "--classes", str(spec["num_classes"]),
                 "--mean", *map(str, spec["mean"]), "--std", *map(str, spec["std"]),
                 "--set", "strategy.name=dsc", "--set", "stream.lr=0.05", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.manifest.model_spec() == spec and bundle.auxiliary is None
    assert (bundle.manifest.strategy.name, bundle.manifest.stream.lr) == ("dsc", 0.05)
    assert _states_equal(bundle.model.state_dict(), burnin.model.state_dict())
    assert torch.equal(bundle.trusted[0], digits_experiment.calibration_tensors[0])  # scaled by 1/255


@pytest.mark.parametrize("packed", [False, True])
def test_bundle_create_reads_an_image_folder_tree_as_the_trusted_set(packed, tmp_path, capsys):
    import tarfile

    from tests.test_bundle_service import _image_tree

    save_file(build_model("digitscnn", num_classes=3, input_shape=(1, 8, 8)).state_dict(), tmp_path / "w.safetensors")
    tree = tmp_path / "tree"
    expected = _image_tree(tree, ["a", "b", "c"])
    if packed:
        with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as archive:
            archive.add(tree, arcname="tree")
        tree = tmp_path / "tree.tar.gz"
    argv = ["bundle", "create", "--model", "digitscnn", "--weights", str(tmp_path / "w.safetensors"),
            "--trusted", str(tree), "--classes", "3", "--class-names", "a,b,c"]
    assert main([*argv, "--out", str(tmp_path / "no-shape")]) == 2
    assert capsys.readouterr().err == (f"dscguard: error: --trusted {tree}: an image-folder tree needs --input-shape "
                                       f"C H W (the images' channels, height and width)\n")
    assert main([*argv, "--input-shape", "1", "8", "8", "--out", str(tmp_path / "bundle")]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert torch.equal(bundle.trusted[0], expected)
    assert bundle.trusted[1].tolist() == [0, 0, 1, 1, 2, 2] * 2
    assert bundle.manifest.input.class_names == ["a", "b", "c"]


def test_bundle_create_refuses_a_tree_with_a_class_the_bundle_does_not_name(tmp_path, capsys):
    from tests.test_bundle_service import _image_tree

    save_file(build_model("digitscnn", num_classes=3, input_shape=(1, 8, 8)).state_dict(), tmp_path / "w.safetensors")
    _image_tree(tmp_path / "tree", ["a", "b", "d"])
    assert main(["bundle", "create", "--model", "digitscnn", "--weights", str(tmp_path / "w.safetensors"),
                 "--trusted", str(tmp_path / "tree"), "--input-shape", "1", "8", "8", "--classes", "3",
                 "--class-names", "a,b,c", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dscguard: error: {tmp_path / 'tree'}: not an image-folder tree of .png, .jpg, .jpeg "
                          f"images for this bundle: ") and len(err.splitlines()) == 1
    assert "train/d/0.png: unknown class folder 'd'" in err
    assert list((tmp_path / "out").iterdir()) == []


def _pieces(tmp_path: Path) -> list[str]:
    save_file(build_model("digitscnn", num_classes=CLASSES, input_shape=(1, 8, 8)).state_dict(),
              tmp_path / "w.safetensors")
    save_file({"x": torch.rand(TRUSTED_SAMPLES, 1, 8, 8), "y": torch.arange(TRUSTED_SAMPLES) % CLASSES},
              tmp_path / "t.safetensors")
    return ["--weights", str(tmp_path / "w.safetensors"), "--trusted", str(tmp_path / "t.safetensors")]


@pytest.mark.parametrize(("argv", "message"), [
    (["--profile", "digits", "--classes", "10"], "--classes: these go with --model"),
    (["--profile", "digits", "--optimizer-state", "o.safetensors"], "--optimizer-state: these go with --model"),
    (["--model", "digitscnn"], "--model needs --weights, --trusted and --classes (missing: --classes)"),
    (["--model", "digitscnn", "--classes", "10", "--set", "burnin.epochs=3"],
     "--set burnin.*: a bundle keeps only stream, strategy, calibration settings"),
    (["--model", "digitscnn", "--classes", "10", "--model-kwargs", "[16]"], "--model-kwargs: expected a JSON object"),
    (["--model", "nosuch", "--classes", "10"], "invalid bundle: --model: Value error, expected a built-in"),
    (["--model", "digitscnn", "--classes", "1"], "invalid bundle: --classes: Input should be greater than or equal "
                                                 "to 2 (got 1)"),
    (["--model", "digitscnn", "--classes", "10", "--set", "stream.lr=-1"],
     "invalid bundle: --set stream.lr: Input should be greater than 0 (got -1)"),
])
def test_bundle_create_command_line_errors_exit_2(argv, message, tmp_path, capsys):
    pieces = _pieces(tmp_path) if "--model" in argv else []
    assert main(["bundle", "create", *argv, *pieces, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dscguard: error: ") and message in err and len(err.splitlines()) == 1


def test_bundle_create_refuses_pickled_weights_by_name(tmp_path, capsys):
    pieces = _pieces(tmp_path)
    _pickle_bomb(tmp_path / "w.pt", tmp_path / "unpickled")
    pieces[1] = str(tmp_path / "w.pt")
    assert main(["bundle", "create", "--model", "digitscnn", "--classes", "10", *pieces,
                 "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"dscguard: error: {tmp_path / 'w.pt'}: a pickle file is never loaded")
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_bundle_create_names_the_users_file_when_its_weights_do_not_fit(tmp_path, capsys):
    pieces = _pieces(tmp_path)
    assert main(["bundle", "create", "--model", "digitscnn", "--classes", "10", "--model-kwargs", '{"width": 16}',
                 *pieces, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"dscguard: error: {tmp_path / 'w.safetensors'}: net.0.weight: shape "
                                              f"[16, 1, 3, 3], but digitscnn expects [8, 1, 3, 3]")
    assert list((tmp_path / "out").iterdir()) == []  # every check before any file is written


def test_bundle_create_refuses_a_non_empty_directory_before_the_burn_in(tmp_path, monkeypatch, capsys):
    import service.core.experiment

    def never(*args, **kwargs):
        raise AssertionError("the burn-in started although the bundle cannot be written")

    monkeypatch.setattr(service.core.experiment.Experiment, "prepare", never)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["bundle", "create", "--profile", "digits", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"dscguard: error: {tmp_path}: not empty; a bundle is written into a new or "
                                       f"empty directory\n")
