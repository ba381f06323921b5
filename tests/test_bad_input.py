"""Bad input, table-driven: every row is a mistake a user makes, and what hfcompress must answer.

For each row, on every surface (command line, recipes, Python API):

* the message is ONE line that names what is wrong (and, where there is one, the fix): asserted with a regex
  of its key words;
* the Python API raises a subclass of :class:`hfcompress.core.errors.HFCompressError` (never a bare
  ``ValueError``/``KeyError``/``IndexError`` from deep inside torch or transformers);
* the command line exits non-zero (2 for a usage mistake; ``verify`` answers 1 for a checkpoint that fails
  its checks) and prints that one line on stderr, with no traceback;
* NOTHING is written: every file under the test's folder (which is also the working directory) is the same
  before and after, byte for byte, and no file appears.

The counts of rows per surface are quoted in README.md (section "Guarantees"); update both together.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfcompress.cli import main
from hfcompress.core.errors import ConfigError, DataError, HFCompressError, ModelLoadError


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>' for every folder) under ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        state[relative] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_one_line(message: str, pattern: str) -> None:
    assert message and "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message
    assert re.search(pattern, message, re.IGNORECASE), f"{pattern!r} not in {message!r}"


class Inputs:
    """Builds the bad inputs of a row inside ``root`` (the test's tmp_path, also its working directory)."""

    def __init__(self, root: Path, reference: Path, tokenizer):
        self.root = root
        self.reference = reference  # the tiny reference teacher's folder (config, safetensors, tokenizer)
        self.tokenizer = tokenizer

    def path(self, name: str) -> str:
        return str(self.root / name)

    def model(self, name: str = "model") -> Path:
        """A copy of the tiny reference teacher."""
        folder = self.root / name
        shutil.copytree(self.reference, folder)
        return folder

    def truncated_weights(self) -> str:
        folder = self.model()
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
        return str(folder)

    def garbage_weights(self) -> str:
        folder = self.model()
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" + bytes(64))
        return str(folder)

    def config_not_json(self) -> str:
        folder = self.model()
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')  # cut short
        return str(folder)

    def no_weights(self) -> str:
        folder = self.model()
        (folder / "model.safetensors").unlink()
        return str(folder)

    def vision_model(self) -> str:
        """A folder whose config is an image classifier (no causal LM for it)."""
        from transformers import ViTConfig

        folder = self.model()
        config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=8)
        (folder / "config.json").write_text(config.to_json_string())
        return str(folder)

    def nan_model(self) -> str:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.reference)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        folder = self.root / "model"
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return str(folder)

    def other_tokenizer_student(self) -> str:
        """A student folder (same architecture and vocabulary size) whose tokenizer numbers tokens differently."""
        folder = self.model("student")
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary merged tokens swap their ids
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (folder / "tokenizer.json").write_text(json.dumps(data))
        return str(folder)

    def model_with_card(self, card: str) -> str:
        folder = self.model()
        (folder / "README.md").write_text(card)
        return str(folder)

    def text_folder(self, name: str = "data", files: dict[str, str] | None = None) -> str:
        folder = self.root / name
        folder.mkdir()
        for file, text in (files or {}).items():
            (folder / file).write_text(text)
        return str(folder)

    def non_empty_folder(self, name: str = "out") -> str:
        folder = self.root / name
        folder.mkdir()
        (folder / "keep-me.txt").write_text("a previous result")
        return str(folder)

    def file(self, name: str, text: str = "x") -> str:
        (self.root / name).write_text(text)
        return self.path(name)


@pytest.fixture()
def inputs(tmp_path, monkeypatch, tiny_reference_dir, tiny_tokenizer, hfcompress_home):
    monkeypatch.chdir(tmp_path)  # relative default outputs (distill-output, runs/...) would land here
    monkeypatch.setenv("HFCOMPRESS_HOME", str(hfcompress_home))  # reference:tiny without training it again
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return Inputs(tmp_path, Path(tiny_reference_dir), tiny_tokenizer)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------------
# Surface 1: the command line (in process, through hfcompress.cli.main)
# --------------------------------------------------------------------------------------------------------
# (id, argv builder, regex the one error line must match). {ref} is the tiny teacher folder, {out} a fresh
# output folder that must not appear.
def q(*extra):
    # The tiny teacher's widths are 64 and 192 and its context 128: a fitting group size and calibration length
    # so that each row fails for its own reason only.
    return lambda i: ["quantize", str(i.reference), i.path("out"), "-q", "--group-size", "32", "--seq-len", "64",
                      *extra]


