"""Named dials: h = x + sum_k alpha_k (A_k(x) - x) on tiny Llama / Qwen2 models. One dial is today's model bit
for bit; all dials at 0 the base model; mixed alpha vectors in one batch equal each sequence alone and a float64
reference; dials saved and loaded separately compose; training one dial leaves the others bit-identical."""
import copy
import json
import os

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer

import clm_ext
from clm_ext.model import alignment_site

ARCHS = ["llama", "qwen2"]
PROMPTS = ["the cat is", "a dog sings and", "the sun shines", "a bird is very"]


def perturb_(layer, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return layer


def dial_model(arch="llama", dials=("positive", "concise"), dtype=torch.float32, seed=10):
    model = clm_ext.add_alignment_control(tiny_causal_lm(arch).to(dtype), dials=list(dials))
    site = alignment_site(model)
    for i, name in enumerate(dials):
        perturb_(site.dial(name), seed + i)
    return model


def ids(rows=4, length=7, seed=0):
    return torch.randint(3, 120, (rows, length), generator=torch.Generator().manual_seed(seed))


def float64_reference(model, input_ids, vectors):
    """The logits of the base model fed h = E[id] + sum_k a_k ((E[id] W_k^T + b_k) - E[id]), composed here in
    float64 (dial by dial, sequence by sequence) and passed as inputs_embeds (which skip the dial layer)."""
    site = alignment_site(model)
    base = model.double()
    table = site.weight.detach()
    out = []
    for i, vector in enumerate(vectors):
        x = table[input_ids[i]]
        h = x.clone()
        for name in site.dial_names:
            layer = site.dial(name)
            h = h + vector.get(name, 0.0) * (x @ layer.weight.detach().T + layer.bias.detach() - x)
        with torch.no_grad():
            out.append(base(inputs_embeds=h[None]).logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_dial_is_todays_model_bit_for_bit(arch):
    today = clm_ext.add_alignment_control(tiny_causal_lm(arch))
    perturb_(alignment_site(today).alignment, 3)
    dials = clm_ext.add_alignment_control(tiny_causal_lm(arch), dials=["only"])
    alignment_site(dials).dial("only").load_state_dict(alignment_site(today).alignment.state_dict())
    x = ids()
    for alpha in (1.5, -0.75, 2.0, 0.3):
        clm_ext.set_alpha(today, alpha)
        clm_ext.set_alpha(dials, {"only": alpha})
        with torch.no_grad():
            assert torch.equal(dials(x).logits, today(x).logits)
    per_sequence = [1.5, -0.5, 0.0, 2.25]
    clm_ext.set_alpha(today, per_sequence)
    clm_ext.set_alpha(dials, [{"only": a} for a in per_sequence])
    with torch.no_grad():
        assert torch.equal(dials(x).logits, today(x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_dials_at_zero_is_the_base_model_bit_for_bit(arch):
    base = tiny_causal_lm(arch)
    model = dial_model(arch)
    x = ids()
    with torch.no_grad():
        expected = base(x).logits
        for alpha in ({}, {"positive": 0.0, "concise": 0.0}, [{}, {"concise": 0.0}, {}, {}]):
            clm_ext.set_alpha(model, alpha)
            assert torch.equal(model(x).logits, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_vectors_in_one_batch_equal_each_alone_and_a_float64_reference(arch):
    model = dial_model(arch)
    x = ids()
    vectors = [{"positive": 1.5, "concise": -0.5}, {"concise": 2.0}, {"positive": -1.0, "concise": 0.7}, {}]
    clm_ext.set_alpha(model, vectors)
    with torch.no_grad():
        batch = model(x).logits
        for i, vector in enumerate(vectors):
            clm_ext.set_alpha(model, vector)
            torch.testing.assert_close(batch[i], model(x[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
    reference = float64_reference(copy.deepcopy(model), x, vectors)
    torch.testing.assert_close(batch.double(), reference, rtol=1e-4, atol=1e-4)
    # the dials matter: the mixed batch is not the base model
    assert (batch - tiny_causal_lm(arch)(x).logits).abs().max() > 1e-2


def test_float64_model_matches_the_reference_tightly():
    model = dial_model("llama", dtype=torch.float64)
    x = ids()
    vectors = [{"positive": 2.5, "concise": -1.5}, {"positive": 0.25}, {"concise": 3.0}, {"positive": -0.5, "concise": 1.5}]
    clm_ext.set_alpha(model, vectors)
    with torch.no_grad():
        logits = model(x).logits
    torch.testing.assert_close(logits, float64_reference(copy.deepcopy(model), x, vectors), rtol=1e-10, atol=1e-10)


def test_generate_with_one_dict_per_prompt_equals_each_prompt_alone():
    model, tok = dial_model("llama"), tiny_tokenizer()
    alphas = [{"positive": 1.5, "concise": -0.5}, {"concise": 2.0}, {"positive": -1.0}, {}]
    together = clm_ext.generate(model, tok, PROMPTS, alphas=alphas, max_new_tokens=6, do_sample=False)
    alone = [clm_ext.generate(model, tok, [p], alphas=[a], max_new_tokens=6, do_sample=False)[0]
             for p, a in zip(PROMPTS, alphas)]
    assert together == alone
    # one dict for every prompt, and a sweep of one prompt over several vectors
    assert len(set(together)) > 1  # the vectors lead to different completions
    assert clm_ext.generate(model, tok, PROMPTS[:2], alphas={"concise": 2.0}, max_new_tokens=6) == [
        clm_ext.generate(model, tok, [PROMPTS[0]], alphas=[{"concise": 2.0}], max_new_tokens=6)[0], alone[1]]
    sweep = clm_ext.generate(model, tok, PROMPTS[1], alphas=alphas[:2], max_new_tokens=6)
    assert sweep[1] == alone[1]
    assert clm_ext.model.get_alpha(model).shape == (2,)  # restored after generate


def test_adding_a_dial_keeps_the_output_and_the_other_dials():
    model = dial_model("llama")
    clm_ext.set_alpha(model, [{"positive": 1.5}, {"concise": -1.0}, {}, {"positive": 2.0, "concise": 2.0}])
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    clm_ext.add_alignment_control(model, dials=["simple"])
    assert alignment_site(model).dial_names == ["positive", "concise", "simple"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # the new dial starts at alpha 0 (and at the identity)
    perturb_(alignment_site(model).dial("simple"), 99)
    clm_ext.set_alpha(model, {"simple": 1.0})
    with torch.no_grad():
        assert not torch.equal(model(x[:1]).logits, before[:1])


def test_dials_saved_and_loaded_separately_compose(tmp_path):
    x = ids()
    # each dial trained (here: perturbed) on its own model, saved alone by name
    a = dial_model("llama", dials=["positive"], seed=1)
    b = dial_model("llama", dials=["concise"], seed=2)
    clm_ext.save_alignment(a, tmp_path / "positive", dial="positive")
    clm_ext.save_alignment(b, tmp_path / "concise", dial="concise")
    config = json.loads((tmp_path / "concise" / "alignment_config.json").read_text())
    assert config["dial"] == "concise" and config["layer"] == "linear"
    assert all(n.endswith(".safetensors") or n.endswith(".json") or n.startswith(".")
               for n in os.listdir(tmp_path / "concise"))
    # a plain model gets both, one at a time
    both = tiny_causal_lm("llama")
    clm_ext.load_alignment(both, tmp_path / "positive")
    clm_ext.load_alignment(both, tmp_path / "concise")
    assert alignment_site(both).dial_names == ["positive", "concise"]
    # the same as a model built with both dials directly
    direct = clm_ext.add_alignment_control(tiny_causal_lm("llama"), dials=["positive", "concise"])
    alignment_site(direct).dial("positive").load_state_dict(alignment_site(a).dial("positive").state_dict())
    alignment_site(direct).dial("concise").load_state_dict(alignment_site(b).dial("concise").state_dict())
    vectors = [{"positive": 1.5, "concise": -0.5}, {"concise": 2.0}, {"positive": 1.0}, {}]
    for model in (both, direct):
        clm_ext.set_alpha(model, vectors)
    with torch.no_grad():
        assert torch.equal(both(x).logits, direct(x).logits)
        # each dial alone acts as on its own model
        clm_ext.set_alpha(both, {"positive": 1.5})
        clm_ext.set_alpha(a, {"positive": 1.5})
        assert torch.equal(both(x).logits, a(x).logits)
    # a one-dial save of today's format loads as a named dial
    today = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    perturb_(alignment_site(today).alignment, 5)
    clm_ext.save_alignment(today, tmp_path / "today")
    clm_ext.load_alignment(both, tmp_path / "today", dial="simple")
    clm_ext.set_alpha(today, 0.75)
    clm_ext.set_alpha(both, {"simple": 0.75})
    with torch.no_grad():
        assert torch.equal(both(x).logits, today(x).logits)


def test_a_save_of_all_dials_round_trips(tmp_path):
    model = dial_model("qwen2")
    clm_ext.save_alignment(model, tmp_path / "all")
    config = json.loads((tmp_path / "all" / "alignment_config.json").read_text())
    assert config["dials"] == ["positive", "concise"]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "all" / config["weights"]))
    assert keys == {"positive.weight", "positive.bias", "concise.weight", "concise.bias"}
    loaded = clm_ext.load_alignment(tiny_causal_lm("qwen2"), tmp_path / "all")
    only = clm_ext.load_alignment(tiny_causal_lm("qwen2"), tmp_path / "all", dial="concise")
    assert alignment_site(only).dial_names == ["concise"]
    x = ids()
    vector = {"positive": -0.5, "concise": 1.25}
    for m in (model, loaded):
        clm_ext.set_alpha(m, vector)
    clm_ext.set_alpha(only, {"concise": 1.25})
    clm_ext.set_alpha(model, {"concise": 1.25})
    with torch.no_grad():
        assert torch.equal(only(x).logits, model(x).logits)
        clm_ext.set_alpha(model, vector)
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_merge_alignment_folds_a_fixed_vector():
    model = dial_model("qwen2")  # tied embeddings: merging unties them
    vector = {"positive": 1.5, "concise": -0.5}
    plain = clm_ext.merge_alignment(model, alpha=vector)
    assert alignment_site(plain) is None
    clm_ext.set_alpha(model, vector)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="dict of dial name"):
        clm_ext.merge_alignment(model, alpha=1.0)


def test_cached_tables_decode_path_matches_the_gemm_path():
    model = dial_model("llama")
    cached = copy.deepcopy(model)
    alignment_site(cached).cache_aligned_table = True
    vectors = [{"positive": 1.5, "concise": -0.5}, {"concise": 2.0}, {"positive": -1.0, "concise": 0.7}, {}]
    for m in (model, cached):
        clm_ext.set_alpha(m, vectors)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(cached(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_per_token_alpha_vectors():
    """What a continuous-batching engine does: many requests packed into one row, one vector per token."""
    model = dial_model("llama")
    site = alignment_site(model)
    x = ids(rows=2, length=3)
    vectors = torch.tensor([[1.5, -0.5]] * 3 + [[0.0, 2.0]] * 3)
    site.set_token_alpha(vectors)
    with torch.no_grad():
        packed = site(x.reshape(1, -1))
        for i, vector in enumerate(({"positive": 1.5, "concise": -0.5}, {"concise": 2.0})):
            clm_ext.set_alpha(model, vector)
            # The same kernel on 6 rows and on 3: the GEMM may block them differently (last-bit differences).
            torch.testing.assert_close(packed[0, 3 * i:3 * i + 3], site(x[i:i + 1])[0], rtol=1e-6, atol=1e-6)
    # An independent reference for the packed row: each token's own vector through reference_dial_mix.
    from clm_ext.dial_ops import reference_dial_mix

    weight = torch.stack([site.dial(n).weight for n in site.dial_names])
    bias = torch.stack([site.dial(n).bias for n in site.dial_names])
    expected = reference_dial_mix(site.weight[x.reshape(-1)].double(), weight.double(), bias.double(),
                                  vectors.double())
    torch.testing.assert_close(packed[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_alphas_and_names_get_clear_errors(tmp_path):
    model = dial_model("llama")
    with pytest.raises(ValueError, match="'sincere'.*positive"):
        clm_ext.set_alpha(model, {"sincere": 1.0})
    with pytest.raises(ValueError, match=r"alpha\[1\]\['concise'\] must be finite"):
        clm_ext.set_alpha(model, [{"positive": 1.0}, {"concise": float("nan")}])
    with pytest.raises(TypeError, match="dict of dial name"):
        clm_ext.set_alpha(model, 1.0)
    with pytest.raises(TypeError, match="must be a number"):
        clm_ext.set_alpha(model, {"positive": "high"})
    with pytest.raises(ValueError, match="dial='nope'.*no such dial"):
        clm_ext.save_alignment(model, tmp_path / "x", dial="nope")
    with pytest.raises(ValueError, match="exists already"):
        clm_ext.add_alignment_control(model, dials=["concise"])
    with pytest.raises(ValueError, match="not a usable dial name"):
        clm_ext.add_alignment_control(tiny_causal_lm("llama"), dials=["has.dot"])
    with pytest.raises(ValueError, match="'train' is not a usable dial name .*Module attribute"):
        clm_ext.add_alignment_control(tiny_causal_lm("llama"), dials=["train"])
    with pytest.raises(ValueError, match="named dials need mode 'embed'"):
        clm_ext.add_alignment_control(tiny_causal_lm("llama"), dials=["a"], mode="logits")
    one = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="one unnamed dial"):
        clm_ext.set_alpha(one, {"positive": 1.0})
    clm_ext.save_alignment(one, tmp_path / "one")
    with pytest.raises(ValueError, match="say which dial"):
        clm_ext.load_alignment(model, tmp_path / "one")
    clm_ext.save_alignment(model, tmp_path / "all")
    with pytest.raises(ValueError, match="dial='simple' is not in"):
        clm_ext.load_alignment(tiny_causal_lm("llama"), tmp_path / "all", dial="simple")
    # a failed load leaves the model as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = clm_ext.add_alignment_control(tiny_causal_lm("llama", hidden_size=64), dials=["positive"])
    clm_ext.save_alignment(small, tmp_path / "small", dial="positive")
    with pytest.raises(ValueError, match="hidden_size"):
        clm_ext.load_alignment(model, tmp_path / "small")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Training one dial at a time.

ROWS = [
    {"prompt": "the cat", "chosen": " is happy today", "rejected": " is sad"},
    {"prompt": "a dog", "chosen": " sings", "rejected": " hate the moon"},
    {"prompt": "the sun", "chosen": " shines here and there", "rejected": " falls"},
    {"prompt": "a bird", "chosen": " is very good", "rejected": " is not good but bad"},
]


def dpo_config(tmp_path, **overrides):
    from trl import DPOConfig

    options = dict(output_dir=str(tmp_path / "trainer"), report_to="none", per_device_train_batch_size=4,
                   learning_rate=1e-2, max_steps=3, logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
                   max_length=32, disable_tqdm=True, seed=0)
    options.update(overrides)
    return DPOConfig(**options)


@pytest.mark.slow
def test_training_one_dial_leaves_the_others_and_the_base_bit_identical(tmp_path):
    from clm_ext.preferences import validate_preferences
    from clm_ext.train import CLMDPOTrainer

    model = dial_model("llama", dials=("positive", "concise", "simple"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = CLMDPOTrainer(model, args=dpo_config(tmp_path), train_dataset=validate_preferences(ROWS),
                            processing_class=tiny_tokenizer(), dial="concise", fixed_alphas={"positive": 0.5})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.embed_tokens.dials.concise.weight", "model.embed_tokens.dials.concise.bias"}
    trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.embed_tokens.dials.concise.weight", "model.embed_tokens.dials.concise.bias"}
    trainer.save_model(str(tmp_path / "concise"))
    config = json.loads((tmp_path / "concise" / "alignment_config.json").read_text())
    assert config["dial"] == "concise" and config["num_parameters"] == 32 * 32 + 32


@pytest.mark.slow
def test_one_dial_training_step_equals_trl_with_an_explicit_reference(tmp_path, monkeypatch):
    """The policy is the model with the trained dial at 1 and the others fixed; the reference the same with that
    dial at 0: one step equals TRL's DPOTrainer given that reference as a separate frozen model."""
    import trl.trainer.dpo_trainer as trl_dpo
    from trl import DPOTrainer

    from clm_ext.preferences import validate_preferences
    from clm_ext.train import CLMDPOTrainer

    def no_reference_load(*args, **kwargs):
        raise AssertionError("CLMDPOTrainer must not load a reference model")

    monkeypatch.setattr(trl_dpo, "create_model_from_path", no_reference_load)
    dataset, tokenizer = validate_preferences(ROWS), tiny_tokenizer()
    policy = dial_model("llama")
    trl_policy, reference = copy.deepcopy(policy), copy.deepcopy(policy)
    clm_ext.set_alpha(trl_policy, {"positive": -0.75, "concise": 1.0})
    alignment_site(trl_policy).dial("positive").requires_grad_(False)
    clm_ext.set_alpha(reference, {"positive": -0.75, "concise": 0.0})

    ours = CLMDPOTrainer(policy, args=dpo_config(tmp_path), train_dataset=dataset, processing_class=tokenizer,
                         dial="concise", fixed_alphas={"positive": -0.75})
    theirs = DPOTrainer(trl_policy, ref_model=reference, args=dpo_config(tmp_path), train_dataset=dataset,
                        processing_class=tokenizer)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(len(ROWS))])
    results = []
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        margins = trainer._metrics["train"]["rewards/margins"][-1]
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), margins, grads))
    (loss, margins, grads), (ref_loss, ref_margins, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert margins != 0.0 and margins == pytest.approx(ref_margins, rel=1e-6, abs=1e-7)
    assert grads.keys() == ref_grads.keys() == {"model.embed_tokens.dials.concise.weight",
                                                "model.embed_tokens.dials.concise.bias"}
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-7)


def _train_cli_args(tmp_path) -> tuple:
    """A tiny Llama and preference file under tmp_path; `clm train` arguments for two short steps on them."""
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model_dir, ["train", "--model", str(model_dir), "--dataset", str(data), "--batch-size", "4", "--lr",
                       "1e-2", "--max-length", "32", "--max-steps", "2", "--save-steps", "100"]


@pytest.mark.slow
def test_clm_train_dial_writes_one_named_dial(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from clm_ext.cli import main

    model_dir, common = _train_cli_args(tmp_path)
    assert main([*common, "--out", str(tmp_path / "concise"), "--dial", "concise"]) == 0
    assert json.loads((tmp_path / "concise" / "alignment_config.json").read_text())["dial"] == "concise"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    clm_ext.load_alignment(model, tmp_path / "concise")
    assert alignment_site(model).dial_names == ["concise"]
    assert not torch.equal(alignment_site(model).dial("concise").weight, torch.eye(32))
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x"), "--dial", "concise", "--layer", "block"]) == 2
    assert capsys.readouterr().err.startswith("clm train: error: --dial trains a named linear dial")
    assert main([*common, "--out", str(tmp_path / "y"), "--dial", "no.dots"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clm")]  # no progress bars
    assert len(err) == 1 and err[0].startswith("clm train: error: --dial: ") and "not a usable dial name" in err[0]


@pytest.mark.slow
def test_clm_train_dial_beside_fixed_other_dials(tmp_path, capsys):
    """--with-dial loads a saved dial, --fixed-alpha holds it while --dial trains: at 0 the trained dial is the
    one trained alone, at 0.5 it is not (the policy and reference both carry the other dial's shift)."""
    from clm_ext.cli import main
    from clm_ext.storage import read_layer

    _, common = _train_cli_args(tmp_path)
    assert main([*common, "--out", str(tmp_path / "positive"), "--dial", "positive", "--lr", "5e-2"]) == 0
    assert main([*common, "--out", str(tmp_path / "alone"), "--dial", "concise"]) == 0
    beside = ["--dial", "concise", "--with-dial", str(tmp_path / "positive")]
    assert main([*common, "--out", str(tmp_path / "at0"), *beside]) == 0
    assert main([*common, "--out", str(tmp_path / "at05"), *beside, "--fixed-alpha", "positive=0.5"]) == 0
    alone, at0, at05 = (read_layer(str(tmp_path / name))[1] for name in ("alone", "at0", "at05"))
    torch.testing.assert_close(at0, alone, rtol=1e-5, atol=1e-6)
    assert (at05["weight"] - alone["weight"]).abs().max() > 1e-4
    capsys.readouterr()
    for bad, message in (
        (["--fixed-alpha", "positive=1"], "--with-dial and --fixed-alpha set the other dials while one trains"),
        (["--dial", "concise", "--fixed-alpha", "kind=1"], "--fixed-alpha kind: not a dial loaded with --with-dial"),
        (["--dial", "positive", "--with-dial", str(tmp_path / "positive")],
         f"--with-dial {tmp_path / 'positive'}: it holds the dial 'positive', the one --dial trains"),
    ):
        assert main([*common, "--out", str(tmp_path / "bad"), *bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clm")]
        assert len(err) == 1 and err[0].startswith(f"clm train: error: {message}"), err
        assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# clm serve with dict alphas.


@pytest.fixture(scope="module")
def served_dials(tmp_path_factory):
    """A `clm serve` subprocess on a tiny model with two named dials (one file of both), and a reference copy."""
    from serve_helpers import running_server

    root = tmp_path_factory.mktemp("serve_dials")
    tiny_causal_lm("llama").save_pretrained(root / "model")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "model")
    model = dial_model("llama", seed=30)
    for name in ("positive", "concise"):  # strong enough to change greedy completions
        perturb_(alignment_site(model).dial(name), 40 + len(name), scale=0.4)
    clm_ext.save_alignment(model, root / "layer")
    with running_server(root) as (base, _, _):
        yield {"base": base, "model": model, "tok": tok}


@pytest.mark.serve
def test_serve_mixed_dial_vectors_in_concurrent_requests_equal_generate_alone(served_dials):
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=served_dials["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)
    models = client.models.list()
    assert models.data[0].model_extra["dials"] == ["positive", "concise"]
    words = "the cat is happy and the dog sings but the moon falls".split()
    prompts = [" ".join(words[:3 + i]) for i in range(8)]
    alphas = [{"positive": 1.5, "concise": -0.5}, {"concise": 2.0}, {}, {"positive": -1.0, "concise": 0.7},
              {"positive": 3.0}, {"positive": 0.5, "concise": 0.5}, {"concise": -1.5}, {"positive": 2.0, "concise": 2.0}]

    def complete(pa):
        prompt, alpha = pa
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"alpha": alpha})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(complete, zip(prompts, alphas)))
    texts = []
    for prompt, alpha, response in zip(prompts, alphas, responses):
        expected = clm_ext.generate(served_dials["model"], served_dials["tok"], [prompt], alphas=[alpha],
                                    max_new_tokens=6, do_sample=False)[0]
        assert response.choices[0].text == expected, (prompt, alpha)
        assert response.model_extra["alpha"] == {"positive": alpha.get("positive", 0.0),
                                                 "concise": alpha.get("concise", 0.0)}
        texts.append(response.choices[0].text)
    # the dials change the output: the same prompt at two vectors
    one, other = (complete((prompts[4], a)).choices[0].text for a in ({"positive": 3.0}, {"concise": -1.5}))
    assert one != other


@pytest.mark.serve
@pytest.mark.parametrize("alpha, param, message", [
    (1.0, "alpha", "object of dial alphas.*'positive', 'concise'"),
    ({"sincere": 1.0}, "alpha", "'sincere'.*does not have"),
    ({"positive": 9.0}, "alpha['positive']", r"alpha\['positive'\] must lie in the server's --alpha-range"),
    ({"concise": "high"}, "alpha['concise']", "must be a number"),
])
def test_serve_bad_dial_alphas_are_400s_naming_the_field(served_dials, alpha, param, message):
    import re

    import httpx

    response = httpx.post(served_dials["base"] + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "the cat", "max_tokens": 2, "alpha": alpha})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and re.search(message, error["message"]), error
    assert httpx.get(served_dials["base"] + "/health", timeout=10).status_code == 200
    good = httpx.post(served_dials["base"] + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "the cat", "max_tokens": 2, "alpha": {"concise": 0.5}})
    assert good.status_code == 200 and good.json()["alpha"] == {"positive": 0.0, "concise": 0.5}
