"""Structured output with xgrammar, the grammar library vLLM uses (and runs on the CPU): a request's
`StructuredOutput` becomes a grammar, the grammar a token mask at every step of the row it constrains.

Three layers, each used by one caller:
- `grammar_of` / `check`: a constraint as an xgrammar `Grammar`, tokenizer-free, by the rules of vLLM's
  xgrammar backend (a JSON schema with any whitespace and no properties beyond the schema's, any JSON
  object, a regex, a choice among strings, an EBNF grammar). The API checks every constraint this way
  before a request is routed or streamed, so a schema that cannot be enforced is a 400 naming its
  field on either engine, never a 500 and never an error event after a 200.
- `GrammarCompiler`: the embedded engine's compiler, one per tokenizer (the model's real vocabulary
  size, the engine's end-of-sequence ids as the grammar's stop tokens), compiled grammars cached, and
  one `RowGrammar` (an xgrammar matcher) per constrained row, made before the row is queued.
- `TokenMask`: ONE bitmask for the running batch, filled for the constrained rows only and applied to
  their logits before sampling; free rows are never touched, and with no constrained row nothing runs.

When a row's grammar is complete only the stop tokens are allowed, so the row samples one and the
output builder ends it with finish_reason "stop", the same rule as an unconstrained answer.

What a client can make the server compile is bounded: the constraint's size, its JSON nesting, the
number of choices, and the time (one compile thread; a compile that runs too long is refused).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import xgrammar as xgr

from service.engine.base import StructuredOutput
from service.engine.errors import ConstraintError, EngineUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_SPEC_CHARS = 65_536  # a schema (serialized), a regex, a grammar, or all the choices together
MAX_JSON_NESTING = 64  # objects and arrays inside each other, vLLM's bound (OpenAI allows 10)
MAX_CHOICES = 1024
# a bounded repetition costs compile time in proportion to its bound (`.{0,3000}`: 3.6 s on this CPU,
# the compile runs on after a timeout), so bounds above this are refused: regex and grammar
# quantifiers, and a JSON schema's string lengths and patterns
MAX_REPEAT = 1000
COMPILE_TIMEOUT_S = 10.0
COMPILED_CACHE = 64  # compiled grammars kept per tokenizer (a tool set or a schema is usually reused)

# one thread compiles, for every request: a client's slow constraint delays other constraints (each
# bounded by COMPILE_TIMEOUT_S), never the engine's thread or the event loop
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")


def _refused(structured: StructuredOutput, reason: str) -> ConstraintError:
    return ConstraintError(f"{structured.param}: {reason}")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether a JSON value nests objects and arrays deeper than `limit` (iterative: a hostile
    document cannot exhaust the stack here)."""
    level = [value]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, dict | list)
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, dict | list)]
        if not level:
            return False
    return True


_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _repeats_too_much(text: str) -> bool:
    return any(int(bound) > MAX_REPEAT for match in _QUANTIFIER.finditer(text) for bound in match.groups() if bound)


def _schema_repeats_too_much(value: Any) -> bool:
    nodes = [value]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            lengths = [node.get("minLength"), node.get("maxLength")]
            if any(isinstance(n, int | float) and n > MAX_REPEAT for n in lengths):
                return True
            if isinstance(node.get("pattern"), str) and _repeats_too_much(node["pattern"]):
                return True
            nodes.extend(node.values())
        elif isinstance(node, list):
            nodes.extend(node)
    return False


