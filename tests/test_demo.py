"""The demo: corpus, tokenizer, judge, pairs and fluency measures (fast), and `clm demo --quick` end to end."""
import json
import math
import os

import pytest
import torch

from clm_ext.demo.corpus import make_corpus, make_prompts
from clm_ext.demo.judge import mean_and_stderr, reward
from clm_ext.demo.pairs import make_pairs
from clm_ext.demo.pipeline import parse_variant
from clm_ext.demo.sweep import distinct_n


def test_corpus_is_balanced_seeded_and_judged_as_labelled():
    reviews = make_corpus(400, seed=3)
    assert sum(r.label == "pos" for r in reviews) == 200
    assert make_corpus(400, seed=3) == reviews
    assert make_corpus(400, seed=4) != reviews
    pos = [reward(r.completion) for r in reviews if r.label == "pos"]
    neg = [reward(r.completion) for r in reviews if r.label == "neg"]
    assert sum(pos) / len(pos) > 0.4 and sum(neg) / len(neg) < -0.4
    assert len({r.text for r in reviews}) > 350  # varied, not a handful of templates repeated


def test_prompts_are_distinct_and_sentiment_neutral():
    prompts = make_prompts(300, seed=1)
    assert len(set(prompts)) == 300
    assert all(reward(p) == 0.0 for p in prompts)
    with pytest.raises(ValueError, match="distinct prompts"):
        make_prompts(5000, seed=1)


def test_tokenizer_round_trips_and_splits_at_word_boundaries():
    from clm_ext.demo.tokenizer import train_tokenizer

    reviews = make_corpus(2000, seed=0)
    tok = train_tokenizer([r.text for r in reviews], vocab_size=512)
    text = reviews[0].text
    assert tok.decode(tok(text)["input_ids"]) == text
    # TRL tokenizes prompt + completion together; the prompt's tokens must be a prefix of them.
    prompt_ids = tok(reviews[0].prompt)["input_ids"]
    assert tok(text)["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tok("great")["input_ids"] != tok(" great")["input_ids"]
    assert len(tok(" great")["input_ids"]) == 1  # corpus words are whole tokens


def test_judge_orders_sentiment_and_stderr_is_right():
    assert reward("what a wonderful , lovely film .") > 0.5 > -0.5 > reward("an awful , boring film .")
    assert reward("the room") == 0.0
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4))
    assert mean_and_stderr([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="empty"):
        mean_and_stderr([])
    with pytest.raises(TypeError, match="text"):
        reward(3)


def test_pairs_take_best_and_worst_per_prompt_and_drop_small_margins():
    prompts = ["a", "a", "a", "b", "b"]
    completions = [" was fine .", " was wonderful and lovely .", " was awful .", " was ok .", " was ok ."]
    rows = make_pairs(prompts, completions, min_margin=0.3)
    assert rows == [{"prompt": "a", "chosen": " was wonderful and lovely .", "rejected": " was awful ."}]
    assert len(make_pairs(prompts, completions, min_margin=0.0)) == 2
    with pytest.raises(ValueError, match="completions"):
        make_pairs(prompts, completions[:2], min_margin=0.3)


def test_distinct_n_and_variant_names():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0
    assert parse_variant("block/logits") == ("block", "logits")
    with pytest.raises(ValueError, match="variants"):
        parse_variant("linear")


@pytest.mark.slow
def test_clm_demo_quick_end_to_end(tmp_path):
    """The README's command at smoke-test size: every stage runs and every output is written."""
    from clm_ext.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--toy", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# clm demo on toy")
    assert os.path.getsize(out / "reward_vs_alpha.png") > 10_000
    alphas = results["alphas"]
    assert {-1.0, 0.0, 1.0, 2.0, 3.0} <= set(alphas)
    assert len(results["reward"]) == len(results["reward_stderr"]) == len(alphas)
    assert set(results["variants"]) == {"linear/embed", "linear/logits", "block/logits"}
    assert set(results["baselines"]) == {"full", "lora"}
    for variant in results["variants"].values():
        assert [row["alpha"] for row in variant["sweep"]] == alphas
        for row in variant["sweep"]:
            assert -1 <= row["reward"] <= 1 and row["perplexity"] > 1 and 0 < row["distinct_2"] <= 1
        assert variant["train"]["trainable_params"] > 0
    train = {name: v["train"]["trainable_params"] for name, v in {**results["variants"], **results["baselines"]}.items()}
    assert train["linear/embed"] < train["full"] and train["lora"] < train["full"]
    assert results["timings"]["pretrain"] > 0 and results["pairs"] > 0


def test_requests_are_distinct_neutral_and_train_eval_disjoint():
    from clm_ext.demo.requests import SUBJECTS, make_requests

    train, held_out = make_requests(200, "train", seed=0), make_requests(100, "eval", seed=0)
    assert len(set(train)) == 200 and len(set(held_out)) == 100
    assert make_requests(200, "train", seed=0) == train and make_requests(200, "train", seed=1) != train
    train_subjects = {s for pair in SUBJECTS.values() for s in pair[0]}
    eval_subjects = {s for pair in SUBJECTS.values() for s in pair[1]}
    assert not train_subjects & eval_subjects
    assert all(any(s in r for s in eval_subjects) for r in held_out)
    assert not any(s in r for r in train for s in eval_subjects)
    asks = {"good", "bad", "great", "positive", "negative", "love", "hate", "best", "worst", "praise", "complain"}
    assert not any(asks & set(r.lower().strip(".").split()) for r in train + held_out)  # nothing asks for a verdict
    with pytest.raises(ValueError, match="split"):
        make_requests(3, "test", seed=0)
    with pytest.raises(ValueError, match="distinct eval requests"):
        make_requests(10_000, "eval", seed=0)


