"""Layer-only checkpoints of CLMDPOTrainer: what a checkpoint holds (the layer, optimizer, scheduler, RNG and
trainer state, nothing of the base), exact resume (bit-equal to an uninterrupted run on CPU), refusal of a
checkpoint from another base or layer kind, and resume past a partially written checkpoint."""
import json
import os

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer
from transformers import TrainerCallback

import clm_ext
from clm_ext.checkpoints import (CheckpointMismatchError, IncompleteCheckpointError, incomplete_reason,
                                 last_complete_checkpoint)
from clm_ext.model import alignment_parameters
from clm_ext.preferences import validate_preferences
from clm_ext.train import CLMDPOTrainer, make_dpo_trainer
from test_train import ROWS, dpo_config

TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def trainer(tmp_path, name, model=None, layer="linear", eval_dataset=None, **overrides):
    """4 steps of 2 pairs (two epochs, shuffled), AdamW with linear decay, a checkpoint every 2 steps."""
    options = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=4, save_steps=2,
                   save_strategy="steps", learning_rate=1e-2)
    options.update(overrides)
    model = model if model is not None else clm_ext.add_alignment_control(tiny_causal_lm("llama"), layer=layer)
    return CLMDPOTrainer(model, args=dpo_config(tmp_path, **options), train_dataset=validate_preferences(ROWS),
                         eval_dataset=eval_dataset, processing_class=tiny_tokenizer())


def layer_state(model):
    return {k: v.clone() for k, v in clm_ext.model.alignment_layer(model).state_dict().items()}


class LayerAtEachStep(TrainerCallback):
    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = layer_state(model)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 4-step run with checkpoints at steps 2 and 4, and the layer after every step."""
    tmp_path = tmp_path_factory.mktemp("run")
    run = trainer(tmp_path, "a")
    seen = LayerAtEachStep()
    run.add_callback(seen)
    run.train()
    return tmp_path / "a", seen.states


def test_checkpoint_holds_the_layer_not_the_base(uninterrupted):
    folder, states = uninterrupted
    checkpoint = folder / "checkpoint-2"
    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    assert {f for f in files if not f.startswith("alignment/")} == TRAINER_FILES | {"clm_checkpoint.json"}
    assert "alignment/alignment_config.json" in files and not any(f.startswith(("model", "pytorch")) for f in files)
    saved = layer_state(clm_ext.load_alignment(tiny_causal_lm("llama"), str(checkpoint / "alignment")))
    assert saved.keys() == states[2].keys() and all(torch.equal(saved[k], states[2][k]) for k in saved)
    assert not all(torch.equal(states[2][k], states[4][k]) for k in saved)
    # The optimizer state is that of the layer's parameters only (AdamW: two moments each).
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in states[2].values())
    info = json.loads((checkpoint / "clm_checkpoint.json").read_text())
    assert info["layer"] == "linear" and info["base_model"]["hidden_size"] == 32
    assert len(info["base_model"]["embedding_digest"]) == 16
    # The saved layer loads like any save_alignment output.
    model = clm_ext.load_alignment(tiny_causal_lm("llama"), str(checkpoint / "alignment"))
    assert all(torch.equal(a, b) for a, b in zip(layer_state(model).values(), states[2].values()))


@pytest.mark.parametrize("layer", ["linear", "block"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, uninterrupted, layer):
    if layer == "linear":
        folder, states = uninterrupted
    else:  # the block layer (a decoder block) through the same path
        run = trainer(tmp_path, "a", layer="block")
        run.train()
        folder, states = tmp_path / "a", {4: layer_state(run.model)}
    resumed = trainer(tmp_path, "b", layer=layer)
    resumed.train(resume_from_checkpoint=str(folder / "checkpoint-2"))
    assert resumed.state.global_step == 4
    final = layer_state(resumed.model)
    assert final.keys() == states[4].keys()
    for key in final:
        assert torch.equal(final[key], states[4][key]), key
    base = tiny_causal_lm("llama").state_dict()
    for key, value in resumed.model.state_dict().items():  # the base was never touched
        if key in base:
            assert torch.equal(value, base[key]), key


def test_resume_restores_the_optimizer_state(tmp_path, uninterrupted):
    """The layer alone is not enough: without AdamW's moments and the schedule the run ends elsewhere."""
    folder, states = uninterrupted
    model = clm_ext.load_alignment(tiny_causal_lm("llama"), str(folder / "checkpoint-2" / "alignment"))
    fresh = trainer(tmp_path, "c", model=model, max_steps=2, save_strategy="no")
    fresh.train()
    assert not all(torch.equal(a, b) for a, b in zip(layer_state(fresh.model).values(), states[4].values()))


def test_resume_refuses_another_base_or_layer(tmp_path, uninterrupted):
    checkpoint = str(uninterrupted[0] / "checkpoint-2")
    other_weights = clm_ext.add_alignment_control(tiny_causal_lm("llama", seed=1))
    with pytest.raises(CheckpointMismatchError, match=r"another base model .*embedding_digest="):
        trainer(tmp_path, "d", model=other_weights).train(resume_from_checkpoint=checkpoint)
    wider = clm_ext.add_alignment_control(tiny_causal_lm("llama", hidden_size=64))
    with pytest.raises(CheckpointMismatchError, match=r"hidden_size=32.*has hidden_size=64"):
        trainer(tmp_path, "d", model=wider).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match=r"layer='linear' alignment layer, the model being trained "
                                                      r"has layer='block'"):
        trainer(tmp_path, "d", layer="block").train(resume_from_checkpoint=checkpoint)


