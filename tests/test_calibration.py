import math

import numpy as np
import pytest
import torch
from scipy import stats

from service.core.defense.calibration import calibrate
from service.core.defense.discrepancy import memorization_discrepancy


@pytest.mark.parametrize("target", [0.1, 0.25])
def test_calibration_hits_its_false_flag_target_on_held_out_clean_data(digits_experiment, target):
    exp = digits_experiment
    x_cal, y_cal = exp.calibration_tensors
    cal = calibrate(exp.burnin.model, exp.burnin.auxiliary, x_cal, y_cal, target_false_flag_rate=target,
                    warmup_batches=0)
    held_out, _ = exp.splits.stream.tensors()  # clean, disjoint from the calibration split
    scores = memorization_discrepancy(exp.burnin.auxiliary, exp.burnin.model, held_out).cpu().numpy()
    rate = float((scores > cal.threshold(0)).mean())
    # 500 held-out samples: a binomial standard error of ~1.5 points; allow ~3 of them
    assert rate == pytest.approx(target, abs=0.05)
    assert cal.samples == len(x_cal) and cal.tau == 0.0


def test_drift_is_measured_on_a_copy_and_is_non_negative(digits_experiment):
    exp = digits_experiment
    before = [p.detach().clone() for p in exp.burnin.model.parameters()]
    x_cal, y_cal = exp.calibration_tensors
    cal = calibrate(exp.burnin.model, exp.burnin.auxiliary, x_cal, y_cal, warmup_batches=6, seed=3)
    assert len(cal.quantile_per_warmup_batch) == 7
    assert cal.tau >= 0
    slope = np.polyfit(np.arange(7), cal.quantile_per_warmup_batch, 1)[0]
    assert cal.tau == pytest.approx(max(slope, 0.0))
    assert all((a == b).all() for a, b in zip(before, exp.burnin.model.parameters(), strict=True))


def test_calibration_rejects_bad_targets(digits_experiment):
    x_cal, y_cal = digits_experiment.calibration_tensors
    with pytest.raises(ValueError, match="target_false_flag_rate"):
        calibrate(digits_experiment.burnin.model, digits_experiment.burnin.auxiliary, x_cal, y_cal,
                  target_false_flag_rate=0.0)


def test_batch_unit_calibrates_on_batch_means(digits_experiment):
    exp = digits_experiment
    x, y = exp.splits.stream.tensors()
    target, size, draws = 0.1, 10, 512  # draws: the clean batch means `threshold_statistic` takes the quantile of
    cal = calibrate(exp.burnin.model, exp.burnin.auxiliary, x[:250], y[:250], target_false_flag_rate=target,
                    warmup_batches=0, batch_size=size, unit="batch")
    assert cal.unit == "batch"
    # mu is the k-th smallest of `draws` means of `size` clean scores drawn from the calibration samples, k =
    # ceil((draws + 1)(1 - target)). The conformal guarantee: a fresh batch drawn the same way has its mean above
    # mu with a probability that is Beta(draws + 1 - k, k) over calibrations (mean 0.099, sd 0.013 here), so the
    # rate over 100,000 fresh batches (+-0.001) lies in its 99.9% interval. A threshold of the wrong statistic
    # misses it: the per-sample quantile (rate 0.055), means of 5 or 25 (0.037, 0.18), levels 0.8 or 0.95.
    # (Held-out samples cannot check mu this closely: on digits, whose scores are heavy-tailed, their batch-mean
    # rate varies with sd 0.06 over random calibration/held-out splits of the clean data.)
    scores = memorization_discrepancy(exp.burnin.auxiliary, exp.burnin.model, x[:250])
    generator = torch.Generator().manual_seed(12345)
    means = scores[torch.randint(250, (100_000, size), generator=generator)].mean(dim=1)
    rate = float((means > cal.mu).float().mean())
    k = math.ceil((draws + 1) * (1 - target))
    low, high = stats.beta.ppf([0.0005, 0.9995], draws + 1 - k, k)
    assert low < rate < high, (rate, low, high)
    per_sample = calibrate(exp.burnin.model, exp.burnin.auxiliary, x[:250], y[:250], warmup_batches=0)
    assert per_sample.mu != pytest.approx(cal.mu)
    with pytest.raises(ValueError, match="unit"):
        calibrate(exp.burnin.model, exp.burnin.auxiliary, x, y, unit="pixel")
