"""`clm demo --dials`: the concise pairs, the grid's checks on known grids, and the toy run end to end."""
import json

import pytest
import torch
from safetensors.torch import load_file

from clm_ext.demo import sampling
from clm_ext.demo.named_dials import concise_pairs, dial_checks, grid_vectors, is_complete

GRID = (-1.0, 0.0, 0.5, 1.0, 2.0)


def test_concise_pairs_choose_the_shortest_complete_answer_against_the_longest():
    rows = [("p", "Short and done.", True),
            ("p", "Shorter but", False),                                        # cut off: never chosen
            ("p", "A much longer answer that goes on and on about it.", True),
            ("p", "The longest one of all, which the token limit cut off in the", False),
            ("q", "Only cut-off answers here and", False),                       # nothing complete: no pair
            ("q", "and here too, all of them", False),
            ("r", "Done here.", True),
            ("r", "Also done, now.", True)]                                     # gap of 1 word: no pair
    prompts, texts, finished = map(list, zip(*rows))
    assert concise_pairs(prompts, texts, finished) == [
        {"prompt": "p", "chosen": "Short and done.", "rejected": rows[3][1]}]
    assert len(concise_pairs(prompts, texts, finished, min_gap=1)) == 2
    with pytest.raises(ValueError, match="finished"):
        concise_pairs(prompts, texts, finished[:-1])


def test_a_complete_answer_was_ended_by_the_model_on_a_sentence_end():
    assert is_complete("It rained. ", True) and is_complete('"Lovely!"', True)
    assert not is_complete("It rained.", False)      # the token limit cut it, even at a full stop
    assert not is_complete("It rained and", True)    # the model stopped mid-sentence


def test_samples_record_which_rows_the_model_ended(monkeypatch):
    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def batch_decode(self, ids, skip_special_tokens):
            return [" ".join(map(str, row.tolist())) for row in ids]

    new = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    monkeypatch.setattr(sampling, "_generate", lambda *args: new)
    model = torch.nn.Linear(1, 1)
    drawn = sampling.sample(model, Tok(), ["a", "b", "c"], 1, seed=0, max_new_tokens=3)
    assert drawn.finished == [True, False, True]


def _cells(reward, words):
    """Grid cells with the judges given as functions of (positive alpha, concise alpha)."""
    return [{"reward": reward(v["positive"], v["concise"]), "mean_words": words(v["positive"], v["concise"])}
            for v in grid_vectors(("positive", "concise"), GRID)]


def test_dial_checks_on_a_grid_with_known_effects():
    # positive: +0.3 VADER per unit, +0.5 words per unit; concise: -4 words per unit, +0.02 VADER per unit
    cells = _cells(lambda p, c: 0.1 + 0.3 * p + 0.02 * c, lambda p, c: 20 + 0.5 * p - 4 * c)
    checks = dial_checks(("positive", "concise"), GRID, cells)
    pos, con = checks["positive"], checks["concise"]
    assert pos["effect_at_1"] == pytest.approx(0.3) and con["effect_at_1"] == pytest.approx(4.0)
    assert pos["spearman"] == pytest.approx(1.0) and con["spearman"] == pytest.approx(1.0) and pos["monotone"]
    # positive at 1 adds half a word: -0.5 on concise's judge (words removed), 1/8 of concise's own effect
    assert pos["cross_effect_on_concise"] == pytest.approx(-0.5) and pos["cross_share"] == pytest.approx(0.125)
    assert con["cross_effect_on_positive"] == pytest.approx(0.02) and con["cross_share"] == pytest.approx(0.02 / 0.3)
    assert pos["independent"] and con["independent"]
    # at (1, 1): VADER 0.32 over 0.3 alone; words removed 3.5 of 4
    assert pos["composed_share_at_1_1"] == pytest.approx(0.32 / 0.3)
    assert con["composed_share_at_1_1"] == pytest.approx(3.5 / 4) and con["composes"]


