from __future__ import annotations

import pytest

from quept.structured.grammar import GrammarCompiler
from tests.tiny import TINY_VOCAB, tiny_tokenizer


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = tiny_tokenizer()
    return GrammarCompiler(tok, TINY_VOCAB, (tok.eos_token_id,))
