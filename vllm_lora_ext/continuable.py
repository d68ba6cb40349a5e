"""Which interrupted generations can be continued exactly from prompt + tokens so far.

A continuation is a new engine request whose prompt is the old prompt plus the tokens
made so far. That is exact for plain sampling (and for ``repetition_penalty``, which
vLLM applies over prompt and output alike), but not for state vLLM keeps per request
over its *output*: a stop string or a bad word that spans the boundary is never seen,
presence and frequency penalties count only the new segment's tokens, a
structured-output grammar, a thinking budget and repetition detection start again. Such
requests are not continued (server: ``keep`` pauses and ``continue`` swaps; client:
``sample_with_retry``): they end partial, ``finish_reason: "abort"``, with the reason
in ``stop_reason``. One rule for both sides, over sampling fields by name (vLLM's
``SamplingParams`` attributes or the OpenAI request's fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "not continued: "

_STRUCTURED = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
)


def why_not(fields: Mapping[str, Any]) -> str | None:
    """Why a request with these sampling fields cannot be continued exactly (None: it
    can)."""
    if fields.get("stop"):
        return "a stop string could span the boundary"
    if fields.get("bad_words"):
        return "a bad word could span the boundary"
    if fields.get("presence_penalty") or fields.get("frequency_penalty"):
        return "presence/frequency penalties would count only the new tokens"
    fmt = fields.get("response_format")
    fmt_type = fmt.get("type") if isinstance(fmt, Mapping) else getattr(fmt, "type", None)
    if any(fields.get(k) is not None for k in _STRUCTURED) or fmt_type not in (None, "text"):
        return "a structured-output grammar would start again"
    if fields.get("thinking_token_budget") is not None:
        return "the thinking budget would start again"
    if fields.get("repetition_detection") is not None:
        return "repetition detection would start again"
    return None


def of_params(params: Any) -> str | None:
    """:func:`why_not` for a vLLM ``SamplingParams``."""
    names = (
        "stop",
        "bad_words",
        "presence_penalty",
        "frequency_penalty",
        "thinking_token_budget",
        "repetition_detection",
        *_STRUCTURED,
    )
    return why_not({n: getattr(params, n, None) for n in names})
