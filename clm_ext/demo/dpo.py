"""One DPO run of the demo through the project's trainers (`clm_ext.train.make_dpo_trainer`).

The CLM layer and the baselines (full fine-tuning with a reference copy, LoRA) get the same pairs, the same
DPOConfig apart from the learning rate, and the same number of steps, so their rewards compare.
"""
import time
from dataclasses import dataclass

import torch
from transformers import PrinterCallback, TrainerCallback


@dataclass
class DPOResult:
    model: object
    seconds: float
    steps: int
    step_seconds: float        # mean wall time of one optimizer step
    trainable_params: int
    peak_memory_mb: float      # CUDA peak allocated during training; None on CPU (not measurable per run)
    mean_loss: float           # training loss averaged over all steps


class _Progress(TrainerCallback):
    """Advance the demo's own stage bar instead of the Trainer's bar."""

    def __init__(self, progress):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


def dpo_config(output_dir: str, steps: int, batch_size: int, lr: float, beta: float, seed: int, device: str,
               max_length: int, optim: str = "adamw_torch", loss_type=("sigmoid",), loss_weights=None):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, optim=optim,
        loss_type=list(loss_type), loss_weights=None if loss_weights is None else list(loss_weights),
        lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps // 10), beta=beta, seed=seed,
        data_seed=seed, max_length=max_length, use_cpu=device == "cpu", bf16=False,
        activation_checkpointing=False, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        # the reference log-probs are scored once per pair, not at every visit of a pair (several epochs)
        precompute_ref_log_probs=True,
    )


class DecayToStart(TrainerCallback):
    """Decoupled weight decay of the trained weights towards where they started, after every optimizer step:
    w -= lr * rate * (w - w0). For the alignment layer the start is the identity (the linear layer's W = I, the
    block's zeroed output projections), so the decay pulls the dial towards the base model, not towards zero
    weights as AdamW's own decay would."""

    def __init__(self, rate: float):
        self.rate = rate
        self.start = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # the trainer has frozen everything but the layer by now
        self.start = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        shrink = lr_scheduler.get_last_lr()[0] * self.rate
        with torch.no_grad():
            for p, start in self.start:
                p.sub_(shrink * (p - start))


def train(method: str, model, tokenizer, dataset, args, progress=None, merge_lora: bool = True,
          identity_decay: float = 0.0, dial: str = None) -> DPOResult:
    """Train `model` (wrapped beforehand for method "clm") with DPO; returns it with timings. A LoRA adapter is
    merged into the weights unless `merge_lora` is False (then the PEFT model comes back, for scaling it).
    identity_decay: the rate of `DecayToStart` (method "clm" only; 0 = off). dial: train that named dial alone
    (method "clm" only; CLMDPOTrainer's `dial`)."""
    from clm_ext.train import make_dpo_trainer

    if identity_decay and method != "clm":
        raise ValueError(f"identity_decay: only for method 'clm' (the layer starts at the identity), got {method!r}")
    if dial is not None and method != "clm":
        raise ValueError(f"dial: only method 'clm' trains a named dial, got {method!r}")
    callbacks = [_Progress(progress)] if progress is not None else []
    if identity_decay:
        callbacks.append(DecayToStart(identity_decay))
    extra = {} if dial is None else {"dial": dial}
    trainer = make_dpo_trainer(method, model, args, train_dataset=dataset, processing_class=tokenizer,
                               callbacks=callbacks, **extra)
    trainer.remove_callback(PrinterCallback)  # the stage bar shows the loss; no log dicts on stdout
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cuda = torch.cuda.is_available() and args.use_cpu is False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - begin
    steps = output.global_step
    trained = trainer.model
    if method == "lora" and merge_lora:
        trained = trained.merge_and_unload()
    trained.eval()
    return DPOResult(
        model=trained,
        seconds=seconds,
        steps=steps,
        step_seconds=seconds / max(1, steps),
        trainable_params=trainable,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        mean_loss=output.training_loss,
    )
