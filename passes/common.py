"""Shared facts of the FX passes: module-path normalisation, node classification, and the
structured ``Reason`` every pass uses to say what it could not do (graph editing helpers are
in :mod:`omnicompile.passes.edit`).

Dynamo graphs (torch >= 2.11) carry parameters as placeholders whose ``_dynamo_source``
names the parameter, ``node.meta["nn_module_stack"]`` with raw paths such as
``L['self'].__dict__['_modules']['transformer_blocks'].0`` and ``node.meta["example_value"]``
(a FakeTensor).  Passes never mutate Dynamo's GraphModule: its OutputGraph still reads the
placeholders, so every rewrite starts from :func:`~omnicompile.passes.edit.copy_graph_module`.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Iterable

import torch
import torch.fx as fx

__all__ = [
    "Reason",
    "normalize_module_path",
    "module_paths",
    "is_param_placeholder",
    "example_value",
    "tensor_meta",
    "node_signature",
    "HEAVY_TARGETS",
    "is_heavy",
    "mutated_args",
    "iter_args",
]


@dataclasses.dataclass(frozen=True)
class Reason:
    """A structured explanation of something a pass could not do.

    ``code`` is a stable machine-readable identifier (tests and reports key on it),
    ``message`` says what happened in words, ``subject`` names what it is about (a span,
    a node, a block list).
    """

    code: str
    message: str
    subject: str = ""

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"[{self.code}] {self.subject + ': ' if self.subject else ''}{self.message}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']*)'\]")
_MODULES = re.compile(r"\._modules\['([^']*)'\]")
_ITEM = re.compile(r"\['([^']*)'\]")
_ROOT = re.compile(r"^L\['([^']*)'\]")


def normalize_module_path(raw: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0`` -> ``transformer_blocks.0``.

    Other roots keep their local name (``L['model'].blocks.1`` -> ``model.blocks.1``); a
    forward-replacing hook's ``function_reference.forward.__self__`` is dropped.
    """
    s = raw.strip()
    m = _ROOT.match(s)
    if m:
        root = m.group(1)
        s = ("" if root == "self" else root) + s[m.end():]
    s = _DICT_MODULES.sub(r".\1", s)
    s = _MODULES.sub(r".\1", s)
    s = _ITEM.sub(r".\1", s)
    # a hook that replaced ``forward`` (diffusers' context parallelism: ``function_reference``)
    # reaches the module through ``<hook>.forward.__self__``: the path goes on from that module
    s = re.sub(r"(?:^|\.)[A-Za-z_]\w*\.forward\.__self__(?=\.|$)", "", s)
    s = re.sub(r"\.+", ".", s).strip(".")
    return s


def module_paths(node: fx.Node) -> list[str]:
    """Normalised module paths of a node, outermost first (empty when metadata is missing)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        raw = value[0] if isinstance(value, tuple) else value
        out.append(normalize_module_path(str(raw)))
    return out


def is_param_placeholder(node: fx.Node) -> bool:
    """True for a placeholder that carries a parameter or buffer of the module."""
    if node.op != "placeholder":
        return False
    src = getattr(node, "_dynamo_source", None)
    if src is not None:
        try:
            name = src.name() if callable(getattr(src, "name", None)) else str(src)
        except Exception:  # pragma: no cover - defensive: source types vary across versions
            name = str(src)
        if "_parameters" in name or "_buffers" in name:
            return True
        if "ParamBuffer" in type(src).__name__:
            return True
    ev = node.meta.get("example_value")
    return isinstance(ev, torch.nn.Parameter)


def example_value(node: Any) -> Any:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def tensor_meta(node: Any) -> tuple[tuple, torch.dtype, torch.device] | None:
    """(shape, dtype, device) of a node's tensor value, or None when it is not a tensor."""
    ev = example_value(node)
    if isinstance(ev, torch.Tensor):
        return tuple(ev.shape), ev.dtype, ev.device
    return None


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"{mod}.{name}" if mod and not str(name).startswith(mod) else str(name)


def node_signature(node: fx.Node, constants: bool = False) -> str:
    """What a node does, independent of which tensors it reads: ``op:target``; with
    ``constants`` also the non-node arguments (slices, dims), which tells apart e.g. the
    two halves of a split."""
    sig = f"{node.op}:{_target_name(node)}"
    if constants:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: "%")
        sig += repr(args)
    return sig


HEAVY_TARGETS = {
    "linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "einsum",
    "scaled_dot_product_attention", "conv1d", "conv2d", "conv3d", "conv_transpose2d",
}


def is_heavy(node: fx.Node) -> bool:
    """Matmul-like nodes: the work a cache saves."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    name = _target_name(node).rsplit(".", 1)[-1]
    name = name.split(".")[0]
    return name in HEAVY_TARGETS or name == "__matmul__"


_INPLACE_KW = ("inplace", "out")


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """Nodes a call writes into (in-place methods/functions, ``inplace=True``, ``out=``)."""
    out: list[fx.Node] = []
    if node.op == "call_method" and isinstance(node.target, str):
        t = node.target
        if t.endswith("_") and not t.startswith("__") and node.args and isinstance(node.args[0], fx.Node):
            out.append(node.args[0])
        if t in ("copy_", "__setitem__", "__iadd__", "__imul__") and node.args:
            if isinstance(node.args[0], fx.Node) and node.args[0] not in out:
                out.append(node.args[0])
    elif node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", "")
        if t in (operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv):
            if node.args and isinstance(node.args[0], fx.Node):
                out.append(node.args[0])
        elif name.endswith("_") and not name.startswith("_") and node.args and isinstance(node.args[0], fx.Node):
            out.append(node.args[0])
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
            for arg, a in zip(t._schema.arguments, node.args):
                if arg.is_write and isinstance(a, fx.Node):
                    out.append(a)
        if node.kwargs.get("inplace") is True and node.args and isinstance(node.args[0], fx.Node):
            out.append(node.args[0])
        o = node.kwargs.get("out")
        if isinstance(o, fx.Node):
            out.append(o)
    return out


def iter_args(obj: Any) -> Iterable[fx.Node]:
    """All nodes referenced by a (nested) argument structure."""
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n) or n)
    return out
