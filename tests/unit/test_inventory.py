"""Model inventory from a config alone: the trainers' blocks, with bytes, FLOPs and activation sizes."""

from __future__ import annotations

import json

import pytest

from fuyoucli.errors import ModelError
from fuyoucli.model.inventory import inventory, inventory_from_config
from fuyoucli.recipe import ModelConfig, PeftConfig

COMMON = dict(vocab_size=384, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=16),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=8, sliding_window=8),
}


def config(arch: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **CONFIGS[arch], **COMMON)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_blocks_match_the_trainers_split(arch):
    """Same names, order and parameter assignment (tied weights in 'embed') as model.blocks."""
    from transformers import AutoModelForCausalLM

    from fuyoucli.model.blocks import param_blocks

    real = AutoModelForCausalLM.from_config(config(arch))
    expected = [(b.name, b.numel) for b in param_blocks(real, trainable_only=False)]
    inv = inventory_from_config(config(arch))
    assert [(b.name, b.params) for b in inv.blocks if b.params] == expected
    assert inv.params == sum(p.numel() for p in real.parameters())
    assert inv.trainable_params == inv.params
    assert inv.num_layers == real.config.num_hidden_layers and inv.hidden_size == 32
    assert inv.blocks[0].name == "embed" and inv.blocks[-1].name == "head"
    assert all(b.matmul_flops_per_token > 0 for b in inv.blocks if b.name != "embed")


def test_tied_head_weight_lives_in_embed_but_computes_in_head():
    inv = inventory_from_config(config("qwen2"))
    head = inv.blocks[-1]
    assert inv.tied_embeddings
    assert head.params == 32  # the final norm only
    assert inv.blocks[0].params == 384 * 32
    assert head.matmul_flops_per_token == 2 * 32 * 384


def test_llama_flops_and_activations_by_formula():
    inv = inventory_from_config(config("llama"))
    h, i, heads, kv, hd, v = 32, 64, 4, 2, 8, 384
    layer = inv.blocks[1]
    assert layer.matmul_flops_per_token == 2 * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * i)
    assert layer.attention_flops_per_token_per_key == 4 * heads * hd
    assert layer.attention_window is None
    assert layer.forward_flops_per_token(128) == layer.matmul_flops_per_token + 4 * heads * hd * 64
    assert layer.boundary_elems_per_token == h
    assert layer.internal_elems_per_token == (heads * hd + 2 * kv * hd + h + 2 * i + h) + 4 * h
    assert layer.max_tensor_params == h * i
    assert inv.blocks[-1].matmul_flops_per_token == 2 * h * v
    assert inv.blocks[0].matmul_flops_per_token == 0


def test_sliding_window_caps_the_attention_term():
    mistral = inventory_from_config(config("mistral")).blocks[1]
    assert mistral.attention_window == 16
    assert mistral.forward_flops_per_token(4096) == mistral.forward_flops_per_token(33)


def test_lora_trainable_counts_match_peft():
    from transformers import AutoModelForCausalLM

    from fuyoucli.model.blocks import param_blocks
    from fuyoucli.model.loading import apply_lora

    peft_cfg = PeftConfig(type="lora", r=4, target_modules=["q_proj", "v_proj"])
    inv = inventory_from_config(config("llama"), peft_cfg)
    real = apply_lora(AutoModelForCausalLM.from_config(config("llama")), peft_cfg, head="causal_lm", seed=0)
    expected = {b.name: (b.numel, sum(p.numel() for _, p in b.params if p.requires_grad))
                for b in param_blocks(real, trainable_only=False)}
    assert {b.name: (b.params, b.trainable_params) for b in inv.blocks} == expected
    assert inv.blocks[1].trainable_params == (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)  # A and B of q (32->32), v (32->16)
    assert inv.blocks[0].trainable_params == 0


@pytest.mark.parametrize("arch,head", [("opt", "causal_lm"), ("gpt2", "causal_lm"), ("llama", "sequence_classification")])
def test_the_lora_suggestions_inventory_counts_what_the_traced_one_does(arch, head, tiny_models):
    """lora_inventory (the planner's LoRA suggestion) skips the trace but counts the same parameters."""
    from fuyoucli.model.inventory import lora_inventory

    cfg, peft_cfg = ModelConfig(path=str(tiny_models[arch]), head=head), PeftConfig(type="lora")
    got, want = lora_inventory(cfg, peft_cfg, num_labels=3), inventory(cfg, peft_cfg, num_labels=3)
    assert [(b.name, b.params, b.trainable_params) for b in got.blocks] == \
        [(b.name, b.params, b.trainable_params) for b in want.blocks]
    assert got.blocks[1].trainable_params > 0


