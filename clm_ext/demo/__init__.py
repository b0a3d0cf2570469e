"""The end-to-end demo behind `clm demo`: a real instruct model (SmolLM2-135M-Instruct by default, or the tiny
review-writing model trained from scratch with `--toy`), VADER-judged preference pairs from its own samples, DPO
of the alignment layer (and of full fine-tuning / LoRA baselines), and an alpha sweep.
Run it with `clm demo`; `clm_ext.demo.pipeline.run` is the entry point."""
