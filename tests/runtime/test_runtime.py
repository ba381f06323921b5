"""load_compressed round trips: compressed-tensors checkpoints -> packed modules -> logits close to
transformers' own dequantized load of the same folder.

Tolerance: our model runs in bfloat16 but multiplies by the exact integer codes; transformers' dequantized
model run in bfloat16 rounds the same weights once more. Both differ from the float32 dequantized reference
only through bfloat16 rounding of activations, scales and outputs, so our error must be of the same order
as that bfloat16 reference's own error: we allow 3x it. A wrong zero point, group mapping or packing
order shows up as an error of the order of the logits themselves (checked: > 10x that tolerance).
"""

from __future__ import annotations

import json

import pytest
import torch
from .conftest import ct_reference_logits, load_dequantized_reference, small_llama, write_ct_checkpoint

from hfcompress.models.evaluate import count_parameters, weight_bytes
from hfcompress.core.errors import HFCompressError
from hfcompress.core import native
from hfcompress.quantization.checkpoint import CheckpointError, UnsupportedSchemeError
from hfcompress.quantization.runtime import (
    PackedLinear,
    DequantLinear,
    Int4PackedLinear,
    Int8PackedLinear,
    Int8RowEmbedding,
    PackedEmbedding,
    SharedInputSlice,
    kernel_module,
    load_compressed,
)

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


def check_close_to_reference(path, ours):
    reference = logits(load_dequantized_reference(path, torch.float32))
    bf16_error = (logits(load_dequantized_reference(path, torch.bfloat16)) - reference).abs().max()
    error = (logits(ours) - reference).abs().max()
    assert error <= 3 * bf16_error, f"packed runtime error {error:.3g} vs bf16 reference error {bf16_error:.3g}"
    return error, bf16_error


def module_types(model):
    return {name: type(m) for name, m in model.named_modules()}


CASES = [  # bits, strategy, group_size, symmetric, expected Linear module class
    (4, "group", 32, True, Int4PackedLinear),
    (4, "group", 32, False, Int4PackedLinear),
    (4, "channel", None, True, Int4PackedLinear),
    (4, "channel", None, False, Int4PackedLinear),
    (8, "channel", None, True, Int8PackedLinear),
    (8, "channel", None, False, Int8PackedLinear),
    (8, "group", 32, True, DequantLinear),
    (8, "group", 32, False, DequantLinear),
    (3, "group", 32, False, Int4PackedLinear),
    (2, "channel", None, True, Int4PackedLinear),
]


@pytest.mark.parametrize("bits,strategy,group_size,symmetric,expected", CASES,
                         ids=[f"int{c[0]}-{c[1]}-{'sym' if c[3] else 'asym'}" for c in CASES])
def test_round_trip(tmp_path, bits, strategy, group_size, symmetric, expected):
    model = small_llama()
    original_parameters = count_parameters(model)
    write_ct_checkpoint(model, tmp_path, num_bits=bits, strategy=strategy, group_size=group_size,
                        symmetric=symmetric)
    ours = load_compressed(tmp_path, progress=False)
    assert type(ours.model.layers[0].mlp.down_proj) is expected
    assert type(kernel_module(ours.model.layers[1].self_attn.k_proj)) is expected
    assert isinstance(ours.lm_head, torch.nn.Linear) and not isinstance(ours.lm_head, PackedLinear)  # stays float
    assert ours.dtype == torch.bfloat16
    error, bf16_error = check_close_to_reference(tmp_path, ours)
    # The logical parameter count is the float model's, however the weights are packed.
    assert count_parameters(ours) == original_parameters
    # Sanity of the tolerance: corrupting one scale is caught by it.
    layer = ours.model.layers[0].mlp.down_proj
    buffer = next(b for n, b in layer.named_buffers() if "scale" in n)
    buffer.mul_(1.5)
    reference = logits(load_dequantized_reference(tmp_path))
    assert (logits(ours) - reference).abs().max() > 3 * bf16_error