def d(*extra):
    return lambda i: ["distill", "--teacher", str(i.reference), "--block_size", "64", "--output_dir", i.path("out"),
                      "--report_to", "none", *extra]


CLI_ROWS = [
    # ---- quantize: the model argument
    ("quantize-missing-model", lambda i: ["quantize", i.path("nope"), i.path("out"), "-q"],
     r"model path .*nope.* does not exist"),
    ("quantize-model-is-a-file", lambda i: ["quantize", i.file("model.txt"), i.path("out"), "-q"],
     r"is a file.*folder that holds config\.json"),
    ("quantize-folder-without-config", lambda i: ["quantize", i.text_folder("empty"), i.path("out"), "-q"],
     r"not a model folder.*no config\.json"),
    ("quantize-config-not-json", lambda i: ["quantize", i.config_not_json(), i.path("out"), "-q"],
     r"config\.json.*not a valid JSON"),
    ("quantize-truncated-safetensors", lambda i: ["quantize", i.truncated_weights(), i.path("out"), "-q"],
     r"model\.safetensors.*(truncated|corrupt|incomplete)"),
    ("quantize-garbage-safetensors", lambda i: ["quantize", i.garbage_weights(), i.path("out"), "-q"],
     r"model\.safetensors.*(corrupt|not a valid safetensors)"),
    ("quantize-no-weight-files", lambda i: ["quantize", i.no_weights(), i.path("out"), "-q"],
     r"no weight files|no .*safetensors"),
    ("quantize-vision-model", lambda i: ["quantize", i.vision_model(), i.path("out"), "-q"],
     r"(vit|ViTConfig).*not a causal (language model|LM)|causal LM.*vit"),
    ("quantize-nan-weights", lambda i: ["quantize", i.nan_model(), i.path("out"), "-q", "--method", "rtn"],
     r"layers\.1\.mlp\.down_proj\.weight.*NaN"),
    # ---- quantize: option values
    ("quantize-bits-5", q("--bits", "5"), r"bits=5 is not supported.*2, 3, 4, 8"),
    ("quantize-bits-not-a-number", q("--bits", "four"), r"--bits.*invalid int value.*'four'"),
    ("quantize-unknown-method", q("--method", "gptqq"), r"method='gptqq'.*did you mean 'gptq'"),
    ("quantize-group-size-zero", q("--group-size", "0"), r"group_size must be a positive integer or None"),
    ("quantize-group-size-divides-nothing", q("--group-size", "7"),
     r"group_size=7 divides none of the .* layers.*use group_size="),
    ("quantize-damp-out-of-range", q("--method", "gptq", "--damp", "1.5"), r"damp must be in \[0, 1\)"),
    ("quantize-unknown-dtype", q("--method", "cast", "--dtype", "float8"), r"dtype='float8'.*float16, bfloat16"),
    ("quantize-bool-flag-garbage", q("--symmetric", "maybe"), r"--symmetric.*expected.*maybe.*true/false"),
    ("quantize-ignore-everything", q("--ignore", "re:.*"), r"no nn\.Linear layers left.*ignore"),
    ("quantize-bad-shard-size", q("--max-shard-size", "lots"), r"max.shard.size.*'lots'.*(2GB|500MB)"),
    ("quantize-bnb-block-size", q("--method", "bnb_nf4", "--bnb-block-size", "48"),
     r"bnb_block_size must be a power of two"),
    ("quantize-seq-len-beyond-context", q("--method", "gptq", "--seq-len", "100000"),
     r"block size 100000 is larger than the model's context"),
    # ---- quantize: calibration data and the output folder
    ("quantize-missing-calibration-data", q("--method", "gptq", "--calibration-data", "./no/such/texts"),
     r"text source .*no/such/texts.* does not exist"),
    ("quantize-empty-calibration-folder",
     lambda i: q("--method", "gptq", "--calibration-data", i.text_folder("calib"))(i),
     r"holds no text files"),
    ("quantize-output-not-empty", lambda i: [i.non_empty_folder(), *q()(i)][1:],
     r"out.* is not empty.*--overwrite"),
    ("quantize-output-is-a-file", lambda i: ["quantize", str(i.reference), i.file("out"), "-q"],
     r"it is a file, not a folder"),
    # ---- quantize --stream (layer by layer from the shards; the output's lock file must not stay behind either)
    ("quantize-stream-bad-memory", q("--stream", "--max-memory", "lots"), r"max_memory='lots' is not a size.*8GB"),
    ("quantize-stream-memory-too-small", q("--stream", "--max-memory", "1KB"),
     r"cannot hold one decoder layer's quantization.*raise max_memory to at least"),
    ("quantize-stream-output-not-empty", lambda i: [i.non_empty_folder(), *q("--stream")(i)][1:],
     r"out.* is not empty.*--overwrite"),
    ("quantize-max-memory-without-stream", q("--max-memory", "8GB"), r"max_memory bounds a streamed quantization"),
    # ---- eval
    ("eval-missing-model", lambda i: ["eval", i.path("nope"), "-q"], r"does not exist"),
    ("eval-missing-data", lambda i: ["eval", str(i.reference), "--data", "./missing.txt", "-q"],
     r"text source .*missing\.txt.* does not exist"),
    ("eval-unknown-stdlib-split", lambda i: ["eval", str(i.reference), "--data", "stdlib:dev", "-q"],
     r"unknown stdlib split 'dev'.*train, validation, test"),
    ("eval-block-size-beyond-context", lambda i: ["eval", str(i.reference), "--block-size", "100000", "--no-speed",
                                                  "-q"], r"larger than the model's context"),
    ("eval-block-size-one", lambda i: ["eval", str(i.reference), "--block-size", "1", "--no-speed", "-q"],
     r"block.size must be at least 2"),
    ("eval-batch-size-zero", lambda i: ["eval", str(i.reference), "--batch-size", "0", "--no-speed", "-q"],
     r"batch_size must be a positive integer"),
    ("eval-stride-zero", lambda i: ["eval", str(i.reference), "--stride", "0", "--no-speed", "-q"],
     r"stride must be in 1\.\."),
    ("eval-json-in-missing-folder", lambda i: ["eval", str(i.reference), "--json", "./no/dir/r.json", "--no-speed",
                                               "-q"], r"--json.*no/dir.* does not exist"),
    ("eval-truncated-safetensors", lambda i: ["eval", i.truncated_weights(), "--no-speed", "-q"],
     r"model\.safetensors is truncated or corrupt.*download or save the checkpoint again"),
    ("eval-unknown-runtime", lambda i: ["eval", str(i.reference), "--runtime", "fast"],
     r"--runtime.*invalid choice: 'fast'"),
    # ---- distill
    ("distill-missing-teacher", lambda i: ["distill", "--teacher", i.path("nope"), "--output_dir", i.path("out")],
     r"model path .*nope.* does not exist"),
    ("distill-unknown-loss", d("--loss", "kll"), r"loss='kll' is not a known divergence"),
    ("distill-zero-temperature", d("--temperature", "0"), r"temperature must be > 0"),
    ("distill-unknown-flag", d("--temprature", "2"),
     r"unrecognized argument.*--temprature.*did you mean --temperature"),
    ("distill-flag-wrong-type", d("--max_steps", "many"), r"--max_steps.*invalid int value: 'many'"),
    ("distill-missing-config-file", lambda i: ["distill", "--config", "missing.yaml"],
     r"config file 'missing\.yaml' does not exist"),
    ("distill-config-unknown-key", lambda i: ["distill", "--config", i.file("d.yaml", "temprature: 2\n")],
     r"unknown key 'temprature'.*did you mean 'temperature'"),
    ("distill-student-zero-layers", d("--student_num_layers", "0"), r"num_layers must be an integer in 1\.\.2"),
    ("distill-bad-layer-selection", d("--student_num_layers", "1", "--student_layer_selection", "first"),
     r"student_layer_selection must be 'uniform', 'keep-last' or comma-separated"),
    ("distill-block-size-beyond-context", d("--block_size", "4096"),
     r"block size 4096 is larger than the model's context"),
    ("distill-empty-dataset", lambda i: d("--dataset", i.text_folder("data", {"a.txt": ""}))(i), r"is empty"),
    ("distill-other-tokenizer", lambda i: d("--student", i.other_tokenizer_student())(i),
     r"student and teacher use different tokenizers"),
    # ---- verify (a checkpoint that fails verification answers 1; the problem is in the report on stdout)
    ("verify-missing-folder", lambda i: ["verify", i.path("nope")], r"does not exist"),
    # A folder saved with a manifest (the reference cache is) reports the changed file first; one without, the JSON.
    ("verify-config-not-json", lambda i: ["verify", i.config_not_json()],
     r"config\.json.*(not (a )?valid JSON|bytes, but \d+ were saved \(truncated or overwritten\))"),
    ("verify-garbage-safetensors", lambda i: ["verify", i.garbage_weights()], r"model\.safetensors"),
    # ---- push (dry runs: nothing leaves the machine)
    ("push-missing-folder", lambda i: ["push", i.path("nope"), "user/repo", "--dry-run"], r"does not exist"),
    ("push-invalid-repo-id", lambda i: ["push", str(i.reference), "not a repo id!", "--dry-run"],
     r"invalid repo id 'not a repo id!'"),
    ("push-no-weights", lambda i: ["push", i.no_weights(), "user/repo", "--dry-run"], r"has no weight files"),
    ("push-no-tokenizer", lambda i: ["push", (lambda f: [p.unlink() for p in Path(f).glob("tokenizer*")] and f)(
        str(i.model())), "user/repo", "--dry-run"], r"has no tokenizer files.*save the tokenizer"),
    ("push-broken-model-card", lambda i: ["push", i.model_with_card("---\nlicense: [apache\n---\n# x\n"),
                                          "user/repo", "--dry-run"], r"README\.md.*(YAML|metadata)"),
    # ---- run (recipe files themselves: see test_recipe_bad_input)
    ("run-output-not-a-run", lambda i: ["run", i.file("r.yaml", f"model: {i.reference}\nstages:\n  - quantize: {{}}\n"),
                                        "--output", i.non_empty_folder("run"), "-q"],
     r"output folder .*run.* exists and is not an hfcompress run.*--output.*--overwrite"),
    # ---- reference
    ("reference-unknown-size", lambda i: ["reference", "--size", "huge"], r"--size.*invalid choice: 'huge'"),
]


