"""runs/report.py draws on its own canvas: a report leaves the user's matplotlib backend alone."""

import matplotlib
import pytest

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


def test_failed_redraw_keeps_the_previous_plot(tmp_path, monkeypatch):
    """A report is rewritten after every stage; a crash while drawing must leave the last good PNG, whole."""
    from matplotlib.figure import Figure

    path = plot_models(ROWS, tmp_path / "report.png", "title")
    good = path.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_models(ROWS[:1], tmp_path / "report.png", "other title")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]  # no partial file left behind