def test_dial_checks_report_a_dial_that_is_not_monotone_independent_or_composable():
    # positive peaks at 1 and falls a little at 2; concise at 1 lowers VADER and shrinks positive's effect
    def reward(p, c):
        if c == 2.0:
            return -0.1 * p  # with concise at 2, the positive dial runs backwards
        return (0.3 * min(p, 1.0) - 0.1 * max(p - 1, 0)) * (1.0 if c <= 0 else 0.1) - 0.25 * min(c, 1.0)

    cells = _cells(reward, lambda p, c: 20 - 4 * c)
    checks = dial_checks(("positive", "concise"), GRID, cells)
    pos, con = checks["positive"], checks["concise"]
    assert pos["spearman"] == pytest.approx(0.9) and pos["monotone"]  # one swap in five: exactly the bar
    assert pos["spearman_min_over_other_dial"] == pytest.approx(-1.0)
    assert con["cross_effect_on_positive"] == pytest.approx(-0.25) and not con["independent"]
    assert pos["composed_share_at_1_1"] == pytest.approx((0.03 - 0.25) / 0.3) and not pos["composes"]
    with pytest.raises(ValueError, match="must hold alpha 1"):
        dial_checks(("positive", "concise"), (-1.0, 0.0, 2.0), cells[:9])


@pytest.mark.slow
def test_clm_demo_dials_on_the_toy_model(tmp_path):
    """`clm demo --toy --quick --dials positive,concise`: both dials trained alone and composed, a 5 x 5 grid."""
    from clm_ext.cli import main

    out = tmp_path / "dials-demo"
    assert main(["demo", "--toy", "--quick", "--dials", "positive,concise", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dials"] == ["positive", "concise"] and results["grid"] == list(GRID)
    assert [c["alpha"] for c in results["cells"]] == grid_vectors(("positive", "concise"), GRID)
    for cell in results["cells"]:
        assert -1 <= cell["reward"] <= 1 and cell["perplexity"] > 1 and cell["n"] == 16 * 2
    assert set(results["checks"]) == {"positive", "concise"}
    hidden = results["per_dial"]["positive"]["train"]["trainable_params"]
    for name, lr in (("positive", 5e-4), ("concise", 1e-4)):
        assert results["per_dial"][name]["lr"] == lr
        assert results["per_dial"][name]["train"]["trainable_params"] == hidden  # d*d + d each
        assert results["per_dial"][name]["file_bytes"] > 4 * hidden
    for row in map(json.loads, (out / "pairs-concise.jsonl").read_text().splitlines()):
        assert len(row["rejected"].split()) - len(row["chosen"].split()) >= 5
        assert row["chosen"].rstrip().endswith((".", "!", "?", '"', ")"))
    # the composed save holds each dial as it was trained alone, bit for bit
    both = load_file(next((out / "dials").glob("*.safetensors")))
    for name in ("positive", "concise"):
        alone = load_file(next((out / f"dial-{name}").glob("*.safetensors")))
        assert torch.equal(both[f"{name}.weight"], alone["weight"]) and torch.equal(both[f"{name}.bias"], alone["bias"])
        assert not torch.equal(alone["weight"], torch.eye(alone["weight"].shape[0]))
    assert (out / "dials_grid.png").stat().st_size > 10_000
    assert "## Checks" in (out / "results.md").read_text()
    # the example at (0, 0) is the base model's own sample with the same random numbers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clm_ext.demo.pipeline import DemoConfig

    cfg = DemoConfig.quick()
    base = AutoModelForCausalLM.from_pretrained(out / "base-model")
    tokenizer = AutoTokenizer.from_pretrained(out / "base-model")
    alone = sampling.sample(base, tokenizer, [results["example_prompt"]], 1, cfg.seed + 2, cfg.max_new_tokens,
                            temperature=cfg.temperature)
    assert results["examples"][0] == {"alpha": {"positive": 0.0, "concise": 0.0}, "completion": alone.completions[0]}


def test_only_the_clm_method_trains_a_named_dial():
    from clm_ext.demo import dpo

    with pytest.raises(ValueError, match="dial: only method 'clm'"):
        dpo.train("full", torch.nn.Linear(1, 1), None, None, None, dial="concise")


def test_each_dial_trains_at_its_own_rate_unless_lr_sets_them_all(monkeypatch, tmp_path):
    from clm_ext.cli import main
    from clm_ext.demo import named_dials

    seen = []

    def stop(cfg, names, out, **kwargs):
        seen.append(kwargs["lr"])
        raise ValueError("stopped before training")

    monkeypatch.setattr(named_dials, "run", stop)
    argv = ["demo", "--toy", "--quick", "--dials", "positive,concise", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert main([*argv, "--lr", "clm/linear=3e-4", "--out", str(tmp_path / "b")]) == 2
    assert seen == [None, {"positive": 3e-4, "concise": 3e-4}]
