"""defaults_sweep.py's table: each variant against its own method's defaults, borrowed run.py rows labelled."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))


def _rows(text: str) -> dict[str, list[str]]:
    lines = [line.strip("|").split("|") for line in text.splitlines()[2:]]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in lines}


def test_variants_compare_with_their_methods_default_and_give_bytes():
    import defaults_sweep

    ok = dict(status="ok", num_calibration_blocks=64)
    rows = [dict(ok, name="awq-default", what="AWQ defaults", perplexity=18.0, kl_to_fp32=0.160, weight_bytes=1000),
            dict(ok, name="awq-grid-10", what="grid 10", perplexity=18.1, kl_to_fp32=0.200, weight_bytes=1000),
            dict(ok, name="g64", what="group 64", perplexity=17.5, kl_to_fp32=0.150, weight_bytes=1100),
            dict(name="awq-no-clip", what="no clip", status="error", error="boom")]
    borrowed = {"fp32": dict(ok, perplexity=15.0, kl_to_fp32=0.0, weight_bytes=4000),
                "rtn": dict(ok, perplexity=22.0, kl_to_fp32=0.400, weight_bytes=1000),
                "default": dict(ok, perplexity=17.0, kl_to_fp32=0.100, weight_bytes=1000), "awq-default": None}
    table = _rows(defaults_sweep.markdown(rows, 15.0, borrowed["rtn"], borrowed))
    assert "run.py's row" in table["default"][1] and "run.py's row" not in table["awq-default"][1]
    assert table["awq-grid-10"][5] == "1.250×"  # 0.200 / AWQ's default 0.160, not GPTQ's 0.100
    assert table["g64"][5] == "1.500×" and table["g64"][6] == "0.375×"  # vs GPTQ's default, vs RTN
    assert table["g64"][7] == "1,100" and table["g64"][8] == "1.100×"  # bytes beside the KL
    assert table["awq-grid-10"][3] == "+20.67%"
    assert table["awq-no-clip"][2] == "error: boom" and table["fp32"][5] == "-"
