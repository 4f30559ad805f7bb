"""The paper's real datasets, read with ``datasets.load_dataset`` into the shared schema.

Every loader turns one hub dataset into rows of ``echochamber.data.synthetic.SCHEMA`` (source, id,
question, solution, answer, split, difficulty), so the rest of the workflow cannot tell real data from
the synthetic world. ``datasets`` honours the user's ``HF_HOME`` / ``HF_DATASETS_CACHE`` cache,
``HF_TOKEN`` and ``HF_HUB_OFFLINE``.

A source spec (``data.sources.<name>`` in the config, ``kind: hub``) holds:

- ``loader``: one of ``LOADERS`` (finemath, algebraic_stack, tinygsm, omi1, omi2, metamathqa, gsm8k,
  math500, aime);
- ``path`` (optional): another hub id, a local folder (for example a ``hf download``
  snapshot, or files named by split such as ``train.parquet`` / ``test.jsonl``), or one local data file
  (``.parquet``, ``.jsonl``, ``.json``, ``.csv``, optionally compressed) that holds the loader's primary
  split (``train`` for training sets and corpora, ``test`` for benchmarks);
- ``splits`` (optional): our split -> hub split, merged over the loader's defaults; a value may slice
  (``train[:5000]``), name another hub split (``train_1M``), be a local data file, or be ``""`` for an
  empty split;
- ``max_docs`` (optional): at most this many rows per split, after filtering (the first ones);
- ``streaming`` (optional): read without downloading whole datasets; on by default when ``max_docs``
  is set, so a capped FineMath read fetches only what it keeps.

Splits per loader (``load_splits`` always returns the keys train, test and hard):

=================  ===============================  =========================================
loader             train                            test / hard
=================  ===============================  =========================================
finemath           finemath-3plus train             empty / empty (raw corpus)
algebraic_stack    proof-pile-2 algebraic-stack     empty / empty (raw corpus)
tinygsm            train (question, code)           empty / empty
omi1               train, ``is_correct`` rows only  empty / empty
omi2               train (14M; ``train_1M`` ...)    empty / empty
metamathqa         train                            empty / empty
gsm8k              train (7,473)                    test (1,319) / empty
math500            empty                            test (500) / empty
aime               empty                            train (90: the whole set) / empty
=================  ===============================  =========================================

Raw corpora have no question: a document's first paragraph becomes the question and the rest the
solution, split at the first blank line whose neighbours are not blank, so that
``formats.document(question, solution)`` (question + blank line + solution) gives back the stripped
text exactly. A document with no such blank line keeps the whole text as solution and an empty
question.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from echochamber.data.synthetic import SCHEMA, SPLITS
from echochamber.io import atomic_path


class HubError(RuntimeError):
    """A dataset that cannot be read or does not look as expected; the message is one sentence."""


# --- converters: one hub row -> (question, solution, answer, difficulty, id or None), or None to drop


def split_document(text: str) -> tuple[str, str]:
    """Split a raw document into (first paragraph, rest) so that ``q + "\\n\\n" + s`` is the stripped text."""
    text = (text or "").strip()
    for m in re.finditer(r"\n\n", text):
        i, j = m.start(), m.end()
        if not text[i - 1].isspace() and not text[j].isspace():
            return text[:i], text[j:]
    return "", text


def gsm8k_gold(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, without thousands separators."""
    _, sep, gold = (answer or "").rpartition("####")
    return gold.strip().replace(",", "") if sep else ""


_METAMATH_ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.DOTALL)


def metamath_answer(response: str) -> str:
    """The final answer MetaMathQA responses end with (``The answer is: 18``)."""
    m = _METAMATH_ANSWER.search(response or "")
    return m.group(1).strip() if m else ""


def _level(value) -> int:
    """MATH levels come as 3 or "Level 3"; anything else is 0."""
    if isinstance(value, int):
        return value
    m = re.search(r"\d+", str(value or ""))
    return int(m.group()) if m else 0


def _corpus(row: dict):
    text = row["text"]
    if not text or not text.strip():
        return None
    q, s = split_document(text)
    return q, s, "", 0, None


def _tinygsm(row: dict):
    return row["question"], row["code"], "", 0, None


def _omi1(row: dict):
    if row["is_correct"] is not True:
        return None
    return row["question"], row["generated_solution"], _str(row.get("expected_answer")), 0, None


def _omi2(row: dict):
    return row["problem"], row["generated_solution"], _str(row.get("expected_answer")), 0, None


def _metamathqa(row: dict):
    return row["query"], row["response"], metamath_answer(row["response"]), 0, None


def _gsm8k(row: dict):
    return row["question"], row["answer"], gsm8k_gold(row["answer"]), 0, None


def _math500(row: dict):
    return (row["problem"], row["solution"], _str(row["answer"]), _level(row.get("level")),
            _str(row.get("unique_id")) or None)


def _aime(row: dict):
    return row["problem"], row["solution"], _str(row["answer"]), 0, _str(row.get("id")) or None


