"""CLMDPOTrainer under `accelerate launch` with DDP on two CPU processes (gloo): the layer's gradients are
all-reduced (both ranks hold the full-batch gradient a single process computes) and its weights stay identical.

This file is also the worker script that `accelerate launch` runs (see `worker`).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [
    {"prompt": "the cat", "chosen": " is happy today", "rejected": " is sad"},
    {"prompt": "a dog", "chosen": " sings", "rejected": " hate the moon"},
    {"prompt": "the sun", "chosen": " shines here and there", "rejected": " falls"},
    {"prompt": "a bird", "chosen": " is very good", "rejected": " is not good but bad"},
]


def build_trainer(out_dir, per_device_batch, callbacks=None, **options):
    """The same model (layer moved off the identity), data and options on every rank and in the test; `options`
    override DPOConfig fields."""
    from helpers import tiny_causal_lm, tiny_tokenizer
    from trl import DPOConfig

    import clm_ext
    from clm_ext.preferences import validate_preferences
    from clm_ext.train import CLMDPOTrainer

    model = clm_ext.add_alignment_control(tiny_causal_lm("llama"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    args = DPOConfig(**{**dict(output_dir=out_dir, report_to="none", per_device_train_batch_size=per_device_batch,
                               learning_rate=1e-2, max_steps=2, max_grad_norm=0.0, logging_steps=1,
                               save_strategy="no", use_cpu=True, bf16=False, max_length=32, disable_tqdm=True,
                               seed=0), **options})
    return CLMDPOTrainer(model, args=args, train_dataset=validate_preferences(ROWS),
                         processing_class=tiny_tokenizer(), callbacks=callbacks)


def keep_first_gradients(full_grad):
    """A Trainer callback keeping each trainable parameter's gradient of the first step, read by
    `full_grad(param)` (under FSDP a DTensor gathered whole); returns the callback and the dict it fills."""
    from transformers import TrainerCallback

    grads = {}

    class KeepFirstGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                grads.update({f"grad.{n}": full_grad(p).clone() for n, p in model.named_parameters() if p.requires_grad})

    return KeepFirstGradients(), grads


def worker(out_dir):
    """Run by each rank: train 2 steps with 2 pairs per rank, save the first step's gradients and the weights."""
    from safetensors.torch import save_file

    keep, first_grads = keep_first_gradients(lambda p: p.grad.detach())
    trainer = build_trainer(os.path.join(out_dir, "trainer"), per_device_batch=2, callbacks=[keep])
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {f"weight.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    assert world == 2 and trainer.accelerator.distributed_type.value == "MULTI_CPU", trainer.accelerator.state
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    save_file({**first_grads, **weights}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    leave(trainer)


def leave(trainer):
    """End a worker once every rank is done, without interpreter finalization: there, threads of gloo (and of
    DeepSpeed) can abort a run whose results are written (SIGABRT, "terminate called without an active
    exception"; seen in CI under ZeRO-3 even after destroy_process_group)."""
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A free TCP port for the rendezvous, so parallel runs do not collide on accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_synchronise_the_layer(tmp_path):
    from safetensors.torch import load_file

    path = os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    # accelerate's --cpu launcher expects mpirun for several processes; its torchrun launcher (--multi_gpu) on a
    # machine without GPUs (use_cpu=True in the config) gives DistributedType.MULTI_CPU over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", os.path.abspath(__file__), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    errors = "\n".join(line for line in done.stderr.splitlines() if "warn" not in line.lower())
    assert done.returncode == 0, errors[-6000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    # Reference: one process, the whole 4-pair batch (the union of both ranks' first batches).
    single = build_trainer(str(tmp_path / "single"), per_device_batch=4)
    initial = {f"weight.{n}": p.detach().clone() for n, p in single.model.named_parameters() if p.requires_grad}
    single.model.train()
    single.compute_loss(single.model, single.data_collator([single.train_dataset[i] for i in range(4)])).backward()
    full_batch = {f"grad.{n}": p.grad for n, p in single.model.named_parameters() if p.requires_grad}

    assert ranks[0].keys() == ranks[1].keys() == full_batch.keys() | initial.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
    for key, grad in full_batch.items():
        torch.testing.assert_close(ranks[0][key], grad, rtol=1e-4, atol=1e-6, msg=key)
    assert all(not torch.equal(ranks[0][key], w) for key, w in initial.items())


if __name__ == "__main__":
    worker(sys.argv[1])
