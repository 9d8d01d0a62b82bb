"""The Lua scripts of lua/, as installed with the package (each has a header of its KEYS,
ARGV and replies).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_SOURCE_TREE_LUA = Path(__file__).resolve().parents[2] / "lua"


def lua_source(name: str) -> str:
    """A script from the installed package (`gateway.lua`, the wheel's copy of lua/)."""
    try:
        scripts = resources.files("gateway.lua")
    except ModuleNotFoundError:
        # `python -m gateway` run inside a source checkout imports gateway/ from the working
        # directory, beside which lua/ lies, not from the installed wheel.
        return (_SOURCE_TREE_LUA / f"{name}.lua").read_text()
    return scripts.joinpath(f"{name}.lua").read_text()
