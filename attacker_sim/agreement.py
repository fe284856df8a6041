"""Whether two evaluations agree: two `results.json` (`dscguard eval --out`, `dscguard attack --targets --out`)
compared per seed and at every step of the traces, within stated tolerances (`dscguard compare`).

The tolerances are those measured for two evaluations of the same profile and seeds in different processes
(docs/deployment.md, "The tolerance, and the measured agreement"): accuracies, per seed and at every step of the
traces, within 2 points (8 of digits' 400 test images); the defense's flag and correction rates within 10 points
(a verdict on 2 of the 20 poisoned batches); the batch at which the attacker's monitor fires, equal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

# What is compared: each row's per-seed values (accuracies and rates are fractions; batches a count)
COMPARED_FIELDS = ("start_acc", "clean_final_acc", "poison_acc", "trigger_acc", "delta", "batches", "flagged_rate",
                   "corrected_rate", "trigger_flagged_rate")
RATE_FIELDS = ("flagged_rate", "corrected_rate", "trigger_flagged_rate")
TRACE = "trace"  # what `_aligned` calls a trace's test accuracy after every step
ACCURACY_TOLERANCE, RATE_TOLERANCE = 0.02, 0.10

Results = Mapping | str | Path  # a results.json document, or the path of one


def compare_results(left: Results, right: Results, tolerance: float = ACCURACY_TOLERANCE,
                    rate_tolerance: float = RATE_TOLERANCE) -> list[str]:
    """Where two results.json differ by more than `tolerance` on accuracies or `rate_tolerance` on flag and
    correction rates (absolute, per seed, on fractions; `batches` must be equal); [] when they agree. Rows are
    matched by strategy and scenario, traces also by seed; a row or seed that only one has is a difference.

    >>> row = {"strategy": "st", "scenario": "clean", "start_acc": {"values": [0.9, 0.8]}}
    >>> compare_results({"rows": [row]}, {"rows": [{**row, "start_acc": {"values": [0.9, 0.81]}}]}, 0.02)
    []
    >>> compare_results({"rows": [row]}, {"rows": [{**row, "start_acc": {"values": [0.9, 0.85]}}]}, 0.02)
    ['st/clean start_acc seed #2: 0.8000 vs 0.8500 (|diff| 0.0500 > 0.02)']
    """
    a, b = _document(left), _document(right)
    rows_a, rows_b = _rows(a), _rows(b)
    differences = [f"{s}/{c}: only in {'the first' if (s, c) in rows_a else 'the second'}"
                   for s, c in sorted(set(rows_a) ^ set(rows_b))]
    for name, field, x, y in _aligned(a, b):
        if field == TRACE:
            if len(x) != len(y):
                differences.append(f"{name}: {len(x)} vs {len(y)} steps")
                continue
            worst = max((abs(u - v), step) for step, (u, v) in enumerate(zip(x, y, strict=True)))
            if worst[0] > tolerance + 1e-9:
                differences.append(f"{name}: |diff| {worst[0]:.4f} at step {worst[1]} > {tolerance:g}")
            continue
        if x is None and y is None:
            continue
        if x is None or y is None or len(x) != len(y):
            differences.append(f"{name} {field}: {x} vs {y}")
            continue
        allowed = 0.0 if field == "batches" else rate_tolerance if field in RATE_FIELDS else tolerance
        for index, (u, v) in enumerate(zip(x, y, strict=True), start=1):
            if u is None or v is None or math.isnan(u) or math.isnan(v):
                if (u is None) != (v is None):
                    differences.append(f"{name} {field} seed #{index}: {u} vs {v}")
            elif abs(u - v) > allowed + 1e-9:
                differences.append(f"{name} {field} seed #{index}: {u:.4f} vs {v:.4f} "
                                   f"(|diff| {abs(u - v):.4f} > {allowed:g})")
    return differences


def max_difference(left: Results, right: Results, rates: bool = False) -> float:
    """The largest absolute difference between two results.json over the accuracies (per seed, and every trace
    step) both have, or (`rates`) over the flag and correction rates.

    >>> row = {"strategy": "st", "scenario": "clean", "start_acc": {"values": [0.9, 0.8]}}
    >>> round(max_difference({"rows": [row]}, {"rows": [{**row, "start_acc": {"values": [0.9, 0.85]}}]}), 4)
    0.05
    """
    worst = 0.0
    for _, field, x, y in _aligned(_document(left), _document(right)):
        if field == "batches" or (field in RATE_FIELDS) != rates:
            continue
        worst = max([worst, *(abs(u - v) for u, v in zip(x or [], y or [], strict=False)
                              if u is not None and v is not None)])
    return worst


def _document(results: Results) -> Mapping:
    return results if isinstance(results, Mapping) else json.loads(Path(results).read_text())


def _rows(document: Mapping) -> dict[tuple[str, str], dict]:
    return {(row["strategy"], row["scenario"]): row for row in document["rows"]}


def _aligned(a: Mapping, b: Mapping) -> Iterator[tuple[str, str, list | None, list | None]]:
    """(name, field, values in `a`, values in `b`): each compared field of the rows both have, in `a`'s order, then
    (field `TRACE`) the test accuracy after every step of each trace both have."""
    rows_b = _rows(b)
    for key, row in _rows(a).items():
        if key in rows_b:
            for field in COMPARED_FIELDS:
                yield ("/".join(key), field, (row.get(field) or {}).get("values"),
                       (rows_b[key].get(field) or {}).get("values"))
    traces_b = {(t["strategy"], t["scenario"], t["seed"]): t["test_acc"] for t in b.get("traces", [])}
    for trace in a.get("traces", []):
        key = (trace["strategy"], trace["scenario"], trace["seed"])
        if key in traces_b:
            yield f"{key[0]}/{key[1]} seed {key[2]} trace", TRACE, trace["test_acc"], traces_b[key]
