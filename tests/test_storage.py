"""Saved alignment layers on disk: nothing of the user's is lost, a kill at any step or a concurrent save never
leaves a reader without a complete layer, malformed files are refused by name, format-1 layers still load."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_causal_lm
from safetensors.torch import save_file

import clm_ext
from clm_ext import storage
from clm_ext.model import alignment_layer, alignment_parameters, alignment_site


def _model(seed):
    """A tiny llama with a layer whose weights depend on `seed` (so two saves are told apart)."""
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _layer(model):
    return {k: v.clone() for k, v in alignment_layer(model).state_dict().items()}


def _loaded(directory):
    """The layer state a fresh model gets from `directory`."""
    return _layer(clm_ext.load_alignment(tiny_causal_lm("llama"), directory))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_format_1(model, directory):
    """What clm-ext 0.1.0 wrote: alignment.safetensors and a format-1 config side by side."""
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _layer(model).items()}, os.path.join(directory, "alignment.safetensors"))
    info = {"format_version": 1, "clm_ext_version": "0.1.0", "model_type": "llama", "hidden_size": 32,
            "mode": "embed", "layer": "linear", "dtype": "float32", "num_parameters": 32 * 33}
    with open(os.path.join(directory, "alignment_config.json"), "w") as f:
        json.dump(info, f)


def _user_files(directory):
    """Files of the user's beside a layer: a base checkpoint, a tokenizer, notes, a folder."""
    files = {"config.json": '{"model_type": "llama"}', "model.safetensors": "base weights",
             "tokenizer.json": "{}", "notes.txt": "mine", os.path.join("sub", "more.txt"): "also mine"}
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return files


def _assert_user_files_kept(directory, files):
    for name, text in files.items():
        with open(os.path.join(directory, name)) as f:
            assert f.read() == text, name


def _layer_files(directory):
    return sorted(n for n in os.listdir(directory) if storage.is_layer_file(n))


# ------------------------------------------------------------------------------------------------
# Nothing of the user's is lost; permissions, symlinks and long names.


@pytest.mark.parametrize("previous", ["format 1", "format 2"])
def test_save_replaces_only_the_layers_own_files(tmp_path, previous):
    target = str(tmp_path / "layer")
    (_save_format_1 if previous == "format 1" else clm_ext.save_alignment)(_model(1), target)
    files = _user_files(target)
    model = _model(2)
    clm_ext.save_alignment(model, target)
    _assert_user_files_kept(target, files)
    assert os.path.isdir(os.path.join(target, "sub"))
    assert _same(_loaded(target), _layer(model))
    names = _layer_files(target)
    assert names[0] == ".alignment.lock" and names[2] == "alignment_config.json"
    assert names[1].startswith("alignment-") and len(names) == 3  # format 1's alignment.safetensors is gone
    assert sorted(os.listdir(tmp_path)) == ["layer"]  # nothing written beside the directory


def test_format_1_layers_still_load(tmp_path):
    model = _model(3)
    _save_format_1(model, tmp_path / "old")
    assert _same(_loaded(tmp_path / "old"), _layer(model))
    assert clm_ext.model.read_alignment_config(tmp_path / "old")["format_version"] == 1


def test_saved_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        target = clm_ext.save_alignment(_model(1), tmp_path / "shared")
    finally:
        os.umask(previous)
    assert os.stat(target).st_mode & 0o777 == 0o755
    for name in os.listdir(target):
        assert os.stat(os.path.join(target, name)).st_mode & 0o777 == 0o644, name


def test_a_symlink_to_a_directory_is_followed_not_replaced(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for seed in (1, 2):  # into an empty directory, then over the first layer
        model = _model(seed)
        clm_ext.save_alignment(model, link)
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert _same(_loaded(real), _layer(model))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="symlink to nothing"):
        clm_ext.save_alignment(model, dangling)


