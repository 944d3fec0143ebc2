"""Every Triton model's inputs and outputs: names, types and shapes.

The adapters and clients use the names below; ``MODELS`` describes each model's interface in full, and a
test checks every config template against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .audio import NUM_CODEBOOKS

# Models
TTS = "tts"  # the ensemble: text in, audio out
TALKER = "talker"
CODEC_DECODER = "codec_decoder"
VOICE_ENCODER = "voice_encoder"
ALIGNER = "aligner"  # word times: audio and its text in, each word's start and end out (optional in a deployment)

# Tensors (the same name means the same thing in every model that has it)
TEXT = "text"  # BYTES [1], UTF-8
VOICE = "voice"  # BYTES [1], a voice id
LANGUAGE = "language"  # BYTES [1], a language name or Auto
INSTRUCT = "instruct"  # BYTES [1], UTF-8: a style instruction, or a VoiceDesign model's voice description
TEXT_KEY = "text_key"  # UINT64 [1], a client's key for text still being written: more arrives by `append` commands
COMMAND = "command"  # BYTES [1], a talker control request's typed, versioned message (tts_contract.commands)
STATUS = "status"  # BYTES [1], JSON: the talker's capacity now (rows, active, realtime_batch, headroom, ...)
CODES = "codes"  # INT32 [frames, 16]
CONTEXT_CODES = "context_codes"  # INT32 [frames, 16], an ICL voice's reference frames (first chunk only)
STREAM_ID = "stream_id"  # UINT64 [1]
FINAL = "final"  # BOOL [1], true on a stream's last chunk
AUDIO = "audio"  # FP32 [samples], mono
SAMPLE_RATE = "sample_rate"  # INT32 [1]
REF_TEXT = "ref_text"  # BYTES [1], the reference clip's transcript
SPK_EMBEDDING = "spk_embedding"  # FP32 [hidden]
REF_CODE = "ref_code"  # INT32 [frames, 16]
PROMPT = "prompt"  # BYTES [1], a serialised voice prompt
WORDS = "words"  # BYTES [1], JSON: [{"text", "startMs", "endMs", "charStart", "charEnd"}] (the aligner's answer)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # the Triton config type (TYPE_STRING, TYPE_INT32, ...)
    dims: tuple
    optional: bool = False

    @property
    def wire_dtype(self) -> str:
        """The type name clients use (tritonclient's InferInput)."""
        return {"TYPE_STRING": "BYTES", "TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_UINT64": "UINT64",
                "TYPE_BOOL": "BOOL"}[self.dtype]


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple
    outputs: tuple
    decoupled: bool = False
    # Requests the server batches into one execution (0: none). A batched model's clients send each tensor with
    # a leading batch dimension of 1 (audio [1, samples], text [1, 1]); the dims above exclude it.
    max_batch_size: int = 0


def _string(name: str, optional: bool = False) -> Tensor:
    return Tensor(name, "TYPE_STRING", (1,), optional)


def _codes(name: str, optional: bool = False) -> Tensor:
    return Tensor(name, "TYPE_INT32", (-1, NUM_CODEBOOKS), optional)


MODELS = {
    TTS: Model(TTS, inputs=(_string(TEXT), _string(VOICE, True), _string(LANGUAGE, True),
                            Tensor(TEXT_KEY, "TYPE_UINT64", (1,), True), _string(INSTRUCT, True)),
               outputs=(Tensor(AUDIO, "TYPE_FP32", (-1,)),), decoupled=True),
    TALKER: Model(TALKER,
                  # text is required for synthesis; a control request carries `command` (and an append its text)
                  inputs=(_string(TEXT, True), _string(VOICE, True), _string(LANGUAGE, True),
                          Tensor(TEXT_KEY, "TYPE_UINT64", (1,), True), _string(COMMAND, True),
                          _string(INSTRUCT, True)),
                  outputs=(_codes(CODES), _codes(CONTEXT_CODES), Tensor(STREAM_ID, "TYPE_UINT64", (1,)),
                           Tensor(FINAL, "TYPE_BOOL", (1,)), _string(STATUS)),
                  decoupled=True),
    CODEC_DECODER: Model(CODEC_DECODER,
                         inputs=(_codes(CODES), _codes(CONTEXT_CODES, True), Tensor(STREAM_ID, "TYPE_UINT64", (1,)),
                                 Tensor(FINAL, "TYPE_BOOL", (1,), True)),
                         outputs=(Tensor(AUDIO, "TYPE_FP32", (-1,)),), decoupled=True),
    VOICE_ENCODER: Model(VOICE_ENCODER,
                         inputs=(Tensor(AUDIO, "TYPE_FP32", (-1,)), Tensor(SAMPLE_RATE, "TYPE_INT32", (1,)),
                                 _string(REF_TEXT, True)),
                         outputs=(Tensor(SPK_EMBEDDING, "TYPE_FP32", (-1,)), _codes(REF_CODE), _string(PROMPT))),
    ALIGNER: Model(ALIGNER,
                   inputs=(Tensor(AUDIO, "TYPE_FP32", (-1,)), Tensor(SAMPLE_RATE, "TYPE_INT32", (1,)), _string(TEXT),
                           _string(LANGUAGE, True)),
                   outputs=(_string(WORDS),), max_batch_size=16),
}
