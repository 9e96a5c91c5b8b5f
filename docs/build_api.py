"""Write docs/API.md, the API reference, from the docstrings of the public API.

    python docs/build_api.py            rewrite docs/API.md
    python docs/build_api.py --check    exit 1 if docs/API.md differs from what the docstrings give

What is documented: every name in ``vera_kernels.__all__`` (functions with their signatures; classes with
their constructor and public methods) and of ``vera_kernels.triton.__all__``, then the command-line modules
(their module docstrings). A docstring is rendered as Markdown paragraphs, except blocks that contain an
indented line (formulas, tables, lists of options), which are kept verbatim in a fenced block. Nothing but
the standard library and the package itself is needed; the Triton part is skipped, with a note, where
Triton cannot be imported.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(ROOT, "docs", "API.md")
COMMAND = "python docs/build_api.py"
# Modules run with `python -m`: their module docstring is their manual.
COMMAND_MODULES = ["vera_kernels.verify", "vera_kernels.demo", "vera_kernels.export"]


def _markdown(doc: str | None) -> str:
    """A docstring as Markdown: plain paragraphs stay text (RST ``code`` becomes `code`); a block with any
    indented line is fenced verbatim."""
    if not doc:
        return "*(no docstring)*"
    blocks = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    out = []
    for block in blocks:
        lines = block.splitlines()
        if any(line.startswith((" ", "\t")) for line in lines):
            out.append("```text\n" + block + "\n```")
        else:
            text = " ".join(line.strip() for line in lines)
            text = re.sub(r"``([^`]+)``", r"`\1`", text)
            text = re.sub(r":(?:func|class|meth|mod|attr):`~?([^`]+)`", r"`\1`", text)
            # A docstring's pointer into the design document becomes a link (this page sits beside it).
            text = re.sub(r"docs/DESIGN\.md(#[a-z0-9-]+)?", r"[docs/DESIGN.md\1](DESIGN.md\1)", text)
            out.append(_escape_outside_code(text))
    return "\n\n".join(out)


def _escape_outside_code(text: str) -> str:
    # Outside `code` spans, < would start an HTML tag and * emphasis in a renderer: escape them.
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace("*", r"\*") for p in parts)


class _Raw:
    """An annotation kept as the source text (the package uses postponed annotations): printed unquoted."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name

    def raw(annotation):
        return _Raw(annotation) if isinstance(annotation, str) else annotation

    sig = sig.replace(parameters=[p.replace(annotation=raw(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=raw(sig.return_annotation))
    return f"{name}{sig}"


def _anchor(title: str) -> str:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^a-z0-9_ -]", "", title.lower()).replace(" ", "-")


def _own_members(cls):
    """Public methods and properties defined by the class or its package-internal bases, in source order;
    overrides of nn.Module's hooks (extra_repr, ...) left out, forward kept."""
    from torch import nn

    seen, members = {name for name in dir(nn.Module) if name != "forward"}, []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vera_kernels"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                seen.add(name)
                members.append((name, value))
    return members


def _document(qualified: str, obj) -> list[str]:
    lines = [f"### `{qualified}`", ""]
    if inspect.isclass(obj):
        lines += ["```python", f"class {_signature(qualified.rsplit('.', 1)[-1], obj)}", "```", "", _markdown(obj.__doc__), ""]
        for name, member in _own_members(obj):
            if isinstance(member, property):
                lines += [f"#### `{qualified}.{name}` (property)", "", _markdown(member.__doc__), ""]
            else:
                lines += [f"#### `{qualified}.{name}`", "", "```python", _signature(name, member), "```", "",
                          _markdown(member.__doc__), ""]
    elif callable(obj):
        lines += ["```python", _signature(qualified.rsplit(".", 1)[-1], obj), "```", "", _markdown(obj.__doc__), ""]
    else:
        lines += ["```python", f"{qualified.rsplit('.', 1)[-1]} = {obj!r}", "```", ""]
    return lines


def render() -> str:
    """The whole page, deterministic for given docstrings and signatures."""
    sys.path.insert(0, ROOT)
    import vera_kernels

    sections = [("vera_kernels", vera_kernels, sorted(vera_kernels.__all__, key=str.lower))]
    try:
        triton_api = importlib.import_module("vera_kernels.triton")
        sections.append(("vera_kernels.triton", triton_api, sorted(triton_api.__all__, key=str.lower)))
    except Exception as exc:  # no Triton here: the page says so instead of failing
        sections.append(("vera_kernels.triton", None, f"not documented: Triton could not be imported ({exc})"))

    lines = ["# API reference", "",
             f"Generated from the docstrings by `{COMMAND}`; do not edit by hand (a test checks that this page",
             "matches the docstrings). The design behind it: [DESIGN.md](DESIGN.md).", ""]
    toc = []
    body = []
    for module_name, module, names in sections:
        body += [f"## `{module_name}`", ""]
        toc.append(f"- [`{module_name}`](#{_anchor(module_name)})")
        if module is None:
            body += [names, ""]
            continue
        body += [_markdown(module.__doc__), ""]
        for name in names:
            qualified = f"{module_name}.{name}"
            toc.append(f"  - [`{name}`](#{_anchor(qualified)})")
            body += _document(qualified, getattr(module, name))
    body += ["## Commands", ""]
    toc.append("- [Commands](#commands)")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        body += [f"### `python -m {module_name}`", "", _markdown(module.__doc__), ""]
        toc.append(f"  - [`python -m {module_name}`](#{_anchor('python -m ' + module_name)})")
    return "\n".join(lines + toc + [""] + body).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    args = parser.parse_args(argv)
    page = render()
    current = open(API_MD, encoding="utf-8").read() if os.path.exists(API_MD) else ""
    if args.check:
        if current == page:
            print(f"{os.path.relpath(API_MD, ROOT)} is up to date")
            return 0
        diff = difflib.unified_diff(current.splitlines(), page.splitlines(), "docs/API.md", "from the docstrings",
                                    lineterm="", n=1)
        print("\n".join(list(diff)[:40]))
        print(f"docs/API.md is out of date: run `{COMMAND}`")
        return 1
    with open(API_MD, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {os.path.relpath(API_MD, ROOT)} ({len(page.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