def test_a_very_long_directory_name_saves(tmp_path):
    model = _model(1)
    target = tmp_path / ("x" * 250)  # NAME_MAX is 255: no prefix or suffix may be added to this name
    clm_ext.save_alignment(model, target)
    clm_ext.save_alignment(model, target)
    assert _same(_loaded(target), _layer(model))


def test_a_file_or_a_foreign_config_is_never_overwritten(tmp_path):
    model = _model(1)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):
        clm_ext.save_alignment(model, tmp_path / "file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "alignment_config.json").write_text('{"something": "else"}')
    with pytest.raises(FileExistsError, match="not a readable layer"):
        clm_ext.save_alignment(model, foreign)
    assert (tmp_path / "file").read_text() == "mine"
    assert os.listdir(foreign) == ["alignment_config.json"]


# ------------------------------------------------------------------------------------------------
# A kill at every step of a save; concurrent savers and readers.


class Killed(BaseException):
    """Stands for SIGKILL: no except clause catches it and nothing is cleaned up after it."""


def _kill_at(monkeypatch, step, when):
    """Make the `step`-th file-system operation of a save raise Killed before it, after it, or half-way
    through writing a file ("during", only for file writes). Returns a counter list."""
    calls = [0]

    def wrap(owner, name):
        real = getattr(owner, name)

        def operation(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step and when == "before":
                raise Killed
            if calls[0] == step and when == "during" and name == "_write_new":
                with open(args[0], "xb") as f:
                    f.write(args[1][: len(args[1]) // 2])
                raise Killed
            result = real(*args, **kwargs)
            if calls[0] == step and when == "after":
                raise Killed
            return result

        monkeypatch.setattr(owner, name, operation)

    for name in ("makedirs", "open", "fsync", "replace", "remove"):
        wrap(os, name)
    wrap(storage, "_write_new")
    return calls


@pytest.mark.parametrize("previous", ["none", "format 1", "format 2"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_layer(tmp_path, monkeypatch, previous):
    old, new, after = _model(1), _model(2), _model(3)
    step = 0
    while True:
        step += 1
        for when in ("before", "during", "after"):
            target = str(tmp_path / f"{step}-{when}")
            if previous != "none":
                (_save_format_1 if previous == "format 1" else clm_ext.save_alignment)(old, target)
                files = _user_files(target)
            with monkeypatch.context() as m:
                calls = _kill_at(m, step, when)
                try:
                    clm_ext.save_alignment(new, target)
                    killed = False
                except Killed:
                    killed = True
            if previous == "none" and not os.path.exists(os.path.join(target, "alignment_config.json")):
                with pytest.raises(FileNotFoundError, match="not a saved alignment layer"):
                    _loaded(target)
            else:
                seen = _loaded(target)
                assert _same(seen, _layer(new)) or (killed and _same(seen, _layer(old))), (step, when)
            clm_ext.save_alignment(after, target)  # the next save cleans up what the kill left
            assert _same(_loaded(target), _layer(after))
            assert len(_layer_files(target)) == 3 and sorted(os.listdir(tmp_path / f"{step}-{when}")) == sorted(
                _layer_files(target) + (["config.json", "model.safetensors", "notes.txt", "sub", "tokenizer.json"]
                                        if previous != "none" else []))
            if previous != "none":
                _assert_user_files_kept(target, files)
        if calls[0] < step:  # the save finished before reaching this step: every step was tried
            break
    assert step > 8


CONCURRENT = textwrap.dedent("""
    import json, sys, time
    import torch
    sys.path.insert(0, sys.argv[5])
    from helpers import tiny_causal_lm
    import clm_ext
    from clm_ext.model import alignment_layer

    role, directory, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    layer = alignment_layer(model)
    counts = {"done": 0, "errors": []}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if role == "save":  # every value of save k is the same number, unique to this process and k
                with torch.no_grad():
                    for p in layer.parameters():
                        p.fill_(seed * 100000 + counts["done"])
                clm_ext.save_alignment(model, directory)
            else:
                clm_ext.load_alignment(model, directory)
                values = {float(v) for p in layer.parameters() for v in p.detach().flatten()}
                assert len(values) == 1, f"a mix of saves: {sorted(values)[:4]}"
            counts["done"] += 1
        except Exception as e:
            counts["errors"].append(f"{type(e).__name__}: {e}")
    print(json.dumps(counts))
""")


@pytest.mark.slow
def test_concurrent_saves_and_loads_never_fail_or_mix(tmp_path):
    """Two processes saving and two loading the same directory for 3 s: every load is one whole save."""
    target = str(tmp_path / "layer")
    first = _model(0)
    with torch.no_grad():
        for p in alignment_parameters(first):
            p.fill_(0.0)
    clm_ext.save_alignment(first, target)
    roles = ["save", "save", "load", "load"]
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, role, target, "3", str(i + 1), tests],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, role in enumerate(roles)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    for role, result in zip(roles, results):
        assert result["errors"] == [], (role, len(result["errors"]), result["errors"][:3])
        assert result["done"] > 0, role
    assert sorted(os.listdir(tmp_path)) == ["layer"] and len(os.listdir(target)) == 3


# ------------------------------------------------------------------------------------------------
# Malformed files are refused by name, and a failed load leaves the model as it was.


def _rewrite_config(directory, change):
    path = os.path.join(directory, "alignment_config.json")
    info = json.load(open(path))
    with open(path, "w") as f:
        f.write(change(info))


BAD_CONFIGS = {
    "invalid JSON": (lambda info: json.dumps(info)[:-3], "not valid JSON"),
    "a list": (lambda info: json.dumps([info]), "must hold a JSON object, got a list"),
    "no format_version": (lambda info: json.dumps({k: v for k, v in info.items() if k != "format_version"}),
                          "has no format_version"),
    "a newer format_version": (lambda info: json.dumps({**info, "format_version": 3}), "has format_version 3"),
    "no layer": (lambda info: json.dumps({k: v for k, v in info.items() if k != "layer"}), "needs 'layer'"),
    "no mode": (lambda info: json.dumps({k: v for k, v in info.items() if k != "mode"}), "needs 'mode'"),
    "an unknown layer": (lambda info: json.dumps({**info, "layer": "conv"}), "layer='conv'"),
    "an unknown mode": (lambda info: json.dumps({**info, "mode": "both"}), "mode='both'"),
    "weights outside the directory": (lambda info: json.dumps({**info, "weights": "../x.safetensors"}), "needs 'weights'"),
}


def _assert_untouched(model, before, wrapped):
    assert (alignment_site(model) is not None) == wrapped
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["grad"]
    assert _same({n: p.detach() for n, p in model.named_parameters()}, before["params"])


def _snapshot(model):
    return {"grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_malformed_config_names_the_file_and_leaves_the_model_alone(tmp_path, case):
    change, message = BAD_CONFIGS[case]
    target = clm_ext.save_alignment(_model(1), tmp_path / "layer")
    _rewrite_config(target, change)
    for model, wrapped in ((tiny_causal_lm("llama"), False), (_model(2), True)):
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message) as error:
            clm_ext.load_alignment(model, target)
        assert os.path.join(target, "alignment_config.json") in str(error.value)
        _assert_untouched(model, before, wrapped)


BAD_TENSORS = {
    "NaN": (lambda t: {**t, "weight": t["weight"].clone().index_fill_(0, torch.tensor([3]), float("nan"))},
            "'weight' holds 32 NaN or infinite"),
    "inf": (lambda t: {**t, "bias": t["bias"].clone().fill_(float("inf"))}, "'bias' holds 32 NaN or infinite"),
    "integer": (lambda t: {**t, "weight": t["weight"].to(torch.int32)}, "'weight' has dtype torch.int32"),
    "float64 beyond float32": (lambda t: {**t, "weight": t["weight"].to(torch.float64).index_fill_(0, torch.tensor([3]),
                                                                                                  1e300)},
                               r"'weight' holds 32 value\(s\) that are not finite in torch.float32"),
    "wrong shape": (lambda t: {**t, "weight": t["weight"][:16]}, "do not fit"),
    "missing tensor": (lambda t: {"weight": t["weight"]}, "do not fit"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_weights_are_refused_and_leave_the_model_alone(tmp_path, case):
    change, message = BAD_TENSORS[case]
    target = clm_ext.save_alignment(_model(1), tmp_path / "layer")
    weights = os.path.join(target, storage.read_config(target)["weights"])
    from safetensors.torch import load_file

    save_file({k: v.contiguous() for k, v in change(load_file(weights)).items()}, weights)
    for model, wrapped in ((tiny_causal_lm("llama"), False), (_model(2), True)):
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            clm_ext.load_alignment(model, target)
        _assert_untouched(model, before, wrapped)


def test_a_config_naming_missing_weights_is_a_clear_error(tmp_path):
    target = clm_ext.save_alignment(_model(1), tmp_path / "layer")
    os.remove(os.path.join(target, storage.read_config(target)["weights"]))
    with pytest.raises(FileNotFoundError, match="not a complete alignment layer.*which is missing"):
        _loaded(target)


# ------------------------------------------------------------------------------------------------
# Finite in the dtype the weights are used in, not only as stored


def _overflowing_layer(directory, dtype, value):
    """A layer saved from a model whose layer has `dtype`, one weight entry set to `value` (finite in `dtype`)."""
    model = clm_ext.add_alignment_control(tiny_causal_lm("llama").to(dtype))
    with torch.no_grad():
        alignment_layer(model).weight[0, 0] = value
    return clm_ext.save_alignment(model, directory)


@pytest.mark.parametrize("saved, value, used", [(torch.float64, 1e300, torch.float32),
                                                (torch.float64, 1e300, torch.bfloat16),
                                                (torch.float32, 3.4e38, torch.bfloat16)])
def test_a_weight_that_overflows_the_models_dtype_is_refused(tmp_path, saved, value, used):
    """Finite as saved, inf in the dtype the model uses it in (a bfloat16 table mixes the float32 linear layer
    in bfloat16): refused by name, the model left as it was (its alpha-0 logits still the base model's)."""
    target = _overflowing_layer(tmp_path / "layer", saved, value)
    assert storage.read_layer(target)[1]["weight"].dtype == saved  # the file itself is consistent
    model = tiny_causal_lm("llama").to(used)
    ids = torch.tensor([[2, 5, 6, 7]])
    base = model(ids).logits
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"'weight' holds 1 value\(s\) that are not finite in {used}"):
        clm_ext.load_alignment(model, target)
    _assert_untouched(model, before, wrapped=False)
    assert torch.equal(model(ids).logits, base)
    same = clm_ext.load_alignment(tiny_causal_lm("llama").to(saved), target)  # in its own dtype it loads
    assert float(alignment_layer(same).weight[0, 0]) == float(torch.tensor(value, dtype=saved))


def test_an_export_refuses_a_layer_that_overflows_the_served_dtype(tmp_path):
    from clm_ext.vllm_export import export_for_vllm

    base = tmp_path / "base"
    tiny_causal_lm("llama").save_pretrained(base)
    target = _overflowing_layer(tmp_path / "layer", torch.float64, 1e300)
    with pytest.raises(ValueError, match=r"--alignment: the layer in .* not finite in torch.float32"):
        export_for_vllm(str(base), target, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_empty_path_is_refused_not_taken_for_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clm_ext.save_alignment(_model(1), tmp_path)  # a layer here: "" must still not save over it or load it
    before = _layer_files(tmp_path), open(tmp_path / "alignment_config.json").read()
    for call in (lambda: clm_ext.save_alignment(_model(2), ""), lambda: clm_ext.load_alignment(_model(2), ""),
                 lambda: clm_ext.model.read_alignment_config("")):
        with pytest.raises(ValueError, match="expected a path, got an empty one"):
            call()
    assert (_layer_files(tmp_path), open(tmp_path / "alignment_config.json").read()) == before
