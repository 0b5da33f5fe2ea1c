"""Bounds on what a request asks the engine's grammar compiler to build: JSON schemas, regexes, grammars, tools.

vLLM compiles `response_format`, `structured_outputs`, Responses' `text.format`, Messages' `output_config`, and
tools (a strict tool, or `tool_choice` naming or requiring tools, becomes a JSON schema) into a grammar in the
engine's process. The compile's cost follows the grammar's expanded size, not the body's: a counted repetition
inside another one multiplies (`(a{1,1000}){1,1000}` is a million states), as does `maxItems` over an item schema
with a long `pattern`. So the router refuses, before admission, schema inputs larger than `max_bytes` or whose
nested repetition counts multiply past `max_repetition` (400 naming the field). `*`, `+` and `?` loop and add no
states; only counted bounds (`{m,n}`, `minItems`, `maxLength`, ...) are multiplied.
"""

from __future__ import annotations

import json
import re
from typing import Any

from routing.errors import InvalidRequest

GRAMMAR_FIELDS = ("response_format", "structured_outputs", "tools", "functions", "tool_choice", "text", "output_config")
"""Top-level body fields whose content vLLM may compile into a grammar, on any generating API."""
PATTERN_KEYS = frozenset({"pattern", "regex", "grammar"})
"""Keys whose string values are regexes (or EBNF grammars, whose counted repetitions read the same)."""
COUNT_KEYS = frozenset(
    {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains"}
)
"""JSON-schema keywords that repeat a schema (or a character) that many times in the compiled grammar."""
_QUANTIFIER = re.compile(r"\{(\d{1,9})(?:,(\d{0,9}))?\}")


def check_grammar_inputs(body: dict[str, Any], *, max_bytes: int, max_repetition: int) -> None:
    """Raises `InvalidRequest` if the body's grammar inputs are larger than `max_bytes` (their JSON, all fields
    together) or repeat anything more than `max_repetition` times once nested counts are multiplied."""
    present = [name for name in GRAMMAR_FIELDS if body.get(name) is not None]
    size = 0
    for name in present:
        size += len(json.dumps(body[name], separators=(",", ":")))
        if size > max_bytes:
            raise InvalidRequest(
                f"Schemas, tools and grammars of one request may take at most {max_bytes} bytes of JSON; this "
                f"request's take more by `{name}`. Simplify the schema or send fewer tools.",
                param=name,
            )
    for name in present:
        cost, path = _repetition(body[name], (name,))
        if cost > max_repetition:
            raise InvalidRequest(
                f"This schema repeats a part about {cost} times once its nested counts (regex {{m,n}}, minItems, "
                f"maxLength, ...) are multiplied; at most {max_repetition} are accepted. Loosen the inner bound to "
                "`*` or `+`, or lower the counts.",
                param=".".join(str(part) for part in path),
            )


def _repetition(value: Any, path: tuple[str | int, ...]) -> tuple[int, tuple[str | int, ...]]:
    """The largest product of nested counted repetitions within `value`, and the path of the part that reaches it.

    Iterative: a schema is nested at most `protocol.MAX_JSON_DEPTH` deep, but costs no stack either way."""
    best: tuple[int, tuple[str | int, ...]] = (1, path)
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, path, 1)]
    while stack:
        item, where, outer = stack.pop()
        if isinstance(item, list):
            stack.extend((child, (*where, i), outer) for i, child in enumerate(item))
            continue
        if not isinstance(item, dict):
            continue
        counts = [v for k, v in item.items() if k in COUNT_KEYS and type(v) is int and v > 0]
        here = outer * max(counts, default=1)
        best = max(best, (here, where), key=lambda found: found[0])
        for key, child in item.items():
            if key in PATTERN_KEYS and isinstance(child, str):
                best = max(best, (here * pattern_repetition(child), (*where, key)), key=lambda found: found[0])
            elif isinstance(child, dict | list):
                stack.append((child, (*where, key), here))
    return best


def pattern_repetition(pattern: str) -> int:
    """The largest product of nested counted repetitions (`{m}`, `{m,}`, `{m,n}`) in a regex: `(a{1,1000}){1,1000}`
    is 1,000,000. Escapes and character classes are skipped; `*`, `+`, `?` count 1 (they loop)."""
    frames: list[int] = [1]  # the largest cost inside each open group, innermost last
    last = 1  # the cost of the atom a quantifier would repeat
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i, last = i + 2, 1
            continue
        if char == "[":
            end = i + 1
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            i, last = end + 1, 1
            continue
        if char == "(":
            frames.append(1)
            i += 1
            continue
        if char == ")" and len(frames) > 1:
            last = frames.pop()
            frames[-1] = max(frames[-1], last)
            i += 1
            continue
        quantifier = _QUANTIFIER.match(pattern, i) if char == "{" else None
        if quantifier is not None:
            low, high = quantifier.group(1), quantifier.group(2)
            last *= max(int(low), int(high) if high else 0)
            frames[-1] = max(frames[-1], last)
            i = quantifier.end()
            continue
        last = 1
        i += 1
    return max(frames)