def test_odd_shapes_fall_back_and_stay_exact(tmp_path):
    """N % 16 != 0 or K % 16 != 0: our int4 kernel takes any shape; without it (PyTorch's int4pack needs
    N % 16 == 0) per-channel int4 goes to an int8 kernel where K allows, else dequantizes."""
    model = small_llama(intermediate=72)
    write_ct_checkpoint(model, tmp_path, num_bits=4, strategy="channel", symmetric=False)
    for native_on in ("1", "0"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HFCOMPRESS_NATIVE_KERNELS", native_on)
            ours = load_compressed(tmp_path, progress=False)
            mlp = ours.model.layers[0].mlp
            if native_on == "1" and native.int4_gemv_available():
                for layer in (mlp.gate_proj, mlp.down_proj, ours.model.layers[0].self_attn.q_proj):
                    assert kernel_module(layer).backend == "hfcompress"
                check_close_to_reference(tmp_path, ours)
                continue
            assert type(kernel_module(mlp.gate_proj)) is Int8PackedLinear  # N = 72
            # K = 72: PyTorch's int8 kernel needs K % 16 == 0, so without ours it dequantizes
            assert type(mlp.down_proj) is DequantLinear
            assert type(kernel_module(ours.model.layers[0].self_attn.q_proj)) is Int4PackedLinear
            check_close_to_reference(tmp_path, ours)


def test_quantized_embeddings_head_and_mixed_groups(tmp_path, llama):
    """Embedding + lm_head quantized, and a second config group (8-bit channel for the MLP down_proj)
    listed first so it wins for those layers, as in compressed-tensors."""
    write_ct_checkpoint(llama, tmp_path, num_bits=4, strategy="group", group_size=32, symmetric=False,
                        targets=("Linear", "Embedding"), ignore=(),
                        extra_groups={"down": (["re:.*down_proj"], dict(num_bits=8, strategy="channel",
                                                                          symmetric=True))})
    ours = load_compressed(tmp_path, progress=False)
    assert isinstance(ours.model.embed_tokens, PackedEmbedding)
    assert isinstance(ours.lm_head, Int4PackedLinear)
    assert isinstance(ours.model.layers[0].mlp.down_proj, Int8PackedLinear)
    assert isinstance(kernel_module(ours.model.layers[0].mlp.up_proj), Int4PackedLinear)
    reference, bf16 = ct_reference_logits(llama, TOKENS)
    assert (logits(ours) - reference).abs().max() <= 3 * (bf16 - reference).abs().max()
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(config["quantization_config"]["config_groups"]) == 2


def test_tied_embeddings_and_generate(tmp_path):
    model = small_llama(tie=True)
    write_ct_checkpoint(model, tmp_path, num_bits=4, strategy="group", group_size=32)
    ours = load_compressed(tmp_path, progress=False)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    check_close_to_reference(tmp_path, ours)
    prompt = TOKENS[:1, :5]
    out = ours.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13) and torch.equal(out[:, :5], prompt)
    # Greedy decoding with the KV cache picks what a full forward pass ranks first (up to bf16 near-ties).
    full = logits(ours, out[:, :-1])[0, 4:]  # (8, V)
    chosen = full.gather(1, out[0, 5:, None]).squeeze(1)
    assert (full.max(dim=1).values - chosen <= 0.02 * full.abs().max()).all()


def test_float_head_multiplies_a_flat_input(tmp_path):
    """The float LM head takes a prefill's last position (a (1, 1, H) view with the prompt's strides) as a (1, H)
    matrix (bfloat16 F.linear on a CPU copied the whole transposed weight for that view): the same class family,
    the same tied parameter, and the same numbers as nn.Linear."""
    from hfcompress.quantization.packed import FlatInputLinear

    model = small_llama(tie=True)
    write_ct_checkpoint(model, tmp_path, num_bits=4, strategy="group", group_size=32)
    ours = load_compressed(tmp_path, progress=False)
    head = ours.lm_head
    assert type(head) is FlatInputLinear and isinstance(head, torch.nn.Linear)
    assert head.weight is ours.model.embed_tokens.weight  # still tied
    hidden = torch.randn(2, 6, head.in_features, dtype=head.weight.dtype)
    last = hidden[:, -1:, :]  # what logits_to_keep=1 hands the head
    expected = torch.nn.functional.linear(last.float(), head.weight.float())
    assert head(last).shape == (2, 1, head.out_features)
    torch.testing.assert_close(head(last).float(), expected, rtol=1e-2, atol=1e-2)  # bfloat16 output rounding
    assert torch.equal(head(hidden)[:, -1:], head(last.contiguous()))


def test_memory_is_packed(tmp_path):
    model = small_llama(hidden=128, intermediate=256, vocab=128)
    float_bytes = weight_bytes(model)
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    write_ct_checkpoint(model, tmp_path, num_bits=4, strategy="group", group_size=32, ignore=())
    ours = load_compressed(tmp_path, progress=False)
    # int4 codes (1/2 byte) + one bf16 scale and zero per 32 weights (4/32 bytes) vs 4 bytes each.
    other_params = count_parameters(ours) - linear_params
    expected = linear_params * (0.5 + 4 / 32) + other_params * 2
    assert weight_bytes(ours) <= 1.01 * expected
    assert weight_bytes(ours) < 0.2 * float_bytes


def test_float32_activations_and_state_dict_refused(tmp_path, llama):
    write_ct_checkpoint(llama, tmp_path, num_bits=8, strategy="channel")
    ours = load_compressed(tmp_path, dtype="float32", progress=False)
    assert ours.dtype == torch.float32
    check_close_to_reference(tmp_path, ours)
    with pytest.raises(HFCompressError, match="inference-only"):
        ours.state_dict()


