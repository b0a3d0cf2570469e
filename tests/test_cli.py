"""The `clm` command line used carelessly: every error of every command is one line, `clm COMMAND: error: ...`
naming the argument, exit code 2, no traceback; no output directory may be, contain or lie inside an input (even
with --force), and --force replaces files of the same names and deletes nothing (checked before any work)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_causal_lm, tiny_tokenizer
from transformers import AutoModelForCausalLM

import clm_ext
from clm_ext.cli import COMMANDS, USAGE_EXIT_CODE, main
from clm_ext.model import alignment_parameters

ROWS = [{"prompt": "the cat", "chosen": " is happy today", "rejected": " is sad"},
        {"prompt": "a dog", "chosen": " sings", "rejected": " hate the moon"}]


def clm(capsys, *argv):
    """Exit code and stderr lines of `clm ARGV` run in this process (SystemExit as the interpreter reports it)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    progress = ("%|", "Warning", "warnings.warn")  # progress bars and library warnings are not the error
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not any(p in line for p in progress)]
    return rc, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == USAGE_EXIT_CODE
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(("clm: error: ", *(f"clm {c}: error: " for c in COMMANDS))), err[0]
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved base model with its tokenizer, a trained-looking layer for it, and a preference file."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    clm_ext.add_alignment_control(model)
    with torch.no_grad():
        for p in alignment_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    clm_ext.save_alignment(model, root / "layer")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _tree(directory):
    """Every file under `directory` with its bytes."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


# ------------------------------------------------------------------------------------------------
# clm merge --out


def test_merge_refuses_a_file_as_out(workspace, capsys, tmp_path):
    target = tmp_path / "merged.txt"
    target.write_text("mine")
    rc, err = clm(capsys, "merge", "--model", workspace / "base", "--alignment", workspace / "layer", "--out", target)
    assert_one_line_error(rc, err, "--out", "not a directory")
    assert target.read_text() == "mine"


def test_merge_never_overwrites_the_base_model_or_a_non_empty_directory(workspace, capsys, tmp_path):
    base = workspace / "base"
    before = _tree(base)
    for extra in ([], ["--force"]):  # the base model's own directory: refused even with --force
        rc, err = clm(capsys, "merge", "--model", base, "--alignment", workspace / "layer", "--out", base, *extra)
        assert_one_line_error(rc, err, "--out", "is the --model", "apart from the inputs")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("mine")
    rc, err = clm(capsys, "merge", "--model", base, "--alignment", workspace / "layer", "--out", other)
    assert_one_line_error(rc, err, "--out", "non-empty", "--force")
    assert _tree(base) == before and (other / "config.json").read_text() == "mine"
    assert clm(capsys, "merge", "--model", base, "--alignment", workspace / "layer", "--out", other, "--force")[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(other)  # --force: written into it
    assert merged.config.model_type == "qwen2"


# ------------------------------------------------------------------------------------------------
# clm train --out, checked before training


@pytest.mark.parametrize("kind", ["file", "non-empty directory"])
def test_train_refuses_an_unusable_out_before_training(workspace, capsys, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):  # --force cannot make a non-layer directory hold a layer
        rc, err = clm(capsys, "train", "--model", workspace / "base", "--dataset", workspace / "prefs.jsonl",
                      "--out", out, "--max-steps", 1, *extra)
        assert_one_line_error(rc, err, "--out")
    assert not (tmp_path / "out-checkpoints").exists()  # refused before the trainer was made
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "mine"


def test_train_replaces_a_saved_layer_only_with_force(workspace, capsys, tmp_path):
    out = tmp_path / "out"
    clm_ext.save_alignment(clm_ext.add_alignment_control(tiny_causal_lm("qwen2")), out)  # the identity
    (out / "notes.txt").write_text("mine")
    args = ["train", "--model", workspace / "base", "--dataset", workspace / "prefs.jsonl", "--out", out,
            "--max-steps", 1, "--lr", 0.05, "--batch-size", 2, "--max-length", 32, "--layer", "linear"]
    rc, err = clm(capsys, *args)
    assert_one_line_error(rc, err, "holds a saved alignment layer", "--force")
    assert not (tmp_path / "out-checkpoints").exists()
    rc, _ = clm(capsys, *args, "--force")
    assert rc == 0
    trained = clm_ext.load_alignment(AutoModelForCausalLM.from_pretrained(workspace / "base"), out)
    layer = clm_ext.model.alignment_layer(trained)
    assert not torch.equal(layer.weight, torch.eye(32))  # the new, trained layer replaced the identity
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").is_file()


def test_train_defaults_to_the_block_layer_at_the_demos_learning_rate(workspace, capsys, tmp_path, monkeypatch):
    """The layer a user trains by default is the one the demo measured best and clm serve serves, at the rate
    the demo trains it with (read from the demo's config, so the two cannot drift apart)."""
    import clm_ext.train
    from clm_ext.demo.pipeline import DemoConfig

    made = {}

    def record(method, model, config, *args, **kwargs):
        made.update(method=method, site=clm_ext.model.alignment_site(model), lr=config.learning_rate)
        raise KeyboardInterrupt  # stop before training: only the defaults are under test

    monkeypatch.setattr(clm_ext.train, "make_dpo_trainer", record)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--model", str(workspace / "base"), "--dataset", str(workspace / "prefs.jsonl"),
              "--out", str(tmp_path / "out")])
    assert made["method"] == "clm" and made["site"].layer_kind == "block"
    assert made["lr"] == DemoConfig.real().lr["clm/block"]
    made.clear()
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--model", str(workspace / "base"), "--dataset", str(workspace / "prefs.jsonl"),
              "--out", str(tmp_path / "out2"), "--layer", "linear"])
    assert made["site"].layer_kind == "linear" and made["lr"] == DemoConfig.real().lr["clm/linear"]


