"""Triton adapter for the word aligner: each request's audio and text -> its words' times and characters (JSON)."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_support import params as config
from triton_support.tensors import error_response, read_array, read_string, response
from tts_contract import tensors as names
from tts_contract.audio import SAMPLE_RATE
from tts_contract.words import encode_words
from tts_engine.alignment import AlignItem, check_item, load_aligner


class TritonPythonModel:
    def initialize(self, args):
        self.log = config.setup_logging("aligner")
        config.exit_with_parent(self.log)
        params = config.model_parameters(args)
        self.aligner = load_aligner(params["aligner_dir"], config.device_for_instance(args, params.get("device", "")),
                                    params.get("dtype") or None)
        # The first alignment pays for lazy set-up (resampling from the gateway's 24 kHz, kernels, caches): 0.85 s
        # on this CPU, which the first interrupt's heard text waited for. Paid here, before the model is ready.
        self.aligner.align_batch([AlignItem(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, "warm up", "English")])

    def _item(self, request) -> AlignItem:
        audio = read_array(pb_utils, request, names.AUDIO).reshape(-1)
        sample_rate = int(read_array(pb_utils, request, names.SAMPLE_RATE).reshape(-1)[0])
        return check_item(AlignItem(audio, sample_rate, read_string(pb_utils, request, names.TEXT, required=True),
                                    read_string(pb_utils, request, names.LANGUAGE)))

    def execute(self, requests):
        """Every request gets one response: a bad one its own error, the others their words from one batch."""
        responses = [None] * len(requests)
        items = {}
        for index, request in enumerate(requests):
            try:
                items[index] = self._item(request)
            except Exception as exc:
                self.log.info("alignment refused: %s", exc)
                responses[index] = error_response(pb_utils, exc)
        try:
            aligned = dict(zip(items, self.aligner.align_batch(list(items.values()))))
        except Exception:  # one item broke the batch: align each alone, so that only it fails
            aligned = {}
            for index, item in items.items():
                try:
                    aligned[index] = self.aligner.align_batch([item])[0]
                except Exception as exc:
                    responses[index] = error_response(pb_utils, exc)
        for index, words in aligned.items():
            responses[index] = response(pb_utils, {names.WORDS: np.array([[encode_words(words)]], dtype=np.object_)})
        return responses
