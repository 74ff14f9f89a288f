from __future__ import annotations

import types

import tokenbooth


def test_public_api_is_exactly_all() -> None:
    exported = {
        name for name, value in vars(tokenbooth).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert set(tokenbooth.__all__) - {"__version__"} == exported
    for name in tokenbooth.__all__:
        assert getattr(tokenbooth, name) is not None
