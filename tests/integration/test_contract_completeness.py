"""The request contract covers every field the installed vLLM accepts (read from vLLM's own
request models in the engine environment), and the check would catch a field dropped from the
contract or one a new vLLM adds."""

from __future__ import annotations

import pytest

from serving.contract import completeness
from serving.engines.environment import EngineEnvironment
from serving.engines.sources import vllm_fields
from tests.support import Engines

pytestmark = pytest.mark.engine


def test_the_contract_covers_every_field_vllm_accepts(engines: Engines) -> None:
    found = vllm_fields(EngineEnvironment(engines.env_dir))
    assert set(found) == set(completeness.coverage())
    assert completeness.gaps(found) == []
    # And the check would catch a field dropped from the contract, or one vLLM adds.
    fewer = completeness.coverage()
    fewer["chat"] = fewer["chat"] - {"chat_template_kwargs"}
    assert completeness.gaps(found, fewer) == ["chat.chat_template_kwargs"]
    assert completeness.gaps({**found, "chat": [*found["chat"], "new_knob"]}) == [
        "chat.new_knob"]