def test_train_names_invalid_utf8_and_all_rows_too_long(workspace, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    rc, err = clm(capsys, "train", "--model", workspace / "base", "--dataset", bad, "--out", tmp_path / "o1")
    assert_one_line_error(rc, err, "line 2 is not valid UTF-8")
    rc, err = clm(capsys, "train", "--model", workspace / "base", "--dataset", workspace / "prefs.jsonl",
                  "--out", tmp_path / "o2", "--max-length", 2, "--max-steps", 1)
    assert_one_line_error(rc, err, "every row of --dataset", "--max-length 2")


# ------------------------------------------------------------------------------------------------
# clm demo --out, argument errors, and the real entry point


def test_demo_refuses_a_non_empty_out_before_running(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    rc, err = clm(capsys, "demo", "--quick", "--out", tmp_path)
    assert_one_line_error(rc, err, "--out", "non-empty", "--force")
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("argv, fragments", [
    (["generate", "--alpha", "nan", "--prompt", "a"], ["argument --alpha", "finite", "'nan'"]),
    (["generate", "--alpha", "1e999", "--prompt", "a"], ["argument --alpha", "finite"]),
    (["generate", "--prompt", ""], ["argument --prompt", "empty"]),
    (["generate", "--prompt", "a"], ["--model"]),
    (["merge", "--alpha", "x", "--out", "o"], ["argument --alpha", "'x'"]),
    (["train", "--beta", "-1", "--dataset", "d", "--out", "o"], ["argument --beta", "> 0"]),
    (["demo", "--alphas", "0,nan"], ["--alphas", "finite"]),
    (["demo", "--optim", "clm/linear=adamx"], ["--optim", "'adamx'", "not an optimizer"]),
    (["demo", "--optim", "clm=sgd"], ["--optim", "METHOD=NAME"]),
    (["demo", "--loss-type", "sigmoid,bogus"], ["--loss-type", "unknown bogus", "'ipo'"]),
    (["demo", "--loss-type", "sigmoid,sft", "--loss-weights", "1"], ["--loss-weights", "one weight per --loss-type (2)"]),
    (["demo", "--identity-decay", "-1"], ["--identity-decay", ">= 0"]),
    (["demo", "--dials", "positive"], ["--dials", "two different dials", "['positive']"]),
    (["demo", "--dials", "positive,happy"], ["--dials", "unknown dial(s) ['happy']", "positive, concise"]),
    (["demo", "--dials", "positive,concise", "--dataset", "d.jsonl"], ["--dataset", "own on-policy pairs"]),
    (["demo", "--dials", "positive,concise", "--alphas", "-1,2"], ["--alphas", "must hold 0 and 1"]),
    (["demo", "--dials", "positive,concise", "--baselines", "full"], ["--baselines", "--dials"]),
    (["demo", "--dials", "positive,concise", "--variants", "block/embed"], ["--variants", "--dials"]),
    (["train", "--optim", "adamx", "--dataset", "d", "--out", "o"], ["argument --optim", "'adamx'"]),
])
def test_bad_arguments_are_one_line(workspace, capsys, argv, fragments):
    if "--model" not in fragments:
        argv = [argv[0], "--model", str(workspace / "base"), *argv[1:]]
    rc, err = clm(capsys, *argv)
    assert_one_line_error(rc, err, *fragments)


def test_a_missing_model_directory_is_one_line(capsys, tmp_path):
    for command in (["generate", "--prompt", "a"], ["merge", "--alignment", "x", "--out", tmp_path / "o"],
                    ["train", "--dataset", "d.jsonl", "--out", tmp_path / "o"]):
        rc, err = clm(capsys, *command, "--model", tmp_path / "missing")
        assert_one_line_error(rc, err, "--model", "no such directory")


@pytest.mark.slow
def test_the_clm_command_reports_a_bad_layer_without_a_traceback(workspace, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "alignment_config.json").write_text("[1, 2")
    proc = subprocess.run([sys.executable, "-m", "clm_ext.cli", "generate", "--model", str(workspace / "base"),
                           "--alignment", str(broken), "--prompt", "the cat"], capture_output=True, text=True,
                          timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert err[-1].startswith("clm generate: error: load_alignment:") and "is not valid JSON" in err[-1], err


# ------------------------------------------------------------------------------------------------
# One error path: every command, an argparse error and an error found while running, the same one line and code


@pytest.mark.parametrize("argv, fragments", [
    (["generate", "--model", "{base}", "--prompt", "a", "--sample", "--top-p", "5"], ["argument --top-p", "(0, 1]"]),
    (["generate", "--model", "{nomodel}", "--prompt", "a"], ["--model", "no config.json in"]),
    (["generate", "--model", "", "--prompt", "a"], ["argument --model", "empty"]),
    (["train", "--model", "{base}", "--dataset", "{prefs}", "--out", "{tmp}/o", "--eval-steps", "2"],
     ["--eval-steps needs --eval-dataset"]),
    (["train", "--model", "{base}", "--dataset", "{prefs}", "--out", "{tmp}/o", "--resume", "{tmp}/none"],
     ["--resume", "does not exist"]),
    (["train", "--model", "{base}", "--dataset", "", "--out", "{tmp}/o"], ["argument --dataset", "empty"]),
    (["demo", "--toy", "--quick", "--alphas", "", "--out", "{tmp}/o"], ["--alphas", "finite numbers", "''"]),
    (["demo", "--toy", "--quick", "--variants", "", "--out", "{tmp}/o"], ["--variants", "comma-separated names"]),
    (["demo", "--toy", "--dpo-steps", "0", "--out", "{tmp}/o"], ["--dpo-steps must be >= 1"]),
    (["merge", "--model", "{base}", "--out", "{tmp}/o"], ["--alignment DIR is required"]),
    (["merge", "--model", "{base}", "--alignment", "{layer}"], ["the following arguments are required: --out"]),
    (["bench", "nosuch"], ["argument script", "invalid choice"]),
    (["serve", "--port", "0", "--alpha-range", "3,1"], ["--alpha-range", "LOW <= HIGH"]),
    (["serve", "--port", "0", "--max-queue", "0"], ["--max-queue must be >= 1"]),
    (["export-vllm", "--model", "{base}", "--alignment", "{layer}", "--out", "{tmp}/o", "--default-alpha", "nan"],
     ["--default-alpha", "finite"]),
    (["export-vllm", "--model", "{base}", "--alignment", "{nomodel}", "--out", "{tmp}/o"],
     ["not a saved alignment layer"]),
    (["nosuch"], ["argument command", "invalid choice"]),
])
def test_every_command_reports_a_user_error_in_one_line_with_the_documented_code(workspace, capsys, tmp_path, argv,
                                                                                 fragments):
    (tmp_path / "nomodel").mkdir()
    paths = {"base": workspace / "base", "layer": workspace / "layer", "prefs": workspace / "prefs.jsonl",
             "nomodel": tmp_path / "nomodel", "tmp": tmp_path}
    rc, err = clm(capsys, *[a.format(**paths) for a in argv])
    assert_one_line_error(rc, err, *fragments)
    command = argv[0] if argv[0] in COMMANDS else None
    assert err[0].startswith(f"clm {command}: error: " if command else "clm: error: ")
    assert sorted(os.listdir(tmp_path)) == ["nomodel"]  # nothing was written


def test_the_entry_point_exits_with_the_documented_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clm_ext.cli", "demo", "--alphas", "1,,2"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == USAGE_EXIT_CODE == 2
    assert proc.stderr == "clm demo: error: --alphas: expected comma-separated finite numbers, got '1,,2'\n"


# ------------------------------------------------------------------------------------------------
# Output directories apart from the inputs; --force deletes nothing


@pytest.fixture(scope="module")
def trained(workspace):
    """`clm train` for 2 steps with a checkpoint after each (fewer steps than --logging-steps: nothing logged)."""
    import io
    from contextlib import redirect_stdout

    out = workspace / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        rc = main(["train", "--model", str(workspace / "base"), "--dataset", str(workspace / "prefs.jsonl"),
                   "--out", str(out), "--max-steps", "2", "--save-steps", "1", "--batch-size", "2",
                   "--max-length", "32", "--lr", "0.05"])
    assert rc == 0
    return out, printed.getvalue()


def test_train_summary_has_no_empty_parts_when_nothing_was_logged(trained):
    out, printed = trained
    assert [line for line in printed.splitlines() if line.startswith("clm train:")] == [
        f"clm train: clm done after 2 steps; wrote {out}"]


WRITERS = {  # command -> (arguments besides --out, the inputs among them)
    "merge": (["--model", "{base}", "--alignment", "{layer}"], ("base", "layer")),
    "export-vllm": (["--model", "{base}", "--alignment", "{layer}"], ("base", "layer")),
    "train": (["--model", "{base}", "--dataset", "{prefs}", "--eval-dataset", "{evals}", "--resume", "{checkpoint}",
               "--max-steps", "3", "--max-length", "32"], ("base", "prefs", "evals", "checkpoint")),
    "train --method full": (["--model", "{base}", "--dataset", "{prefs}", "--max-steps", "1", "--method", "full"],
                            ("base", "prefs")),
    "demo": (["--model", "{base}", "--dataset", "{prefs}", "--quick"], ("base", "prefs")),
}
CASES = [(command, name, relation) for command, (_, inputs) in WRITERS.items() for name in inputs
         for relation in ("equal to", "containing", "inside")]


@pytest.mark.parametrize("command, name, relation", CASES)
def test_no_command_writes_over_its_inputs_even_with_force(workspace, trained, capsys, command, name, relation):
    (workspace / "evals.jsonl").write_text((workspace / "prefs.jsonl").read_text())
    for folder in ("", "base", "layer"):
        (workspace / folder / "important.txt").write_text("mine")
    paths = {"base": workspace / "base", "layer": workspace / "layer", "prefs": workspace / "prefs.jsonl",
             "evals": workspace / "evals.jsonl", "checkpoint": workspace / "run-checkpoints" / "checkpoint-2"}
    target = paths[name]
    out = {"equal to": target, "containing": target.parent, "inside": target / "sub"}[relation]
    before = _tree(workspace)
    argv, _ = WRITERS[command]
    rc, err = clm(capsys, *command.split(), *[a.format(**paths) for a in argv], "--out", out, "--force")
    assert_one_line_error(rc, err, "--out")
    assert _tree(workspace) == before  # every input file and every unrelated file, byte for byte


@pytest.mark.parametrize("command", ["merge", "export-vllm"])
def test_force_replaces_files_of_the_same_names_and_deletes_nothing(workspace, capsys, tmp_path, command):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("important.txt", "sub/notes.txt", "config.json"):
        (out / name).write_text("mine")
    args = [command, "--model", workspace / "base", "--alignment", workspace / "layer", "--out", out]
    rc, err = clm(capsys, *args)
    assert_one_line_error(rc, err, "--out", "non-empty", "--force", "nothing else is deleted")
    assert clm(capsys, *args, "--force")[0] == 0
    assert (out / "important.txt").read_text() == "mine" and (out / "sub" / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"  # replaced: the written one
    assert not [n for n in os.listdir(tmp_path) if n != "out"]  # no staging directory left beside it


def test_new_output_directories_honour_the_umask(workspace, capsys, tmp_path):
    old = os.umask(0o022)
    try:
        for command in ("merge", "export-vllm"):
            out = tmp_path / command
            assert clm(capsys, command, "--model", workspace / "base", "--alignment", workspace / "layer",
                       "--out", out)[0] == 0
            assert os.stat(out).st_mode & 0o777 == 0o755, command
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------
# --resume over damaged checkpoints


def _damaged_copy(trained, tmp_path, name, content):
    import shutil

    out, _ = trained
    checkpoints = tmp_path / "run-checkpoints"
    shutil.copytree(f"{out}-checkpoints", checkpoints)
    (checkpoints / "checkpoint-2" / name).write_bytes(content)
    return checkpoints


@pytest.mark.parametrize("name, content, reason", [
    ("optimizer.pt", b"garbage, not a torch file", "optimizer.pt is not a readable torch.save file"),
    ("trainer_state.json", b"{}", "trainer_state.json has no valid 'global_step'"),
    ("clm_checkpoint.json", b"{not json", "clm_checkpoint.json is not readable JSON"),
])
def test_resume_skips_a_damaged_checkpoint_or_names_the_file(workspace, trained, capsys, tmp_path, name, content,
                                                             reason):
    checkpoints = _damaged_copy(trained, tmp_path, name, content)
    common = ["train", "--model", workspace / "base", "--dataset", workspace / "prefs.jsonl", "--max-steps", 3,
              "--batch-size", 2, "--max-length", 32, "--checkpoint-dir", checkpoints]
    rc, err = clm(capsys, *common, "--out", tmp_path / "named", "--resume", checkpoints / "checkpoint-2")
    assert_one_line_error(rc, err, "--resume", str(checkpoints / "checkpoint-2" / name), reason)
    assert not (tmp_path / "named").exists()
    assert main([str(a) for a in common + ["--out", tmp_path / "latest", "--resume"]]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'checkpoint-1'} (skipped partial checkpoint-2: " in printed
    assert reason in printed and (tmp_path / "latest" / "alignment_config.json").is_file()
