"""CLMDPOTrainer under `accelerate launch --config_file examples/accelerate/fsdp.yaml` (FSDP2) on two CPU
processes (gloo): every decoder block and the root are sharded, only the layer trains; its gradients equal the
single-process full-batch ones; `save_alignment` gathers the sharded layer, and a plain unsharded model that
loads it gives the sharded model's logits. Also with bf16 mixed precision, as FSDP users set it.

accelerate forms FSDP only on accelerators: AcceleratorState applies the FSDP plugin when the process group is
MULTI_GPU/XPU/NPU/..., never MULTI_CPU. torch's `fully_shard` itself runs on CPU over gloo, so the worker shows
the gloo group to AcceleratorState as MULTI_GPU (`fsdp_on_cpu`, with the Trainer's documented
`accelerator_config={"use_configured_state": True}` so it keeps that state); from then on it is accelerate's own
FSDP2 path (fsdp2_prepare_model, the plugin of the launch config).

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
from test_train_distributed import build_trainer, free_port, keep_first_gradients, leave  # noqa: E402

PROBE = torch.tensor([[2, 5, 6, 9, 12, 7], [2, 8, 4, 11, 3, 10]])


def fsdp_on_cpu():
    """Let AcceleratorState apply the launch config's FSDP plugin to a gloo CPU group (see the module doc)."""
    from accelerate.state import DistributedType, PartialState

    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU, state
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def worker(out_dir, resume=None):
    """Each rank: 2 steps on 2 pairs (a layer-only checkpoint after each; or resumed from `resume`), the first
    step's full gradients, the gathered layer, and probe logits."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import clm_ext

    keep, first_grads = keep_first_gradients(lambda p: p.grad.full_tensor())
    fsdp_on_cpu()
    trainer = build_trainer(os.path.join(out_dir, "trainer"), per_device_batch=2, callbacks=[keep],
                            bf16=os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16",
                            accelerator_config={"use_configured_state": True}, save_strategy="steps", save_steps=1)
    plugin = trainer.accelerator.state.fsdp_plugin
    assert trainer.is_fsdp_enabled and plugin.fsdp_version == 2, trainer.accelerator.state
    if os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16":
        assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16, plugin.mixed_precision_policy
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    assert {"", "model.layers.0", "model.layers.1"} <= set(sharded), sharded
    print(f"FSDP units: {sharded}")
    layer = dict(clm_ext.model.alignment_layer(model).named_parameters())
    assert all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in layer.values())
    assert all(p.dtype == torch.float32 for p in layer.values())  # fp32 master weights, also under bf16
    clm_ext.save_alignment(model, os.path.join(out_dir, "layer"), is_main_process=rank == 0)
    model.eval()
    with torch.no_grad():
        logits = model(PROBE).logits.float()
    save_file({**first_grads, "logits": logits}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    leave(trainer)


def launch(precision, *worker_args):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml` of this file on 2 CPU processes."""
    path = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", os.path.join(ROOT, "examples", "accelerate", "fsdp.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", precision,
               os.path.abspath(__file__), *map(str, worker_args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    errors = "\n".join(line for line in done.stderr.splitlines() if "warn" not in line.lower())
    assert done.returncode == 0, errors[-6000:]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_fsdp2_two_cpu_processes(tmp_path, precision):
    from safetensors.torch import load_file

    import clm_ext
    from helpers import tiny_causal_lm

    launch(precision, tmp_path)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    # Reference: one process, the whole 4-pair batch, fp32 (bf16 runs are compared at a bf16 tolerance).
    single = build_trainer(str(tmp_path / "single"), per_device_batch=4)
    single.model.train()
    single.compute_loss(single.model, single.data_collator([single.train_dataset[i] for i in range(4)])).backward()
    full_batch = {f"grad.{n}": p.grad for n, p in single.model.named_parameters() if p.requires_grad}
    tolerance = dict(rtol=1e-4, atol=1e-6) if precision == "no" else dict(rtol=0.1, atol=2e-3)
    for key, grad in full_batch.items():
        torch.testing.assert_close(ranks[0][key], grad, **tolerance, msg=key)
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # The gathered layer in a plain, unsharded model gives the sharded model's logits.
    plain = clm_ext.load_alignment(tiny_causal_lm("llama"), str(tmp_path / "layer"))
    clm_ext.set_alpha(plain, 1.0)
    assert all(p.dtype == torch.float32 for p in clm_ext.model.alignment_parameters(plain))
    with torch.no_grad():
        if precision == "no":
            torch.testing.assert_close(plain(PROBE).logits, ranks[0]["logits"], rtol=1e-5, atol=1e-6)
        else:  # the sharded model computed in bf16 (params cast by FSDP's MixedPrecisionPolicy)
            plain_bf16 = clm_ext.load_alignment(tiny_causal_lm("llama").to(torch.bfloat16), str(tmp_path / "layer"))
            clm_ext.set_alpha(plain_bf16, 1.0)
            torch.testing.assert_close(plain_bf16(PROBE).logits.float(), ranks[0]["logits"], rtol=0.05, atol=0.05)
    trained = single.model
    assert not torch.equal(clm_ext.model.alignment_parameters(plain)[0],
                           clm_ext.model.alignment_parameters(trained)[0])  # it moved from the start

    # Layer-only checkpoints under FSDP: resumed from step 1, the sharded run ends on the same layer, bit for bit.
    checkpoint = tmp_path / "trainer" / "checkpoint-1"
    assert not any(name.startswith(("model", "pytorch_model")) for name in os.listdir(checkpoint))
    if precision == "no":
        launch(precision, tmp_path / "resumed", checkpoint)
        final, resumed = (clm_ext.model.alignment_parameters(clm_ext.load_alignment(tiny_causal_lm("llama"),
                          str(d / "layer"))) for d in (tmp_path, tmp_path / "resumed"))
        assert all(torch.equal(a, b) for a, b in zip(final, resumed))


if __name__ == "__main__":
    worker(*sys.argv[1:])
