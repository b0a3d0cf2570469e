"""`clm export-vllm` / export_for_vllm: the directory vLLM serves with the plugin (no vLLM needed here)."""
import json
import os

import pytest
import torch
from helpers import tiny_causal_lm
from safetensors.torch import load_file

import clm_ext
from clm_ext.cli import main
from clm_ext.vllm_export import export_for_vllm
from clm_ext.vllm_format import CONFIG_KEY, LAYER_FILE


def _pair(tmp_path, arch="llama", layer="linear", mode="embed", **overrides):
    model = tiny_causal_lm(arch, **overrides)
    base, alignment = str(tmp_path / "base"), str(tmp_path / "alignment")
    model.save_pretrained(base)
    clm_ext.add_alignment_control(model, mode=mode, layer=layer)
    with torch.no_grad():
        for p in clm_ext.model.alignment_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    clm_ext.save_alignment(model, alignment)
    return model, base, alignment


@pytest.mark.parametrize("arch, cls", [("llama", "ClmLlamaForCausalLM"), ("qwen2", "ClmQwen2ForCausalLM")])
def test_export_writes_base_weights_layer_and_plugin_architecture(tmp_path, arch, cls):
    model, base, alignment = _pair(tmp_path, arch)
    out = export_for_vllm(base, alignment, str(tmp_path / "out"), default_alpha=0.5)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [cls]
    assert config[CONFIG_KEY] == {"layer": "linear", "mode": "embed", "default_alpha": 0.5,
                                  "clm_ext_version": clm_ext.__version__}
    layer = load_file(os.path.join(out, LAYER_FILE))
    # The key names the plugin loads are the ones a wrapped HF model has for its layer.
    state = model.state_dict()
    assert set(layer) == {"model.embed_tokens.alignment.weight", "model.embed_tokens.alignment.bias"}
    for key, value in layer.items():
        assert torch.equal(value, state[key])
    assert load_file(os.path.join(out, "model.safetensors")).keys() == load_file(
        os.path.join(base, "model.safetensors")).keys()


def test_a_sharded_checkpoints_index_names_the_layer_file(tmp_path):
    model, base, alignment = _pair(tmp_path)
    os.remove(os.path.join(base, "model.safetensors"))
    model_plain = tiny_causal_lm("llama")
    model_plain.save_pretrained(base, max_shard_size="20KB")
    out = export_for_vllm(base, alignment, str(tmp_path / "out"))
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert weight_map["model.embed_tokens.alignment.weight"] == LAYER_FILE
    assert len(set(weight_map.values())) > 2  # still sharded


