"""benchmarks/gr_precision.py measures what it says: one tiny run (one ε, one ‖g1‖), in-process, checked."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gr_precision  # noqa: E402

MODES = ["float64", "float32", "tf32", "bf16-autocast", "bf16-held"]
ARGS = ["--sizes", "tiny", "--eps", "1e-3", "--grad-norm", "1", "--batch", "8x16+16", "--threads", "1",
        "--modes", ",".join(MODES)]


@pytest.fixture(scope="module")
def run():
    """(rows by mode, printed output) of one run with an fp64 reference and the exact H·g1."""
    import contextlib
    import io
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            results = gr_precision.main(ARGS)
    finally:
        torch.set_num_threads(threads)
    return {r["mode"]: r for r in results}, out.getvalue()


def test_every_requested_row_is_printed(run):
    rows, out = run
    assert "reference float64 at the same ε" in out and "SAME ε" in out
    for mode in ["reference", *MODES]:
        if mode == "tf32" and not torch.cuda.is_available():
            assert re.search(r"^tf32\s+skipped on cpu: TF32 is an input format", out, re.M)
            assert mode not in rows
            continue
        assert re.search(rf"^{mode}\s+1e-03\s+[\d.e+-]+\s+[\d.]+\s+-?[\d.]+\s+[\d.]+\s+-?[\d.]+\s+[\d.]+\s+[\d.]+%", out,
                         re.M), mode
        assert mode in rows
    for mode in ["float32", "bf16-autocast", "bf16-held"]:  # the summary grids
        assert re.search(rf"^{mode}\nsize .*\ntiny\s+\d[\d,]+\s+1\s+-?[\d.]+ \(", out.split("=== summary")[1], re.M), mode


def test_numbers(run):
    rows, _ = run
    for mode, r in rows.items():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, mode
        assert 0 < r["changed"] <= 1, mode
        assert r["g1"] == pytest.approx(1, rel=0.02), mode  # the advantages were scaled to ‖g1‖ = 1
    # fp64 recomputed from scratch is the reference: same ε, same weights, bit-exact restore in between
    assert rows["float64"]["cos"] == pytest.approx(1, abs=1e-12) and rows["float64"]["ratio"] == pytest.approx(1, abs=1e-9)
    assert rows["float64"]["changed"] == 1.0
    # the finite difference at a small step is the exact Hessian-vector product (step ε·‖g1‖ ≈ 5e-4 here)
    assert rows["reference"]["cos_hg"] > 0.999 and rows["reference"]["ratio_hg"] == pytest.approx(1, abs=0.01)
    # fp32 keeps the finite difference; a perturbation below bf16's step changes few bf16-held weights
    assert rows["float32"]["cos"] > 0.99 and rows["float32"]["ratio"] == pytest.approx(1, abs=0.01)
    assert rows["float32"]["changed"] > 0.9
    assert rows["bf16-held"]["changed"] < 0.2 and rows["bf16-autocast"]["changed"] < 0.2


def test_float32_reference_without_hvp():
    """The cheap path for big models: fp32 reference, no H·g1; the float32 row is the reference recomputed."""
    threads = torch.get_num_threads()
    try:
        results = gr_precision.main(["--sizes", "tiny", "--eps", "1e-2", "--grad-norm", "10", "--batch", "4x8+8",
                                     "--threads", "1", "--reference", "float32", "--no-hvp",
                                     "--modes", "float32,bf16-held"])
    finally:
        torch.set_num_threads(threads)
    rows = {r["mode"]: r for r in results}
    assert set(rows) == {"reference", "float32", "bf16-held"}
    assert rows["float32"]["cos"] == pytest.approx(1, abs=1e-9)
    assert math.isnan(rows["float32"]["cos_hg"])


@pytest.mark.parametrize("args, message", [(["--modes", "fp16"], "--modes: unknown"),
                                           (["--sizes", "huge"], "--sizes: unknown"),
                                           (["--batch", "8x64"], "--batch")])
def test_bad_flags(args, message):
    with pytest.raises(SystemExit, match=message):
        gr_precision.main(args)
