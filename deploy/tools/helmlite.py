"""Render the ztunnel-py Helm chart without Helm: the subset of Go templates and Sprig the chart uses.

Why: there is no Helm binary on the project's machines (not in Debian, not on PyPI), yet the chart must be
rendered by the tests and deploy/base (the Kustomize base) is the chart rendered with its default values, so
the two installs cannot drift. When a `helm` binary is on PATH the tests also render with it and compare.

Supported (and nothing else: anything more is an error naming the template and offset, never a silent
difference): text with `{{ }}` actions and `{{-`/`-}}` trimming; comments; `define`/`include`; `if`/`else
if`/`else`/`end`; `range` over lists (`range $x := …`) and maps (`range $k, $v := …`, sorted keys as Go
does); variable assignment (`$x := …`); pipelines with parentheses; fields of `.`, `$` and variables;
string, integer and boolean literals; the functions the chart calls: quote, toYaml, nindent, default, eq,
not, and, or, required, list.
With `strict=True` a missing key under `.Values` is an error (a typo in a template), where Helm prints "".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class TemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<lp>\()|(?P<rp>\))|(?P<pipe>\|)|(?P<assign>:=)'
    r"|(?P<comma>,)|(?P<word>[$.A-Za-z_][$.\w]*))"
)


# ---- parse -----------------------------------------------------------------------------------------------


@dataclass
class Node:
    kind: str  # text | action | if | range | define
    text: str = ""
    branches: list[tuple[str, list[Node]]] = field(default_factory=list)  # (condition, body); "" = else
    where: str = ""


def _split(source: str, name: str) -> list[tuple[str, str, str]]:
    """(kind, payload, where) with trimming applied: kind 'text' or 'act'."""
    out: list[tuple[str, str, str]] = []
    pos = 0
    pending_trim = False
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if pending_trim:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            out.append(("text", text, ""))
        body = m.group(2).strip()
        if not body.startswith("/*"):
            out.append(("act", body, f"{name}:{source.count(chr(10), 0, m.start()) + 1}"))
        pending_trim = bool(m.group(3))
        pos = m.end()
    text = source[pos:]
    if pending_trim:
        text = text.lstrip()
    if text:
        out.append(("text", text, ""))
    return out


def parse(source: str, name: str) -> tuple[list[Node], dict[str, list[Node]]]:
    items = _split(source, name)
    defines: dict[str, list[Node]] = {}
    stack: list[tuple[Node, list[Node]]] = []
    root: list[Node] = []
    body = root
    for kind, payload, where in items:
        if kind == "text":
            body.append(Node("text", payload))
            continue
        word = payload.split(None, 1)[0] if payload else ""
        rest = payload[len(word) :].strip()
        if word in ("if", "range", "define"):
            node = Node(word, where=where)
            node.branches.append((rest, []))
            if word == "define":
                defines[json.loads(rest)] = node.branches[0][1]
            else:
                body.append(node)
            stack.append((node, body))
            body = node.branches[-1][1]
        elif word == "else":
            if not stack or stack[-1][0].kind not in ("if", "range"):
                raise TemplateError(f"{where}: else outside if/range")
            node = stack[-1][0]
            cond = rest[2:].strip() if rest.startswith("if") else ""
            node.branches.append((cond, []))
            body = node.branches[-1][1]
        elif word == "end":
            if not stack:
                raise TemplateError(f"{where}: end without a block")
            _, body = stack.pop()
        elif word in ("with", "block", "template", "break", "continue"):
            raise TemplateError(f"{where}: {word!r} is not supported by helmlite; use if/range/include")
        else:
            body.append(Node("action", payload, where=where))
    if stack:
        raise TemplateError(f"{name}: {stack[-1][0].kind} at {stack[-1][0].where} is never closed")
    return root, defines


# ---- evaluate --------------------------------------------------------------------------------------------


def _truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or (isinstance(v, (str, list, dict, tuple)) and len(v) == 0))


def _to_yaml(v: Any) -> str:
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(n: int, s: Any) -> str:
    pad = " " * int(n)
    return pad + str(s).replace("\n", "\n" + pad)


def _required(msg: str, v: Any) -> Any:
    if v is None or v == "":
        raise TemplateError(msg)
    return v


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise TemplateError(f"a {type(v).__name__} rendered as text; use toYaml")
    return str(v)


FUNCS: dict[str, Callable[..., Any]] = {
    "quote": lambda *a: " ".join(json.dumps(_str(x)) for x in a),
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "default": lambda d, v=None: v if _truthy(v) else d,
    "eq": lambda a, *b: any(a == x for x in b),
    "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "required": _required,
    "list": lambda *a: list(a),
}


@dataclass
class Renderer:
    defines: dict[str, list[Node]]
    strict: bool = True

    def render(self, nodes: Sequence[Node], dot: Any, scope: dict[str, Any]) -> str:
        out: list[str] = []
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "action":
                m = re.match(r"^(\$\w+)\s*:?=\s*(.*)$", n.text, re.S)
                if m:
                    scope[m.group(1)] = self.pipeline(m.group(2), dot, scope, n.where)
                else:
                    out.append(_str(self.pipeline(n.text, dot, scope, n.where)))
            elif n.kind == "if":
                for cond, body in n.branches:
                    if cond == "" or _truthy(self.pipeline(cond, dot, scope, n.where)):
                        out.append(self.render(body, dot, dict(scope)))
                        break
            elif n.kind == "range":
                out.append(self._range(n, dot, scope))
        return "".join(out)

    def _range(self, n: Node, dot: Any, scope: dict[str, Any]) -> str:
        head, body = n.branches[0]
        m = re.match(r"^(\$\w+)(?:\s*,\s*(\$\w+))?\s*:=\s*(.*)$", head, re.S)
        names: tuple[str, ...] = ()
        expr = head
        if m:
            names = (m.group(1), m.group(2)) if m.group(2) else (m.group(1),)
            expr = m.group(3)
        seq = self.pipeline(expr, dot, scope, n.where)
        pairs: list[tuple[Any, Any]]
        if isinstance(seq, Mapping):
            pairs = [(k, seq[k]) for k in sorted(seq)]
        elif isinstance(seq, (list, tuple)):
            pairs = list(enumerate(seq))
        elif seq is None:
            pairs = []
        else:
            raise TemplateError(f"{n.where}: range over {type(seq).__name__}")
        if not pairs:
            return self.render(n.branches[1][1], dot, dict(scope)) if len(n.branches) > 1 else ""
        out = []
        for k, v in pairs:
            inner = dict(scope)
            if len(names) == 2:
                inner[names[0]], inner[names[1]] = k, v
            elif names:
                inner[names[0]] = v
            out.append(self.render(body, v, inner))
        return "".join(out)

    # pipelines: cmd | cmd ...; a cmd is operands; the previous value is appended as the last argument
    def pipeline(self, text: str, dot: Any, scope: dict[str, Any], where: str) -> Any:
        tokens = self._tokens(text, where)
        value, pos = self._pipe(tokens, 0, dot, scope, where)
        if pos != len(tokens):
            raise TemplateError(f"{where}: unexpected {tokens[pos][1]!r} in {text!r}")
        return value

    def _tokens(self, text: str, where: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise TemplateError(f"{where}: cannot read {text[pos:]!r}")
            kind = m.lastgroup or ""
            out.append((kind, m.group(kind)))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return out

    def _pipe(
        self, toks: list[tuple[str, str]], pos: int, dot: Any, scope: dict[str, Any], where: str
    ) -> tuple[Any, int]:
        value: Any = None
        first = True
        while True:
            args: list[tuple[str, Any]] = []
            while pos < len(toks) and toks[pos][0] not in ("pipe", "rp"):
                if toks[pos][0] == "lp":
                    v, pos = self._pipe(toks, pos + 1, dot, scope, where)
                    if pos >= len(toks) or toks[pos][0] != "rp":
                        raise TemplateError(f"{where}: unclosed (")
                    args.append(("val", v))
                    pos += 1
                else:
                    args.append(toks[pos])
                    pos += 1
            if not args:
                raise TemplateError(f"{where}: empty command")
            value = self._command(args, None if first else value, not first, dot, scope, where)
            first = False
            if pos < len(toks) and toks[pos][0] == "pipe":
                pos += 1
                continue
            return value, pos

    def _command(
        self, args: list[tuple[str, Any]], piped: Any, has_piped: bool, dot: Any, scope: dict[str, Any], where: str
    ) -> Any:
        kind, head = args[0]
        if (kind == "word" and head in FUNCS) or (kind == "word" and head == "include"):
            vals = [self._operand(a, dot, scope, where) for a in args[1:]]
            if has_piped:
                vals.append(piped)
            if head == "include":
                name, ctx = vals
                if name not in self.defines:
                    raise TemplateError(f"{where}: no template {name!r} defined")
                return self.render(self.defines[name], ctx, {"$": scope["$"]})
            try:
                return FUNCS[head](*vals)
            except TemplateError as e:
                raise TemplateError(f"{where}: {e}") from None
            except TypeError as e:
                raise TemplateError(f"{where}: {head}: {e}") from None
        if len(args) != 1 or has_piped:
            raise TemplateError(f"{where}: {head!r} is not a function helmlite knows")
        return self._operand(args[0], dot, scope, where)

    def _operand(self, tok: tuple[str, Any], dot: Any, scope: dict[str, Any], where: str) -> Any:
        kind, text = tok
        if kind == "val":
            return text
        if kind == "str":
            return json.loads(text)
        if kind == "num":
            return int(text)
        if kind != "word":
            raise TemplateError(f"{where}: unexpected {text!r}")
        if text in ("true", "false"):
            return text == "true"
        if text == "nil":
            return None
        if text == ".":
            return dot
        if text.startswith("$"):
            var, _, path = text.partition(".")
            if var not in scope:
                raise TemplateError(f"{where}: undefined variable {var}")
            return self._walk(scope[var], path, where, text)
        if text.startswith("."):
            return self._walk(dot, text[1:], where, text)
        raise TemplateError(f"{where}: {text!r} is not a function helmlite knows")

    def _walk(self, value: Any, path: str, where: str, full: str) -> Any:
        if not path:
            return value
        parts = path.split(".")
        for i, part in enumerate(parts):
            if isinstance(value, Mapping) and part in value:
                value = value[part]
                continue
            if self.strict and ".Values." in "." + full.lstrip("$") and "Values" in parts[:i]:
                raise TemplateError(f"{where}: {full}: no key {part!r} (add it to values.yaml)")
            return None
        return value


# ---- a chart ---------------------------------------------------------------------------------------------


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def render_chart(
    chart_dir: Path,
    *,
    namespace: str = "istio-system",
    release: str = "ztunnel-py",
    values: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, str]:
    """{template path: rendered text} like `helm template`, `_*` helpers and NOTES.txt left out."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    merged = _merge(yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}, dict(values or {}))
    top = {
        "Values": merged,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion", "")},
        "Capabilities": {"KubeVersion": {"Version": "v1.32.0"}},
    }
    templates = sorted((chart_dir / "templates").rglob("*"))
    defines: dict[str, list[Node]] = {}
    parsed: dict[str, list[Node]] = {}
    for path in templates:
        if not path.is_file() or path.name == "NOTES.txt":
            continue
        rel = f"{chart['name']}/{path.relative_to(chart_dir)}"
        nodes, defs = parse(path.read_text(), rel)
        defines.update(defs)
        if not path.name.startswith("_"):
            parsed[rel] = nodes
    r = Renderer(defines, strict=strict)
    return {rel: r.render(nodes, top, {"$": top}) for rel, nodes in parsed.items()}


def objects(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of rendered templates (empty documents dropped)."""
    out: list[dict[str, Any]] = []
    for name, text in rendered.items():
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise TemplateError(f"{name}: rendered YAML does not parse: {e}\n{text}") from e
        out.extend(d for d in docs if d)
    return out