def test_non_empty_out_is_refused_without_force_and_written_into_with_it(tmp_path, capsys):
    _, base, alignment = _pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["export-vllm", "--model", base, "--alignment", alignment, "--out", str(out)]
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clm export-vllm: error: --out {out} is a non-empty directory; pass --force")
    assert err.count("\n") == 1
    assert (out / "mine.txt").read_text() == "keep me"
    assert main(args + ["--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep me" and (out / LAYER_FILE).exists()  # --force deletes nothing
    assert "vllm.entrypoints.openai.api_server" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_block_layer_is_written_under_the_wrapped_models_keys_with_its_fields(tmp_path, arch):
    model, base, alignment = _pair(tmp_path, arch, layer="block")
    out = export_for_vllm(base, alignment, str(tmp_path / "out"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config[CONFIG_KEY]["layer"] == "block"
    assert config[CONFIG_KEY]["block"] == {"model_type": arch, "hidden_size": 32, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}
    layer, state = load_file(os.path.join(out, LAYER_FILE)), model.state_dict()
    block_keys = {k for k in state if ".alignment_block." in k}
    assert set(layer) == block_keys and all(k.startswith("model.alignment_block.block.") for k in layer)
    assert any(k.endswith("self_attn.q_proj.bias") for k in layer) == (arch == "qwen2")
    for key, value in layer.items():
        assert torch.equal(value, state[key])


def test_named_dials_are_stacked_in_their_order(tmp_path):
    """A save of several dials, and one dial saved alone, become the stacked weight [K, d, d] and bias [K, d]
    the plugin's dial mix reads, with the dial names in config.json."""
    model = tiny_causal_lm("llama")
    base = str(tmp_path / "base")
    model.save_pretrained(base)
    clm_ext.add_alignment_control(model, dials=["positive", "concise"])
    with torch.no_grad():
        for p in clm_ext.model.alignment_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    site = model.get_input_embeddings()
    for saved, kwargs, dials in [("all", {}, ["positive", "concise"]), ("one", {"dial": "concise"}, ["concise"])]:
        clm_ext.save_alignment(model, str(tmp_path / saved), **kwargs)
        out = export_for_vllm(base, str(tmp_path / saved), str(tmp_path / f"out-{saved}"))
        assert json.load(open(os.path.join(out, "config.json")))[CONFIG_KEY]["dials"] == dials
        layer = load_file(os.path.join(out, LAYER_FILE))
        assert torch.equal(layer["model.embed_tokens.alignment.weight"],
                           torch.stack([site.dial(d).weight for d in dials]))
        assert torch.equal(layer["model.embed_tokens.alignment.bias"], torch.stack([site.dial(d).bias for d in dials]))


def test_logits_mode_is_refused(tmp_path):
    _, base, alignment = _pair(tmp_path, mode="logits", layer="block")
    with pytest.raises(ValueError, match="mode='logits'.*serves only mode='embed'"):
        export_for_vllm(base, alignment, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer_arch, overrides, message", [
    ("llama", {"num_key_value_heads": 4}, "block layer was made for num_key_value_heads x head_dim=32, "
                                          "the model has num_key_value_heads x head_dim=2 x 8 = 16"),
    ("llama", {"num_attention_heads": 2, "head_dim": 8}, "block layer was made for num_attention_heads x head_dim=16, "
                                                         "the model has num_attention_heads x head_dim=4 x 8 = 32"),
    ("llama", {"intermediate_size": 48}, "block layer was made for intermediate_size=48, the model has intermediate_size=64"),
    ("qwen2", {}, "layer was trained for model_type='qwen2', the model has model_type='llama'"),
    ("llama", {"attention_bias": True}, "block layer's self_attn.k_proj.bias is (16,), the model's first layer has none"),
])
def test_a_block_layer_made_for_another_model_is_refused_naming_both_values(tmp_path, layer_arch, overrides,
                                                                            message):
    _, base, _ = _pair(tmp_path / "base", "llama")
    _, _, alignment = _pair(tmp_path / "other", layer_arch, layer="block", **overrides)
    with pytest.raises(ValueError) as err:
        export_for_vllm(base, alignment, str(tmp_path / "out"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer", ["linear", "block"])
def test_unsupported_architecture_names_the_supported_ones(tmp_path, layer):
    _, base, alignment = _pair(tmp_path, arch="mistral", layer=layer)
    supported = r"\['LlamaForCausalLM', 'Qwen2ForCausalLM'\]"
    with pytest.raises(ValueError, match=rf"MistralForCausalLM.*not supported.*{supported}"):
        export_for_vllm(base, alignment, str(tmp_path / "out"))


def test_mismatched_layer_is_refused(tmp_path):
    _, base, _ = _pair(tmp_path / "b", arch="llama")
    other = tiny_causal_lm("llama", hidden_size=64)
    clm_ext.add_alignment_control(other)
    clm_ext.save_alignment(other, str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="hidden_size=64, the model has hidden_size=32"):
        export_for_vllm(base, str(tmp_path / "wide"), str(tmp_path / "out"))


@pytest.mark.parametrize("argv_tail, message", [
    (["--default-alpha", "nan"], "clm export-vllm: error: --default-alpha must be finite in float32 (|alpha| <= 3.4e38), got nan"),
    (["--alignment", "/nonexistent"], "clm export-vllm: error: load_alignment: /nonexistent is not a saved alignment"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv_tail, message):
    _, base, alignment = _pair(tmp_path)
    argv = ["export-vllm", "--model", base, "--alignment", alignment, "--out", str(tmp_path / "out"), *argv_tail]
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