@pytest.mark.parametrize("build, pattern", [pytest.param(b, p, id=i) for i, b, p in CLI_ROWS])
def test_cli_bad_input(build, pattern, inputs, capsys):
    argv = build(inputs)
    before = snapshot(inputs.root)
    code, out, err = run_cli(capsys, argv)
    assert snapshot(inputs.root) == before, "a failed command wrote or changed files"
    if argv[0] == "verify":
        assert code == 1
        problems = [line for line in out.splitlines() if line.strip().startswith("problem:")]
        assert problems, out
        assert_one_line(problems[0], pattern)
        return
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"hfcompress {argv[0]}: error: "), lines[0]
    assert_one_line(lines[0], pattern)


# The installed console script (a fresh interpreter): the same one line and exit code, no traceback.
@pytest.mark.parametrize("argv, pattern", [
    pytest.param(["quantize", "nope", "out", "--bits", "5"], r"does not exist|bits=5", id="quantize"),
    pytest.param(["run", "missing.yaml"], r"recipe 'missing\.yaml' does not exist", id="run"),
])
def test_console_script_bad_input(argv, pattern, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hfcompress.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"hfcompress {argv[0]}: error: "), proc.stderr
    assert_one_line(lines[0], pattern)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# Surface 2: recipes (YAML files run with `hfcompress run`, and loaded with load_recipe)
