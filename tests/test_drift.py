import pytest
import torch

from attacker_sim.drift import DRIFTS, BrightnessContrast, LabelPrior, PixelShift, Rotation, build_drift
from service.core.data import load_dataset

KINDS = {
    "pixel_shift": {"pixels": 1, "height": False},
    "rotation": {"degrees": 15.0},
    "brightness_contrast": {"brightness": 1.3, "contrast": 0.6},
    "label_prior": {"classes": 3, "share": 0.7, "num_classes": 10, "seed": 0},
}


@pytest.fixture(scope="module")
def digits():
    train, _ = load_dataset("digits")
    return train.tensors()


def _favoured_fraction(y, drift):
    return torch.isin(y, torch.tensor(drift.favoured_classes)).float().mean().item()


def test_registry_names_every_kind_and_params_rebuild_it():
    assert set(DRIFTS) == set(KINDS)
    for kind, params in KINDS.items():
        drift = build_drift(kind, **params)
        assert drift.name == kind and drift.params == params
        assert build_drift(kind, **drift.params).params == drift.params


@pytest.mark.parametrize("kind", KINDS)
def test_stream_batches_keep_dtype_shape_and_range_and_follow_the_seed(digits, kind):
    x, y = digits
    drift = build_drift(kind)
    first = list(drift.batches(x, y, batch_size=64, count=5, seed=3))
    again = list(drift.batches(x, y, batch_size=64, count=5, seed=3))
    other = list(drift.batches(x, y, batch_size=64, count=5, seed=4))
    assert len(first) == 5
    for xb, yb in first:
        assert xb.dtype == torch.float32 and xb.shape == (64, 1, 8, 8) and yb.shape == (64,)
        assert xb.min() >= 0.0 and xb.max() <= 1.0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    view, again_view = drift.test_view(x, y, seed=1), drift.test_view(x, y, seed=1)
    assert view[0].dtype == torch.float32 and view[0].shape == x.shape and view[1].shape == y.shape
    assert view[0].min() >= 0.0 and view[0].max() <= 1.0
    assert torch.equal(view[0], again_view[0]) and torch.equal(view[1], again_view[1])


@pytest.mark.parametrize("kind", ["pixel_shift", "rotation", "brightness_contrast"])
def test_transform_streams_visit_every_sample_once_per_epoch_with_labels_kept(kind):
    torch.manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8), torch.arange(60)  # unique labels: they tell which sample was drawn
    drift = build_drift(kind)
    batches = list(drift.batches(x, y, batch_size=25, count=12, seed=0))  # 300 draws = 5 epochs
    drawn = torch.cat([yb for _, yb in batches])
    for epoch in drawn.split(60):
        assert sorted(epoch.tolist()) == list(range(60))
    assert not torch.equal(drawn[:60], drawn[60:120])  # reshuffled each epoch
    for xb, yb in batches:
        assert torch.equal(xb, drift.apply(x[yb], yb)[0])  # the batch is the transform of the samples it names


def test_pixel_shift_rolls_along_the_width_and_optionally_the_height():
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 6, 7), torch.zeros(4, dtype=torch.long)
    shifted, labels = PixelShift(pixels=2).apply(x, y)
    assert torch.equal(shifted[..., 2:], x[..., :-2]) and torch.equal(shifted[..., :2], x[..., -2:])
    assert labels is y
    both, _ = PixelShift(pixels=2, height=True).apply(x, y)
    assert torch.equal(both[:, :, 2:, 2:], x[:, :, :-2, :-2])
    assert not torch.equal(both, shifted)


def test_rotation_turns_the_image_by_the_angle(digits):
    x, y = digits[0][:200], digits[1][:200]
    quarter, _ = Rotation(degrees=90).apply(x, y)
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(2, 3)), atol=1e-6)  # counter-clockwise
    small, _ = Rotation(degrees=15).apply(x, y)
    change = (small - x).abs().mean().item()
    assert change > 0.05  # digits strokes moved
    assert small.sum() < x.sum()  # corners leave the frame and are filled with 0, nothing is added


def _principal_axis_degrees(image):
    """Orientation of an [H, W] image's intensity mass, counter-clockwise from the width axis."""
    rows, cols = torch.meshgrid(torch.arange(image.shape[0]).double(), torch.arange(image.shape[1]).double(),
                                indexing="ij")
    weights = image.double() / image.sum()
    u, v = cols - (weights * cols).sum(), -(rows - (weights * rows).sum())  # v points up
    mu20, mu02, mu11 = (weights * u * u).sum(), (weights * v * v).sum(), (weights * u * v).sum()
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02)).item()


