"""The voices API on the real gateway: upload, list, speak with, delete; bad and oversized uploads."""
from __future__ import annotations

import io

import httpx
import pytest
import soundfile as sf

from conftest import SAMPLE_RATE, synthetic_reference
from gateway_helpers import collect, open_session, send, serve_gateway
from test_gateway import start_session


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("gw-voices"))

def wav_bytes(seconds: float, seed: int = 5) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, synthetic_reference(seconds=seconds, seed=seed), SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


async def test_voice_upload_list_speak_delete(gateway):
    """Upload a voice, see it listed, speak with it, delete it; then it is gone."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        response = await http.post("/api/v1/voices", files={"audio": ("me.wav", wav_bytes(4.0), "audio/wav")},
                                   data={"transcript": "This is me.", "name": "Me Myself", "id": "me",
                                         "language": "english"})
        assert response.status_code == 201, response.text
        assert response.json() == {"id": "me", "name": "Me Myself", "kind": "cloned", "language": "English",
                                   "description": "", "isDefault": False}
        listed = (await http.get("/api/v1/voices")).json()["voices"]
        assert {"me", "default"} <= {v["id"] for v in listed}
        assert [v["id"] for v in listed if v["isDefault"]] == ["default"]
        async with open_session(gateway.ws) as ws:
            started = await start_session(ws, voice="me")
            assert started["voice"] == "me"
            await send(ws, type="speak", text="Spoken in my voice.")
            assert (await collect(ws)).end["cancelled"] is False
        assert (await http.delete("/api/v1/voices/me")).status_code == 204
        assert "me" not in {v["id"] for v in (await http.get("/api/v1/voices")).json()["voices"]}
        assert (await http.delete("/api/v1/voices/me")).status_code == 404


async def test_voice_upload_without_transcript_is_x_vector_only(gateway, voices_dir):
    """An upload with no transcript makes an x-vector-only voice (no transcript file)."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        response = await http.post("/api/v1/voices", files={"audio": ("a.wav", wav_bytes(3.5), "audio/wav")},
                                   data={"name": "No Words"})
        assert response.status_code == 201
        voice_id = response.json()["id"]
        assert voice_id.startswith("no-words-")
        assert not (voices_dir / voice_id / "transcript.txt").exists()
        assert list((voices_dir / voice_id).glob("prompt-*.safetensors"))
        assert (await http.delete(f"/api/v1/voices/{voice_id}")).status_code == 204


@pytest.mark.parametrize("files, data, status, message", [
    ({"audio": ("x.wav", b"definitely not audio", "audio/wav")}, {}, 400, "not decodable"),
    ({"audio": ("x.wav", wav_bytes(1.0), "audio/wav")}, {}, 400, "between"),
    ({"audio": ("x.wav", wav_bytes(31.0), "audio/wav")}, {}, 400, "between"),
    ({}, {"name": "nothing"}, 400, "missing"),
    ({"audio": ("x.wav", wav_bytes(4.0), "audio/wav")}, {"id": "../escape"}, 400, "invalid voice id"),
    ({"audio": ("x.wav", wav_bytes(4.0), "audio/wav")}, {"id": "default"}, 409, "already exists"),
])
async def test_bad_uploads_are_refused(gateway, files, data, status, message):
    """Undecodable, too short, too long, missing audio and bad ids get 400; an existing id gets 409."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        response = await http.post("/api/v1/voices", files=files or {"other": ("a", b"a")}, data=data)
        assert response.status_code == status
        assert message in response.json()["error"]


async def test_too_large_upload_is_refused(make_gateway):
    """An upload above GATEWAY_MAX_UPLOAD_BYTES (plus room for the form) gets 413."""
    gateway = make_gateway(GATEWAY_MAX_UPLOAD_BYTES="50000")
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        response = await http.post("/api/v1/voices", files={"audio": ("x.wav", wav_bytes(4.0), "audio/wav")})
        assert response.status_code == 413 and "GATEWAY_MAX_UPLOAD_BYTES" in response.json()["error"]


async def test_default_voice_cannot_be_deleted(gateway):
    """DELETE of the default voice is refused."""
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10) as http:
        response = await http.delete("/api/v1/voices/default")
        assert response.status_code == 400 and "default" in response.json()["error"]
