"""make_student: fewer layers copied from the teacher, or narrower widths cut from it."""

from __future__ import annotations

import pytest
import torch

from hfcompress import make_student
from hfcompress.distillation.student import keep_last_layers, uniform_layers
from hfcompress.core.errors import ConfigError


def test_uniform_layers_take_every_kth():
    assert uniform_layers(8, 4) == [0, 2, 4, 6]
    assert uniform_layers(6, 4) == [0, 1, 3, 4]
    assert uniform_layers(2, 2) == [0, 1]


def test_keep_last_layers_end_with_the_teachers_last():
    assert keep_last_layers(30, 15) == list(range(0, 27, 2)) + [29]
    assert uniform_layers(30, 15) == list(range(0, 29, 2))
    assert keep_last_layers(8, 4) == [0, 2, 4, 7]
    assert keep_last_layers(4, 1) == [3]
    assert keep_last_layers(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("selection,expected", [("uniform", [0]), ("keep-last", [1]), ([1], [1])])
def test_layers_are_copied_from_the_teacher(tiny_teacher, selection, expected):
    student = make_student(tiny_teacher, num_layers=1, layer_selection=selection)
    assert student.config.num_hidden_layers == 1
    assert type(student) is type(tiny_teacher)
    teacher_state, student_state = tiny_teacher.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        source = name.replace("layers.0.", f"layers.{expected[0]}.")
        assert torch.equal(tensor, teacher_state[source]), name
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_full_depth_student_reproduces_the_teacher(tiny_teacher, distill_blocks):
    student = make_student(tiny_teacher, num_layers=2).eval()
    batch = distill_blocks[:2]
    with torch.no_grad():
        assert torch.allclose(student(batch).logits, tiny_teacher(batch).logits, atol=1e-5)


def test_narrower_student_keeps_leading_blocks_and_whole_heads(tiny_teacher, distill_blocks):
    # Tiny teacher: hidden 64, 2 heads of 32, MLP 192.
    student = make_student(tiny_teacher, num_layers=1, hidden_size=32, intermediate_size=96)
    config = student.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (32, 1, 96)
    teacher_state = tiny_teacher.state_dict()
    q = student.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, teacher_state["model.layers.0.self_attn.q_proj.weight"][:32, :32])
    up = student.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(up, teacher_state["model.layers.0.mlp.up_proj.weight"][:96, :32])
    assert student(distill_blocks[:1]).logits.shape[-1] == tiny_teacher.config.vocab_size


def test_gpt2_student_and_round_trip(tiny_gpt2, tmp_path, distill_blocks):
    from transformers import AutoModelForCausalLM

    student = make_student(tiny_gpt2, num_layers=1, layer_selection=[1])
    assert torch.equal(student.state_dict()["transformer.h.0.attn.c_attn.weight"],
                       tiny_gpt2.state_dict()["transformer.h.1.attn.c_attn.weight"])
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(distill_blocks[:1]).logits, student.eval()(distill_blocks[:1]).logits)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_layers": 0}, "num_layers"),
    ({"num_layers": 3}, "num_layers"),
    ({"num_layers": 1, "layer_selection": [5]}, "teacher layer 5"),
    ({"num_layers": 2, "layer_selection": [1]}, "num_layers=2"),
    ({"num_layers": 2, "layer_selection": [1, 1]}, "repeats"),
    ({"num_layers": 1, "layer_selection": "random"}, "layer_selection"),
    ({"num_layers": 1, "hidden_size": 48}, "multiple of"),
    ({"num_layers": 1, "hidden_size": 128}, "wider"),
])
def test_bad_arguments(tiny_teacher, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_student(tiny_teacher, **kwargs)
