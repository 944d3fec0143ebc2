"""The contract is the one source of truth: configs, imports and docs agree with it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import tritonclient.grpc as grpcclient

from conftest import ROOT
from tts_contract.errors import PROTOCOL_CODE, RECOVERABLE, EngineCode, ErrorCode
from tts_contract.languages import LANGUAGES, UnknownLanguage, normalise_language
from tts_contract.tensors import MODELS



@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_config_matches_the_contract(triton, model):
    """Each loaded model's inputs, outputs, transaction policy and batch size are exactly what the contract says."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    config = client.get_model_config(model, as_json=True)["config"]
    spec = MODELS[model]

    def described(tensors):
        return {t["name"]: (t["data_type"], tuple(int(d) for d in t["dims"]), bool(t.get("optional", False)))
                for t in tensors}

    assert described(config["input"]) == {t.name: (t.dtype, t.dims, t.optional) for t in spec.inputs}
    assert described(config["output"]) == {t.name: (t.dtype, t.dims, False) for t in spec.outputs}
    assert bool(config.get("model_transaction_policy", {}).get("decoupled", False)) == spec.decoupled
    assert int(config.get("max_batch_size", 0)) == spec.max_batch_size


def _imports_without(blocked: str, modules: str, absent: str) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"import {modules}\n"
            f"leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in "
            f"{absent.split(',')!r})\n"
            f"assert not leaked, leaked")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_gateway_imports_without_torch_or_the_engine():
    """The gateway image has no torch: the gateway imports the contract, never the engine."""
    result = _imports_without("torch", "gateway.app, gateway.__main__, tts_contract.voices", "tts_engine,torch")
    assert result.returncode == 0, result.stderr


def test_the_clients_use_only_the_contract():
    """client/ speaks the public interfaces (WebSocket, gRPC) and shares nothing with gateway/ but the contract."""
    result = _imports_without("torch", "client.speak, client.triton_tts", "gateway,tts_engine,torch")
    assert result.returncode == 0, result.stderr


def test_every_engine_code_has_a_protocol_code_and_both_are_documented():
    """The engine-to-protocol table is complete, and README / docs/PROTOCOL.md list every code."""
    assert set(PROTOCOL_CODE) == set(EngineCode) and set(RECOVERABLE) == set(ErrorCode)
    readme, protocol = (ROOT / "README.md").read_text(), (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert [c.value for c in EngineCode if f"`{c.value}`" not in readme] == []
    assert [c.value for c in ErrorCode if f"`{c.value}`" not in protocol] == []


@pytest.mark.parametrize("raw, expected", [("english", "English"), (" GERMAN ", "German"), ("", "Auto"),
                                           (None, "Auto"), ("auto", "Auto")])
def test_language_names_normalise_in_one_place(raw, expected):
    """Any case, surrounding spaces, or nothing (Auto) maps to the canonical name."""
    assert normalise_language(raw) == expected


@pytest.mark.parametrize("raw", ["", "   "])
def test_a_blank_language_is_refused_where_a_client_must_name_one(raw):
    """With ``blank_is_auto=False`` (what clients send) a blank name is refused; None still means Auto."""
    with pytest.raises(UnknownLanguage):
        normalise_language(raw, blank_is_auto=False)
    assert normalise_language(None, blank_is_auto=False) == "Auto"


def test_unknown_languages_are_refused_with_the_list():
    """An unknown name raises an error that lists every supported language."""
    with pytest.raises(UnknownLanguage) as error:
        normalise_language("Klingon")
    assert all(name in str(error.value) for name in LANGUAGES)