def test_heldout_judge_is_textblob_and_orders_sentiment():
    from clm_ext.demo.judge import heldout_reward

    assert heldout_reward("A wonderful, lovely hotel.") > 0.5 > -0.5 > heldout_reward("An awful, terrible hotel.")
    assert heldout_reward("The room has a door.") == 0.0
    # a word VADER scores but TextBlob's lexicon does not: the judges differ, so one can be gamed alone
    assert reward("yay") > 0 and heldout_reward("yay") == 0.0
    with pytest.raises(TypeError, match="text"):
        heldout_reward(None)


def test_fluency_measures():
    from clm_ext.demo.sweep import mean_words, repeated_ngram_share, unknown_word_share

    looping = "the food was good and the food was good and"
    assert repeated_ngram_share([looping, "a b c d e", "x y"], 4) == pytest.approx(1 / 3)
    assert repeated_ngram_share(["The food was good. the food was good"], 4) == 1.0  # case-insensitive
    assert unknown_word_share(["The hotel was lovely"]) == 0.0
    assert unknown_word_share(["a bowl of nerf makes a first-class nawes Kalerenbeiderfleufe"]) == pytest.approx(3 / 10)
    assert mean_words(["a b c", "d"]) == 2.0 and mean_words([]) == 0.0


def test_spearman_and_checks_on_a_known_sweep():
    from clm_ext.demo.report import checks, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254)  # ties get their mean rank
    alphas = [-1.0, 0.0, 1.0, 2.0, 3.0]
    vader, blob = [-0.2, 0.1, 0.5, 0.6, 0.55], [0.0, 0.1, 0.2, 0.19, 0.3]
    row = lambda v, b, p: {"reward": v, "heldout_reward": b, "perplexity": p, "repeated_4gram": 0.1,
                           "unknown_words": 0.01}
    results = {"alphas": alphas, "base": row(0.1, 0.1, 10.0), "baselines": {"full": row(0.7, 0.35, 12.0)},
               "variants": {"linear/embed": {"sweep": [row(v, b, p) for v, b, p in
                                                       zip(vader, blob, [9, 10, 12, 20, 40])]}}}
    c = checks(results)["linear/embed"]
    assert c["monotone_alpha_-1_to_2"] and c["spearman_alpha_-1_to_2"] == pytest.approx(1.0)
    assert c["gain_vs_full_at_alpha_1"] == pytest.approx(0.4 / 0.6) and c["alpha_2_beats_1"]
    h = c["heldout"]
    assert not h["monotone_alpha_-1_to_2"] and not h["alpha_2_beats_1"] and h["best_alpha"] == 3.0
    assert h["spearman_alpha_-1_to_2"] == pytest.approx(0.8) and h["gain_vs_full_at_alpha_1"] == pytest.approx(0.4)
    assert c["max_perplexity_ratio_alpha_le_1.5"] == pytest.approx(1.2)


def test_negative_alpha_lists_parse_with_a_space():
    from clm_ext.cli import _attach_list_values

    assert _attach_list_values(["demo", "--alphas", "-1,0,1", "--out", "x"]) == ["demo", "--alphas=-1,0,1", "--out", "x"]
    assert _attach_list_values(["demo", "--alphas", "-.5,1"]) == ["demo", "--alphas=-.5,1"]
    assert _attach_list_values(["demo", "--alphas", "0,1", "--quick"]) == ["demo", "--alphas", "0,1", "--quick"]


def test_each_method_trains_with_its_own_learning_rate_and_optimizer(monkeypatch):
    """`--lr METHOD=LR` and `--optim METHOD=NAME` reach that method's DPOConfig and no other's; the loss types
    reach every method's, the identity decay only the CLM layer's training."""
    from clm_ext.demo import pipeline
    from clm_ext.cli.demo import _learning_rates, _optimizers

    seen = {}
    monkeypatch.setattr(pipeline.dpo, "train", lambda method, model, tokenizer, dataset, args, progress=None,
                        identity_decay=None: seen.setdefault(method, (args.learning_rate, args.optim.value,
                                                                      args.loss_type, args.loss_weights,
                                                                      identity_decay)))
    base = pipeline.DemoConfig.real()
    cfg = pipeline.DemoConfig.real(lr={**base.lr, **_learning_rates(["clm/linear=0.03"])},
                                   optim={**base.optim, **_optimizers(["clm/linear=sgd"])},
                                   loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5), identity_decay=30.0)
    for key in ("clm/linear", "full"):
        pipeline._train(cfg, key, None, None, None, pipeline._Stages(), key)
    assert seen == {"clm": (0.03, "sgd", ["sigmoid", "sft"], [1.0, 0.5], 30.0),
                    "full": (base.lr["full"], "adamw_torch", ["sigmoid", "sft"], [1.0, 0.5], None)}


def test_identity_decay_pulls_the_trained_weights_towards_their_start():
    """w -= lr * rate * (w - w0) after a step, for the weights that train only."""
    from types import SimpleNamespace

    from clm_ext.demo.dpo import DecayToStart

    layer, frozen = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(layer, frozen)
    decay = DecayToStart(rate=4.0)
    decay.on_train_begin(None, None, None, model=model)
    start_w, start_frozen = layer.weight.detach().clone(), frozen.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn(3, 3))
        frozen.weight.add_(1.0)
    moved, moved_frozen = layer.weight.detach().clone(), frozen.weight.detach().clone()
    decay.on_step_end(None, None, None, lr_scheduler=SimpleNamespace(get_last_lr=lambda: [0.05]))
    torch.testing.assert_close(layer.weight, moved - 0.2 * (moved - start_w))
    assert torch.equal(frozen.weight, moved_frozen) and not torch.equal(moved_frozen, start_frozen)
