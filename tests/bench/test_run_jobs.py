"""run.py's job filter (``--jobs`` / ``--skip-jobs`` / ``--list-jobs``): which measurements a run starts and
records, without running any model (fast)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run  # noqa: E402


def test_job_selected_patterns():
    assert run.job_selected("gptq-int4-g128", None, None)
    assert run.job_selected("gptq-int4-g128", ["rtn-*", "gptq-int4-*"], None)
    assert not run.job_selected("gptq-int3-g128", ["rtn-*", "gptq-int4-*"], None)
    assert not run.job_selected("awq-int4-g128", None, ["awq-*"])
    assert not run.job_selected("peer-hqq_int4_g128", ["peer-*"], ["peer-hqq*"])
    assert not run.job_selected("fp32x", ["fp32"], None)  # a pattern matches the whole name


def _job(tmp_path: Path, name: str) -> run.Job:
    out = tmp_path / f"{name}.json"
    code = f"import json; json.dump({{'status': 'ok', 'value': 1}}, open({str(out)!r}, 'w'))"
    return run.Job("quant", name, "ours", ["-c", code], out, 60)


def test_runner_runs_only_selected_jobs_and_reports_after_each(tmp_path):
    results: dict = {}
    calls = []
    runner = run.Runner(tmp_path, results, None, verbose=False, jobs=["keep-*"], skip=["keep-not"],
                        after_job=lambda: calls.append(len(results.get("quant", []))))
    kept = runner.run(_job(tmp_path, "keep-a"))
    skipped = [runner.run(_job(tmp_path, name)) for name in ("other", "keep-not")]
    assert kept["status"] == "ok" and kept["value"] == 1
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]
    assert not (tmp_path / "other.json").exists()  # never started
    assert [r["name"] for r in results["quant"]] == ["keep-a"]
    assert runner.skipped == ["other", "keep-not"]
    assert calls == [1]  # results written once, after the job that ran


def test_list_jobs_prints_the_filtered_profile_without_preparing_anything(tmp_path):
    argv = [sys.executable, str(BENCH / "run.py"), "--model", "smollm2", "--no-peers", "--work", str(tmp_path),
            "--list-jobs", "--jobs", "fp32", "gptq-int*-g128", "--skip-jobs", "gptq-int8-*"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [line.split("\t")[1] for line in proc.stdout.splitlines()]
    assert names == ["fp32", "gptq-int4-g128", "gptq-int3-g128"]
    assert not (tmp_path / "models").exists()  # nothing fetched or converted
    assert not (tmp_path / "smollm2" / "results.json").exists()


def test_report_names_the_jobs_a_filtered_run_left_out():
    note = report._job_filter_note({"jobs": ["rtn-*"], "skip_jobs": None, "left_out": ["gptq-int4-g128"]})
    assert "`--jobs rtn-*`" in note and "1 of the profile's jobs were left out (gptq-int4-g128)" in note


def test_runner_reuses_an_earlier_record_only_for_the_same_command(tmp_path):
    first: dict = {}
    run.Runner(tmp_path, first, None, verbose=False).run(_job(tmp_path, "a"))
    earlier = first["quant"][0]
    changed = dict(earlier, name="b", command=earlier["command"] + " --other")
    results: dict = {}
    runner = run.Runner(tmp_path, results, None, verbose=False, previous={"a": earlier, "b": changed})
    (tmp_path / "a.json").unlink()
    reused = runner.run(_job(tmp_path, "a"))
    assert reused["value"] == 1 and not (tmp_path / "a.json").exists()  # not run again
    rerun = runner.run(_job(tmp_path, "b"))  # same name, different command: runs
    assert rerun["status"] == "ok" and (tmp_path / "b.json").exists()
    assert runner.reused == ["a"]
    assert [r["name"] for r in results["quant"]] == ["a", "b"]
    note = report._resume_note({"commands": ["python run.py x"], "date": "d", "reused_jobs": runner.reused})
    assert "1 row(s) (a)" in note and "`python run.py x`" in note


def test_resume_matches_commands_recorded_in_another_checkout(tmp_path):
    here = f"python {BENCH}/ours.py quant --model {BENCH}/work/models/m --bits 4 --out {BENCH}/work/p/json/q.json"
    there = here.replace(str(BENCH.parents[1]), "/elsewhere/wt/other")
    assert there != here and run.portable_command(there) == run.portable_command(here)
    assert run.portable_command(here).startswith("python scripts/bench/ours.py quant --model scripts/bench/work/")
    assert run.portable_command(there.replace("--bits 4", "--bits 3")) != run.portable_command(here)
    assert run.portable_command("python /data/model --out /x/y") == "python /data/model --out /x/y"
    # A record made in another checkout is reused by a runner here, not run again
    job = _job(tmp_path, "a")
    job.argv = [str(BENCH / "ours.py"), *job.argv]  # a path into scripts/bench/, as every real job has
    earlier = {"status": "ok", "value": 1, "name": "a",
               "command": f"{Path(sys.executable).name} /elsewhere/wt/x/scripts/bench/ours.py "
                          + " ".join(shlex.quote(a) for a in job.argv[1:])}
    runner = run.Runner(tmp_path, {}, None, verbose=False, previous={"a": earlier})
    assert runner.run(job)["value"] == 1 and runner.reused == ["a"] and not job.out.exists()


def test_report_labels_timings_of_a_loaded_machine_as_distorted():
    assert report.load_distorted({"loadavg_at_start": (2.7, 4.4, 5.7)})
    assert not report.load_distorted({"loadavg_at_start": (0.2, 0.5, 0.9)})
    assert not report.load_distorted({})
    rows = [{"name": "fp32", "status": "ok", "table": "ours", "label": "fp32", "perplexity": 15.2,
             "quantize_seconds": 1.0}]
    profile = {"name": "smollm2", "group_size": 128, "bits": [4], "real_model": "smollm2", "block_size": 512,
               "calibration_blocks": 64, "eval_blocks": 64}
    loaded = "\n".join(report.quant_tables(rows, profile, [], {}, distorted=True))
    idle = "\n".join(report.quant_tables(rows, profile, [], {}))
    assert "quantize s (load-distorted)" in loaded and "load-distorted" not in idle