# --------------------------------------------------------------------------------------------------------
# {model} is the tiny teacher folder.
RECIPE_ROWS = [
    ("not-yaml", "name: x\nstages: [quantize: {{bits: 4}}\n", r"not valid YAML at line"),
    ("not-a-mapping", "- quantize: {{bits: 4}}\n", r"must be a YAML mapping with a 'stages' list"),
    ("empty-file", "", r"must be a YAML mapping"),
    ("unknown-top-level-key", "model: {model}\nstagse: []\n", r"unknown top-level key 'stagse'.*did you mean 'stages'"),
    ("no-stages", "model: {model}\nstages: []\n", r"missing required key 'stages'"),
    ("stages-not-a-list", "model: {model}\nstages: quantize\n", r"'stages' must be a list of stages.*'quantize'"),
    ("unknown-stage-kind", "model: {model}\nstages:\n  - quantise: {{bits: 4}}\n",
     r"unknown kind 'quantise'.*did you mean 'quantize'"),
    ("stage-not-one-key", "model: {model}\nstages:\n  - quantize: {{}}\n    evaluate: {{}}\n",
     r"stage 0 must be a one-key mapping"),
    ("stage-body-a-list", "model: {model}\nstages:\n  - quantize: [1, 2]\n",
     r"stage 0 \(quantize\) must map keys to values"),
    ("stage-body-a-string", "model: {model}\nstages:\n  - quantize: fast\n",
     r"stage 0 \(quantize\) must map keys to values"),
    ("unknown-stage-key", "model: {model}\nstages:\n  - quantize: {{bitz: 4}}\n",
     r"stage 0 \(quantize\): unknown key 'bitz'.*did you mean 'bits'"),
    ("wrong-type", "model: {model}\nstages:\n  - quantize: {{bits: four}}\n",
     r"stage 0 \(quantize\): key 'bits' expects int, got 'four'"),
    ("bits-5", "model: {model}\nstages:\n  - quantize: {{bits: 5}}\n",
     r"stage 0 \(quantize\): bits=5 is not supported"),
    ("bool-as-int", "model: {model}\nstages:\n  - quantize: {{group_size: true}}\n",
     r"key 'group_size' expects int \| None, got True"),
    ("distill-bad-temperature", "model: {model}\nstages:\n  - distill: {{temperature: -1}}\n",
     r"stage 0 \(distill\): .*temperature must be > 0"),
    ("missing-model", "model: ./no/such/model\nstages:\n  - quantize: {{bits: 4}}\n",
     r"model .*no/such/model.* does not exist"),
    ("unknown-reference-model", "model: reference:huge\nstages:\n  - quantize: {{bits: 4}}\n",
     r"unknown reference model 'reference:huge'; use one of reference:tiny"),
    ("no-model-at-all", "stages:\n  - quantize: {{bits: 4}}\n", r"needs an input model.*set the recipe's 'model'"),
    ("input-names-a-later-stage", "model: {model}\nstages:\n  - quantize: {{input: q2}}\n"
                                  "  - quantize: {{name: q2}}\n", r"needs 'q2', which no earlier stage produces"),
    ("duplicate-stage-names", "model: {model}\nstages:\n  - quantize: {{name: q}}\n  - quantize: {{name: q}}\n",
     r"two stages are named 'q'"),
    ("push-without-repo-id", "model: {model}\nstages:\n  - push: {{dry_run: true}}\n",
     r"missing required key 'repo_id'"),
    ("evaluate-unknown-runtime", "model: {model}\nstages:\n  - evaluate: {{runtime: fast}}\n",
     r"runtime must be 'auto', 'packed' or 'transformers'"),
]


