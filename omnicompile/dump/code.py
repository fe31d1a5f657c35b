"""Graphs as re-loadable code.

``graph*_before.py`` and ``graph*_after_*.py`` are Python modules: a header (what the graph
is, its policy and guard, its signature), the imports the FX code needs, then
``class Graph(torch.nn.Module)`` whose ``forward`` is the graph's code (``GraphModule.code``);
the ``torch.cond`` branches of a cond graph become classes of their own.  Tensor constants,
if a graph has any, go to ``*.constants.pt`` next to it.  :func:`load_graph` imports such a
file and returns the module; called with the graph's inputs (Dynamo lifts parameters to
inputs) it computes what the dumped graph does.  A graph that cannot be written as code
(a non-FX submodule, a global that is not importable by name) is written as comments with
``RELOAD_ERROR`` saying why, next to its ``print_readable`` text (``*.txt``, with shapes).
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from omnicompile.dump.errors import DumpError
from omnicompile.dump.info import policy_text

__all__ = ["graph_module_source", "load_graph", "code_header", "write_code", "write_code_text"]


def _ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else "_" + s


def _import_line(name: str, obj: Any) -> str:
    from torch.fx.graph import _custom_builtins

    if name in _custom_builtins:
        return _custom_builtins[name].import_str
    if isinstance(obj, type(torch)):  # a module
        mod = obj.__name__
        return f"import {mod}" if mod == name else f"import {mod} as {name}"
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if mod and qual and "." not in qual and "<" not in qual:
        try:
            if getattr(importlib.import_module(mod), qual) is obj:
                return f"from {mod} import {qual}" + ("" if qual == name else f" as {name}")
        except Exception:
            pass
    raise DumpError(f"the graph's code uses {name} = {obj!r}, which cannot be imported by name")


def _resolve_attr(mod: torch.nn.Module, target: str):
    cur: Any = mod
    for part in target.split("."):
        cur = getattr(cur, part, None)
        if cur is None:
            return None
    return cur


def graph_module_source(gm: fx.GraphModule, header: str = "", class_name: str = "Graph"
                        ) -> tuple[str, dict[str, torch.Tensor]]:
    """Python source of a module that re-creates ``gm``, and the tensor constants it loads.

    Raises :class:`DumpError` when the graph uses something that cannot be written as code
    (a non-FX submodule, a global that is not importable by name)."""
    imports: dict[str, None] = {"import torch": None}
    classes: list[str] = []
    constants: dict[str, torch.Tensor] = {}

    def emit(mod: fx.GraphModule, cls: str) -> None:
        pc = mod.graph.python_code(root_module="self")
        for name, obj in pc.globals.items():
            imports.setdefault(_import_line(name, obj), None)
        init = ["    def __init__(self, constants=None):", "        super().__init__()",
                "        constants = constants or {}"]
        for cname, child in mod.named_children():
            if not isinstance(child, fx.GraphModule):
                raise DumpError(f"submodule {cname!r} is a {type(child).__name__}, not an FX GraphModule")
            sub = f"{cls}_{_ident(cname)}"
            emit(child, sub)
            init.append(f"        self.{cname} = {sub}(constants)")
        own: dict[str, torch.Tensor] = {}
        for pname, p in mod.named_parameters(recurse=False):
            own[pname] = p
        for bname, b in mod.named_buffers(recurse=False):
            own[bname] = b
        for n in mod.graph.nodes:
            if n.op == "get_attr" and "." not in n.target:
                v = _resolve_attr(mod, n.target)
                if isinstance(v, torch.Tensor):
                    own[n.target] = v
            elif n.op == "get_attr" and isinstance(_resolve_attr(mod, n.target), torch.Tensor):
                raise DumpError(f"get_attr {n.target!r} reads a tensor inside a submodule; not supported")
        for aname, t in own.items():
            key = f"{cls}.{aname}"
            constants[key] = t.detach().cpu().clone()
            init.append(f"        self.register_buffer({aname!r}, constants[{key!r}])")
        body = "\n".join("    " + line if line.strip() else "" for line in pc.src.strip("\n").splitlines())
        classes.append(f"class {cls}(torch.nn.Module):\n" + "\n".join(init) + "\n\n" + body + "\n")

    emit(gm, class_name)
    text = header + "\n".join(imports) + "\n\n\n" + "\n\n".join(classes)
    compile(text, "<omnicache dump>", "exec")  # never write a file that does not parse
    return text, constants


def load_graph(path: str | os.PathLike) -> torch.nn.Module:
    """Re-load a dumped graph (``graph*_before.py`` / ``graph*_after_*.py``) as a module.

    Call the result with the graph's inputs in placeholder order (after-graphs take what
    their runtime appends after the original inputs: see the file's ``# signature:``)."""
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"{path}: no such dump file")
    name = "omnicache_dump_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DumpError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    namespace = vars(mod)
    if namespace.get("RELOAD_ERROR"):
        raise DumpError(f"{path}: this graph was dumped as text only: {namespace['RELOAD_ERROR']}")
    if "Graph" not in namespace:
        raise DumpError(f"{path}: no Graph class (not an omnicache graph dump)")
    consts_path = path.with_suffix(".constants.pt")
    consts = torch.load(consts_path, weights_only=True) if consts_path.is_file() else {}
    return namespace["Graph"](consts)


