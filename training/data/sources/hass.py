"""Smart-home experts from `home-assistant-intents` (Apache-2.0), expanded with `hassil`.

The package ships sentence *templates* per intent (`<turn> on [the] {area} {name}`), not sentences.
hassil's own `sample_intents` expands them exhaustively and in a fixed order (the first thousand
expansions of a template share their first words) and does not say which slot values it used, so
we walk the same parsed templates (`hassil.expression`) with a seeded random choice at every
alternative, optional and list, and record each list value we pick as a slot. The lists Home
Assistant fills at runtime from the user's house (`{area}`, `{name}`, `{floor}`, shopping items,
media queries, timer names) get the small vocabularies below; `{name}` values carry the entity
domain, so a template that requires `domain: light` is only filled with light names.

Intents are grouped into experts by domain; each record is answered with a JSON tool call
(`{"name": intent, "arguments": slots}`), which is what the expert learns to produce.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from training.data.tool_calls import format_tool_call

SOURCE = "home-assistant-intents"
SOURCE_URL = "https://github.com/home-assistant/intents"
LICENSE = "Apache-2.0"
LANGUAGE = "en"

AREAS = ["kitchen", "living room", "bedroom", "office", "bathroom", "garage", "hallway", "dining room",
         "basement", "guest room", "nursery", "patio"]
FLOORS = ["first", "second", "ground", "top", "upstairs", "downstairs"]
NAMES_BY_DOMAIN: dict[str, list[str]] = {
    "light": ["ceiling light", "desk lamp", "floor lamp", "porch light", "reading lamp", "bedside lamp",
              "kitchen spots", "hallway light", "night light", "LED strip"],
    "switch": ["coffee maker", "fountain pump", "space heater", "Christmas tree", "printer"],
    "climate": ["thermostat", "heat pump", "radiator", "air conditioner"],
    "fan": ["ceiling fan", "desk fan", "bathroom fan"],
    "weather": ["Paris", "London", "New York", "Berlin", "Tokyo", "Sydney"],
    "media_player": ["TV", "living room speaker", "kitchen radio", "soundbar", "bedroom speaker", "Chromecast"],
    "todo": ["groceries", "chores", "work", "packing", "garden"],
    "vacuum": ["Roomba", "Roborock", "Dusty", "Eufy"],  # templates add "vacuum" themselves
    "lawn_mower": ["Automower", "Husqvarna", "backyard", "Gardena"],  # and "mower"
}
ITEMS = ["milk", "eggs", "bread", "apples", "bananas", "coffee beans", "toothpaste", "batteries", "olive oil",
         "rice", "dish soap", "butter", "cheese", "paper towels", "tomatoes", "call the plumber", "pay rent",
         "water the plants", "book flights", "oat milk"]
SEARCH_QUERIES = ["jazz", "the Beatles", "Taylor Swift", "Bohemian Rhapsody", "lo-fi beats", "classical music",
                  "the news", "Miles Davis", "Abbey Road", "Stranger Things", "Daft Punk", "Planet Earth"]
TIMER_NAMES = ["pizza", "pasta", "laundry", "tea", "eggs", "bread", "cookies", "nap"]

# Wildcard lists (free text in Home Assistant) we fill from the vocabularies above; templates using
# any other wildcard (`{message}`, `{timer_command}`, `{zone}`) are skipped.
SUPPLIED_WILDCARDS: dict[str, list[str]] = {
    "shopping_list_item": ITEMS,
    "todo_list_item": ITEMS,
    "search_query": SEARCH_QUERIES,
    "timer_name": TIMER_NAMES,
}


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: the intents it answers and the entity domains its `{name}` slots may name."""

    name: str
    description: str
    intents: frozenset[str]
    domains: frozenset[str] = field(default_factory=frozenset)

    @property
    def system_prompt(self) -> str:
        return f"You handle {self.description}. Reply with one JSON tool call."


