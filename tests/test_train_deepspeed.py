"""CLMDPOTrainer under `accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml` on two CPU
processes (DeepSpeed's CPU accelerator, gloo): ZeRO-2 shards the layer's gradients and optimizer state, ZeRO-3
the parameters too (the frozen base included). The layer's gradients equal the single-process full-batch ones,
`save_alignment` gathers the partitioned layer, and a plain unsharded model that loads it gives the DeepSpeed
model's logits. Skipped where deepspeed is not installed.

This file is also the worker script that `accelerate launch` runs (see `worker`).
"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_train_distributed import build_trainer, free_port, leave  # noqa: E402
from test_train_fsdp import PROBE  # noqa: E402


def worker(out_dir, stage):
    """Each rank: 2 steps on 2 pairs, the first step's full gradients, the gathered layer, and probe logits."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file

    import clm_ext

    first_grads = {}
    engine_step = DeepSpeedEngine.step

    def keep_first_gradients(engine, *args, **kwargs):
        """accelerate runs the engine's backward and step back to back, so the reduced (and, under ZeRO,
        partitioned) gradients are only readable here, just before the step."""
        if not first_grads:
            first_grads.update({f"grad.{n}": safe_get_full_grad(p).clone()
                                for n, p in engine.module.named_parameters() if p.requires_grad})
        return engine_step(engine, *args, **kwargs)

    DeepSpeedEngine.step = keep_first_gradients
    # max_grad_norm: the example configs clip at 1.0, and the Trainer refuses a config that disagrees with it
    # (the tiny model's gradient norm is ~0.1, so nothing is clipped).
    trainer = build_trainer(os.path.join(out_dir, "trainer"), per_device_batch=2, max_grad_norm=1.0)
    assert trainer.is_deepspeed_enabled
    # DeepSpeed keeps parameters under 1e5 values whole on every rank (stage3_param_persistence_threshold); the
    # tiny model's would all stay whole, so partition everything, as a real model's layer (d*d >= 0.5M) is.
    trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
        "stage3_param_persistence_threshold"] = 0
    trainer.train()
    assert trainer.deepspeed.zero_optimization_stage() == int(stage)
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    if int(stage) == 3:  # the base and the layer are partitioned: this process holds a slice of each
        assert all(p.numel() == 0 and p.ds_numel > 0 for p in clm_ext.model.alignment_parameters(model))
    clm_ext.save_alignment(model, os.path.join(out_dir, "layer"), is_main_process=rank == 0)
    model.eval()
    with torch.no_grad():
        logits = model(PROBE).logits.float()
    save_file({**first_grads, "logits": logits}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    leave(trainer)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_cpu_processes(tmp_path, stage):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    import clm_ext
    from helpers import tiny_causal_lm

    path = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", os.path.join(ROOT, "examples", "accelerate", f"deepspeed_zero{stage}.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               os.path.abspath(__file__), str(tmp_path), str(stage)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    errors = "\n".join(line for line in done.stderr.splitlines() if "warn" not in line.lower())
    assert done.returncode == 0, errors[-6000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    single = build_trainer(str(tmp_path / "single"), per_device_batch=4)
    single.model.train()
    single.compute_loss(single.model, single.data_collator([single.train_dataset[i] for i in range(4)])).backward()
    full_batch = {f"grad.{n}": p.grad for n, p in single.model.named_parameters() if p.requires_grad}
    assert ranks[0].keys() == ranks[1].keys() == full_batch.keys() | {"logits"}
    for key, grad in full_batch.items():
        torch.testing.assert_close(ranks[0][key], grad, rtol=1e-4, atol=1e-6, msg=key)
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    plain = clm_ext.load_alignment(tiny_causal_lm("llama"), str(tmp_path / "layer"))
    clm_ext.set_alpha(plain, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(plain(PROBE).logits, ranks[0]["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain(PROBE).logits, ranks[1]["logits"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(clm_ext.model.alignment_parameters(plain)[0],
                           clm_ext.model.alignment_parameters(single.model)[0])  # it moved from the start


if __name__ == "__main__":
    worker(*sys.argv[1:])
