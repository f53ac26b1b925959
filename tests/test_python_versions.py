"""The package runs on every Python ``requires-python`` allows (3.9 up), though CI runs one:
its modules are scanned for what Python 3.9 lacks at run time and ruff's ``target-version``
does not catch (an audit found ``from typing import ParamSpec``: ``import fastoptim`` failed on
3.9).  Imports under ``if TYPE_CHECKING:`` and annotations (never evaluated: every module has
``from __future__ import annotations``) may use anything."""

from __future__ import annotations

import ast
from pathlib import Path

import fastoptim

# Names typing gained after 3.9 (3.10: ParamSpec...; 3.11: Self, Never...; 3.12+: override...)
NEWER_TYPING = {
    "ParamSpec", "ParamSpecArgs", "ParamSpecKwargs", "Concatenate", "TypeAlias", "TypeGuard",
    "is_typeddict", "Self", "LiteralString", "Never", "assert_never", "assert_type",
    "reveal_type", "Required", "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform",
    "get_overloads", "clear_overloads", "override", "TypeAliasType", "get_protocol_members",
    "is_protocol", "ReadOnly", "TypeIs", "NoDefault",
}  # fmt: skip
NEWER_ITERTOOLS = {"pairwise", "batched"}


def _modules() -> list[Path]:
    return sorted(Path(fastoptim.__file__).parent.rglob("*.py"))


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typed = _type_checking_blocks(tree)
    out = []
    futures = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    annotated = any(
        isinstance(n, ast.AnnAssign) or (isinstance(n, ast.arg) and n.annotation is not None)
        or (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is not None)
        for n in ast.walk(tree)
    )  # fmt: skip
    if annotated and not any(a.name == "annotations" for n in futures for a in n.names):
        out.append(f"{path.name}: annotations without 'from __future__ import annotations'")
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if id(node) in typed:
            continue
        if isinstance(node, ast.ImportFrom) and node.module in ("typing", "itertools"):
            newer = NEWER_TYPING if node.module == "typing" else NEWER_ITERTOOLS
            out += [f"{where}: {node.module}.{a.name}" for a in node.names if a.name in newer]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {("typing", n) for n in NEWER_TYPING} | {
                ("itertools", n) for n in NEWER_ITERTOOLS
            }:
                out.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            attr = node.func.attr if isinstance(node.func, ast.Attribute) else None
            words = {k.arg for k in node.keywords}
            if name == "zip" and "strict" in words:
                out.append(f"{where}: zip(strict=) (3.10)")
            if attr == "bit_count":
                out.append(f"{where}: int.bit_count() (3.10)")
            if "dataclass" in (name, attr) and words & {"slots", "kw_only"}:
                out.append(f"{where}: dataclass(slots=/kw_only=) (3.10)")
        elif type(node).__name__ in ("Match", "TryStar", "TypeAlias"):
            out.append(f"{where}: {type(node).__name__} statement")
    return sorted(out, key=lambda p: int(p.split(":")[1]) if p.split(":")[1].isdigit() else 0)


def test_no_module_needs_a_python_newer_than_3_9() -> None:
    modules = _modules()
    assert len(modules) > 20  # (the installed package's modules)
    problems = [p for m in modules for p in _problems(m)]
    assert not problems, problems


def test_the_scan_finds_what_3_9_lacks(tmp_path: Path) -> None:
    """The scan itself: each construct is found, and the TYPE_CHECKING form is allowed."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from __future__ import annotations\n"
        "from typing import ParamSpec, TYPE_CHECKING\n"
        "import itertools, typing\n"
        "if TYPE_CHECKING:\n    from typing import Self\n"
        "x = typing.TypeAlias\n"
        "y = list(zip([1], [2], strict=True))\n"
        "z = (5).bit_count()\n"
        "w = list(itertools.pairwise([1, 2]))\n"
    )
    found = _problems(bad)
    assert [p.split(": ", 1)[1] for p in found] == [
        "typing.ParamSpec",
        "typing.TypeAlias",
        "zip(strict=) (3.10)",
        "int.bit_count() (3.10)",
        "itertools.pairwise",
    ], found