EXPERTS: dict[str, ExpertSpec] = {
    spec.name: spec
    for spec in (
        ExpertSpec("lights", "smart home lights and switches",
                   frozenset({"HassTurnOn", "HassTurnOff", "HassLightSet"}), frozenset({"light", "switch"})),
        ExpertSpec("climate", "heating, fans and the weather",
                   frozenset({"HassClimateGetTemperature", "HassClimateSetTemperature", "HassClimateSetFanMode",
                              "HassFanSetSpeed", "HassGetWeather"}),
                   frozenset({"climate", "fan", "weather"})),
        ExpertSpec("timer", "kitchen timers",
                   frozenset({"HassStartTimer", "HassCancelTimer", "HassCancelAllTimers", "HassIncreaseTimer",
                              "HassDecreaseTimer", "HassPauseTimer", "HassUnpauseTimer", "HassTimerStatus"})),
        ExpertSpec("media", "music, TV and volume",
                   frozenset({"HassMediaNext", "HassMediaPrevious", "HassMediaPause", "HassMediaUnpause",
                              "HassMediaPlayerMute", "HassMediaPlayerUnmute", "HassSetVolume",
                              "HassSetVolumeRelative", "HassMediaSearchAndPlay"}),
                   frozenset({"media_player"})),
        ExpertSpec("lists", "shopping and to-do lists",
                   frozenset({"HassShoppingListAddItem", "HassShoppingListCompleteItem", "HassListAddItem",
                              "HassListCompleteItem", "HassListRemoveItem"}),
                   frozenset({"todo"})),
        # not in the demo: the expert `loramux onboard` adds to a running demo service
        ExpertSpec("robots", "robot vacuums and lawn mowers",
                   frozenset({"HassVacuumStart", "HassVacuumReturnToBase", "HassLawnMowerStartMowing",
                              "HassLawnMowerDock"}),
                   frozenset({"vacuum", "lawn_mower"})),
    )
}


@dataclass
class _Template:
    intent: str
    sentence: Any  # hassil.expression.Sentence
    text: str
    fixed_slots: dict[str, Any]
    rules: dict[str, Any]
    names: list[str]  # {name} values allowed here (domain-filtered)


def load_intents(language: str = LANGUAGE) -> Any:
    from hassil.intents import Intents
    from home_assistant_intents import get_intents

    data = get_intents(language)
    if data is None:
        raise ValueError(f"home-assistant-intents has no language {language!r}")
    return Intents.from_dict(data)


def _domains(value: Any) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else {str(v) for v in value}


def _templates(intents: Any, spec: ExpertSpec) -> list[_Template]:
    """The templates of the expert's intents that we can fill, with the `{name}` values each allows."""
    from hassil.intents import WildcardSlotList

    out: list[_Template] = []
    for intent_name in sorted(spec.intents):
        intent = intents.intents.get(intent_name)
        if intent is None:
            continue
        for data in intent.data:
            rules = {**intents.expansion_rules, **data.expansion_rules}
            fixed = dict(data.slots or {})
            fixed_domain = _domains(fixed.get("domain"))
            if fixed_domain is not None and spec.domains and not fixed_domain <= spec.domains:
                continue
            required = _domains((data.requires_context or {}).get("domain"))
            excluded = _domains((data.excludes_context or {}).get("domain")) or set()
            allowed = set(spec.domains) if required is None else required & set(spec.domains)
            allowed -= excluded
            names = sorted({n for d in allowed for n in NAMES_BY_DOMAIN.get(d, [])})
            for sentence, text in zip(data.sentences, data.sentence_texts, strict=False):
                lists = set(sentence.list_names(rules))
                if "name" in lists and not names:
                    continue
                wild = {n for n in lists if isinstance(intents.slot_lists.get(n), WildcardSlotList)}
                if wild - set(SUPPLIED_WILDCARDS):
                    continue
                out.append(_Template(intent_name, sentence, text, fixed, rules, names))
    return out


