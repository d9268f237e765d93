"""Security rules over the source (fastnft/, the kernel package, benchmarks/, setup.py), checked on
its syntax tree, so that comments and docstrings that name a pattern do not count:

- no `weights_only=False`, and every `torch.load` passes `weights_only=True`;
- no `trust_remote_code=True`;
- YAML read only with `yaml.safe_load` (no `yaml.load`, `full_load`, `unsafe_load` or their loaders);
- no `shell=True`, `os.system` or `os.popen`;
- no `pickle.load`/`loads` (nor `dill`, `cloudpickle`, `marshal`); `pickle.Unpickler` only as the
  base of the allowlisting unpickler of fastnft/checkpoint.py.

Each rule has a control: a snippet that breaks it must be found."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    *sorted((ROOT / "fastnft").rglob("*.py")),
    *sorted((ROOT / "kernels" / "fastnft_kernels").rglob("*.py")),
    *sorted((ROOT / "kernels" / "benchmarks").rglob("*.py")),
    *sorted((ROOT / "benchmarks").rglob("*.py")),
    ROOT / "setup.py",
]
BAD_KEYWORDS = {"weights_only": False, "trust_remote_code": True, "shell": True}
FORBIDDEN = {
    *(f"yaml.{name}" for name in ("load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all")),
    *(f"yaml.{name}" for name in ("Loader", "FullLoader", "UnsafeLoader")),
    *(f"{module}.{name}" for module in ("pickle", "_pickle", "dill", "cloudpickle") for name in ("load", "loads")),
    "pickle.Unpickler",
    "pickle._Unpickler",
    "marshal.load",
    "marshal.loads",
    "os.system",
    "os.popen",
}
# The one place that may name pickle.Unpickler: the allowlisting unpickler's base class.
ALLOWED = {("fastnft/checkpoint.py", "pickle.Unpickler")}


def qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it stands for, from the imports (`import pickle as p`: p -> pickle)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({alias.asname or alias.name: alias.name for alias in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
    return names


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`pickle.loads` for the expression pickle.loads (or p.loads after `import pickle as p`)."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return None


def findings(source: str, path: str) -> list[str]:
    tree = ast.parse(source)
    names = qualified_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                value = keyword.value
                bad = BAD_KEYWORDS.get(keyword.arg, object())
                if isinstance(value, ast.Constant) and value.value is bad:
                    found.append(f"{path}:{node.lineno}: {keyword.arg}={value.value}")
            explicit = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if dotted(node.func, names) == "torch.load" and not explicit:
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = dotted(node, names)
            if name in FORBIDDEN and (path, name) not in ALLOWED:
                found.append(f"{path}:{node.lineno}: {name}")
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if name in FORBIDDEN and (path, name) not in ALLOWED:
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def test_the_source_keeps_the_security_rules():
    assert len(SOURCES) > 40  # the scan sees the package, not an empty glob
    found = [line for path in SOURCES for line in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_allowed_unpickler_is_the_allowlisting_one():
    """fastnft/checkpoint.py names pickle.Unpickler once, as the base of a class with find_class."""
    tree = ast.parse((ROOT / "fastnft" / "checkpoint.py").read_text())
    names = qualified_names(tree)
    bases = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(dotted(base, names) == "pickle.Unpickler" for base in node.bases)
    ]
    assert len(bases) == 1 and any(
        isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in bases[0].body
    )
    uses = [node for node in ast.walk(tree) if dotted(node, names) == "pickle.Unpickler"]
    assert len(uses) == 1


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('x', weights_only=False)",
        "import torch\ntorch.load('x')",
        "from torch import load\nload('x')",
        "model = Auto.from_pretrained('x', trust_remote_code=True)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.full_load(text)",
        "from yaml import unsafe_load",
        "import subprocess\nsubprocess.run('ls', shell=True)",
        "import os\nos.system('ls')",
        "import pickle\npickle.loads(data)",
        "import pickle as p\np.load(handle)",
        "from pickle import loads",
        "import pickle\nclass Mine(pickle.Unpickler):\n    pass",
        "import dill\ndill.loads(data)",
    ],
)
def test_each_rule_finds_what_breaks_it(snippet):
    assert findings(snippet, "fastnft/example.py")
