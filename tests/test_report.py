"""runs/report.py draws on its own canvas: a report leaves the user's matplotlib backend alone."""

import matplotlib

from hfcompress.runs.report import plot_models

ROWS = [{"model": "a", "label": "fp32", "perplexity": 40.0, "checkpoint_bytes": 8 * 2**20, "decode_tokens_per_s": 90.0},
        {"model": "b", "label": "int4", "perplexity": 41.0, "checkpoint_bytes": 2 * 2**20, "decode_tokens_per_s": 200.0}]


def test_plot_keeps_the_users_backend(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the user might have chosen (not Agg)
    try:
        path = plot_models(ROWS, tmp_path / "report.png", "title")
        assert matplotlib.get_backend() == "svg"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    finally:
        matplotlib.use(before)


def test_no_rows_no_plot(tmp_path):
    assert plot_models([], tmp_path / "report.png", "title") is None
    assert not (tmp_path / "report.png").exists()
