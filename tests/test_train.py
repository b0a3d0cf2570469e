"""CLMDPOTrainer equals TRL's DPO with an explicit frozen base reference, trains only the layer, and `clm train`
works end to end (layer saved, loadable, generation runs, resume reproduces the uninterrupted run)."""
import copy
import json
import re

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer
from trl import DPOConfig, DPOTrainer

import clm_ext
from clm_ext.preferences import validate_preferences
from clm_ext.model import alignment_site
from clm_ext.train import CLMDPOTrainer, make_dpo_trainer

ROWS = [
    {"prompt": "the cat", "chosen": " is happy today", "rejected": " is sad"},
    {"prompt": "a dog", "chosen": " sings", "rejected": " hate the moon"},
    {"prompt": "the sun", "chosen": " shines here and there", "rejected": " falls"},
    {"prompt": "a bird", "chosen": " is very good", "rejected": " is not good but bad"},
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def dpo_config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "trainer"), report_to="none", per_device_train_batch_size=4,
                   per_device_eval_batch_size=4, learning_rate=1e-2, max_steps=3, logging_steps=1,
                   save_strategy="no", use_cpu=True, bf16=False, max_length=32, disable_tqdm=True, seed=0)
    options.update(overrides)
    return DPOConfig(**options)


def clm_model(seed=1, layer="linear"):
    """Tiny llama with an alignment layer moved off the identity, so that alpha = 1 and alpha = 0 differ."""
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"), layer=layer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def one_step(trainer, batch):
    """Loss, logged metrics and trainable-parameter gradients of one forward/backward on `batch`."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads


def no_reference_load(*args, **kwargs):
    raise AssertionError("CLMDPOTrainer must not load a reference model")


@pytest.mark.parametrize("loss_type, layer", [(["sigmoid"], "linear"), (["ipo"], "linear"),
                                              (["sigmoid", "sft"], "linear"), (["sigmoid"], "block")])
def test_equals_trl_with_explicit_base_reference(tmp_path, monkeypatch, loss_type, layer):
    import trl.trainer.dpo_trainer as trl_dpo

    monkeypatch.setattr(trl_dpo, "create_model_from_path", no_reference_load)
    dataset, tokenizer = validate_preferences(ROWS), tiny_tokenizer()
    policy = clm_model(layer=layer)
    trl_policy = copy.deepcopy(policy)
    clm_ext.set_alpha(trl_policy, 1.0)
    base_reference = tiny_causal_lm("llama")

    ours = CLMDPOTrainer(policy, args=dpo_config(tmp_path, loss_type=loss_type), train_dataset=dataset,
                         processing_class=tokenizer)
    theirs = DPOTrainer(trl_policy, ref_model=base_reference, args=dpo_config(tmp_path, loss_type=loss_type),
                        train_dataset=dataset, processing_class=tokenizer)
    assert not isinstance(ours.ref_model, torch.nn.Module)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(len(ROWS))])
    loss, metrics, grads = one_step(ours, batch)
    ref_loss, ref_metrics, ref_grads = one_step(theirs, batch)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert metrics["rewards/margins"] != 0.0
    for key in METRICS:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6, abs=1e-7), key
    assert grads.keys() == ref_grads.keys() and grads
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_only_the_layer_trains(tmp_path):
    model = tiny_causal_lm("llama")  # no layer yet: the trainer adds one
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eval_rows = validate_preferences(ROWS[:2])
    trainer = CLMDPOTrainer(model, args=dpo_config(tmp_path, eval_strategy="steps", eval_steps=2,
                                                     gradient_checkpointing=True),
                            train_dataset=validate_preferences(ROWS), eval_dataset=eval_rows,
                            processing_class=tiny_tokenizer())
    assert alignment_site(model) is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()

    after = model.state_dict()
    assert {k for k in start if not torch.equal(start[k], after[k])} == trainable
    for key in before:  # the base weights are bit-identical
        assert torch.equal(before[key], after[key]), key
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"loss", "rewards/chosen", "rewards/accuracies", "eval_loss", "eval_rewards/margins"} <= logged


def test_bf16_mixed_precision(tmp_path):
    trainer = CLMDPOTrainer(clm_model(), args=dpo_config(tmp_path, bf16=True, max_steps=1),
                            train_dataset=validate_preferences(ROWS), processing_class=tiny_tokenizer())
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_precomputed_reference_is_the_base_model(tmp_path):
    dataset, tokenizer = validate_preferences(ROWS), tiny_tokenizer()
    policy = clm_model()
    trainer = CLMDPOTrainer(copy.deepcopy(policy), args=dpo_config(tmp_path, precompute_ref_log_probs=True),
                            train_dataset=dataset, processing_class=tokenizer)
    live = CLMDPOTrainer(policy, args=dpo_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    base = DPOTrainer(tiny_causal_lm("llama"), args=dpo_config(tmp_path, precompute_ref_log_probs=True),
                      train_dataset=dataset, processing_class=tokenizer)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(trainer.train_dataset[column]),
                                   torch.tensor(base.train_dataset[column]))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    loss, metrics, _ = one_step(trainer, batch)
    live_loss, live_metrics, _ = one_step(live, {k: v for k, v in batch.items() if not k.startswith("ref_")})
    torch.testing.assert_close(loss, live_loss)
    assert metrics["rewards/chosen"] == pytest.approx(live_metrics["rewards/chosen"], rel=1e-5)

    trainer.train()
    scores = trainer.evaluate(validate_preferences(ROWS[:2]))  # reference re-scored after training: alpha = 0
    assert torch.isfinite(torch.tensor(scores["eval_loss"])) and scores["eval_rewards/margins"] != 0.0


def test_conversational_preferences_train(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in ROWS]
    model = clm_model()
    layer = [p.detach().clone() for p in clm_ext.model.alignment_parameters(model)]
    trainer = CLMDPOTrainer(model, args=dpo_config(tmp_path, max_steps=1), processing_class=tokenizer,
                            train_dataset=validate_preferences(rows))
    assert all(len(ids) > 0 for ids in trainer.train_dataset["chosen_ids"])
    trainer.train()
    assert trainer.state.log_history[0]["rewards/margins"] != 0.0
    assert all(not torch.equal(a, b) for a, b in zip(layer, clm_ext.model.alignment_parameters(model)))


def test_refused_options(tmp_path):
    from peft import LoraConfig

    dataset, tokenizer = validate_preferences(ROWS), tiny_tokenizer()
    with pytest.raises(ValueError, match="peft_config"):
        CLMDPOTrainer(clm_model(), args=dpo_config(tmp_path), train_dataset=dataset, processing_class=tokenizer,
                      peft_config=LoraConfig())
    with pytest.raises(ValueError, match="sync_ref_model"):
        CLMDPOTrainer(clm_model(), args=dpo_config(tmp_path, sync_ref_model=True), train_dataset=dataset,
                      processing_class=tokenizer)
    with pytest.raises(ValueError, match="mode 'logits'; train it in mode 'embed'"):
        CLMDPOTrainer(clm_ext.add_alignment_control(tiny_causal_lm("llama"), mode="logits"), args=dpo_config(tmp_path),
                      train_dataset=dataset, processing_class=tokenizer)
    unfrozen = clm_model()
    unfrozen.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"base parameters require grad \(\['lm_head.weight'\]\)"):
        CLMDPOTrainer(unfrozen, args=dpo_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="method must be one of"):
        make_dpo_trainer("qlora", clm_model(), dpo_config(tmp_path), dataset, tokenizer)
    with pytest.raises(ValueError, match="needs a plain model"):
        make_dpo_trainer("full", clm_model(), dpo_config(tmp_path), dataset, tokenizer)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines(tmp_path, method):
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_dpo_trainer(method, model, dpo_config(tmp_path, max_steps=1), validate_preferences(ROWS),
                               tiny_tokenizer())
    trainer.train()
    if method == "full":
        assert isinstance(trainer.ref_model, torch.nn.Module)
        assert all(not p.requires_grad for p in trainer.ref_model.parameters())
        assert all(p.requires_grad for p in model.parameters())
        assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"],
                               model.state_dict()["model.layers.0.mlp.up_proj.weight"])
    else:
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert trainer.state.log_history[-1]["train_loss"] > 0


def make_model_dir(tmp_path):
    path = tmp_path / "model"
    tiny_causal_lm("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def run_cli(*argv):
    from clm_ext.cli import main

    return main(["train", *map(str, argv)])


def test_cli_trains_saves_loads_and_resumes(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = make_model_dir(tmp_path)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--model", model_dir, "--dataset", data, "--batch-size", 2, "--lr", 1e-2, "--max-length", 32,
              "--logging-steps", 1, "--save-steps", 2, "--max-steps", 4, "--eval-dataset", data]
    assert run_cli(*common, "--out", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "done after 4 steps" in out and "rewards/accuracies" in out
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in history if "eval_rewards/accuracies" in h] == [2, 4]

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base_logits = model(torch.tensor([[2, 5, 6]])).logits
    clm_ext.load_alignment(model, str(tmp_path / "run"))
    clm_ext.set_alpha(model, 1.0)
    assert not torch.allclose(model(torch.tensor([[2, 5, 6]])).logits, base_logits)
    generated = model.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)

    # A run killed while writing its step-4 checkpoint (no trainer_state.json yet), resumed with a bare --resume,
    # falls back to checkpoint-2, says so, and ends on the uninterrupted run's layer, bit for bit.
    uninterrupted = AutoModelForCausalLM.from_pretrained(model_dir)
    clm_ext.load_alignment(uninterrupted, str(tmp_path / "run"))
    checkpoints = tmp_path / "run-checkpoints"
    assert not (checkpoints / "checkpoint-4" / "model.safetensors").exists()  # layer-only checkpoints
    (checkpoints / "checkpoint-4" / "trainer_state.json").unlink()
    assert run_cli(*common, "--out", tmp_path / "run", "--resume") == 0
    out = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'checkpoint-2'} (skipped partial checkpoint-4: no trainer_state.json)" in out
    resumed = AutoModelForCausalLM.from_pretrained(model_dir)
    clm_ext.load_alignment(resumed, str(tmp_path / "run"))
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]

    # The same checkpoints on another base model: one line naming the mismatch, no traceback.
    other = tmp_path / "other"
    tiny_causal_lm("llama", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    other_args = [other if a == model_dir else a for a in common]
    capsys.readouterr()
    assert run_cli(*other_args, "--out", tmp_path / "run", "--checkpoint-dir", checkpoints, "--resume") == 2
    assert re.match(r"clm train: error: --resume: .*checkpoint-4 was made on another base model[^\n]*\n$",
                    capsys.readouterr().err.splitlines(keepends=True)[-1])


def test_model_path_is_loaded_and_given_a_layer(tmp_path):
    trainer = CLMDPOTrainer(make_model_dir(tmp_path), args=dpo_config(tmp_path),
                            train_dataset=validate_preferences(ROWS), processing_class=tiny_tokenizer())
    assert alignment_site(trainer.model) is not None
    assert float(clm_ext.model.get_alpha(trainer.model)) == 1.0


@pytest.mark.parametrize("method, artifact", [("lora", "adapter_config.json"), ("full", "model.safetensors")])
def test_cli_baselines_write_their_model(tmp_path, method, artifact):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert run_cli("--model", make_model_dir(tmp_path), "--dataset", data, "--out", tmp_path / "out", "--method",
                   method, "--max-steps", 1, "--max-length", 32) == 0
    assert (tmp_path / "out" / artifact).is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_cli_names_the_bad_row(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": "", "rejected": "b"}) + "\n")
    (tmp_path / "model").mkdir()  # the rows are read before the model
    assert run_cli("--model", tmp_path / "model", "--dataset", data, "--out", tmp_path / "out") == 2
    assert "row 1 (line 2): field 'chosen': empty string" in capsys.readouterr().err
