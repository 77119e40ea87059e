"""Regenerate the key tables of docs/config.md from the pydantic config models.

    python scripts/gen_config_docs.py > /tmp/keys.md   # then paste between the markers
    python scripts/gen_config_docs.py --write          # rewrite docs/config.md in place
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from taxonomist.train.config import Config

BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


def _type(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in typing.get_args(ann))
    if origin is not None:
        return str(ann).replace("typing.", "")
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _optional_section(ann) -> type[BaseModel] | None:
    """The section model of an ``X | None`` annotation whose X is a section."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def tables(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    rows, subs = [], []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            subs.append((name, ann))
            continue
        optional_section = _optional_section(ann)
        if optional_section is not None:  # e.g. data.metadata: None or a section; document both
            subs.append((name, optional_section))
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append(f"| `{prefix}{name}` | {_type(ann)} | `{default}` | {f.description or ''} |")
    out = []
    if rows:
        out += [f"### `{prefix.rstrip('.') or 'top level'}`", "", "| key | type / allowed | default | meaning |",
                "|---|---|---|---|", *rows, ""]
        if model.model_config.get("extra") == "allow":
            out += ["Other keys in this section are passed to the registered component (see docs/models.md).", ""]
    for name, sub in subs:
        out += tables(sub, f"{prefix}{name}.")
    return out


def main() -> None:
    text = "\n".join(tables())
    if "--write" in sys.argv:
        path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
        doc = path.read_text()
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    else:
        print(text)


if __name__ == "__main__":
    main()