# ------------------------------------------------------------------------------------------------------
# Projections sharing one kernel call; embeddings quantized at load
# ------------------------------------------------------------------------------------------------------
def test_fused_projections_give_the_same_results(tmp_path, llama):
    write_ct_checkpoint(llama, tmp_path, num_bits=8, strategy="channel")
    fused = load_compressed(tmp_path, dtype="float32", progress=False)
    separate = load_compressed(tmp_path, dtype="float32", progress=False, fuse_projections=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(isinstance(m, SharedInputSlice) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                         mlp.up_proj))
    assert attn.q_proj.shared is attn.v_proj.shared and mlp.gate_proj.shared is not attn.q_proj.shared
    assert type(mlp.down_proj) is Int8PackedLinear
    assert type(separate.model.layers[0].self_attn.q_proj) is Int8PackedLinear
    # Same weights, counted once; same logical size; still refuses to be saved.
    assert count_parameters(fused) == count_parameters(separate)
    assert weight_bytes(fused) == weight_bytes(separate)
    with pytest.raises(HFCompressError, match="inference-only"):
        fused.state_dict()
    # Decode-sized inputs go through our kernel row by row: bitwise equal. Prefill uses a dense GEMM over
    # the concatenated weight, equal to rounding.
    with torch.no_grad():
        one = TOKENS[:1, :1]
        assert torch.equal(fused(one).logits, separate(one).logits)
    assert torch.allclose(logits(fused), logits(separate), rtol=1e-5, atol=1e-5)
    prompt = TOKENS[:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kwargs), separate.generate(prompt, **kwargs))
    for slice_ in (attn.q_proj, attn.k_proj, attn.v_proj):
        reference = getattr(separate.model.layers[0].self_attn, {0: "q_proj", 1: "k_proj", 2: "v_proj"}[slice_.index])
        assert torch.equal(slice_.dequantized_weight(), reference.dequantized_weight())


def test_fused_projection_slices_never_serve_stale_outputs(tmp_path, llama):
    write_ct_checkpoint(llama, tmp_path, num_bits=8, strategy="channel")
    fused = load_compressed(tmp_path, dtype="float32", progress=False).model.layers[0].self_attn
    separate = load_compressed(tmp_path, dtype="float32", progress=False,
                               fuse_projections=False).model.layers[0].self_attn
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.equal(fused.q_proj(x), separate.q_proj(x))
        x.mul_(2)  # modified in place after q_proj computed k and v: they must be recomputed
        assert torch.equal(fused.k_proj(x), separate.k_proj(x))
        y = torch.randn(1, 1, 64)  # another tensor: computed afresh
        assert torch.equal(fused.v_proj(y), separate.v_proj(y))
        assert torch.equal(fused.q_proj(y), separate.q_proj(y))  # collected from the v_proj call
        assert torch.equal(fused.k_proj(y), separate.k_proj(y))
        assert fused.q_proj.shared._pending is None  # everything collected: nothing held
    with torch.inference_mode():  # inference tensors have no version counter: identity is checked
        z = torch.randn(1, 1, 64)
        assert torch.equal(fused.k_proj(z), separate.k_proj(z))
        assert torch.equal(fused.v_proj(z), separate.v_proj(z))
        w = torch.randn(1, 1, 64)  # another tensor than the pending one: computed afresh
        assert torch.equal(fused.q_proj(w), separate.q_proj(w))
        assert torch.equal(fused.k_proj(w), separate.k_proj(w))


def test_quantize_embeddings_at_load(tmp_path, llama):
    float_table = llama.model.embed_tokens.weight.detach().clone()
    write_ct_checkpoint(llama, tmp_path, num_bits=8, strategy="channel")
    plain = load_compressed(tmp_path, dtype="float32", progress=False)
    ours = load_compressed(tmp_path, dtype="float32", progress=False, quantize_embeddings=True)
    table = ours.model.embed_tokens
    assert isinstance(table, Int8RowEmbedding)
    # Round to nearest on a per-row grid of max|row| / 127: within half a step of every entry.
    step = float_table.abs().amax(dim=1, keepdim=True) / 127
    assert ((table.dequantized_weight() - float_table).abs() <= step / 2 * (1 + 1e-6)).all()
    assert weight_bytes(plain) - weight_bytes(ours) == float_table.numel() * 3 - float_table.shape[0] * 4
    assert count_parameters(ours) == count_parameters(plain)
    with torch.no_grad():
        looked_up = table(TOKENS)
    assert torch.equal(looked_up, table.dequantized_weight()[TOKENS])
    assert (logits(ours) - logits(plain)).abs().max() < 0.05 * logits(plain).abs().max()


