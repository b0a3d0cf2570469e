"""DPO for the alignment layer on top of TRL, plus the full fine-tuning and LoRA baselines it is compared with.

`CLMDPOTrainer` is TRL's `DPOTrainer` with one change of substance: the reference policy is the *same* model at
alpha = 0 (the base model, exactly), the policy is that model at alpha = 1, and only the alignment layer trains.
TRL never loads, copies, prepares or shards a second model. Everything else (loss types, DPOConfig options,
evaluation, accelerate DDP / FSDP / DeepSpeed) is TRL's own code path, except checkpoints: they hold the layer,
not the frozen base (see `clm_ext.checkpoints`).
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
from trl import DPOConfig, DPOTrainer

from . import checkpoints
from .model import (
    add_alignment_control,
    alignment_parameters,
    alignment_site,
    alignment_strength,
    load_alignment,
    save_alignment,
    set_alpha,
)
from .versions import TRAINER_TRL, require

METHODS = ("clm", "full", "lora")


class CLMDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer training only the alignment layer, with the model at alpha = 0 as its reference.

    Same constructor as `trl.DPOTrainer` minus `ref_model`. `model` is a causal LM (or a path, loaded as TRL
    does); if it has no alignment layer yet, one is added with `clm_ext.add_alignment_control(model)` (in place,
    the way `peft_config` makes TRL wrap a plain model), which freezes every base weight. The model's alpha is
    set to 1 for training. `peft_config` is refused (use `make_dpo_trainer("lora", ...)` for LoRA) and so is
    `sync_ref_model` (the reference is fixed: it is the base model).

    Named dials: `dial="name"` trains that dial only (added if the model lacks it). The policy is the model
    with that dial at 1 and the others at `fixed_alphas` (a dict; a dial it leaves out is at 0), the reference
    the same model with that dial at 0; every other dial is frozen and keeps its weights bit for bit. Saves
    (save_model, checkpoints) write that dial alone (save_alignment(..., dial=name)).
    """

    def __init__(
        self,
        model,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        dial: str | None = None,
        fixed_alphas: dict | None = None,
    ):
        require("trl", TRAINER_TRL, "CLMDPOTrainer")
        if peft_config is not None:
            raise ValueError(
                "peft_config: CLMDPOTrainer trains the alignment layer, not an adapter; "
                "use clm_ext.train.make_dpo_trainer('lora', ...) for LoRA DPO"
            )
        if args is not None and args.sync_ref_model:
            raise ValueError("args.sync_ref_model: the CLM reference is the base model (alpha = 0) and never moves")
        if isinstance(model, str):
            model = _load_model(model, args, quantization_config)
        elif quantization_config is not None:
            raise ValueError("quantization_config only applies when `model` is a path; the model is already loaded")
        if _is_peft_model(model):
            raise ValueError("model: a PEFT model was given; CLMDPOTrainer needs a plain transformers model")
        site = alignment_site(model)
        if fixed_alphas is not None and dial is None:
            raise ValueError("fixed_alphas: the other dials' alphas only apply when training one dial (dial=...)")
        if dial is not None and (site is None or dial not in (site.dial_names or [])):
            add_alignment_control(model, dials=[dial])
        elif site is None:
            add_alignment_control(model)
        elif site.mode != "embed":
            raise ValueError(
                f"model: the alignment layer is in mode {site.mode!r}; train it in mode 'embed' (at alpha 0 and 1 "
                "both modes are the same network, so the trained layer serves both: "
                "load_alignment(model, dir, mode='logits'))"
            )
        self._clm_dial = dial
        if dial is None:
            policy_alpha, self._clm_reference_alpha = 1.0, 0.0
        else:
            policy_alpha, self._clm_reference_alpha = _dial_alphas(model, dial, fixed_alphas)
        set_alpha(model, policy_alpha)
        _check_only_the_layer_trains(model)
        self._clm_base = checkpoints.describe_base(model)
        super().__init__(
            model=model,
            ref_model=_AlphaZeroReference(self),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._clm_reference_ready = True

    # TRL checks `self.ref_model is not None` to load/prepare/shard a reference model, and calls it to score the
    # reference. While TRL's constructor runs the property reads None (nothing to load, prepare or shard); after
    # that it is the model itself at alpha = 0, so TRL's reference calls (training, evaluation, precompute) need
    # no override.
    @property
    def ref_model(self):
        """The reference policy TRL calls: this trainer's model at alpha = 0 (None during construction)."""
        if self.__dict__.get("_clm_reference_ready"):
            return self.__dict__["_clm_reference"]
        return None

    @ref_model.setter
    def ref_model(self, value):
        if not isinstance(value, _AlphaZeroReference):
            raise AttributeError("CLMDPOTrainer.ref_model is the model itself at alpha = 0 and cannot be replaced")
        self.__dict__["_clm_reference"] = value

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference scoring (used by precompute_ref_log_probs), run at alpha = 0 whatever `model` is."""
        with _reference_mode(self._unwrapped_model(), self._clm_reference_alpha):
            return super().compute_ref_log_probs(model, inputs)

    def _unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ---- Layer-only checkpoints: the Trainer's own optimizer / scheduler / RNG / state files, and the layer in
    # place of the model weights (a 7B base would otherwise add ~14 GB per checkpoint, all of it unchanged).

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; `resume_from_checkpoint=True` takes the newest *complete* checkpoint of output_dir (a
        run killed while writing one leaves it partial) instead of the highest-numbered one."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint, _ = checkpoints.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the alignment layer (save_alignment format), never the frozen base. In a checkpoint (the
        Trainer's internal call) it goes to `alignment/` beside clm_checkpoint.json, which names the base."""
        output_dir = output_dir or self.args.output_dir
        model = self._unwrapped_model()
        target = os.path.join(output_dir, checkpoints.LAYER_DIR) if _internal_call else output_dir
        save_alignment(model, target, dial=self._clm_dial, is_main_process=self.args.should_save)
        if _internal_call and self.args.should_save:
            checkpoints.write_info(output_dir, self._clm_base, model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Under FSDP the Trainer would also write the whole sharded model here; keep only the optimizer part.
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_best_model(self) -> None:
        """load_best_model_at_end: the best checkpoint's layer (the Trainer would look for model weights)."""
        if self.is_deepspeed_enabled:  # DeepSpeed's own checkpoint holds the module state: its loader applies
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the layer of a layer-only checkpoint, after checking it was made on this base and layer kind."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        checkpoints.check_info(resume_from_checkpoint, self._clm_base, model)
        load_alignment(model, os.path.join(resume_from_checkpoint, checkpoints.LAYER_DIR), dial=self._clm_dial)


class _AlphaZeroReference:
    """Callable standing in for TRL's `ref_model`: the trainer's current model, run at alpha = 0."""

    def __init__(self, trainer: CLMDPOTrainer):
        self.trainer = trainer

    def __call__(self, *args, **kwargs):
        with _reference_mode(self.trainer._unwrapped_model(), self.trainer._clm_reference_alpha):
            return self.trainer.model(*args, **kwargs)


def _dial_alphas(model, dial: str, fixed_alphas: dict | None) -> tuple:
    """(policy, reference) alphas for training `dial` alone; only that dial's parameters train."""
    site = alignment_site(model)
    fixed = dict(fixed_alphas or {})
    if dial in fixed:
        raise ValueError(f"fixed_alphas: {dial!r} is the dial being trained (at 1 in the policy, 0 in the reference)")
    for name in site.dial_names:
        site.dial(name).requires_grad_(name == dial)
    return {**fixed, dial: 1.0}, {**fixed, dial: 0.0}


@contextlib.contextmanager
def _reference_mode(model, alpha=0.0):
    """The reference alpha (0; with dials the trained dial at 0) and eval mode (no dropout), as TRL runs an
    explicit reference model; both restored after."""
    was_training = model.training
    model.eval()
    try:
        with alignment_strength(model, alpha):
            yield
    finally:
        model.train(was_training)


def _check_only_the_layer_trains(model) -> None:
    """The reference is the base at alpha = 0, so a trainable base weight would move the reference too."""
    layer = {id(p) for p in alignment_parameters(model)}  # with dials, the frozen dials are frozen base
    if not any(p.requires_grad for p in alignment_parameters(model)):
        raise ValueError("model: the alignment layer's parameters do not require grad; nothing would train")
    base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in layer]
    if base:
        raise ValueError(
            f"model: base parameters require grad ({base[:3]}{'...' if len(base) > 3 else ''}); CLM trains only the "
            "alignment layer and uses the frozen base as its reference. Freeze them, or use make_dpo_trainer('full')"
        )


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def _load_model(path: str, args: DPOConfig | None, quantization_config):
    """Load `path` the way TRL's DPOTrainer does (args.model_init_kwargs, float32 unless told otherwise)."""
    from trl.trainer.utils import create_model_from_path  # here: not every trl release clm-ext installs with has it

    kwargs = dict((args.model_init_kwargs if args is not None else None) or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return create_model_from_path(path, **kwargs)


def make_dpo_trainer(method: str, model, args: DPOConfig, train_dataset, processing_class, eval_dataset=None,
                     **kwargs):
    """A DPO trainer for `method`, so that the CLM layer and its baselines run on the same data and options.

    - "clm":  CLMDPOTrainer (only the alignment layer trains; reference = the same model at alpha = 0).
    - "full": TRL DPOTrainer, every weight trains, with an explicit frozen reference copy of `model` in memory
              (the standard recipe the memory/time targets are measured against).
    - "lora": TRL DPOTrainer with a PEFT LoRA adapter (`peft_config=` in kwargs, default r=8 on all linear
              layers); TRL scores the reference with the adapter disabled.
    `kwargs` go to the trainer's constructor.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    common = dict(args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  processing_class=processing_class, **kwargs)
    if method == "clm":
        return CLMDPOTrainer(model, **common)
    if alignment_site(model) is not None:
        raise ValueError(f"model: method {method!r} needs a plain model, but this one has an alignment layer")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        return DPOTrainer(model, ref_model=reference, **common)
    if "peft_config" not in common:
        common["peft_config"] = default_lora_config()
    return DPOTrainer(model, **common)


def default_lora_config(r: int = 8):
    """LoRA on every linear layer except the LM head (TRL refuses an adapter there), alpha = 2r, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
