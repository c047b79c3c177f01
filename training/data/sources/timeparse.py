"""The `calendar` expert from ctparse's labelled corpus of time expressions (MIT licence).

Each corpus entry is (gold parse, reference time, texts): "tomorrow 7.25 pm" said on
2018-12-31T12:43 means 2019-01-01 19:25. We render the gold parse as ISO-8601 and ask the expert
to produce it as a tool call. The reference time goes in the system prompt (the calling
application knows the clock), the expression alone is the user turn, so the router sees what a
user would type. Gold parses ISO-8601 cannot express without inventing information (a day of
month with no month, a weekday without a date) are dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from training.data.tool_calls import CALENDAR_TOOL, format_tool_call

SOURCE = "ctparse corpus"
SOURCE_URL = "https://github.com/comtravo/ctparse"
LICENSE = "MIT"
EXPERT = "calendar"
DESCRIPTION = "dates and times (ctparse corpus, English and German)"
SYSTEM_PROMPT_PREFIX = "You resolve dates and times to ISO-8601."

_DURATION_CODES = {"minutes": "TnM", "hours": "TnH", "days": "nD", "nights": "nD", "weeks": "nW", "months": "nM"}


def system_prompt(reference: datetime) -> str:
    return (
        f"{SYSTEM_PROMPT_PREFIX} It is now {reference:%Y-%m-%dT%H:%M} ({reference:%A}). "
        "Reply with one JSON tool call."
    )


def _time_iso(t: Any) -> str | None:
    has_date = t.year is not None or t.month is not None or t.day is not None
    if has_date:
        if t.year is None or (t.day is not None and t.month is None):
            return None
        if t.month is None:
            date_part = f"{t.year:04d}"
        elif t.day is None:
            date_part = f"{t.year:04d}-{t.month:02d}"
        else:
            date_part = f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
    else:
        date_part = ""
    if t.hour is None:
        if t.minute is not None or not date_part:
            return None
        return date_part
    clock = f"{t.hour:02d}:{(t.minute or 0):02d}"
    if not date_part:
        return clock
    if len(date_part) != 10:
        return None
    return f"{date_part}T{clock}"


def _duration_iso(duration: Any) -> str | None:
    code = _DURATION_CODES.get(duration.unit.value)
    if code is None:
        return None
    return "P" + code.replace("n", str(duration.value))


def gold_arguments(gold: str) -> dict[str, Any] | None:
    """Tool-call arguments for a ctparse gold parse string, or None if ISO-8601 can't hold it."""
    from ctparse.corpus import parse_nb_string
    from ctparse.types import Duration, Interval, Time

    parsed = parse_nb_string(gold)
    if isinstance(parsed, Duration):
        value = _duration_iso(parsed)
        return {"duration": value} if value else None
    if isinstance(parsed, Time):
        value = _time_iso(parsed)
        if value is None:
            return None
        out: dict[str, Any] = {"value": value}
        if parsed.POD:
            out["part_of_day"] = parsed.POD
        return out
    if isinstance(parsed, Interval):
        out = {}
        for key, side in (("start", parsed.t_from), ("end", parsed.t_to)):
            if side is None:
                continue
            value = _time_iso(side)
            if value is None:
                return None
            out[key] = value
        return out or None
    return None


def corpus_entries() -> list[tuple[str, str, list[str]]]:
    from ctparse.time.auto_corpus import corpus as auto_corpus
    from ctparse.time.corpus import corpus as hand_corpus

    return [(str(g), str(r), list(texts)) for g, r, texts in [*hand_corpus, *auto_corpus]]


def calendar_records(limit: int | None = None) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Distinct chats (one per user text) and a count of what was dropped and why."""
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for gold, reference, texts in corpus_entries():
        arguments = gold_arguments(gold)
        if arguments is None:
            dropped["not representable in ISO-8601"] += len(texts)
            continue
        ref = datetime.fromisoformat(reference)
        for text in texts:
            text = " ".join(text.split())
            key = text.casefold()
            if not text or key in seen:
                dropped["duplicate text"] += 1
                continue
            seen.add(key)
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": system_prompt(ref)},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": format_tool_call(CALENDAR_TOOL, arguments)},
                    ],
                    "metadata": {"adapter": EXPERT, "source": SOURCE, "license": LICENSE, "intent": CALENDAR_TOOL,
                                 "gold": gold,
                                 "reference": reference},
                }
            )
            if limit is not None and len(records) >= limit:
                return records, dropped
    return records, dropped