@pytest.mark.parametrize("text, pattern", [pytest.param(t, p, id=i) for i, t, p in RECIPE_ROWS])
def test_recipe_bad_input(text, pattern, inputs, capsys):
    from hfcompress.runs.recipe import load_recipe

    recipe = inputs.file("recipe.yaml", text.format(model=inputs.reference))
    before = snapshot(inputs.root)
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert_one_line(str(info.value), pattern)
    code, _, err = run_cli(capsys, ["run", recipe, "--output", inputs.path("run"), "-q"])
    assert snapshot(inputs.root) == before, "a failed run wrote or changed files"
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hfcompress run: error: "), err
    assert_one_line(lines[0], pattern)


@pytest.mark.parametrize("override, pattern", [
    pytest.param("quantize.bits=5", r"bits=5 is not supported", id="bad-value"),
    pytest.param("quantize.bitz=4", r"unknown key 'bitz'.*did you mean 'bits'", id="unknown-key"),
    pytest.param("bits=4", r"unknown top-level key 'bits'", id="no-stage"),
    pytest.param("quantise.bits=4", r"no stage matches 'quantise'.*did you mean 'quantize'", id="unknown-stage"),
    pytest.param("quantize.bits", r"must look like key=value", id="no-equals"),
])
def test_recipe_override_bad_input(override, pattern, inputs, capsys):
    recipe = inputs.file("recipe.yaml", f"model: {inputs.reference}\nstages:\n  - quantize: {{bits: 4}}\n")
    before = snapshot(inputs.root)
    code, _, err = run_cli(capsys, ["run", recipe, "--set", override, "--output", inputs.path("run"), "-q"])
    assert snapshot(inputs.root) == before
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert_one_line(lines[0], pattern)


