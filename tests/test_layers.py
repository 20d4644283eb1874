"""The layer rules of docs/architecture.md, checked on the source (nothing is imported):

- the config tree imports neither torch nor diffusers (nor any stage);
- infra/, models/ and losses/ never import tasks/ or flows/; models never use torch.distributed;
- no stage module in tasks/ imports another stage's module;
- no import circle among the project's modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "models", "losses", "tasks", "flows")
STAGES = {"acquire", "filter", "normalize", "negatives", "pairs", "precompute", "train", "evaluate"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports (at any depth in the file), resolved to module names."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 1 and parts[1] in STAGES else None


def test_the_walk_sees_the_imports():
    # The checks below are only as good as the walk: it must see known edges.
    assert "infra.store" in GRAPH["infra.stage"]
    assert "infra.gtspec" in GRAPH["tasks.negatives"]
    assert "models.captioner" in GRAPH["tasks.normalize"]  # a function-level import


def test_no_stage_imports_another_stage():
    edges = [(m, i) for m, deps in GRAPH.items() for i in deps
             if _stage(m) and _stage(i) and _stage(m) != _stage(i)]
    assert not edges, f"stage -> stage imports (move the shared code below the stages): {edges}"


@pytest.mark.parametrize("layer", ["infra", "models", "losses"])
def test_lower_layers_never_import_tasks_or_flows(layer):
    edges = [(m, i) for m, deps in GRAPH.items() if m.split(".")[0] == layer
             for i in deps if i.split(".")[0] in ("tasks", "flows")]
    assert not edges, edges


def test_models_contain_no_distributed_code():
    for path in (REPO / "models").rglob("*.py"):
        assert "torch.distributed" not in path.read_text(), path


def test_no_import_circle():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {cycles}"


def test_config_tree_imports_no_torch_and_no_stage():
    code = ("import sys, infra.config, infra.config.run\n"
            "from infra.config import load_config\n"
            "load_config('configs/wan21-i2v-14b-720p.yaml')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'diffusers', 'transformers', 'tasks', 'flows', 'models', 'losses'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_run_config_types_every_section():
    from infra.config import SECTION_PATHS, STAGE_CONFIGS, RunConfig

    schema = RunConfig.model_json_schema()
    for stage, cls in STAGE_CONFIGS.items():  # Dual-IPO's sample and critique sit under `ipo`
        assert SECTION_PATHS.get(stage, (stage,))[0] in schema["properties"], stage
        assert cls.__name__ in schema.get("$defs", {}), f"{stage}: {cls.__name__} not typed"
