"""`clm generate` and `clm train` put a prompt in the tokenizer's chat template when it has one (an instruct
model answers a user turn; given raw text it may return nothing), and `--no-chat-template` turns that off."""
import pytest
import torch

import clm_ext
from helpers import tiny_causal_lm, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


def _chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompt_renders_a_user_turn_and_gets_no_second_bos():
    tok = _chat_tokenizer()
    rendered = clm_ext.chat_prompt(tok, "the cat sleeps")
    assert rendered == "<s> user the cat sleeps </s> <s> assistant "
    assert clm_ext.chat_prompt(tok, "the cat sleeps", chat=False) == "the cat sleeps"
    assert clm_ext.chat_prompt(tiny_tokenizer(), "the cat sleeps") == "the cat sleeps"  # no template: as it is

    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    seen = []
    original = model.generate
    model.generate = lambda **kw: seen.append(kw["input_ids"]) or original(**kw)
    clm_ext.generate(model, tok, [rendered, rendered], alphas=[0.0, 1.0], max_new_tokens=2, do_sample=False)
    ids = seen[0][0].tolist()
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"] and ids.count(tok.bos_token_id) == 2


@pytest.mark.parametrize("flag", [[], ["--no-chat-template"]])
def test_cli_generate_applies_the_chat_template_unless_told_not_to(tmp_path, monkeypatch, flag):
    from clm_ext.cli import main

    tiny_causal_lm("llama").save_pretrained(tmp_path / "m")
    _chat_tokenizer().save_pretrained(tmp_path / "m")
    captured = {}

    def fake_generate(model, tokenizer, prompts, alphas=None, **kwargs):
        captured.update(prompts=prompts, alphas=alphas)
        return ["x"] * len(prompts)

    monkeypatch.setattr(clm_ext, "generate", fake_generate)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "the dog", "--alpha", "0", "2", *flag]) == 0
    expected = "the dog" if flag else "<s> user the dog </s> <s> assistant "
    assert captured == {"prompts": [expected, expected], "alphas": [0.0, 2.0]}


def test_cli_generate_names_a_bad_model_in_one_line(capsys):
    from clm_ext.cli import main

    for bad in ("no/such/model", "no-such-model"):  # a missing path; a name that is no packaged model
        assert main(["generate", "--model", bad, "--prompt", "hi"]) == 2
        message = capsys.readouterr().err
        assert message.startswith("clm generate: error: --model") and bad in message and message.count("\n") == 1


def test_train_turns_plain_rows_into_one_conversation_turn():
    from datasets import Dataset

    from clm_ext.cli.train import as_conversations

    plain = Dataset.from_list([{"prompt": "review the hotel", "chosen": " lovely stay", "rejected": " awful stay "}])
    chat = as_conversations(plain)
    assert chat[0]["prompt"] == [{"role": "user", "content": "review the hotel"}]
    assert chat[0]["chosen"] == [{"role": "assistant", "content": "lovely stay"}]
    assert chat[0]["rejected"] == [{"role": "assistant", "content": "awful stay"}]
    assert as_conversations(chat) is chat  # already conversational: untouched