def _str(value) -> str:
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class Loader:
    """Where a dataset lives on the hub, which columns it needs and how a row maps to the schema."""
    hub_id: str
    columns: tuple[str, ...]
    convert: Callable[[dict], object]
    splits: dict[str, str]                      # our split -> hub split ("" = empty)
    primary: str                                # the split a single local file provides
    config: str | None = None
    data_files: dict[str, str] | None = None    # hub split -> file pattern, for repos with a loading script
    builder: str = "json"                       # the datasets builder that reads those files
    corpus: bool = False
    include: str = ""                           # what of the repo to download for a local copy
    notes: str = field(default="", compare=False)


def _only(split: str, hub_split: str) -> dict[str, str]:
    return {s: (hub_split if s == split else "") for s in SPLITS}


LOADERS: dict[str, Loader] = {
    "finemath": Loader("HuggingFaceTB/finemath", ("text",), _corpus, _only("train", "train"), "train",
                       config="finemath-3plus", corpus=True, include="finemath-3plus/*"),
    # proof-pile-2 ships a loading script, which datasets >= 4 refuses to run: read its JSON-lines files
    # straight from the repo (hf:// paths, through the same cache and token).
    "algebraic_stack": Loader("EleutherAI/proof-pile-2", ("text",), _corpus, _only("train", "train"), "train",
                              data_files={"train": "algebraic-stack/train/*.jsonl*",
                                          "validation": "algebraic-stack/validation/*.jsonl*",
                                          "test": "algebraic-stack/test/*.jsonl*"},
                              corpus=True, include="algebraic-stack/*",
                              notes="its .jsonl.zst files need the zstandard package"),
    "tinygsm": Loader("TinyGSM/TinyGSM", ("question", "code"), _tinygsm, _only("train", "train"), "train"),
    "omi1": Loader("nvidia/OpenMathInstruct-1", ("question", "generated_solution", "is_correct"), _omi1,
                   _only("train", "train"), "train"),
    "omi2": Loader("nvidia/OpenMathInstruct-2", ("problem", "generated_solution"), _omi2,
                   _only("train", "train"), "train"),
    "metamathqa": Loader("meta-math/MetaMathQA", ("query", "response"), _metamathqa,
                         _only("train", "train"), "train"),
    "gsm8k": Loader("openai/gsm8k", ("question", "answer"), _gsm8k,
                    {"train": "train", "test": "test", "hard": ""}, "train", config="main"),
    "math500": Loader("HuggingFaceH4/MATH-500", ("problem", "solution", "answer"), _math500,
                      _only("test", "test"), "test"),
    "aime": Loader("AI-MO/aimo-validation-aime", ("problem", "solution", "answer"), _aime,
                   _only("test", "train"), "test"),
}

_DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_COMPRESSION = {".gz", ".zst", ".bz2", ".xz"}


def _builder(path: str) -> str | None:
    """The packaged ``datasets`` builder for a local data file (``x.jsonl.zst`` -> json), or None."""
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _DATA_SUFFIXES.get(suffixes[-1]) if suffixes else None


def _is_local_file(ref: str) -> bool:
    return _builder(ref) is not None and Path(ref).expanduser().is_file()


def _folder_has_config(folder: Path, config: str) -> bool:
    """A hub snapshot folder declares its configs in the README's YAML header."""
    readme = folder / "README.md"
    return readme.is_file() and re.search(rf"config_name:\s*['\"]?{re.escape(config)}\b", readme.read_text(
        errors="replace")) is not None


def _resolve(name: str, spec: dict) -> Loader:
    loader_name = spec.get("loader")
    if loader_name not in LOADERS:
        raise HubError(f"data.sources.{name}.loader: {loader_name!r} is not a known loader; "
                       f"allowed values: {', '.join(LOADERS)}")
    return LOADERS[loader_name]


def split_refs(name: str, spec: dict) -> dict[str, str]:
    """Our split -> what to read for it (hub split, slice or local file; "" = empty)."""
    loader = _resolve(name, spec)
    refs = dict(loader.splits)
    path = spec.get("path")
    if path and _is_local_file(path):
        # One local file holds the primary split only.
        refs = {s: (path if s == loader.primary else "") for s in SPLITS}
    refs.update(spec.get("splits") or {})
    unknown = sorted(set(refs) - set(SPLITS))
    if unknown:
        raise HubError(f"data.sources.{name}.splits: unknown split {', '.join(map(repr, unknown))}; "
                       f"allowed keys: {', '.join(SPLITS)}")
    return refs


def _where(name: str, spec: dict, loader: Loader) -> str:
    path = spec.get("path")
    if path:
        return f"{path!r}"
    return f"{loader.hub_id!r}" + (f" (config {loader.config})" if loader.config else "")