def test_quantize_embeddings_keeps_a_tied_table_when_the_head_stays_float(tmp_path, caplog):
    """Off the CPU (tied_head=False) the head keeps its float table, and so does the input side (with a warning);
    on the CPU both use one int8 table (tests/runtime/test_decode.py)."""
    from hfcompress.quantization.packed import quantize_input_embeddings

    write_ct_checkpoint(small_llama(tie=True), tmp_path, num_bits=8, strategy="channel")
    ours = load_compressed(tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        assert not quantize_input_embeddings(ours, tied_head=False)
    assert type(ours.model.embed_tokens) is torch.nn.Embedding and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert "lm_head" in caplog.text


# ------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file/tensor, never an unquantized load
# ------------------------------------------------------------------------------------------------------
def _weights(config):
    """The weights args of the (single) config group; compressed-tensors names groups group_0, group_1..."""
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]


def _rewrite_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture()
def int4_checkpoint(tmp_path, llama):
    return write_ct_checkpoint(llama, tmp_path / "ckpt", num_bits=4, strategy="group", group_size=32,
                               symmetric=False)


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_compressed(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed(tmp_path / "nope")


def test_error_plain_checkpoint(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="plain .*from_pretrained"):
        load_compressed(tmp_path)


def test_error_activation_quantization(int4_checkpoint):
    def add_activations(config):
        config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    _rewrite_config(int4_checkpoint, add_activations)
    with pytest.raises(UnsupportedSchemeError, match="group_0 quantizes activations"):
        load_compressed(int4_checkpoint)


@pytest.mark.parametrize("edit,match", [
    (lambda w: w.update(num_bits=1), "1-bit weights"),
    (lambda w: w.update(type="float", num_bits=8), "float weights"),
    (lambda w: w.update(strategy="block", block_structure=[32, 32], group_size=None), "'block' strategy"),
])
def test_error_unsupported_weight_schemes(int4_checkpoint, edit, match):
    _rewrite_config(int4_checkpoint, lambda c: edit(_weights(c)))
    with pytest.raises(UnsupportedSchemeError, match=match):
        load_compressed(int4_checkpoint)


def test_error_config_does_not_match_tensors(int4_checkpoint):
    _rewrite_config(int4_checkpoint, lambda c: _weights(c).update(group_size=64))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.weight_scale'.*\[64, 1\]"):
        load_compressed(int4_checkpoint)


def test_error_config_targets_unquantized_module(int4_checkpoint):
    _rewrite_config(int4_checkpoint, lambda c: c["quantization_config"].update(ignore=[]))
    with pytest.raises(CheckpointError, match="targets module 'lm_head'.*no 'lm_head.weight_packed'"):
        load_compressed(int4_checkpoint)


def test_error_missing_tensor(int4_checkpoint):
    _rewrite_tensors(int4_checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_zero_point"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight_zero_point'"):
        load_compressed(int4_checkpoint)


def test_error_missing_float_tensor(int4_checkpoint):
    _rewrite_tensors(int4_checkpoint, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        load_compressed(int4_checkpoint)


def test_error_non_finite_scale(int4_checkpoint):
    def poison(t):
        t["model.layers.0.mlp.gate_proj.weight_scale"][0, 0] = float("nan")
    _rewrite_tensors(int4_checkpoint, poison)
    with pytest.raises(CheckpointError, match="gate_proj.weight_scale' has non-finite"):
        load_compressed(int4_checkpoint)


def test_error_truncated_file(int4_checkpoint):
    file = int4_checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_compressed(int4_checkpoint)


def test_error_kv_cache_scheme(int4_checkpoint):
    _rewrite_config(int4_checkpoint, lambda c: c["quantization_config"].update(
        kv_cache_scheme={"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}))
    with pytest.raises(UnsupportedSchemeError, match="kv_cache_scheme"):
        load_compressed(int4_checkpoint)


def test_hub_ids_go_through_snapshot_download(monkeypatch, int4_checkpoint):
    """A repo id is fetched with huggingface_hub.snapshot_download (weights as safetensors, no pickles);
    download failures become one-line CheckpointErrors. No network: the download is faked."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        if repo_id == "org/missing":
            raise OSError("404 Client Error: Repository Not Found for url: https://huggingface.co/org/missing")
        return str(int4_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_compressed("org/tiny-w4a16", progress=False)
    assert isinstance(kernel_module(model.model.layers[0].mlp.up_proj), Int4PackedLinear)
    assert calls[0][0] == "org/tiny-w4a16" and "*.safetensors" in calls[0][1]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in calls[0][1])
    with pytest.raises(CheckpointError, match="could not download 'org/missing'.*Repository Not Found"):
        load_compressed("org/missing")
