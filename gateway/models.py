"""Which served model a request means. The Triton endpoints serve one or more models (each talker describes its own,
``tts_contract.models.ServedModel``); a request names one by its served name or by an alias (GATEWAY_MODEL_ALIASES,
GATEWAY_OPENAI_MODEL, and OpenAI's speech model names, which mean the default model unless aliased), or names none
and gets the default (GATEWAY_DEFAULT_MODEL, else the model the deployment serves as `tts`)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from tts_contract.errors import EngineCode
from tts_contract.models import BASE, ServedModel

from .endpoints import Endpoints

# OpenAI's speech model names (the dated ones are its snapshots): code written for OpenAI sends one of these, the
# voice-agent frameworks gpt-4o-mini-tts by default; each means the default model unless GATEWAY_MODEL_ALIASES
# says otherwise.
OPENAI_MODEL_NAMES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20",
                      "gpt-4o-mini-tts-2025-12-15")
OPENAI_SNAPSHOT = re.compile(r"gpt-4o-mini-tts-\d{4}-\d{2}-\d{2}")  # a later snapshot means what its model means
SHOWN_NAME_CHARS = 64


class ModelUnavailable(Exception):
    """A request's model cannot be served: ``loading`` (known, or possibly served, but not ready now: try again)
    or not served here at all (the message lists what is). ``code``: the engine code a client gets (a model not
    ready because no server answers is UNAVAILABLE, not loading)."""

    def __init__(self, message: str, loading: bool, code: EngineCode = EngineCode.MODEL_LOADING):
        super().__init__(message)
        self.message, self.loading, self.code = message, loading, code


@dataclass(frozen=True)
class Listed:
    """A name clients may send, and the served model it means now (``alias_of``: the served name it stands for)."""

    id: str
    model: ServedModel
    alias_of: Optional[str] = None


def default_speaker(model: ServedModel) -> Optional[str]:
    """The speaker a CustomVoice model speaks with when a request names none (as its talker chooses it)."""
    return model.default_speaker()


class Catalog:
    """The models served now, the default one, and the names that mean them."""

    def __init__(self, endpoints: Endpoints, settings):
        self.endpoints, self.settings = endpoints, settings

    def aliases(self) -> dict[str, Optional[str]]:
        """Every alias and the served name it means (None: the default model)."""
        aliases: dict[str, Optional[str]] = {name: None for name in (self.settings.openai_model, *OPENAI_MODEL_NAMES)}
        aliases.update(self.settings.model_aliases)
        return aliases

    def served(self) -> dict[str, ServedModel]:
        """The models usable endpoints serve now, by served name, the default first."""
        served = self.endpoints.models()
        default = self._default_name()
        if default in served:
            served = {default: served[default], **{n: m for n, m in served.items() if n != default}}
        return served

    def _default_name(self) -> Optional[str]:
        configured = self.settings.default_model
        if configured:
            return self.settings.model_aliases.get(configured, configured) \
                if configured not in self.endpoints.known_models() else configured
        default = self.endpoints.default_model()
        return default.name if default is not None else None

    def default(self) -> Optional[ServedModel]:
        """The default model, when it is served now and described."""
        name = self._default_name()
        return self.served().get(name) if name else None

    def resolve(self, requested: Optional[str] = None) -> Optional[ServedModel]:
        """The served model ``requested`` means (a served name or an alias; None or blank: the default). None only
        when no talker has described itself yet while the deployment's default Triton models are ready (requests
        then go to `tts`). Raises ``ModelUnavailable``."""
        requested = (requested or "").strip() or None
        served, known = self.served(), self.endpoints.known_models()
        target = requested
        if requested is not None and requested not in served and requested not in known:
            aliases = self.aliases()
            if requested in aliases:
                target = aliases[requested]
            elif OPENAI_SNAPSHOT.fullmatch(requested) and "gpt-4o-mini-tts" in aliases:
                target = aliases["gpt-4o-mini-tts"]
            elif served or known:
                raise ModelUnavailable(self._not_served(requested), loading=False)
            elif self.endpoints.serving(None):  # a Triton whose talker describes no model (an older image)
                raise ModelUnavailable(f"model '{_shown(requested)}' is not served here; accepted: "
                                       f"{', '.join(aliases)}", loading=False)
            else:  # nothing has described itself yet: whether it is served cannot be told
                raise self._not_ready("the speech models are not ready yet; try again shortly")
        if target is None:
            target = self._default_name()
            if target is None:
                if self.endpoints.serving(None):
                    return None  # served as `tts`, not described (yet)
                raise self._not_ready("the speech model is not ready yet; try again shortly")
        if target in served:
            return served[target]
        if target in known or not (served or known):
            raise self._not_ready(f"the model '{target}' is not ready yet; try again shortly")
        named = _shown(requested) if requested is not None else "the default model"
        raise ModelUnavailable(f"{named} means the model '{target}', which is not served here; "
                               f"{self._offer()}", loading=False)

    def _not_ready(self, message: str) -> ModelUnavailable:
        """Not ready now: loading, or (no server answering) unavailable."""
        code, reason = self.endpoints.unusable_reason() if not self.endpoints.ready else \
            (EngineCode.MODEL_LOADING, message)
        return ModelUnavailable(reason if code != EngineCode.MODEL_LOADING else message, loading=True, code=code)

    def _not_served(self, requested: str) -> str:
        return f"model '{_shown(requested)}' is not served here; {self._offer()}"

    def _offer(self) -> str:
        served = ", ".join(self.served()) or "none ready"
        aliases = [listed.id for listed in self.listing() if listed.alias_of is not None]
        return f"served: {served}" + (f"; also accepted: {', '.join(aliases)}" if aliases else "")

    def listing(self) -> list[Listed]:
        """Every name a request may use now: the served models (the default first), then each alias whose model
        is served."""
        served = self.served()
        listed = [Listed(name, model) for name, model in served.items()]
        default = self._default_name()
        for alias, target in self.aliases().items():
            target = default if target is None else target
            if alias not in served and target in served:
                listed.append(Listed(alias, served[target], alias_of=target))
        return listed

    def find(self, name: str) -> Optional[Listed]:
        return next((listed for listed in self.listing() if listed.id == name), None)


def takes_voice_ids(model: Optional[ServedModel]) -> bool:
    """Whether a request's voice is a cloned voice's id (Base; also an undescribed default model, which is how a
    deployment served before the family was)."""
    return model is None or model.kind == BASE


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_CHARS else name[:SHOWN_NAME_CHARS - 3] + "..."