def code_header(gid: int, what: str, signature: str, policy: Optional[dict] = None,
                guard: Optional[str] = None) -> str:
    """The comment block at the top of a code file (``policy``/``guard``: the report's)."""
    lines = [f"# omnicache dump: graph {gid}, {what}",
             f"# written {datetime.datetime.now().isoformat(timespec='seconds')} by omnicompile.dump"]
    if policy is not None:
        lines.append(f"# policy {policy_text(policy)}, guard {guard or '-'}")
    lines += [f"# signature: {signature}",
              "# re-load: omnicompile.dump.load_graph(this_file) -> torch.nn.Module; parameters are",
              "# inputs (Dynamo lifts them to placeholders), in the order of forward's arguments.", "", ""]
    return "\n".join(lines)


def write_code(folder: Path, stem: str, gm: fx.GraphModule, header: str) -> dict:
    """Write ``stem.py`` (re-loadable, or text only with the reason) and ``stem.txt``
    (print_readable).  Returns the manifest entry."""
    entry: dict[str, Any] = {"py": f"{stem}.py", "txt": None, "reloadable": True}
    try:
        text, consts = graph_module_source(gm, header)
        if consts:
            torch.save(consts, folder / f"{stem}.constants.pt")
            entry["constants"] = f"{stem}.constants.pt"
    except DumpError as e:
        return {**write_code_text(folder, stem, gm.code, header, str(e)), **_write_readable(folder, stem, gm)}
    (folder / f"{stem}.py").write_text(text)
    entry.update(_write_readable(folder, stem, gm))
    return entry


def write_code_text(folder: Path, stem: str, code: str, header: str, why: str) -> dict:
    """A dump file for code that cannot be re-loaded: the code as comments, and why."""
    body = "\n".join("# " + line for line in code.splitlines())
    (folder / f"{stem}.py").write_text(header + f"RELOAD_ERROR = {why!r}\n\n# the graph's code, for reading:\n"
                                       + body + "\n")
    return {"py": f"{stem}.py", "txt": None, "reloadable": False, "reload_error": why}


def _write_readable(folder: Path, stem: str, gm: fx.GraphModule) -> dict:
    try:
        readable = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    except Exception as e:  # print_readable walks fake tensors' metadata: tolerate odd graphs
        readable = f"# print_readable failed: {type(e).__name__}: {e}\n{gm.code}"
    (folder / f"{stem}.txt").write_text(readable)
    return {"txt": f"{stem}.txt"}
