import json
import subprocess
import sys

import pytest

from hfcompress.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("reference", "eval", "quantize", "distill", "run", "push", "verify", "kernels"):
        assert command in out


@pytest.mark.parametrize("command", ["reference", "eval", "quantize", "run", "push", "verify"])
def test_subcommand_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hfcompress " + command in capsys.readouterr().out


def test_kernels_reports_each_kernel(capsys, monkeypatch):
    from hfcompress.core import native

    code = main(["kernels"])
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == ["int8_gemv", "int4_gemv", "kd_logit_loss",
                                                                 "decode_attention"]
    assert code == (0 if native.kernels_available() and native.weight_kernels_available() else 1)
    if code == 0:  # each line names the instruction set that runs
        assert all(line.split(": ")[1].startswith("loaded (") for line in out.splitlines())
    monkeypatch.setenv("HFCOMPRESS_NATIVE_KERNELS", "0")
    assert main(["kernels"]) == 1
    assert capsys.readouterr().out == ("int8_gemv: disabled by HFCOMPRESS_NATIVE_KERNELS\n"
                                       "int4_gemv: disabled by HFCOMPRESS_NATIVE_KERNELS\n"
                                       "kd_logit_loss: disabled by HFCOMPRESS_NATIVE_KERNELS\n"
                                       "decode_attention: disabled by HFCOMPRESS_NATIVE_KERNELS\n")


def _one_line_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    # Progress bars (loading weights) may precede it; the error itself is exactly one line, the last.
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and err.splitlines()[-1] == error_lines[0]
    assert error_lines[0].startswith("hfcompress ") and expected in error_lines[0]
    return err


def test_eval_missing_path(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path / "nope")], "does not exist")


def test_eval_not_a_model_folder(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path)], "not a model folder")


def test_eval_empty_text_source(capsys, tmp_path, tiny_reference_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    _one_line_error(capsys, ["eval", str(tiny_reference_dir), "--data", str(tmp_path / "data"), "--no-speed"],
                    "empty")


def test_eval_block_size_too_large(capsys, tiny_reference_dir):
    _one_line_error(capsys, ["eval", str(tiny_reference_dir), "--block-size", "100000", "--no-speed"], "context")


def test_unknown_option_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "x", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_eval_writes_json(tmp_path, tiny_reference_dir, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_reference_dir), "--block-size", "64", "--num-blocks", "4", "--new-tokens", "4",
                 "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] > 1 and result["decode_tokens_per_s"] > 0
    assert "perplexity" in capsys.readouterr().out


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hfcompress.cli", "eval", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("hfcompress eval: error:") and "Traceback" not in proc.stderr


def test_verify_reports_a_corrupted_checkpoint(tmp_path, tiny_reference_dir, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in tiny_reference_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    assert main(["verify", str(folder), "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    capsys.readouterr()
    assert main(["verify", str(folder)]) == 1
    assert "model.safetensors" in capsys.readouterr().out
