"""The reply codes named in Python are the ones each Lua script's header lists."""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

import pytest

from gateway.store.codes import AdmitCode, CreditCode, UpdateCode, UsageCode

LUA = Path(__file__).resolve().parents[2] / "lua"


def header_codes(script: str, enum: str) -> list[tuple[int, str]]:
    """The `N meaning` pairs after `code (<enum> in ...):` in a script's header comment."""
    lines = (LUA / script).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"code ({enum} in" in line)
    text = lines[start].split("):", 1)[1]
    for line in lines[start + 1:]:
        if not re.match(r"^--\s+\d", line):
            break
        text += "," + line[2:]
    return [(int(number), meaning.strip()) for number, meaning in
            re.findall(r"(\d+)\s+([a-z ]+)", text)]


@pytest.mark.parametrize(("script", "enum"), [("admit.lua", AdmitCode),
                                              ("usage.lua", UsageCode),
                                              ("update_key.lua", UpdateCode),
                                              ("credits.lua", CreditCode)])
def test_the_scripts_headers_list_the_named_codes(script: str, enum: type[IntEnum]) -> None:
    listed = header_codes(script, enum.__name__)
    assert [number for number, _ in listed] == [member.value for member in enum]
    # each meaning shares a word with its name: a renumbering shows as a mismatch here
    for (_, meaning), member in zip(listed, enum, strict=True):
        words = set(member.name.lower().split("_"))
        assert words & set(meaning.split()), (meaning, member.name)
