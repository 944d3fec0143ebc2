"""Triton adapter for the voice encoder: reference audio (+ transcript) -> voice prompt tensors."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_support import params as config
from triton_support.tensors import error_response, read_array, read_string, response
from tts_contract import tensors as names
from tts_contract.audio import NUM_CODEBOOKS
from tts_engine.loading import load_model
from tts_engine.voices.prompts import build_prompt


class TritonPythonModel:
    def initialize(self, args):
        self.log = config.setup_logging("voice_encoder")
        config.exit_with_parent(self.log)
        params = config.model_parameters(args)
        self.loaded = load_model(*config.model_location(args, params))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                audio = read_array(pb_utils, request, names.AUDIO).reshape(-1)
                sample_rate = int(read_array(pb_utils, request, names.SAMPLE_RATE).reshape(-1)[0])
                ref_text = read_string(pb_utils, request, names.REF_TEXT)
                prompt = build_prompt(self.loaded.tts, audio, sample_rate, ref_text)
                ref_code = (np.zeros((0, NUM_CODEBOOKS), np.int32) if prompt.ref_code is None
                            else prompt.ref_code.numpy().astype(np.int32))
                blob = prompt.to_bytes({"model_fingerprint": self.loaded.fingerprint})
                responses.append(response(pb_utils, {
                    names.SPK_EMBEDDING: prompt.spk_embedding.numpy().astype(np.float32),
                    names.REF_CODE: ref_code, names.PROMPT: np.array([blob], dtype=np.object_)}))
            except Exception as exc:
                self.log.info("voice prompt refused: %s", exc)
                responses.append(error_response(pb_utils, exc))
        return responses
