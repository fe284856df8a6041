"""The worker serves a model bundle (issue 14): a user's own module and a torchvision network each go bundle ->
`bundle check` -> worker + API -> `dscguard attack --bundle` over HTTP -> report, with the same runs as in process;
a checkpoint of another bundle is refused naming both fingerprints; every bad bundle is refused before anything is
written to the checkpoint directory; and correction keeps a bundle's feature vectors inside their bounds."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from attacker_sim.http_target import evaluate_target
from attacker_sim.report import table_markdown
from attacker_sim.targets import InProcessTarget
from service.cli import main
from service.core.bundle import BundleError, BundleManifest, create_bundle, load_bundle
from service.core.bundle.architecture import bundle_model_spec
from service.core.bundle.serving import bundle_config, bundle_experiment, bundle_fingerprint, read_data
from service.core.config import ExperimentConfig
from service.core.data.digits import load_sklearn_digits
from service.core.defense import build_strategy
from service.core.learner import OnlineLearner
from service.deployment.checkpoint_store import WorkerError, checkpoints
from service.deployment.codec import MIN_SAMPLES_KEY, InputSpec, decode_json_batch, encode_json_batch, to_stream_fields
from service.deployment.worker import Worker
from tests.bundle_factory import tiny_bn_mlp, tiny_cnn, tiny_mlp
from tests.service_harness import ADMIN_TOKEN, API_KEY, ApiServer, WorkerProcess, make_settings, needs_redis, wait_ready
from tests.test_bundle import BAD_BUNDLES, small_bundle  # noqa: F401  (small_bundle: a fixture)

STREAM = {"batch_size": 10}  # small batches: the campaigns below take a few seconds per bundle
CAMPAIGN = {"max_batches": 2, "clean_batches": 2}
TRUSTED, DATA = 60, 400  # the trusted set; the data the stream, the attacker and the test draw from


def _digits(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float images in [0, 1], shaped [N, channels, size, size]."""
    x, y = load_sklearn_digits().tensors()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1) if size != 8 else x
    return x.repeat(1, channels, 1, 1), y


def _train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    return net.eval()


def _user_module_bundle(directory: Path) -> tuple[Path, Path]:
    """tests.bundle_factory:tiny_cnn trained briefly on digits (an earlier epoch as the auxiliary), defended by dsc."""
    x, y = _digits(1, 8)
    torch.manual_seed(0)
    net = _train(tiny_cnn(1, 10), x[DATA + TRUSTED :], y[DATA + TRUSTED :], epochs=1)
    auxiliary = copy.deepcopy(net)
    _train(net.train(), x[DATA + TRUSTED :], y[DATA + TRUSTED :], epochs=1)
    manifest = BundleManifest(schema_version=1, model={"architecture": "tests.bundle_factory:tiny_cnn",
                                                       "kwargs": {"channels": 1, "classes": 10}},
                              input={"shape": [1, 8, 8], "num_classes": 10}, stream=STREAM, strategy={"name": "dsc"})
    bundle = create_bundle(directory / "user-module", manifest, net, (x[DATA : DATA + TRUSTED],
                                                                    y[DATA : DATA + TRUSTED]), auxiliary=auxiliary)
    return bundle, _save_data(directory / "user-module.npz", x[:DATA], y[:DATA])


def _torchvision_bundle(directory: Path) -> tuple[Path, Path]:
    """torchvision's shufflenet_v2_x0_5 at 3x32x32 (its own initialisation: the pipeline is what is tested), no
    auxiliary, defended by guard. No dropout: its steps draw no random numbers, so the worker's runs equal the
    in-process ones exactly."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    x, y = _digits(3, 32)
    torch.manual_seed(0)
    net = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None, num_classes=10)
    manifest = BundleManifest(schema_version=1, model={"architecture": "torchvision:shufflenet_v2_x0_5",
                                                       "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}},
                              input={"shape": [3, 32, 32], "num_classes": 10}, stream=STREAM)
    bundle = create_bundle(directory / "torchvision", manifest, net.state_dict(), (x[DATA : DATA + TRUSTED],
                                                                                  y[DATA : DATA + TRUSTED]))
    return bundle, _save_data(directory / "torchvision.npz", x[:DATA], y[:DATA])


def _save_data(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


BUNDLES = {"user module": _user_module_bundle, "torchvision": _torchvision_bundle}


def _files(directory: Path) -> dict[str, int]:
    """Every file under `directory` (relative path -> modification time in ns): what a refusal must leave as it is."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))} \
        if directory.exists() else {}


