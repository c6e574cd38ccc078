"""Tables read through the `datasets` library: a hub id (`sentence-transformers/all-nli`), a local folder that
`datasets.load_dataset` reads (files, or a hub repository's copy with its README configs), or a folder written by
`save_to_disk`.

One function for training rows and evaluation data alike, so every caller gets the same rules: a configuration of
a `save_to_disk` copy is its subfolder (`PATH/SUBSET`, as `DatasetDict.save_to_disk` of each configuration would
lay it out), a table with one split needs no split name (MTEB's `corpus` and `queries` configurations each hold one,
named differently from copy to copy), and any failure is one line naming the dataset, never the library's
traceback: offline machines, mistyped ids and missing splits are the usual causes.
"""

from __future__ import annotations

from pathlib import Path

from llm2emb.errors import UserError


def saved_to_disk(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_table(path: str, subset: str | None = None, split: str | None = None):
    """The rows of `path` (configuration `subset`, split `split`; split None: the table's only split)."""
    import datasets

    name = path + (f" ({subset})" if subset else "")
    folder = Path(path).expanduser()
    try:
        if saved_to_disk(folder / subset if subset else folder):
            loaded = datasets.load_from_disk(str(folder / subset if subset else folder))
        else:
            loaded = datasets.load_dataset(path, subset)  # every split: the builder prepares them all anyway
    except Exception as exc:  # datasets raises many types (connection, not found, bad config); one line suffices
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: datasets could not load it: {message}") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded)
    if split is None:
        if len(splits) != 1:
            raise UserError(f"{name}: has splits {', '.join(splits)}; name one (split:)")
        return loaded[splits[0]]
    if split not in loaded:
        raise UserError(f"{name}: no split {split!r}; it has {', '.join(splits)}")
    return loaded[split]


def column_values(table, columns: tuple[str, ...], name: str) -> dict[str, list]:
    """The named columns of `table`, or one line saying which are missing and which there are."""
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise UserError(f"{name}: missing column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}")
    return {column: table[column] for column in columns}