def check_limits(structured: StructuredOutput) -> None:
    """Refuse (400) a constraint too large to compile for a client: checked before any parsing."""
    kinds = sum([structured.json_schema is not None, structured.json_object, structured.regex is not None,
                 structured.choice is not None, structured.grammar is not None])
    if kinds != 1:
        raise _refused(structured, "give exactly one kind of constraint")
    text = structured.json_schema or structured.regex or structured.grammar or ""
    if structured.choice is not None:
        if not structured.choice or len(structured.choice) > MAX_CHOICES:
            raise _refused(structured, f"give 1 to {MAX_CHOICES} choices")
        text = "".join(structured.choice)
    if len(text) > MAX_SPEC_CHARS:
        raise _refused(structured, f"the constraint is over {MAX_SPEC_CHARS} characters")
    if "\x00" in text:
        raise _refused(structured, "the constraint contains a NUL character")
    if structured.json_schema is not None:
        try:
            schema = json.loads(structured.json_schema)
        except (ValueError, RecursionError):
            raise _refused(structured, "the JSON schema is not valid JSON") from None
        if not isinstance(schema, dict | bool):
            raise _refused(structured, "the JSON schema must be an object")
        if _too_deep(schema, MAX_JSON_NESTING):
            raise _refused(structured, f"the JSON schema nests more than {MAX_JSON_NESTING} levels")
        if _schema_repeats_too_much(schema):
            raise _refused(structured, f"the JSON schema bounds a length or repetition above {MAX_REPEAT}")
    elif (structured.regex is not None or structured.grammar is not None) and _repeats_too_much(text):
        raise _refused(structured, f"the constraint bounds a repetition above {MAX_REPEAT}")


def choice_ebnf(choices: Sequence[str]) -> str:
    """A choice among exact strings as an EBNF grammar (vLLM's `choice_as_grammar`)."""
    def literal(text: str) -> str:
        escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        return "".join(escapes.get(c, c if ord(c) >= 0x20 and ord(c) != 0x7F else f"\\u{ord(c):04x}") for c in text)

    return "root ::= " + " | ".join(f'"{literal(c)}"' for c in choices)


@functools.lru_cache(maxsize=256)
def grammar_of(structured: StructuredOutput) -> xgr.Grammar:
    """The constraint as a tokenizer-free xgrammar `Grammar`, as vLLM's xgrammar backend builds it;
    a 400 naming the constraint's field when it cannot be enforced (xgrammar's own words go to the
    log: they name its source files). Call `check_limits` first."""
    kind = ("JSON schema" if structured.json_schema is not None or structured.json_object
            else "regular expression" if structured.regex is not None
            else "choice" if structured.choice is not None else "grammar")
    try:
        if structured.json_schema is not None:
            return xgr.Grammar.from_json_schema(structured.json_schema, any_whitespace=True, strict_mode=True)
        if structured.json_object:
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=True, strict_mode=True)
        if structured.regex is not None:
            return xgr.Grammar.from_regex(structured.regex)
        if structured.choice is not None:
            return xgr.Grammar.from_ebnf(choice_ebnf(structured.choice))
        return xgr.Grammar.from_ebnf(structured.grammar or "")
    except (RuntimeError, ValueError, TypeError) as exc:
        log.info("refused a %s constraint (%s): %s", kind, structured.param, exc)
        hint = {"JSON schema": "not a JSON schema this server can enforce",
                "regular expression": "not a regular expression this server can enforce",
                "choice": "the choices cannot be enforced",
                "grammar": "not a valid EBNF grammar (xgrammar's syntax, with a rule named root)"}[kind]
        raise _refused(structured, hint) from None


async def bounded(fn: Callable[[], T], param: str) -> T:
    """Run `fn` (a conversion or a compile) on the compile thread, at most COMPILE_TIMEOUT_S: one that
    runs longer is refused (400, naming `param`); one that waited that long behind others is told to
    retry (503)."""
    started = threading.Event()

    def run() -> T:
        started.set()
        return fn()

    future = asyncio.get_running_loop().run_in_executor(_POOL, run)
    try:
        return await asyncio.wait_for(future, COMPILE_TIMEOUT_S)
    except TimeoutError:
        if started.is_set():
            raise ConstraintError(f"{param}: the constraint is too complex (compiling it took over "
                                  f"{COMPILE_TIMEOUT_S:g} s)") from None
        raise EngineUnavailableError("the server is busy compiling other constraints; retry", retry_after_s=1) from None