class _Sampler:
    """One random expansion of a template, remembering the slot values it chose."""

    def __init__(self, intents: Any, template: _Template, rng: random.Random):
        self.intents = intents
        self.template = template
        self.rng = rng
        self.slots: dict[str, Any] = {}

    def sample(self) -> str:
        from hassil.util import normalize_whitespace

        return normalize_whitespace(self._expand(self.template.sentence.expression)).strip()

    def _expand(self, expr: Any) -> str:
        from hassil.expression import Alternative, ListReference, Permutation, RuleReference, Sequence, TextChunk

        if isinstance(expr, TextChunk):
            return expr.original_text
        if isinstance(expr, Alternative):
            return self._expand(self.rng.choice(expr.items))
        if isinstance(expr, Permutation):
            items = list(expr.items)
            self.rng.shuffle(items)
            return " ".join(self._expand(item) for item in items)
        if isinstance(expr, Sequence):
            return "".join(self._expand(item) for item in expr.items)
        if isinstance(expr, RuleReference):
            return self._expand(self.template.rules[expr.rule_name].expression)
        if isinstance(expr, ListReference):
            return self._list_value(expr)
        raise ValueError(f"unexpected hassil expression {expr!r}")

    def _list_value(self, ref: Any) -> str:
        from hassil.intents import RangeSlotList, TextSlotList

        if ref.is_inline_range:
            start, stop, step = ref.get_inline_range()
            number = self.rng.randrange(start, stop + 1, step)
            self.slots[ref.slot_name] = number
            return str(number)
        vocabulary = self._vocabulary(ref.list_name)
        if vocabulary is not None:
            value = self.rng.choice(vocabulary)
            self.slots[ref.slot_name] = value
            return value
        slot_list = self.intents.slot_lists.get(ref.list_name)
        if isinstance(slot_list, RangeSlotList):
            number = self.rng.randrange(slot_list.start, slot_list.stop + 1, slot_list.step)
            if slot_list.multiplier:
                self.slots[ref.slot_name] = number * slot_list.multiplier
            else:
                self.slots[ref.slot_name] = number
            return str(number)
        if isinstance(slot_list, TextSlotList):
            value = self.rng.choice(slot_list.values)
            text = self._expand(value.text_in)
            self.slots[ref.slot_name] = value.value_out if value.value_out is not None else text.strip()
            return text
        raise ValueError(f"no values for list {{{ref.list_name}}}")

    def _vocabulary(self, list_name: str) -> list[str] | None:
        if list_name == "area":
            return AREAS
        if list_name == "floor":
            return FLOORS
        if list_name == "name":
            return self.template.names
        return SUPPLIED_WILDCARDS.get(list_name)


def _clean_slots(slots: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in slots.items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value
    return out


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([?.!,%])")


def expert_records(
    spec: ExpertSpec, count: int, seed: int, intents: Any | None = None, max_attempts_factor: int = 30
) -> list[dict[str, Any]]:
    """`count` distinct chats for one expert, spread evenly over its intents and their templates."""
    intents = intents if intents is not None else load_intents()
    templates = _templates(intents, spec)
    if not templates:
        raise ValueError(f"expert {spec.name!r}: no usable templates")
    by_intent: dict[str, list[_Template]] = {}
    for template in templates:
        by_intent.setdefault(template.intent, []).append(template)
    rng = random.Random(f"{seed}:{spec.name}")
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    intent_names = sorted(by_intent)
    attempts = 0
    while len(records) < count and attempts < count * max_attempts_factor:
        attempts += 1
        intent = intent_names[attempts % len(intent_names)]
        template = rng.choice(by_intent[intent])
        sampler = _Sampler(intents, template, rng)
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", sampler.sample())
        if not text or text.casefold() in seen:
            continue
        seen.add(text.casefold())
        slots = _clean_slots({**template.fixed_slots, **sampler.slots})
        records.append(
            {
                "messages": [
                    {"role": "system", "content": spec.system_prompt},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": format_tool_call(intent, slots)},
                ],
                "metadata": {"adapter": spec.name, "source": SOURCE, "license": LICENSE, "intent": intent,
                             "template": template.text},
            }
        )
    return records


def iter_expert_names() -> Iterator[str]:
    yield from EXPERTS
