"""JWT auth on the real gateway: HS256 with a shared secret, RS256 and ES256 with keys from a JWKS file, opaque
tokens beside them; the same answers on the WebSocket and on HTTP; sessions limited per subject; a token that
expires during a session."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.exceptions import ConnectionClosed

from gateway_helpers import FAST, GatewayProcess, collect, open_session, receive_json, send

SECRET = "a-shared-secret-of-at-least-32-characters"
AUDIENCE, ISSUER = "qwen-tts", "https://idp.example.test"
OPAQUE = "an-opaque-service-token"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LEEWAY_S = 1


def _jwk(algorithm, key, kid: str) -> dict:
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


def token(subject: str = "alice", algorithm: str = "RS256", lifetime_s: float = 300, kid: str = "", **claims) -> str:
    """A JWT for ``subject`` signed with the test's key for ``algorithm``; ``claims`` override the defaults."""
    now = time.time()
    payload = {"sub": subject, "aud": AUDIENCE, "iss": ISSUER, "iat": int(now), "exp": int(now + lifetime_s),
               **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    if algorithm == "HS256":
        return jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": kid} if kid else None)
    key, kid = (RSA_KEY, "rsa-1") if algorithm == "RS256" else (EC_KEY, "ec-1")
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


def _part(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _unsigned(subject: str = "alice") -> str:
    """An ``alg: none`` token (no signature at all)."""
    return f"{_part({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa-1'})}." \
           f"{_part({'sub': subject, 'aud': AUDIENCE, 'iss': ISSUER, 'exp': int(time.time()) + 300})}."


def _malformed_header() -> str:
    """A token whose header PyJWT itself rejects (a numeric ``kid``)."""
    return f"{_part({'alg': 'RS256', 'typ': 'JWT', 'kid': 1})}.{_part({'sub': 'x'})}.c2ln"


def _public_key_as_hmac_secret() -> str:
    """The algorithm swap attack: HS256 signed with the RSA public key's PEM, naming the RSA key."""
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    signing_input = ".".join(base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=").decode() for v in
                             (header, {"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 300}))
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


CASES = {  # name: (token, None when accepted, else a phrase of the refusal)
    "hs256": (lambda: token(algorithm="HS256"), None),
    "rs256": (lambda: token(algorithm="RS256"), None),
    "es256": (lambda: token(algorithm="ES256"), None),
    "opaque": (lambda: OPAQUE, None),
    "expired": (lambda: token(lifetime_s=-60), "expired"),
    "not yet valid": (lambda: token(nbf=int(time.time()) + 600), "not valid yet"),
    "wrong audience": (lambda: token(aud="another-service"), "audience"),
    "wrong issuer": (lambda: token(iss="https://elsewhere.test"), "issuer"),
    "wrong signature": (lambda: jwt.encode({"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER,
                                            "exp": int(time.time()) + 300}, OTHER_RSA_KEY, algorithm="RS256",
                                           headers={"kid": "rsa-1"}), "signature"),
    "alg none": (_unsigned, "algorithm"),
    "public key as hmac secret": (_public_key_as_hmac_secret, "signature"),  # HS256 goes to the secret only
    "no exp": (lambda: token(exp=None), "'exp'"),
    "unknown key": (lambda: jwt.encode({"sub": "x", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60},
                                       RSA_KEY, algorithm="RS256", headers={"kid": "rsa-9"}), "no key"),
    "garbage": (lambda: "not-a-token", "invalid"),
    "malformed header": (_malformed_header, "invalid"),
    "hs256 naming a kid": (lambda: token(algorithm="HS256", kid="some-key"), None),
}


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    """A gateway verifying JWTs (secret and JWKS file), an opaque token beside them, two sessions per subject."""
    work = tmp_path_factory.mktemp("auth")
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(RSAAlgorithm, RSA_KEY, "rsa-1"), _jwk(ECAlgorithm, EC_KEY, "ec-1")]}))
    process = GatewayProcess(triton.grpc_url, voices_dir, work / "gateway.log", **FAST, GATEWAY_JWT_SECRET=SECRET,
                             GATEWAY_JWT_JWKS_FILE=str(jwks), GATEWAY_JWT_AUDIENCE=AUDIENCE,
                             GATEWAY_JWT_ISSUER=ISSUER, GATEWAY_JWT_LEEWAY_S=str(LEEWAY_S),
                             GATEWAY_AUTH_TOKENS=OPAQUE, GATEWAY_MAX_SESSIONS_PER_SUBJECT="2").start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize("case", list(CASES))
async def test_the_websocket_accepts_valid_tokens_and_refuses_each_bad_one_with_its_reason(gateway, case):
    """A token in the upgrade's Authorization header: valid ones get `ready`, each bad one UNAUTHORIZED saying
    why, then close 1008."""
    make, refusal = CASES[case]
    async with open_session(gateway.ws, additional_headers={"Authorization": f"Bearer {make()}"}) as ws:
        first = await receive_json(ws)
        if refusal is None:
            assert first["type"] == "ready", first
            return
        assert first["code"] == "UNAUTHORIZED" and refusal in first["message"], first
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 1008


@pytest.mark.parametrize("case", list(CASES))
async def test_http_routes_accept_valid_tokens_and_refuse_each_bad_one_with_its_reason(gateway, case):
    """The same tokens as bearer tokens on the voices API: 200 for valid ones, 401 saying why for bad ones."""
    make, refusal = CASES[case]
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(gateway.http + "/api/v1/voices", headers={"Authorization": f"Bearer {make()}"})
    if refusal is None:
        assert reply.status_code == 200
    else:
        assert reply.status_code == 401 and refusal in reply.json()["error"], reply.text
        assert reply.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


async def test_a_start_message_carries_a_jwt_too(gateway):
    """Without a header, the token may come in `start.authToken` (browsers cannot set WebSocket headers)."""
    async with open_session(gateway.ws) as ws:
        await send(ws, type="start", authToken=token(algorithm="ES256"))
        assert (await receive_json(ws))["type"] == "ready"
        assert (await receive_json(ws))["type"] == "started"


def test_the_openai_sdk_gets_401_for_an_expired_token_and_audio_for_a_valid_one(gateway):
    """The official SDK's api_key is the bearer token: an expired JWT raises AuthenticationError, a valid one
    streams audio."""
    expired = openai.OpenAI(base_url=gateway.http + "/v1", api_key=token(lifetime_s=-60), max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as refused:
        expired.audio.speech.create(model="qwen3-tts", voice="default", input="Hello.", response_format="pcm")
    assert "expired" in str(refused.value)
    valid = openai.OpenAI(base_url=gateway.http + "/v1", api_key=token(), max_retries=0, timeout=60)
    with valid.audio.speech.with_streaming_response.create(model="qwen3-tts", voice="default", input="Hello.",
                                                           response_format="pcm") as response:
        assert len(response.read()) > 0


async def test_sessions_are_limited_per_subject(gateway):
    """A subject holds at most GATEWAY_MAX_SESSIONS_PER_SUBJECT sessions (the next is RATE_LIMITED, close 1013);
    another subject is not affected, and a closed session frees its place."""
    headers = {"Authorization": f"Bearer {token('carol')}"}
    async with open_session(gateway.ws, additional_headers=headers) as one, \
            open_session(gateway.ws, additional_headers=headers) as two:
        assert (await receive_json(one))["type"] == "ready" and (await receive_json(two))["type"] == "ready"
        async with open_session(gateway.ws, additional_headers=headers) as three:
            refused = await receive_json(three)
            assert refused["code"] == "RATE_LIMITED" and "subject" in refused["message"]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(three.recv(), 5)
            assert closed.value.rcvd.code == 1013
        async with open_session(gateway.ws, additional_headers={"Authorization": f"Bearer {token('dave')}"}) as other:
            assert (await receive_json(other))["type"] == "ready"
    async with open_session(gateway.ws, additional_headers=headers) as again:
        assert (await receive_json(again))["type"] == "ready"


async def test_a_token_expiring_mid_session_lets_the_utterance_finish_and_refuses_the_next_speak(gateway):
    """The utterance in progress when the token expires plays to its end; a `speak` after expiry gets
    UNAUTHORIZED and the session stays open; a `start` with a fresh token of the same subject renews it."""
    lifetime_s = 2
    headers = {"Authorization": f"Bearer {token('erin', lifetime_s=lifetime_s)}"}
    async with open_session(gateway.ws, additional_headers=headers) as ws:
        issued = time.time()
        await send(ws, type="start")
        assert (await receive_json(ws))["type"] == "ready"
        assert (await receive_json(ws))["type"] == "started"
        # Its text is still being written, so it is in progress until the test ends it, however fast the machine
        # generates (a `speak` here ended before expiry on a fast machine and after it on a slow one).
        await send(ws, type="append", text="This part is spoken before the token expires.", requestId="playing")
        await send(ws, type="flush")
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        await asyncio.sleep(max(0.0, issued + lifetime_s + LEEWAY_S + 0.5 - time.time()))
        await send(ws, type="speak", text="After expiry.", requestId="late")
        await send(ws, type="append", text=" And this part after it.")
        await send(ws, type="end")
        playing = await collect(ws, timeout=60)
        assert playing.end["cancelled"] is False and playing.end["requestId"] == "playing"
        assert playing.end["charactersProcessed"] == len("This part is spoken before the token expires. And this "
                                                         "part after it.")
        refusals = [m for m in playing.messages if m["type"] == "error"]
        assert [(m["code"], m["requestId"]) for m in refusals] == [("UNAUTHORIZED", "late")], playing.messages
        await send(ws, type="start", authToken=token("mallory"))
        assert (await receive_json(ws))["code"] == "UNAUTHORIZED"  # renewing needs the same subject
        await send(ws, type="start", authToken=token("erin"))
        assert (await receive_json(ws))["type"] == "started"
        await send(ws, type="speak", text="Renewed.")
        assert (await collect(ws, timeout=60)).end["cancelled"] is False


async def test_openai_speech_requests_give_their_subjects_place_back(gateway):
    """A subject's speech requests (answered, refused for bad input, or read in full) each free their place:
    more requests than the per-subject limit, one after another, all succeed."""
    headers = {"Authorization": f"Bearer {token('grace')}"}
    async with httpx.AsyncClient(timeout=60) as http:
        for body in ({"model": "tts-1", "input": "Hello.", "voice": "default", "response_format": "pcm"},
                     {"model": "tts-1", "input": "", "voice": "default"},
                     {"model": "tts-1", "input": "Again.", "voice": "default", "response_format": "pcm"}):
            reply = await http.post(gateway.http + "/v1/audio/speech", json=body, headers=headers)
            assert reply.status_code in (200, 400), reply.text
        reply = await http.post(gateway.http + "/v1/audio/speech", headers=headers,
                                json={"model": "tts-1", "input": "Once more.", "voice": "default",
                                      "response_format": "pcm"})
        assert reply.status_code == 200 and len(reply.content) > 0
