"""Speech as an HTTP body, encoded while it streams: the OpenAI endpoint's response formats (wav and pcm here;
mp3, opus, flac and aac by ffmpeg's encoders through PyAV) and its speed (ffmpeg's atempo filter)."""
from __future__ import annotations

import functools
import struct
from typing import Optional

import numpy as np

from tts_contract.audio import SAMPLE_RATE

from .audio import AudioConverter

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
                 "flac": "audio/flac", "aac": "audio/aac"}
# format -> (ffmpeg muxer, encoder); opus in Ogg and aac in ADTS, as OpenAI sends them
_FFMPEG = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "flac": ("flac", "flac"),
           "aac": ("adts", "aac")}
MIN_SPEED, MAX_SPEED = 0.25, 4.0
_UNKNOWN_SIZE = 0xFFFFFFFF  # a streamed WAV's sizes: unknown when the header is sent


@functools.cache
def available_formats() -> tuple[str, ...]:
    """wav and pcm always; the others where PyAV and its encoder are installed (looked up once)."""
    found = ["wav", "pcm"]
    try:
        import av
    except ImportError:
        return tuple(found)
    for name, (_, codec) in _FFMPEG.items():
        try:
            av.codec.Codec(codec, "w")
            found.append(name)
        except Exception:  # this ffmpeg build lacks the encoder
            continue
    return tuple(found)


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A PCM16 mono WAV header whose RIFF and data sizes are unknown (0xFFFFFFFF): readers play to the end."""
    return (b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", _UNKNOWN_SIZE))


class _Sink:
    """A write-only, unseekable file for ffmpeg's muxer: what it writes is taken as it comes."""

    def __init__(self):
        self._data = bytearray()

    def write(self, data) -> int:
        self._data += data
        return len(data)

    def take(self) -> bytes:
        data, self._data = bytes(self._data), bytearray()
        return data


class _FfmpegEncoder:
    def __init__(self, response_format: str):
        import av

        muxer, codec = _FFMPEG[response_format]
        self._sink = _Sink()
        # flush_packets: bytes leave with every packet; an Ogg page every 100 ms instead of every second
        options = {"flush_packets": "1", **({"page_duration": "100000"} if muxer == "ogg" else {})}
        self._container = av.open(self._sink, mode="w", format=muxer, buffer_size=4096, container_options=options)
        self._stream = self._container.add_stream(codec, rate=SAMPLE_RATE)
        self._stream.layout = "mono"

    def encode(self, frame) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        tail = self.encode(None)
        self._container.close()
        return tail + self._sink.take()


class _Tempo:
    """ffmpeg's atempo (pitch kept), chained where the factor is outside one filter's range."""

    def __init__(self, speed: float):
        import av

        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=SAMPLE_RATE, layout="mono",
                                       time_base=f"1/{SAMPLE_RATE}")
        for factor in _tempo_factors(speed):
            stage = self._graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()

    def process(self, frame) -> list:
        self._graph.push(frame)
        import av

        frames = []
        while True:
            try:
                frames.append(self._graph.pull())
            except (av.BlockingIOError, av.EOFError):
                return frames


def _tempo_factors(speed: float) -> list[float]:
    factors = []
    while speed < 0.5:  # one atempo goes down to 0.5
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]


class SpeechEncoder:
    """Float32 24 kHz chunks in, the response format's bytes out as soon as the encoder has them."""

    def __init__(self, response_format: str, speed: float = 1.0):
        if response_format not in CONTENT_TYPES:
            raise ValueError(f"unknown response format {response_format!r}")
        self.format = response_format
        self.content_type = CONTENT_TYPES[response_format]
        self._pcm = AudioConverter(SAMPLE_RATE, "pcm16")
        self._ffmpeg: Optional[_FfmpegEncoder] = _FfmpegEncoder(response_format) if response_format in _FFMPEG else None
        self._tempo: Optional[_Tempo] = _Tempo(speed) if speed != 1.0 else None
        self._header = wav_header() if response_format == "wav" else b""
        self._samples = 0

    def encode(self, audio: np.ndarray) -> bytes:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if self._tempo is None and self._ffmpeg is None:
            return self._take_header() + self._pcm.encode(audio)
        return self._take_header() + self._through_ffmpeg(self._frame(audio))

    def finish(self) -> bytes:
        """The encoder's and the filter's tails, and the container's trailer."""
        out = self._take_header()
        if self._tempo is not None or self._ffmpeg is not None:
            out += self._through_ffmpeg(None)
        if self._ffmpeg is not None:
            out += self._ffmpeg.finish()
        return out

    def _frame(self, audio: np.ndarray):
        import av

        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, self._samples
        self._samples += len(audio)
        return frame

    def _through_ffmpeg(self, frame) -> bytes:
        """``frame`` (None: end of stream) through the tempo filter, then the encoder or PCM16."""
        frames = self._tempo.process(frame) if self._tempo is not None else ([frame] if frame is not None else [])
        if self._ffmpeg is None:
            return b"".join(self._pcm.encode(f.to_ndarray().reshape(-1)) for f in frames)
        return b"".join(self._ffmpeg.encode(f) for f in frames)

    def _take_header(self) -> bytes:
        header, self._header = self._header, b""
        return header