@needs_redis
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BUNDLES))
def test_a_bundle_is_checked_served_and_attacked_over_http(kind, namespace, tmp_path, monkeypatch, capsys):
    bundle_dir, data_path = BUNDLES[kind](tmp_path)
    assert main(["bundle", "check", str(bundle_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"bundle {bundle_dir}: ok")

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    config = bundle_config(manifest, ExperimentConfig.from_profile("digits", campaign=CAMPAIGN))
    experiment = bundle_experiment(bundle, config, read_data(data_path, manifest))
    strategy = manifest.strategy.name
    learner = experiment.new_learner()
    expected = evaluate_target(config, InProcessTarget(learner), strategy, progress=False, experiment=experiment)

    settings = make_settings(namespace, tmp_path, bundle=bundle_dir)
    monkeypatch.setenv("DSCGUARD_API_KEY", API_KEY)
    monkeypatch.setenv("DSCGUARD_ADMIN_TOKEN", ADMIN_TOKEN)
    report = tmp_path / "report"
    with ApiServer(settings) as api, WorkerProcess(settings) as worker:
        # the worker takes guard's first calibration before it serves: on the torchvision bundle's CNN, over a minute
        wait_ready(api, worker, timeout=300)
        status = api.client.get("/v1/status").json()
        assert status["strategy"] == strategy
        served = {"directory": str(bundle_dir), "fingerprint": bundle_fingerprint(bundle_dir)}
        assert status["worker"]["bundle"] == served
        args = ["attack", "--target", api.url, "--bundle", str(bundle_dir), "--data", str(data_path), "--no-progress",
                "--no-plots", "--out", str(report)]
        assert main(args + [a for k, v in CAMPAIGN.items() for a in ("--set", f"campaign.{k}={v}")]) == 0
        # the API validates against the bundle's input spec, which the worker published with the model
        wrong = torch.zeros(1, 1, 4, 4)
        response = api.client.post("/v1/ingest", content=_safetensors(wrong, [0], "wrong-shape"),
                                   headers={"Content-Type": "application/vnd.safetensors"})
        assert response.status_code == 422 and response.json()["reason"] == "shape"
        assert f"[N, {', '.join(map(str, manifest.input.shape))}]" in response.json()["detail"]
    printed = capsys.readouterr().out
    assert _without_timing(printed) == _without_timing(table_markdown(expected))
    results = json.loads((report / "results.json").read_text())
    poison = [row for row in results["rows"] if row["scenario"] == "poison"]
    assert len(poison) == 1 and poison[0]["strategy"] == strategy and poison[0]["trigger_acc"] is not None
    # the report names what was measured: the user's data and architecture, not the profile's
    assert {(row["dataset"], row["model"]) for row in results["rows"]} == \
        {(data_path.name, f"{manifest.model.architecture} (bundle {bundle_dir.name})")}
    assert (report / "report.md").read_text().startswith(
        f"# dscguard evaluation: {data_path.name} / {manifest.model.architecture} (bundle {bundle_dir.name})")


def _safetensors(x, y, batch_id):
    from service.deployment.codec import encode_safetensors_batch

    return encode_safetensors_batch(x, y, batch_id=batch_id)


def _without_timing(table: str) -> list[str]:
    return [re.sub(r"\| [0-9.]+ \|$", "|", line) for line in table.strip().splitlines() if line.startswith("|")]


@needs_redis
def test_a_checkpoint_of_another_bundle_is_refused_naming_both(small_bundle, namespace, tmp_path):  # noqa: F811
    settings = make_settings(namespace, tmp_path, bundle=small_bundle)
    first = Worker(settings)
    first.start()
    first.shutdown()
    checkpoint_dir = Path(settings.checkpoint_dir)
    written = checkpoints(checkpoint_dir)
    assert written and json.loads((written[0] / "meta.json").read_text())["extra"]["bundle"] == \
        bundle_fingerprint(small_bundle)

    other = tmp_path / "other"
    manifest = load_bundle(small_bundle).manifest
    trusted = load_bundle(small_bundle).trusted
    torch.manual_seed(1)
    create_bundle(other, manifest, _digits_net(manifest), trusted)  # other weights: another bundle
    before = _files(checkpoint_dir)
    with pytest.raises(WorkerError) as info:
        Worker(make_settings(namespace, tmp_path, bundle=other)).start()
    message = str(info.value)
    assert "\n" not in message and str(written[0]) in message
    assert f"bundle {bundle_fingerprint(small_bundle)}" in message and f"bundle {bundle_fingerprint(other)}" in message
    # a profile's worker on that directory is refused too, and neither refusal wrote or moved anything
    with pytest.raises(WorkerError, match="written for bundle .* serves a profile's burn-in"):
        Worker(make_settings(namespace, tmp_path)).start()
    assert _files(checkpoint_dir) == before


def _digits_net(manifest: BundleManifest) -> torch.nn.Module:
    from service.core.models import build_model

    return build_model(**manifest.model_spec())


@needs_redis
@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_the_worker_refuses_a_bad_bundle_before_writing_anything(case, small_bundle, namespace,  # noqa: F811
                                                                 tmp_path):
    spoil, file, field, problem = BAD_BUNDLES[case]
    spoil(small_bundle)
    settings = make_settings(namespace, tmp_path, bundle=small_bundle)
    with pytest.raises(BundleError) as info:
        Worker(settings).start()
    assert (info.value.file, info.value.field) == (small_bundle / file, field)
    assert problem in str(info.value) and "\n" not in str(info.value)
    assert not Path(settings.checkpoint_dir).exists()


@pytest.mark.parametrize("kind", ["a file", "missing", "no manifest"])
def test_dscguard_worker_refuses_a_bundle_path_that_is_no_bundle(kind, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bundle"
    if kind == "a file":
        path.write_text("{}")
    elif kind == "no manifest":
        path.mkdir()
    checkpoint_dir = tmp_path / "checkpoints"
    monkeypatch.setenv("DSCGUARD_CHECKPOINT_DIR", str(checkpoint_dir))
    monkeypatch.setenv("DSCGUARD_REDIS_URL", "redis://127.0.0.1:9/0")  # refused before Redis is ever asked
    assert main(["worker", "--bundle", str(path), "--metrics-port", "0"]) == 1
    err = capsys.readouterr().err
    expected = f"{path}: not a directory" if kind != "no manifest" else f"{path / 'bundle.json'}: missing: not a bundle"
    assert err.startswith(f"dscguard: error: {expected}") and err.count("\n") == 1
    assert not checkpoint_dir.exists()


def test_correction_keeps_feature_vectors_inside_their_bounds():
    bounds = [[0.0, 0.3], [0.2, 0.6], [0.5, 1.0], [0.0, 1.0]]
    manifest = BundleManifest(schema_version=1, model={"architecture": "tests.bundle_factory:tiny_mlp",
                                                       "kwargs": {"features": len(bounds), "classes": 2}},
                              input={"shape": [len(bounds)], "num_classes": 2, "feature_bounds": bounds})
    low, high = torch.tensor(bounds).T
    torch.manual_seed(0)
    x = low + torch.rand(64, len(bounds)) * (high - low)
    y = (x[:, 3] > 0.5).long()
    model, auxiliary = tiny_mlp(len(bounds), 2), tiny_mlp(len(bounds), 2)  # unlike each other: everything flagged
    # AT corrects every sample for every step, with a radius wider than every feature's range
    strategy = build_strategy(manifest.strategy.model_copy(update={"name": "at", "epsilon": 1.0, "steps": 5,
                                                                  "step_size": 0.5}))
    learner = OnlineLearner(model, auxiliary, strategy, model_spec=bundle_model_spec(manifest))
    prepared = learner.strategy.prepare(learner.model, learner.auxiliary, x, y, 0)
    corrected = prepared.correction.x
    assert not torch.equal(corrected, x)  # it moved them
    assert bool(((corrected >= low) & (corrected <= high)).all())
    # the same strategy without the bundle's spec leaves the bounds (only [0, 1] holds): the bounds did the work
    plain = build_strategy(manifest.strategy.model_copy(update={"name": "at", "epsilon": 1.0, "steps": 5,
                                                               "step_size": 0.5}))
    unbounded = plain.prepare(model, auxiliary, x, y, 0).correction.x
    assert not bool(((unbounded >= low) & (unbounded <= high)).all())


def test_a_feature_bound_holds_in_float32_as_inputs_are_sent():
    from service.deployment.codec import InputSpec, check_values

    bound = 0.512725  # not a float32: the float32 nearest to it lies below it
    assert float(np.float32(bound)) < bound
    spec = InputSpec((1,), 2, 8, feature_bounds=((bound, 1.0),))
    x = np.array([[bound]], np.float32)  # a value projected onto the bound, as correction and the attacker do
    assert check_values(x, spec) is x


def test_bundle_create_takes_feature_bounds_inline_or_from_a_file(tmp_path, capsys):
    bounds = [[0.0, 0.5], [0.25, 1.0]]
    x = torch.tensor([[0.1, 0.3], [0.4, 0.9], [0.2, 0.5], [0.0, 0.25]])
    np.savez(tmp_path / "trusted.npz", x=x.numpy(), y=np.array([0, 1, 0, 1]))
    save_file(tiny_mlp(2, 2).state_dict(), tmp_path / "weights.safetensors")
    (tmp_path / "bounds.json").write_text(json.dumps(bounds))
    for given, out in ((json.dumps(bounds), "inline"), (str(tmp_path / "bounds.json"), "file")):
        assert main(["bundle", "create", "--model", "tests.bundle_factory:tiny_mlp", "--model-kwargs",
                     '{"features": 2, "classes": 2}', "--weights", str(tmp_path / "weights.safetensors"), "--trusted",
                     str(tmp_path / "trusted.npz"), "--classes", "2", "--feature-bounds", given,
                     "--out", str(tmp_path / out)]) == 0
        assert [list(b) for b in load_bundle(tmp_path / out).manifest.input.feature_bounds] == bounds
    capsys.readouterr()
    # a sample outside its feature's bounds is refused, naming the file and the feature
    assert main(["bundle", "create", "--model", "tests.bundle_factory:tiny_mlp", "--model-kwargs",
                 '{"features": 2, "classes": 2}', "--weights", str(tmp_path / "weights.safetensors"), "--trusted",
                 str(tmp_path / "trusted.npz"), "--classes", "2", "--feature-bounds", "[[0, 0.3], [0, 1]]",
                 "--out", str(tmp_path / "narrow")]) == 1
    assert "trusted.npz: x: feature(s) 0 fall outside input.feature_bounds" in capsys.readouterr().err


def test_a_learner_of_a_factory_bundle_is_saved_and_loaded_back(tmp_path):
    bounds = [[0.0, 0.5], [0.25, 1.0], [0.0, 1.0]]
    manifest = BundleManifest(schema_version=1, model={"architecture": "tests.bundle_factory:tiny_mlp",
                                                       "kwargs": {"features": 3, "classes": 2}},
                              input={"shape": [3], "num_classes": 2, "feature_bounds": bounds},
                              strategy={"name": "dsc"})
    torch.manual_seed(0)
    low, high = torch.tensor(bounds).T
    x = low + torch.rand(40, 3) * (high - low)
    bundle_dir = create_bundle(tmp_path / "mlp", manifest, tiny_mlp(3, 2), (x, (x[:, 1] > 0.6).long()))
    config = bundle_config(manifest, ExperimentConfig.from_profile("digits"), overrides={"stream": {"batch_size": 8}})
    learner = bundle_experiment(load_bundle(bundle_dir), config).new_learner()
    # no auxiliary in the bundle: the online weights are the auxiliary
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(learner.auxiliary.state_dict()[name], tensor)
    learner.step(x[:8], (x[:8, 1] > 0.6).long())
    learner.save(tmp_path / "checkpoint")
    loaded = OnlineLearner.load(tmp_path / "checkpoint")
    assert loaded.model_spec == learner.model_spec and loaded.batches_applied == 1
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert [bound.tolist() for bound in loaded.strategy.correct.box] == [low.tolist(), high.tolist()]


def _image_tree(root: Path, classes: list[str], size: int = 8) -> torch.Tensor:
    """train/<class>/*.png and test/<class>/*.png: two grey images per class and part; their pixels, in file order."""
    from PIL import Image

    pixels = []
    for part in ("train", "test"):
        for label, name in enumerate(classes):
            (root / part / name).mkdir(parents=True)
            for index in range(2):
                image = np.full((size, size), 40 * label + 10 * index + (100 if part == "test" else 0), np.uint8)
                Image.fromarray(image).save(root / part / name / f"{index}.png")
                pixels.append(image)
    return torch.from_numpy(np.stack(pixels)).float().div(255).unsqueeze(1)


@pytest.mark.parametrize("packed", [False, True])
def test_data_may_be_an_image_folder_tree(packed, tmp_path):
    import tarfile

    manifest = BundleManifest(schema_version=1, model={"architecture": "digitscnn"},
                              input={"shape": [1, 8, 8], "num_classes": 3, "class_names": ["a", "b", "c"]})
    expected = _image_tree(tmp_path / "tree", ["a", "b", "c"])
    path = tmp_path / "tree"
    if packed:
        path = tmp_path / "tree.tar.gz"
        with tarfile.open(path, "w:gz") as archive:
            archive.add(tmp_path / "tree", arcname="tree")
    data = read_data(path, manifest)
    assert torch.equal(data.x, expected)
    assert data.y.tolist() == [0, 0, 1, 1, 2, 2] * 2

    # a class folder the bundle does not name is refused, naming the tree and the folder
    (tmp_path / "tree" / "train" / "d").mkdir()
    (tmp_path / "tree" / "train" / "c" / "0.png").rename(tmp_path / "tree" / "train" / "d" / "0.png")
    with pytest.raises(BundleError, match=r"tree: not an image-folder tree .* unknown class folder 'd'"):
        read_data(tmp_path / "tree", manifest)


@needs_redis
@pytest.mark.parametrize("auxiliary", ["frozen", "rolling"])
def test_dsc_with_a_frozen_auxiliary_the_bundle_lacks_is_warned_about(auxiliary, namespace, tmp_path, caplog):
    manifest = BundleManifest(schema_version=1, model={"architecture": "digitscnn"},
                              input={"shape": [1, 8, 8], "num_classes": 10}, stream=STREAM,
                              strategy={"name": "dsc", "auxiliary": auxiliary})
    x, y = _digits(1, 8)
    bundle = create_bundle(tmp_path / "bundle", manifest, _digits_net(manifest), (x[:TRUSTED], y[:TRUSTED]))
    worker = Worker(make_settings(namespace, tmp_path, bundle=bundle))
    with caplog.at_level("WARNING", logger="dscguard.worker"):
        worker.start()
    worker.shutdown()
    assert ("has no auxiliary" in caplog.text) == (auxiliary == "frozen")


@needs_redis
def test_a_batchnorm_model_is_never_handed_a_batch_of_one_sample(namespace, tmp_path):
    """In training, BatchNorm refuses a batch of one sample: the API refuses it at ingest (422, nothing queued), and
    an entry of one sample that reaches the stream anyway is dead-lettered, not a step that kills the worker each
    time it is replayed. Predicting one sample stays allowed."""
    manifest = BundleManifest(schema_version=1, model={"architecture": "tests.bundle_factory:tiny_bn_mlp",
                                                       "kwargs": {"features": 4, "classes": 3}},
                              input={"shape": [4], "num_classes": 3}, stream=STREAM)
    trusted = (torch.rand(TRUSTED, 4, generator=torch.Generator().manual_seed(0)), torch.arange(TRUSTED) % 3)
    bundle = create_bundle(tmp_path / "bundle", manifest, tiny_bn_mlp(4, 3), trusted)
    settings = make_settings(namespace, tmp_path, bundle=bundle)
    worker = Worker(settings)
    worker.start()
    try:
        assert worker.learner.min_batch_samples == 2
        assert worker.queue.model_spec()[MIN_SAMPLES_KEY] == 2
        x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
        with ApiServer(settings) as api:
            one = api.client.post("/v1/ingest", json=encode_json_batch("one", x[:1].numpy(), [0]))
            assert one.status_code == 422 and one.json()["reason"] == "batch_size", one.text
            assert "BatchNorm" in one.json()["detail"]
            assert worker.queue.client.xlen(worker.queue.stream) == 0
            assert api.client.post("/v1/ingest", json=encode_json_batch("two", x.numpy(), [0, 1])).status_code == 202
            predicted = api.client.post("/v1/predict", json=encode_json_batch(None, x[:1].numpy()))
            assert predicted.status_code == 200 and len(predicted.json()["labels"]) == 1, predicted.text
        # an entry of one sample put on the stream past the API (as an older API would have)
        worker.queue.client.xadd(worker.queue.stream, to_stream_fields(
            decode_json_batch(encode_json_batch("stray", x[:1].numpy(), [0]), InputSpec((4,), 3, 16))))
        entries = worker.queue.read(worker.consumer, 10, 100)
        assert [worker.process(entry_id, fields) for entry_id, fields in entries] == [1, 0]
        assert worker.queue.batch_state("stray")["state"] == "dead_letter"
        assert worker.learner.batches_applied == 1
    finally:
        worker.shutdown()
