"""Triton adapter for the voice encoder: reference audio (+ transcript) -> voice prompt tensors."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tts_engine import backend
from tts_engine.model import load_model
from tts_engine.prompts import build_prompt


class TritonPythonModel:
    def initialize(self, args):
        self.log = backend.setup_logging("voice_encoder")
        params = backend.model_parameters(args)
        self.loaded = load_model(*backend.model_location(args, params))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                audio = backend.read_array(pb_utils, request, "audio").reshape(-1)
                sample_rate = int(backend.read_array(pb_utils, request, "sample_rate").reshape(-1)[0])
                ref_text = backend.read_string(pb_utils, request, "ref_text")
                prompt = build_prompt(self.loaded.tts, audio, sample_rate, ref_text)
                ref_code = (np.zeros((0, 16), np.int32) if prompt.ref_code is None
                            else prompt.ref_code.numpy().astype(np.int32))
                blob = prompt.to_bytes({"model_fingerprint": self.loaded.fingerprint})
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("spk_embedding", prompt.spk_embedding.numpy().astype(np.float32)),
                    pb_utils.Tensor("ref_code", ref_code),
                    pb_utils.Tensor("prompt", np.array([blob], dtype=np.object_)),
                ]))
            except Exception as exc:
                self.log.info("voice prompt refused: %s", exc)
                responses.append(backend.error_response(pb_utils, exc))
        return responses
