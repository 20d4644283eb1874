"""The code identity of a result: a digest of the functions that compute it, not of the files
they sit in (docs/architecture.md, "Keys").

`code_digest("tasks.filter:analyze")` parses the module's source (nothing is imported), takes
the named function and, transitively, every project function, class and module-level constant
it refers to — in its own module, or imported from another project module — and digests their
syntax trees with docstrings removed. So:

- a comment, a docstring, blank lines or an edit to an unrelated function change nothing;
- an edit to the function or to anything it calls changes the digest.

What is not followed, by design: the config tree (infra.config: a section's values are in every
key already, so a description edit must not re-key), the store and key machinery (where a result
is kept is not what it is), and third-party libraries (pin them; weight identities are in keys).
Calls through a parameter (`store.put_file`, `pipe(...)`) are not resolved: a stage names such
code in its `code` roots when it defines the result (e.g. a model loader).
"""

from __future__ import annotations

import ast
import hashlib
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("infra", "models", "losses", "tasks")
# Project modules that never define a result: config values are keyed by value, the store and
# key machinery only say where a result lives.
NOT_RESULT_CODE = ("infra.config", "infra.store", "infra.stage", "infra.code", "infra.errors")


@dataclass
class _Module:
    name: str
    defs: dict[str, ast.AST] = field(default_factory=dict)       # top-level def/class/constant
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # alias -> (module, attr)


def _in_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT and not any(
        module == m or module.startswith(m + ".") for m in NOT_RESULT_CODE)


def _source(name: str) -> tuple[Path, bool] | None:
    """(file, is a package) of a project module, found without importing anything."""
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    return None


# Stage flows run in threads and key their code at once. CPython before 3.11.8 keeps the AST
# constructor's recursion depth in interpreter-global state (gh-106905, fixed in 3.11.8/3.12.2):
# a parse in any other thread (Prefect's or the stdlib's, e.g. traceback carets) racing ours
# raises "SystemError: AST constructor recursion depth mismatch" (seen in CI on 3.11.7). The
# lock serialises our own parses; the retry covers the ones we cannot lock. The tree itself is
# never wrong: the error is raised instead of returning it.
_PARSE_LOCK = threading.Lock()
_PARSE_TRIES = 5


def _parse(source: str, filename: str = "<unknown>") -> ast.Module:
    for attempt in range(_PARSE_TRIES):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, filename=filename)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == _PARSE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


@lru_cache(maxsize=None)
def _module(name: str) -> _Module | None:
    found = _source(name) if _in_project(name) else None
    if found is None:
        return None
    path, is_package = found
    tree = _parse(path.read_text(encoding="utf-8"), str(path))
    mod = _Module(name)
    package = name if is_package else name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            mod.defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        mod.defs[n.id] = node
    mod.imports = _imports(tree.body, package)
    return mod


def _imports(nodes: list[ast.AST], package: str) -> dict[str, tuple[str, str | None]]:
    """alias -> (module, attr) of the import statements among `nodes` (and inside them)."""
    out: dict[str, tuple[str, str | None]] = {}
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                out[a.asname or a.name] = (base, a.name)
    return out


def _strip(node: ast.AST) -> ast.AST:
    """A copy without docstrings and annotations (annotations compute nothing)."""
    if not isinstance(node, ast.Module):
        node = _parse(ast.unparse(node)).body[0]
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n.body = body[1:] or [ast.Pass()]
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.returns = None
            for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs:
                a.annotation = None
        if isinstance(n, ast.AnnAssign) and n.value is None:
            n.annotation = ast.Constant(None)
    return node


def _references(node: ast.AST) -> set[tuple[str, ...]]:
    """Names the code uses: `f` as ('f',), `mod.f` as ('mod', 'f')."""
    out: set[tuple[str, ...]] = set()
    for n in ast.walk(_strip(node)):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            out.add((n.value.id, n.attr))
        elif isinstance(n, ast.Name):
            out.add((n.id,))
    return out


def _resolve(mod: _Module, ref: tuple[str, ...]) -> tuple[str, str] | None:
    """(module, top-level name) a reference points at inside the project, else None."""
    head = ref[0]
    if head in mod.defs:
        return mod.name, head
    if head not in mod.imports:
        return None
    target, attr = mod.imports[head]
    if attr is not None:  # from target import attr: a name in target, or a submodule
        sub = _module(f"{target}.{attr}")
        if sub is not None:
            return (sub.name, ref[1]) if len(ref) > 1 else None
        return (target, attr) if _module(target) is not None else None
    if len(ref) > 1 and _module(target) is not None:  # import target; target.name
        return target, ref[1]
    return None


def _closure(roots: tuple[tuple[str, str], ...]) -> list[tuple[str, str, str]]:
    seen: dict[tuple[str, str], str] = {}
    todo = list(roots)
    while todo:
        where = todo.pop()
        if where in seen:
            continue
        mod = _module(where[0])
        if mod is None or where[1] not in mod.defs:
            if where in roots:
                raise LookupError(f"code root {where[0]}:{where[1]} not found (is the name "
                                  "spelled right and the module inside the project?)")
            continue
        node = mod.defs[where[1]]
        seen[where] = ast.dump(_strip(node), annotate_fields=False)
        package = mod.name.rpartition(".")[0]
        scope = _Module(mod.name, mod.defs, mod.imports | _imports([node], package))
        for ref in _references(node):
            target = _resolve(scope, ref)
            if target is not None and target not in seen:
                while _module(target[0]) is not None and target[1] in _module(target[0]).imports:
                    nxt = _resolve(_module(target[0]), (target[1],))  # follow re-exports
                    if nxt is None or nxt == target:
                        break
                    target = nxt
                todo.append(target)
    return sorted((m, n, d) for (m, n), d in seen.items())


@lru_cache(maxsize=None)
def code_digest(*roots: str) -> str:
    """Digest of the code behind `roots` ("module:name", each a project function or class)."""
    parsed = tuple((r.partition(":")[0], r.partition(":")[2]) for r in roots)
    h = hashlib.sha256()
    for module, name, tree in _closure(parsed):
        h.update(f"{module}:{name}\n{tree}\n".encode())
    return h.hexdigest()[:16]


def code_names(*roots: str) -> list[str]:
    """The "module:name" entries a digest covers (to see what a key depends on)."""
    parsed = tuple((r.partition(":")[0], r.partition(":")[2]) for r in roots)
    return [f"{m}:{n}" for m, n, _ in _closure(parsed)]