def test_resume_refuses_a_full_model_checkpoint(tmp_path):
    full = make_dpo_trainer("full", tiny_causal_lm("llama"), dpo_config(tmp_path, output_dir=str(tmp_path / "f"),
                            max_steps=1, save_strategy="steps", save_steps=1), validate_preferences(ROWS),
                            tiny_tokenizer())
    full.train()
    assert (tmp_path / "f" / "checkpoint-1" / "model.safetensors").is_file()
    with pytest.raises(CheckpointMismatchError, match="is not a CLMDPOTrainer checkpoint"):
        trainer(tmp_path, "e").train(resume_from_checkpoint=str(tmp_path / "f" / "checkpoint-1"))


def test_resume_true_skips_a_partial_checkpoint(tmp_path, uninterrupted):
    import shutil

    folder, states = uninterrupted
    copy = tmp_path / "a"
    shutil.copytree(folder, copy)
    os.remove(copy / "checkpoint-4" / "trainer_state.json")  # killed while writing checkpoint-4
    (copy / "checkpoint-6").mkdir()  # killed right after creating checkpoint-6
    assert last_complete_checkpoint(str(copy)) == (str(copy / "checkpoint-2"),
                                                    [str(copy / "checkpoint-6"), str(copy / "checkpoint-4")])
    resumed = trainer(tmp_path, "a")
    resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(a, b) for a, b in zip(layer_state(resumed.model).values(), states[4].values()))


def test_save_model_writes_the_layer(tmp_path, uninterrupted):
    run = trainer(tmp_path, "g", max_steps=1, save_strategy="no")
    run.train()
    run.save_model(str(tmp_path / "layer"))
    assert "alignment_config.json" in os.listdir(tmp_path / "layer")
    model = clm_ext.load_alignment(tiny_causal_lm("llama"), str(tmp_path / "layer"))
    assert all(torch.equal(a, b) for a, b in zip(alignment_parameters(model), alignment_parameters(run.model)))


def test_load_best_model_at_end_takes_the_best_checkpoints_layer(tmp_path):
    seen = LayerAtEachStep()
    run = trainer(tmp_path, "h", save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                  metric_for_best_model="eval_rewards/margins", greater_is_better=False,
                  eval_dataset=validate_preferences(ROWS))
    run.add_callback(seen)
    run.train()
    best = int(run.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best != 4  # the last step's layer would be kept without loading the best
    assert all(torch.equal(a, b) for a, b in zip(layer_state(run.model).values(), seen.states[best].values()))


DAMAGE = {  # file -> (what it is replaced with, what the reason says)
    "optimizer.pt": (b"garbage", "optimizer.pt is not a readable torch.save file"),
    "scheduler.pt": (None, "no scheduler.pt"),
    "rng_state.pth": (b"", "rng_state.pth is not a readable torch.save file"),
    "trainer_state.json": (b"{}", "trainer_state.json has no valid 'global_step' (got None)"),
    "clm_checkpoint.json": (b"{oops", "clm_checkpoint.json is not readable JSON"),
    "alignment/alignment_config.json": (b"[]", "alignment_config.json must hold a JSON object"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_is_incomplete_and_named(tmp_path, uninterrupted, name):
    """Every file a resume reads is checked: a bare resume falls back to the newest complete checkpoint; a named
    one is refused with the file's name, before the Trainer reads anything."""
    import shutil

    content, reason = DAMAGE[name]
    copy = tmp_path / "a"
    shutil.copytree(uninterrupted[0], copy)
    damaged = copy / "checkpoint-4" / name
    damaged.unlink()
    if content is not None:
        damaged.write_bytes(content)
    assert incomplete_reason(str(copy / "checkpoint-2")) is None
    assert reason in incomplete_reason(str(copy / "checkpoint-4"))
    assert last_complete_checkpoint(str(copy)) == (str(copy / "checkpoint-2"), [str(copy / "checkpoint-4")])
    with pytest.raises(IncompleteCheckpointError, match=f"checkpoint-4 is not a complete checkpoint: .*{name}"):
        trainer(tmp_path, "b").train(resume_from_checkpoint=str(copy / "checkpoint-4"))


def test_resume_refuses_a_layer_that_overflows_the_training_dtype(tmp_path, uninterrupted):
    """A checkpoint's layer re-saved as float64 holding 1e300: consistent as a file, inf in the float32 model."""
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(uninterrupted[0], copy)
    layer_dir = copy / "checkpoint-2" / "alignment"
    model = clm_ext.load_alignment(tiny_causal_lm("llama").double(), str(layer_dir))
    with torch.no_grad():
        clm_ext.model.alignment_layer(model).weight[0, 0] = 1e300
    clm_ext.save_alignment(model, str(layer_dir))
    with pytest.raises(ValueError, match="'weight' holds 1 value.* not finite in torch.float32"):
        trainer(tmp_path, "b").train(resume_from_checkpoint=str(copy / "checkpoint-2"))