def _open(name: str, spec: dict, loader: Loader, ref: str):
    """The ``datasets`` (Iterable)Dataset for one split reference."""
    from datasets import load_dataset

    streaming = spec.get("streaming")
    if streaming is None:
        streaming = spec.get("max_docs") is not None
    path = spec.get("path") or loader.hub_id
    if _is_local_file(ref):
        kwargs = dict(path=_builder(ref), data_files={"train": str(Path(ref).expanduser())}, split="train")
    elif Path(path).expanduser().is_dir():
        folder = Path(path).expanduser()
        pattern = _pattern(name, path, loader, ref) if loader.data_files else None
        if pattern and any(folder.glob(pattern)):
            # a snapshot of a repo with a loading script: read its files, never the script
            kwargs = dict(path=loader.builder, data_files={ref.partition("[")[0]: str(folder / pattern)}, split=ref)
        else:
            kwargs = dict(path=str(folder), split=ref)
            if loader.config and _folder_has_config(folder, loader.config):
                kwargs["name"] = loader.config
    elif spec.get("path") and _builder(path) is not None:
        raise HubError(f"data.sources.{name}.path: local file {path} does not exist")
    elif loader.data_files:
        files = {ref.partition("[")[0]: f"hf://datasets/{path}/{_pattern(name, path, loader, ref)}"}
        kwargs = dict(path=loader.builder, data_files=files, split=ref)
    else:
        kwargs = dict(path=path, split=ref)
        if loader.config and not spec.get("path"):
            kwargs["name"] = loader.config
    return load_dataset(streaming=streaming, **kwargs)


def _pattern(name: str, path: str, loader: Loader, ref: str) -> str:
    hub_split = ref.partition("[")[0]
    if hub_split not in loader.data_files:
        raise HubError(f"data.sources.{name}.splits: {ref!r} is not a split of {path}; "
                       f"known: {', '.join(loader.data_files)}")
    return loader.data_files[hub_split]


def _explain(name: str, spec: dict, loader: Loader, ref: str, e: Exception) -> HubError:
    what = _where(name, spec, loader)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    include = f" --include '{loader.include}'" if loader.include else ""
    hint = (f"download it where the hub is reachable (for example `hf download "
            f"--repo-type dataset {loader.hub_id}{include} --local-dir DIR`) and set data.sources.{name}.path "
            f"to that folder or to a local parquet/jsonl file")
    if loader.notes:
        hint += f"; note that {loader.notes}"
    return HubError(f"cannot read split {ref!r} of dataset {name} from {what}: {reason}; {hint}")


def iter_rows(name: str, spec: dict, split: str) -> Iterator[dict]:
    """Rows of one of our splits (train, test, hard) of source ``name``, in ``SCHEMA``'s column order."""
    loader = _resolve(name, spec)
    ref = split_refs(name, spec).get(split, "")
    if not ref:
        return
    max_docs = spec.get("max_docs")
    readable = (OSError, ValueError, ImportError, KeyError, RuntimeError)
    try:
        from datasets.exceptions import DatasetsError
        readable = readable + (DatasetsError,)
    except ImportError:  # pragma: no cover - older datasets
        pass
    try:
        ds = _open(name, spec, loader, ref)
    except HubError:
        raise
    except readable as e:
        raise _explain(name, spec, loader, ref, e) from None
    columns = list(ds.column_names or [])
    missing = [c for c in loader.columns if columns and c not in columns]
    if missing:
        raise HubError(f"dataset {name} from {_where(name, spec, loader)}, split {ref!r}, has no column "
                       f"{', '.join(map(repr, missing))} (it has {', '.join(columns)}); a {spec['loader']} "
                       f"source needs the columns of {loader.hub_id}: {', '.join(loader.columns)}")
    n = 0
    rows = iter(ds)
    while max_docs is None or n < max_docs:
        try:
            row = next(rows)
        except StopIteration:
            break
        except readable as e:  # streaming reads fail late
            raise _explain(name, spec, loader, ref, e) from None
        try:
            out = loader.convert(row)
        except KeyError as e:
            raise HubError(f"dataset {name} from {_where(name, spec, loader)}, split {ref!r}: a row has no "
                           f"column {e}; a {spec['loader']} source needs {', '.join(loader.columns)}") from None
        if out is None:
            continue
        question, solution, answer, difficulty, row_id = out
        yield {"source": name, "id": row_id or f"{name}-{split}-{n}", "question": question or "",
               "solution": solution or "", "answer": answer, "split": split, "difficulty": int(difficulty)}
        n += 1


def load_splits(name: str, spec: dict) -> dict[str, list[dict]]:
    """All three splits of a hub source as lists of schema rows (keys train, test, hard; some may be empty).

    Holds every row in memory: for a full corpus use ``write_splits``, which streams to parquet.
    """
    return {split: list(iter_rows(name, spec, split)) for split in SPLITS}


def write_splits(name: str, spec: dict, outputs: dict[str, str], batch_rows: int = 50_000) -> dict[str, int]:
    """Stream each split to its parquet output atomically, ``batch_rows`` rows at a time; rows per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = {}
    for split, path in outputs.items():
        with atomic_path(path) as tmp:
            n, batch = 0, []
            with pq.ParquetWriter(tmp, SCHEMA) as writer:
                for row in iter_rows(name, spec, split):
                    batch.append(row)
                    if len(batch) >= batch_rows:
                        writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                        n, batch = n + len(batch), []
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
                    n += len(batch)
        counts[split] = n
    return counts
