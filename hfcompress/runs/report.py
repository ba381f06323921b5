"""Run reports: ``report.md`` + ``report.json`` + ``report.png`` (perplexity against size, one marker per model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.atomic import atomic_write_text


def _rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for summary in summaries:
        for result in summary.get("results", []) or []:
            rows.append(result)
    return rows


def _mib(value) -> str:
    return f"{value / 2**20:.2f}" if value else "-"


def _num(value, digits=1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) and value is not None else "-"


def render_markdown(recipe, summaries: list[dict], rows: list[dict], plot_name: str | None) -> str:
    lines = [f"# hfcompress run: {recipe.name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += ["## Stages", "", "| # | stage | kind | seconds | output |", "|---:|---|---|---:|---|"]
    for s in summaries:
        lines.append(f"| {s['index']} | {s['stage']} | {s['kind']} | {s['seconds']:.1f} | "
                     f"{s.get('output', '-') or '-'} |")
    if rows:
        base = rows[0]
        lines += ["", "## Models", "",
                  f"Perplexity on `{base.get('data')}` ({base.get('scored_tokens', 0):,} scored tokens, windows of "
                  f"{base.get('block_size')} tokens); speeds at batch 1 on this machine.", "",
                  "| model | perplexity | vs first | KL to ref | parameters | checkpoint MiB | weights MiB | "
                  "prefill tok/s | decode tok/s | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            ratio = row["perplexity"] / base["perplexity"]
            lines.append(
                f"| {row.get('label') or row['model']} | {row['perplexity']:.3f} | {ratio:.3f}x | "
                f"{_num(row.get('kl_to_reference'), 4)} | "
                f"{row.get('num_parameters', 0):,} | {_mib(row.get('checkpoint_bytes'))} | "
                f"{_mib(row.get('weight_bytes'))} | {_num(row.get('prefill_tokens_per_s'))} | "
                f"{_num(row.get('decode_tokens_per_s'))} | {_mib(row.get('peak_rss_bytes'))} |")
    if plot_name:
        lines += ["", f"![perplexity vs size]({plot_name})"]
    lines += ["", "## Recipe", "", f"```yaml\n{recipe.source.rstrip()}\n```", ""]
    return "\n".join(lines)


def plot_models(rows: list[dict], path: Path, title: str) -> Path | None:
    """Perplexity against checkpoint size (left) and decode speed (right), one marker per model."""
    if not rows:
        return None
    # A Figure on its own Agg canvas, not pyplot: the user's backend and pyplot's figure list stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    markers = "osD^v<>Pp*hX"
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, row in enumerate(rows):
        size = (row.get("checkpoint_bytes") or row.get("weight_bytes") or 0) / 2**20
        label = row.get("label") or Path(str(row["model"])).name
        left.scatter(size, row["perplexity"], s=80, marker=markers[i % len(markers)], label=label, zorder=3)
        left.annotate(label, (size, row["perplexity"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        decode = row.get("decode_tokens_per_s")
        right.bar(i, decode or 0, label=label)
        if decode:
            right.text(i, decode, f"{decode:.0f}", ha="center", va="bottom", fontsize=8)
    left.set_xlabel("checkpoint size (MiB)")
    left.set_ylabel("held-out perplexity (lower is better)")
    left.set_title("quality vs size")
    left.grid(True, alpha=0.3)
    left.set_xlim(left=0)
    right.set_xticks(range(len(rows)))
    right.set_xticklabels([r.get("label") or Path(str(r["model"])).name for r in rows], rotation=20, ha="right",
                          fontsize=8)
    right.set_ylabel("decode tokens/s, batch 1 (higher is better)")
    right.set_title("speed")
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    # Written beside the target and renamed over it: a reader sees the old plot or the new one, never half a PNG
    staged = path.with_name(f".{path.name}.partial")
    try:
        fig.savefig(staged, dpi=110, format="png")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def write_report(run_dir: Path, recipe, summaries: list[dict]) -> Path:
    rows = _rows(summaries)
    plot = plot_models(rows, run_dir / "report.png", f"hfcompress: {recipe.name}")
    atomic_write_text(run_dir / "report.json", json.dumps({"recipe": recipe.name, "stages": summaries,
                                                          "models": rows}, indent=2, default=str) + "\n")
    return atomic_write_text(run_dir / "report.md", render_markdown(recipe, summaries, rows,
                                                                     plot.name if plot else None))