# --------------------------------------------------------------------------------------------------------
# Surface 3: the Python API
# --------------------------------------------------------------------------------------------------------
def _tiny(i: Inputs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(i.reference)


def _resolve(value, i: Inputs):
    return value(i) if callable(value) and not isinstance(value, type) else value


def _call(name, *args, **kwargs):
    """Row builder: ``hfcompress.<name>(*args, **kwargs)``; an argument may be a function of the Inputs (built
    before the snapshot)."""
    def build(i):
        import hfcompress

        fn = getattr(hfcompress, name)
        values = [_resolve(a, i) for a in args]
        keywords = {k: _resolve(v, i) for k, v in kwargs.items()}
        return lambda: fn(*values, **keywords)
    return build


def _quantize(config, model=_tiny, **kwargs):
    def build(i):
        from hfcompress import QuantizationConfig

        built = _call("quantize", model, QuantizationConfig(**config) if isinstance(config, dict) else config,
                      progress=False, **kwargs)
        return built(i)
    return build


def _distill_config(**kwargs):
    return _call("DistillationConfig", output_dir=lambda i: i.path("out"), report_to="none", **kwargs)


def _trainer(student=None, teacher=_tiny, tokenizer=None, args=None, train_dataset=None):
    def build(i):
        from hfcompress import DistillationConfig, DistillationTrainer, make_student
        from hfcompress.core.data import BlockDataset

        model = student(i) if student else make_student(_tiny(i), num_layers=1)
        config = args(i) if args else DistillationConfig(output_dir=i.path("out"), report_to="none", max_steps=1)
        dataset = BlockDataset(torch.randint(0, 500, (4, 16))) if train_dataset is None else train_dataset
        teacher_model, processing_class = teacher(i), tokenizer(i) if tokenizer else i.tokenizer
        return lambda: DistillationTrainer(model=model, teacher_model=teacher_model, args=config,
                                           train_dataset=dataset, processing_class=processing_class)
    return build


def _other_tokenizer(i: Inputs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(i.other_tokenizer_student())


def _bert(i: Inputs):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()


def _small_vocab_student(i: Inputs):
    """A Llama of the teacher's shape but half its vocabulary (256 rows against the tokenizer's 512 tokens)."""
    from transformers import LlamaForCausalLM

    config = _tiny(i).config
    config.vocab_size = 256
    return LlamaForCausalLM(config)


def _mlp(i: Inputs):
    """A model with linears but no transformer layers (nothing to calibrate layer by layer)."""
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))


def _inf_llama(i: Inputs):
    model = _tiny(i)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    return model


def _compressed_truncated(i: Inputs) -> str:
    """A compressed-tensors checkpoint (RTN int4, written with save_pretrained) whose weights file is cut short."""
    from hfcompress import QuantizationConfig, quantize

    model = quantize(_tiny(i), QuantizationConfig(method="rtn", bits=4, group_size=32), progress=False)
    folder = i.root / "int4"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 100])
    return str(folder)


def _texts(i: Inputs):
    return ["x = 1\n" * 200]


