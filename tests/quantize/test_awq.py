import pytest
import torch

from hfcompress.quantize import awq as A
from hfcompress.quantize import primitives as P


def test_scale_search_is_never_worse_than_plain_quantization():
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.ones(64)
    magnitude[:4] = 20.0  # a few salient channels, as AWQ observes in LLMs
    x = torch.randn(512, 64, generator=gen) * magnitude
    hessian = x.t() @ x / 512
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)]
    scale, alpha = A.search_scale(weights, hessian, x.abs().mean(0), 3, 16, True)
    assert alpha > 0 and scale.shape == (64,)
    assert scale[:4].min() > scale[4:].max()  # salient channels are scaled up

    def error(s):
        return sum(P.output_error(w - P.fake_quantize(w * s, 3, 16, True) / s, hessian) for w in weights)

    assert error(scale) < 0.9 * error(torch.ones(64))


def test_folding_keeps_a_llama_layer_function(tiny_llama):
    layer = tiny_llama.model.layers[0]
    mappings = A.layer_mappings(layer, {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
    names = [prev for prev, _ in mappings]
    # v_proj -> o_proj is skipped: with grouped-query attention their widths differ.
    assert names == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16))
    before = tiny_llama(ids).logits
    modules = dict(layer.named_modules())
    for prev, linears in mappings:
        scale = torch.rand(modules[linears[0]].in_features) + 0.5
        A.scale_inputs([modules[n] for n in linears], scale)
        A.divide_output(modules[prev], scale)
    torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_folding_into_gpt2_layernorm_and_conv1d(tiny_gpt2):
    block = tiny_gpt2.transformer.h[0]
    mappings = A.layer_mappings(block, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})
    assert [prev for prev, _ in mappings] == ["ln_1", "ln_2"]
    ids = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 16))
    before = tiny_gpt2(ids).logits
    modules = dict(block.named_modules())
    for prev, linears in mappings:
        scale = torch.rand(64) + 0.5
        A.scale_inputs([modules[n] for n in linears], scale)
        A.divide_output(modules[prev], scale)
    torch.testing.assert_close(tiny_gpt2(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_gemma_style_norms_are_not_folded_into():
    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))

    assert A.output_channels(GemmaRMSNorm()) is None
    assert A.output_channels(torch.nn.LayerNorm(8)) == 8