async def check(structured: StructuredOutput) -> None:
    """The API's check of a request's constraint, before it is routed or streamed (either engine)."""
    check_limits(structured)
    await bounded(lambda: grammar_of(structured), structured.param)


def json_schema_ebnf(schema: dict[str, Any]) -> str:
    """A JSON schema as EBNF in the compact form `json.dumps` writes (", " and ": ", no other
    whitespace, declared property order): what the experts are trained on, and a form a grammar can
    wrap in other text. Raises ValueError when xgrammar cannot convert it."""
    try:
        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True))
    except RuntimeError as exc:
        log.info("refused a JSON schema: %s", exc)
        raise ValueError("not a JSON schema this server can enforce") from None


def wrapped_ebnf(inner: str, before: str, after: str, repeat_with: str | None = None) -> str:
    """`inner` (an EBNF grammar) between two literal strings, optionally repeated one or more times with
    `repeat_with` between the repetitions (Qwen's `<tool_call>` blocks, one per call)."""
    blocks = xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(before)}"),
                                xgr.Grammar.from_ebnf(inner),
                                xgr.Grammar.from_ebnf(f"root ::= {json.dumps(after)}"))
    text = str(blocks)
    if repeat_with is None:
        return text
    head, _, rules = text.partition("\n")
    if not head.startswith("root ::= "):  # xgrammar prints the root rule first
        raise ValueError("unexpected grammar layout")
    body = head[len("root ::= "):]
    text = f"root ::= {body} ({json.dumps(repeat_with)} {body})*\n{rules}"
    xgr.Grammar.from_ebnf(text)  # the result is checked here, not at the first request that uses it
    return text


class RowGrammar:
    """One constrained row's matcher: fills the row's line of the batch's bitmask, accepts its tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (never expected: the
        token was drawn from the masked logits)."""
        return bool(self.matcher.accept_token(int(token)))


class TokenMask:
    """ONE token bitmask for the running batch (grown to the largest batch seen, then reused): each
    step, the constrained rows' lines are filled by their matchers and applied to those rows' logits,
    in place; the other rows' logits are left as they are, and without a constrained row nothing runs."""

    def __init__(self) -> None:
        self.bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> None:
        rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
        if not rows:
            return
        vocab = logits.shape[-1]
        if self.bitmask is None or self.bitmask.shape[0] < len(grammars) or self.bitmask.shape[1] * 32 < vocab:
            self.bitmask = xgr.allocate_token_bitmask(max(len(grammars), 8), vocab)
        for i in rows:
            grammars[i].matcher.fill_next_token_bitmask(self.bitmask, i)  # type: ignore[union-attr]
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=rows, vocab_size=vocab)


class GrammarCompiler:
    """The embedded engine's compiler: one xgrammar compiler for the tokenizer, built at the first
    constrained request (a server that never sees one never pays for it), and the compiled grammars
    cached by constraint. Compiles run on the compile thread, before the request is queued."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Collection[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the model's logits width, which may exceed the tokenizer's
        self._stop_ids = sorted(stop_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutput, xgr.CompiledGrammar] = OrderedDict()  # compile thread only

    def _compile(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        compiled = self._cache.get(structured)
        if compiled is not None:
            self._cache.move_to_end(structured)
            return compiled
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        grammar = grammar_of(structured)
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except RuntimeError as exc:
            log.info("could not compile a constraint (%s): %s", structured.param, exc)
            raise _refused(structured, "the constraint cannot be compiled for this model") from None
        self._cache[structured] = compiled
        if len(self._cache) > COMPILED_CACHE:
            self._cache.popitem(last=False)
        return compiled

    async def row_grammar(self, structured: StructuredOutput) -> RowGrammar:
        """A fresh matcher for one request's row (off the engine thread and the event loop)."""
        check_limits(structured)
        return await bounded(lambda: RowGrammar(self._compile(structured)), structured.param)