API_ROWS = [
    # ---- QuantizationConfig
    ("config-bits-5", _call("QuantizationConfig", bits=5), ConfigError, r"bits=5 is not supported.*2, 3, 4, 8"),
    ("config-bits-str", _call("QuantizationConfig", bits="4"), ConfigError, r"bits must be int, got '4'"),
    ("config-bits-bool", _call("QuantizationConfig", bits=True), ConfigError, r"bits must be int, got True"),
    ("config-method-typo", _call("QuantizationConfig", method="awk"), ConfigError, r"did you mean 'awq'"),
    ("config-group-size-negative", _call("QuantizationConfig", group_size=-32), ConfigError,
     r"group_size must be a positive integer or None"),
    ("config-group-size-float", _call("QuantizationConfig", group_size=64.0), ConfigError,
     r"group_size must be int, got 64\.0"),
    ("config-seq-len-one", _call("QuantizationConfig", seq_len=1), ConfigError, r"seq_len must be at least 2"),
    ("config-ignore-not-names", _call("QuantizationConfig", ignore=[1]), ConfigError,
     r"ignore must be a list of module names"),
    ("config-rounding-typo", _call("QuantizationConfig", rounding="stochastik"), ConfigError,
     r"did you mean 'stochastic'"),
    ("config-from-dict-unknown-key", lambda i: lambda: __import__("hfcompress").QuantizationConfig.from_dict(
        {"bitz": 4}), ConfigError, r"unknown quantization config key 'bitz'.*did you mean 'bits'"),
    ("config-from-json-not-json", lambda i: lambda: __import__("hfcompress").QuantizationConfig.from_json(
        "{bits: 4"), ConfigError, r"quantization config is not valid JSON"),
    # ---- quantize
    ("quantize-dict-config-bits-5", _call("quantize", _tiny, {"bits": 5}), ConfigError, r"bits=5 is not supported"),
    ("quantize-config-a-string", _quantize("rtn"), ConfigError, r"config must be a QuantizationConfig, got str"),
    ("quantize-gptq-without-data", _quantize({"method": "gptq"}), DataError,
     r"method='gptq' needs calibration data.*calibration_data="),
    ("quantize-text-without-tokenizer", _quantize({"method": "gptq", "seq_len": 64},
                                                  calibration_data=["def f(): pass"] * 4),
     DataError, r"needs a tokenizer.*tokenizer="),
    ("quantize-empty-calibration-list", _quantize({"method": "gptq", "seq_len": 64}, calibration_data=[],
                                                  tokenizer=lambda i: i.tokenizer),
     DataError, r"calibration data is an empty list"),
    ("quantize-token-ids-out-of-vocab", _quantize({"method": "gptq", "num_samples": 2, "seq_len": 8},
                                                  calibration_data=torch.full((2, 8), 10_000)),
     DataError, r"token ids must be in \[0, 512\)"),
    ("quantize-token-ids-float", _quantize({"method": "gptq", "num_samples": 2, "seq_len": 8},
                                           calibration_data=torch.zeros(2, 8)),
     DataError, r"must be a non-empty \(N, T\) LongTensor"),
    ("quantize-inf-weights", _quantize({"method": "rtn"}, model=_inf_llama), HFCompressError,
     r"layers\.0\.self_attn\.q_proj\.weight has 1 NaN/Inf"),
    ("quantize-group-size-divides-nothing", _quantize({"group_size": 40}), ConfigError,
     r"group_size=40 divides none.*use group_size=32"),
    ("quantize-gptq-no-decoder-layers", _quantize({"method": "gptq", "num_samples": 2, "seq_len": 128}, model=_mlp,
                                                  calibration_data=torch.zeros(2, 128).long()),
     ConfigError, r"(decoder|transformer) layers.*sequential_targets"),
    ("quantize-not-a-model", _quantize({"method": "rtn"}, model="reference:tiny"), ConfigError,
     r"model must be a torch\.nn\.Module.*got str"),
    # ---- make_student
    ("student-zero-layers", _call("make_student", _tiny, num_layers=0), ConfigError,
     r"num_layers must be an integer in 1\.\.2"),
    ("student-layers-float", _call("make_student", _tiny, num_layers=1.5), ConfigError,
     r"num_layers must be an integer in 1\.\.2.*1\.5"),
    ("student-repeated-layer", _call("make_student", _tiny, 2, layer_selection=[1, 1]), ConfigError,
     r"repeats a layer"),
    ("student-wider-than-teacher", _call("make_student", _tiny, 1, hidden_size=128), ConfigError,
     r"wider than the teacher's 64"),
    ("student-head-dim-mismatch", _call("make_student", _tiny, 1, hidden_size=40), ConfigError,
     r"not a multiple of the teacher's head dimension"),
    ("student-missing-teacher-path", _call("make_student", "./nope", 1), ModelLoadError, r"does not exist"),
    ("student-of-a-dict", _call("make_student", {"layers": 2}, 1), ConfigError,
     r"teacher must be a transformers model.*got dict"),
    ("student-of-a-model-without-layers", _call("make_student", _mlp, 1), ConfigError,
     r"teacher must be a transformers model.*got Sequential"),
    # ---- DistillationConfig / DistillationTrainer
    ("distill-config-beta", _distill_config(loss="jsd", beta=2.0), ConfigError, r"beta must be in \[0, 1\]"),
    ("distill-config-layer-map", _distill_config(layer_map="zigzag"), ConfigError, r"layer_map='zigzag' is unknown"),
    ("distill-config-nothing-to-train", _distill_config(kd_weight=0, ce_weight=0, hidden_weight=0), ConfigError,
     r"nothing to train"),
    ("distill-config-init-kwargs-json", _distill_config(teacher_model_init_kwargs="{dtype: bf16"), ConfigError,
     r"teacher_model_init_kwargs is not valid JSON"),
    ("distill-config-negative-chunk", _distill_config(loss_chunk_size=-1), ConfigError,
     r"loss_chunk_size must be >= 0"),
    ("distill-config-temperature-a-string", _distill_config(temperature="hot"), ConfigError,
     r"temperature must be a number, got 'hot'"),
    ("distill-config-weight-a-string", _distill_config(kd_weight="1"), ConfigError,
     r"kd_weight must be a number, got '1'"),
    ("trainer-empty-dataset", _trainer(train_dataset=[]), DataError, r"train_dataset is empty"),
    ("trainer-other-tokenizer", _trainer(tokenizer=_other_tokenizer), ConfigError,
     r"student and teacher use different tokenizers"),
    ("trainer-student-vocab-smaller", _trainer(student=_small_vocab_student), ConfigError,
     r"student's LM head has 256 rows but the tokenizer has 512 tokens"),
    ("trainer-teacher-without-lm-head", _trainer(teacher=_bert), ConfigError, r"BertModel has no output embeddings"),
    ("trainer-plain-training-arguments", _trainer(
        args=lambda i: __import__("transformers").TrainingArguments(i.path("out"), report_to="none")),
     ConfigError, r"needs a DistillationConfig, got TrainingArguments"),
    # ---- loading, evaluation, data, saving
    ("load-compressed-missing", _call("load_compressed", "./nope"), HFCompressError, r"'\./nope' does not exist"),
    ("load-compressed-plain-model", _call("load_compressed", lambda i: str(i.reference)), HFCompressError,
     r"plain \(unquantized\) checkpoint.*from_pretrained"),
    ("load-compressed-config-not-json", _call("load_compressed", lambda i: i.config_not_json()), HFCompressError,
     r"config\.json.*not (a )?valid JSON"),
    ("load-compressed-truncated", _call("load_compressed", _compressed_truncated, progress=False), HFCompressError,
     r"model\.safetensors.*(truncated|corrupt)"),
    ("evaluate-no-tokenizer", _call("evaluate", _tiny), DataError, r"needs a tokenizer"),
    ("evaluate-empty-texts", _call("evaluate", _tiny, lambda i: i.tokenizer, data=["", "  "], speed=False,
                                   progress=False), DataError, r"empty"),
    ("evaluate-batch-size-zero", _call("evaluate", _tiny, lambda i: i.tokenizer, data=_texts, block_size=16,
                                       batch_size=0, speed=False, progress=False),
     ConfigError, r"batch_size must be a positive integer"),
    ("evaluate-missing-model", _call("evaluate", "./nope"), ModelLoadError, r"does not exist"),
    ("load-texts-number", _call("load_texts", 123), DataError, r"unsupported text source of type int"),
    ("load-texts-mixed-list", _call("load_texts", ["a", 1]), DataError, r"only strings"),
    ("load-texts-missing", _call("load_texts", "./nowhere.txt"), DataError, r"does not exist"),
    ("load-texts-no-text-column", _call("load_texts", lambda i: __import__("datasets").Dataset.from_dict(
        {"content": ["a"]})), DataError, r"no column 'text'.*text_column="),
    ("save-checkpoint-non-empty", _call("save_checkpoint", _tiny, lambda i: i.non_empty_folder()), HFCompressError,
     r"is not empty.*overwrite=True"),
]


