"""The redaction seam sees the key in every spelling a JSON body or a URL can give it."""

from __future__ import annotations

import json

import pytest

from pipeline.secrets import MASK, Redactor

KEY = "sk-or-v1-0123456789abcdef0123456789abcdef"


def escaped(text: str, chars: str) -> str:
    return "".join(f"\\u{ord(c):04x}" if c in chars else c for c in text)


@pytest.mark.parametrize(
    "spelling",
    [
        escaped(KEY, "-"),  # only the dashes escaped
        escaped(KEY, KEY),  # every character
        escaped(KEY, KEY).upper().replace("\\U", "\\u"),  # upper-case hex
        "".join(f"%{b:02x}" for b in KEY.encode()),
        "".join(f"%{b:02X}" for b in KEY.encode()),
    ],
    ids=["dashes", "all", "upper", "percent_lower", "percent_upper"],
)
def test_the_key_in_other_spellings_is_masked_before_parsing(spelling: str) -> None:
    raw = ('{"error": {"message": "you sent ' + spelling + ' which we refused", "code": 401}}').encode()
    parsed = json.loads(Redactor(KEY).response(raw))
    assert KEY not in json.dumps(parsed) and MASK in parsed["error"]["message"]


def test_escapes_that_are_not_the_key_are_left_alone() -> None:
    raw = b'{"content": "caf\\u00e9 \\\\u0041 \\u0022quoted\\u0022 \\u002d"}'
    assert Redactor(KEY).response(raw) == raw
    assert json.loads(raw)["content"] == 'café \\u0041 "quoted" -'


def test_an_escaped_backslash_before_u_is_not_an_escape() -> None:
    """``\\\\u002d`` is a backslash and the text u002d, not a dash: the JSON must stay the same."""
    raw = ('{"m": "' + KEY.replace("-", "\\\\u002d") + " and " + escaped(KEY, "-") + '"}').encode()
    out = json.loads(Redactor(KEY).response(raw))["m"]
    assert out == KEY.replace("-", "\\u002d") + " and " + MASK