@pytest.mark.parametrize("degrees", [15.0, -10.0])
def test_rotation_angle_is_the_configured_one(degrees):
    bar = torch.zeros(1, 1, 41, 41)
    bar[0, 0, 19:22, 8:33] = 1.0  # a horizontal bar through the centre
    rotated, _ = Rotation(degrees=degrees).apply(bar, torch.tensor([0]))
    assert _principal_axis_degrees(bar[0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert _principal_axis_degrees(rotated[0, 0]) == pytest.approx(degrees, abs=1.0)


def test_brightness_contrast_matches_the_formula_for_one_channel_and_flattens_three():
    torch.manual_seed(2)
    x, y = torch.rand(8, 1, 5, 5) * 0.9, torch.zeros(8, dtype=torch.long)
    drifted, _ = BrightnessContrast(brightness=1.3, contrast=0.6).apply(x, y)
    bright = (1.3 * x).clamp(0, 1)
    mean = bright.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(drifted, (mean + 0.6 * (bright - mean)).clamp(0, 1), atol=1e-6)
    rgb = torch.rand(8, 3, 5, 5)
    drifted_rgb, _ = BrightnessContrast(brightness=1.0, contrast=0.5).apply(rgb, y)
    assert drifted_rgb.shape == rgb.shape and drifted_rgb.dtype == torch.float32
    assert drifted_rgb.std(dim=(1, 2, 3)).mean() < 0.6 * rgb.std(dim=(1, 2, 3)).mean()
    brighter, _ = BrightnessContrast(brightness=1.3, contrast=1.0).apply(rgb, y)
    assert brighter.max() == 1.0 and brighter.mean() > 1.15 * rgb.mean()  # brighter, clamped at white


def test_label_prior_batches_give_the_favoured_classes_their_share(digits):
    x, y = digits
    drift = LabelPrior(classes=3, share=0.7, num_classes=10, seed=0)
    assert len(drift.favoured_classes) == 3 and set(drift.favoured_classes) <= set(range(10))
    assert 0.25 < _favoured_fraction(y, drift) < 0.35  # digits are balanced: 3 of 10 classes
    batches = list(drift.batches(x, y, batch_size=100, count=20, seed=0))
    labels = torch.cat([yb for _, yb in batches])
    assert _favoured_fraction(labels, drift) == pytest.approx(0.7, abs=0.1)
    per_class = torch.bincount(labels, minlength=10).float() / len(labels)
    assert per_class[drift.favoured_classes].min() > 0.15  # each favoured class gets about 0.7 / 3
    assert torch.equal(drift.class_weights()[drift.favoured_classes], torch.full((3,), 0.7 / 3))
    for xb, yb in batches:  # images are drawn as they are, matched to their labels
        assert all(any(torch.equal(img, pool_img) for pool_img in x[y == label]) for img, label in
                   zip(xb[:3], yb[:3], strict=True))
    view_x, view_y = drift.test_view(x, y, seed=0)
    assert len(view_y) == len(y) and _favoured_fraction(view_y, drift) == pytest.approx(0.7, abs=0.05)
    assert torch.equal(drift.apply(x, y)[0], x)
    assert LabelPrior(classes=3, seed=1).favoured_classes != drift.favoured_classes  # the seed picks the classes


def test_label_prior_keeps_the_share_when_the_pool_lacks_some_other_classes():
    torch.manual_seed(3)
    drift = LabelPrior(classes=2, share=0.6, num_classes=10, seed=0)
    y = torch.tensor(drift.favoured_classes * 50 + [c for c in range(10) if c not in drift.favoured_classes][:1] * 400)
    labels = torch.cat([yb for _, yb in drift.batches(torch.rand(len(y), 1, 4, 4), y, 100, 20, seed=0)])
    assert _favoured_fraction(labels, drift) == pytest.approx(0.6, abs=0.05)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: build_drift("blur"), "unknown drift kind 'blur'; expected one of pixel_shift, rotation"),
        (lambda: build_drift("rotation", angle=10), "unknown parameter.*'angle'.*expected some of degrees"),
        (lambda: PixelShift(pixels=-1), "pixels .* integer >= 1, got -1"),
        (lambda: PixelShift(pixels=0), "pixels .* integer >= 1, got 0"),
        (lambda: Rotation(degrees=0), "degrees .* non-zero"),
        (lambda: Rotation(degrees=float("nan")), "degrees"),
        (lambda: BrightnessContrast(brightness=-0.5), "brightness .* > 0"),
        (lambda: BrightnessContrast(contrast=0.0), "contrast .* > 0"),
        (lambda: BrightnessContrast(brightness=1.0, contrast=1.0), "no drift"),
        (lambda: LabelPrior(share=0.0), r"share .* must be in \(0, 1\)"),
        (lambda: LabelPrior(share=1.0), r"share .* must be in \(0, 1\)"),
        (lambda: LabelPrior(share=1.5), r"share .* must be in \(0, 1\)"),
        (lambda: LabelPrior(classes=10, num_classes=10), r"classes .* \[1, 9\], got 10"),
        (lambda: LabelPrior(classes=0), "classes .* got 0"),
        (lambda: LabelPrior(num_classes=1), "num_classes must be an integer >= 2"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_pools_and_batches_are_refused():
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10)
    shift = PixelShift()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        next(shift.batches(x, y, batch_size=0, count=1, seed=0))
    with pytest.raises(ValueError, match="count must be an integer >= 0"):
        next(shift.batches(x, y, batch_size=2, count=-1, seed=0))
    with pytest.raises(ValueError, match="empty pool"):
        next(shift.batches(x[:0], y[:0], batch_size=2, count=1, seed=0))
    with pytest.raises(ValueError, match=r"images must be a float tensor \[N, C, H, W\]"):
        shift.apply(x[:, 0], y)
    with pytest.raises(ValueError, match="one label per image"):
        shift.apply(x, y[:5])
    prior = LabelPrior(classes=2, num_classes=10, seed=0)
    others = torch.tensor([c for c in range(10) if c not in prior.favoured_classes])
    with pytest.raises(ValueError, match="no samples of favoured classes"):
        next(prior.batches(torch.rand(8, 1, 4, 4), others, batch_size=2, count=1, seed=0))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        prior.test_view(torch.rand(2, 1, 4, 4), torch.tensor([0, 12]))
