"""Class names: the one normaliser of names and the one parser of the label-spec syntax.

A class is a name or a tuple of names (synonyms whose text embeddings are averaged). The label-spec syntax
of ``--labels`` / ``--background`` and of the trainer's command line is ``"car|automobile,dog"``: classes
separated by ``,``, synonyms of one class by ``|``. Pure Python (no torch), so the command line and the
settings can use it without loading a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "ClassNames", "normalize_names", "normalize_classes", "name_owners", "parse_label_spec", "format_label_spec",
]  # fmt: skip

#: One class: a name, or several names (synonyms) whose embeddings are averaged.
ClassNames = str | Sequence[str]


def normalize_names(names: Iterable[str]) -> tuple[str, ...]:
    """The one normaliser of class names: each name stripped of surrounding whitespace (inner spaces kept:
    ``"dining table"``), empty names dropped, repeats dropped keeping the first, order kept.

    ``[" car", "automobile ", "", "car"]`` -> ``("car", "automobile")``.
    """
    return tuple(dict.fromkeys(n.strip() for n in names if n and n.strip()))


def normalize_classes(classes: Sequence[ClassNames]) -> tuple[tuple[str, ...], ...]:
    """``["cat", ("car", "automobile")]`` -> ``(("cat",), ("car", "automobile"))``, names normalised by
    :func:`normalize_names`. Raises ValueError for a class without a usable name, or no class at all."""
    out = []
    for c in classes:
        names = normalize_names((c,) if isinstance(c, str) else c)
        if not names:
            raise ValueError(f"a class has no usable name: {c!r}")
        out.append(names)
    if not out:
        raise ValueError("no class names given")
    return tuple(out)


def name_owners(classes: Sequence[Sequence[str]]) -> tuple[int, ...]:
    """The name -> class map of normalised classes, one entry per name in order:
    ``(("cat",), ("car", "automobile"))`` -> ``(0, 1, 1)``. Text embeddings are kept one row per name in
    this order (the store, ``MaskCLIP.name_embeddings``); a preset's synonym rule merges them per class."""
    return tuple(k for k, names in enumerate(classes) for _ in names)


# Characters a backslash escapes inside a name.
_SPECIAL = {",", "|", "\\"}


def parse_label_spec(spec: str | None) -> tuple[tuple[str, ...], ...]:
    """``"car|automobile, dog"`` -> ``(("car", "automobile"), ("dog",))``.

    Classes are separated by ``,``, synonyms by ``|``; every name goes through :func:`normalize_names`
    (so whitespace around names is ignored, inner spaces kept), and classes left without a name are dropped
    (``"a,,b,"`` is two classes). A backslash makes the next character literal, so ``"a\\,b"`` is the one
    name ``a,b``. ``None`` or an empty string -> ``()``.
    """
    classes: list[list[str]] = []
    names: list[str] = []
    name: list[str] = []
    chars = iter(spec or "")
    for ch in chars:
        if ch == "\\":
            name.append(next(chars, "\\"))  # a trailing backslash stands for itself
        elif ch == "|":
            names.append("".join(name))
            name = []
        elif ch == ",":
            names.append("".join(name))
            classes.append(names)
            names, name = [], []
        else:
            name.append(ch)
    names.append("".join(name))
    classes.append(names)
    return tuple(c for c in (normalize_names(c) for c in classes) if c)


def format_label_spec(classes: Sequence[ClassNames]) -> str:
    """The inverse of :func:`parse_label_spec`: ``[("car", "automobile"), "dog"]`` -> ``"car|automobile,dog"``,
    with ``,``, ``|`` and ``\\`` inside a name escaped by a backslash."""

    def escape(name: str) -> str:
        return "".join("\\" + ch if ch in _SPECIAL else ch for ch in name)

    return ",".join("|".join(escape(n) for n in names) for names in normalize_classes(classes))