@pytest.mark.parametrize("build, error, pattern", [pytest.param(b, e, p, id=i) for i, b, e, p in API_ROWS])
def test_api_bad_input(build, error, pattern, inputs):
    call = build(inputs)  # the inputs (files, models) are made here, before the snapshot
    before = snapshot(inputs.root)
    with pytest.raises(HFCompressError) as info:
        call()
    assert snapshot(inputs.root) == before, "a failed call wrote or changed files"
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert_one_line(str(info.value), pattern)


def test_readme_states_these_counts():
    """README.md's "Guarantees" section quotes the size of this table and of tests/test_properties.py."""
    import tests.test_properties as properties

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Bad input"):readme.index("### Properties")]
    overrides = len(test_recipe_override_bad_input.pytestmark[0].args[1])
    console = len(test_console_script_bad_input.pytestmark[0].args[1])
    total = len(CLI_ROWS) + len(RECIPE_ROWS) + overrides + len(API_ROWS) + console
    assert f"**{total} rows**: {len(CLI_ROWS)} command lines" in section
    assert f"{len(RECIPE_ROWS)} recipe files" in section and f"{overrides} `--set` overrides" in section
    assert f"{len(API_ROWS)} Python API calls" in section and f"{console} through the installed console" in section
    commands = {}
    for row_id, *_ in CLI_ROWS:
        commands[row_id.split("-")[0]] = commands.get(row_id.split("-")[0], 0) + 1
    for command, count in commands.items():
        assert f"`{command}` {count}" in section, (command, count)
    tests = [name for name in dir(properties) if name.startswith("test_")]
    assert f"**{len(tests)} property-based tests**" in readme