def test_classification_head_is_sized_by_the_labels():
    inv = inventory_from_config(config("llama"), head="sequence_classification", num_labels=3)
    assert inv.blocks[-1].params == 32 + 32 * 3  # final norm + score
    assert inv.blocks[-1].matmul_flops_per_token == 2 * 32 * 3


def test_a_folder_with_only_config_json_is_enough(tmp_path):
    """What-if planning of a model whose weights are not here."""
    folder = tmp_path / "opt-13b"
    folder.mkdir()
    cfg = {"model_type": "opt", "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
           "num_attention_heads": 40, "max_position_embeddings": 2048, "word_embed_proj_dim": 5120,
           "vocab_size": 50272, "do_layer_norm_before": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    inv = inventory(ModelConfig(path=str(folder)), PeftConfig())
    assert inv.num_layers == 40 and len(inv.blocks) == 42
    assert 12.8e9 < inv.params < 12.9e9  # OPT-13B: 12.85 B parameters


def test_planning_does_not_move_the_global_rng():
    import torch

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    inventory_from_config(config("llama"), PeftConfig(type="lora", r=2))
    assert torch.equal(before, torch.random.get_rng_state())


def test_an_architecture_it_cannot_build_names_it():
    from transformers import AutoConfig

    with pytest.raises(ModelError, match="t5"):
        inventory_from_config(AutoConfig.for_model("t5", d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32,
                                                   vocab_size=64))


# ---- config arithmetic (the fast path): exactly what the meta path measures ----------------------

COVERED = {
    **{a: CONFIGS[a] for a in ("llama", "mistral", "qwen2", "gpt2")},
    "llama-gqa-biases-tied": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True,
                                  attention_bias=True, mlp_bias=True),
    "llama-mqa": dict(model_type="llama", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=1),
    "opt-same-width": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=64),
    "gpt2-inner": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, n_positions=64, n_inner=80),
}


def covered_config(name: str):
    from transformers import AutoConfig

    kw = dict(COVERED[name])
    arch = kw.pop("model_type", name)
    return arch, {**kw, **COMMON}, AutoConfig.for_model(arch, **kw, **COMMON)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_config_arithmetic_equals_the_meta_path(name):
    from fuyoucli.model.arithmetic import known_inventory

    arch, minimal, cfg = covered_config(name)
    meta = inventory_from_config(cfg)
    assert known_inventory({"model_type": arch, **minimal}) == meta  # a hand-written config.json: class defaults
    assert known_inventory(cfg.to_dict()) == meta  # a saved one: every key
    assert all(b.elementwise_elems_per_token > 0 for b in meta.blocks) and meta.loss_elems_per_position > 0


def test_config_arithmetic_declines_what_it_does_not_cover():
    from fuyoucli.model.arithmetic import known_inventory

    for arch in ("gemma", "qwen3", "gpt_neox", "opt"):  # opt: word_embed_proj_dim 16 != hidden 32
        assert known_inventory(config(arch).to_dict()) is None, arch
    llama = config("llama").to_dict()
    assert known_inventory(llama, lora=True) is None and known_inventory(llama, head="sequence_classification") is None
    assert known_inventory({**llama, "hidden_act": "gelu"}) is None


def test_the_elementwise_trace_counts_the_forward_and_the_loss():
    """Llama, per token: two RMSNorms (pow, mean, two muls), rotary, SiLU * up, residual adds, ... in the
    layers; the loss copies each scored position's logits and runs log-softmax over them: 4 x vocab."""
    inv = inventory_from_config(config("llama"))
    layer = inv.blocks[1]
    assert layer.elementwise_elems_per_token > 8 * 32 + 3 * 64  # at least the norms and the MLP's activation
    assert 4 * 384 <= inv.loss_elems_per_position <= 4 * 384 + 1
    classifier = inventory_from_config(config("llama"), head="sequence_classification", num_labels=3)
    assert classifier.loss_elems_per_position < 20


def test_planning_a_config_json_folder_of_a_known_architecture_imports_no_torch(tmp_path):
    """The 175B what-if plans in well under a second: config arithmetic, not a meta-device model."""
    import subprocess
    import sys

    folder = tmp_path / "opt-175b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 12288, "ffn_dim": 49152, "num_hidden_layers": 96,
        "num_attention_heads": 96, "word_embed_proj_dim": 12288, "vocab_size": 50272}))
    code = ("import sys; from fuyoucli.model.inventory import inventory; from fuyoucli.recipe import ModelConfig, "
            f"PeftConfig; inv = inventory(ModelConfig(path={str(folder)!r}), PeftConfig()); "
            "assert 174e9 < inv.params < 176e9, inv.params; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]")
    subprocess.run([sys.executable, "-c", code], check=True)
