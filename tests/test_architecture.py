"""The layering of ARCHITECTURE.md, checked on the source.

Every ``import`` statement (function-level ones included) is parsed with ``ast``, resolved to the module
it loads, and compared with what its layer may import. The checker first runs on a small synthetic tree
holding one violation of each kind, so a checker that stopped finding violations fails rather than
passing everything.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import from fastunlearn besides itself; the longest matching prefix is a module's
# layer. "fastunlearn" alone means the root package's own names (__version__), not its subpackages.
INTERNAL: dict[str, tuple[str, ...]] = {
    "fastunlearn.kernels": (),
    "fastunlearn._io": (),
    # Hub ids resolved in the local Hugging Face cache: models and data sets alike.
    "fastunlearn._hub": (),
    "fastunlearn.ops": ("fastunlearn.kernels",),
    # torch.distributed for runs under torchrun / accelerate launch, and ZeRO-3 partitioned parameters:
    # the engines' primitives, below everything that runs on several ranks.
    "fastunlearn.engines.distributed": (),
    # Loading and checking models, names under wrappers, devices, precision.
    "fastunlearn.models": ("fastunlearn._hub",),
    # The losses inside a causal LM's forward: ops applied to a model.
    "fastunlearn.models.patching": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn.engines.distributed",
    ),
    # FILA's truncated SVD: linear algebra on tensors, nothing of the package.
    "fastunlearn.fisher.solver": (),
    "fastunlearn.fisher": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn._io",
        "fastunlearn._hub",
        "fastunlearn.engines.distributed",
    ),
    # Stopping rules and their controller: pure logic over metric values, read by the option schema.
    "fastunlearn.evaluation.stopping": (),
    # Records, templates, tokenisation, batches, TOFU's files: below training and evaluation alike.
    "fastunlearn.data": ("fastunlearn", "fastunlearn.ops", "fastunlearn._hub"),
    # FILA's reference model reads the initial adapters fila_init recorded.
    "fastunlearn.methods": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn.data",
        "fastunlearn.fisher",
    ),
    # FSDP2 and DeepSpeed: wrapping, sharded loading, gathering.
    "fastunlearn.engines": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn.fisher",
        "fastunlearn.data",
    ),
    "fastunlearn.options": (
        "fastunlearn",
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn.fisher",
        "fastunlearn.data",
        "fastunlearn.methods",
        "fastunlearn.engines",
        "fastunlearn.evaluation.stopping",
    ),
    "fastunlearn.evaluation": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn._io",
        "fastunlearn.engines.distributed",
        "fastunlearn.data",
    ),
    # The memory plan: the run's phases executed on fake tensors, so it calls the code of every phase
    # (the adapters' setup and the export of training included); its live-byte counter and the peak of
    # real live tensor bytes it is checked against need nothing of the package.
    "fastunlearn.plan": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn.engines",
        "fastunlearn.fisher",
        "fastunlearn.data",
        "fastunlearn.methods",
        "fastunlearn.options",
        "fastunlearn.evaluation",
        "fastunlearn.training.adapters",
    ),
    "fastunlearn.plan.peak_memory": (),
    "fastunlearn.training": (
        "fastunlearn",
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn._io",
        "fastunlearn._hub",
        "fastunlearn.engines",
        "fastunlearn.fisher",
        "fastunlearn.data",
        "fastunlearn.methods",
        "fastunlearn.options",
        "fastunlearn.evaluation",
        "fastunlearn.plan",
    ),
    "fastunlearn.demo": (
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn._io",
        "fastunlearn.engines",
        "fastunlearn.fisher",
        "fastunlearn.data",
        "fastunlearn.methods",
        "fastunlearn.options",
        "fastunlearn.evaluation",
        "fastunlearn.training",
    ),
    "fastunlearn.cli": (
        "fastunlearn",
        "fastunlearn.ops",
        "fastunlearn.models",
        "fastunlearn._io",
        "fastunlearn._hub",
        "fastunlearn.engines",
        "fastunlearn.fisher",
        "fastunlearn.data",
        "fastunlearn.methods",
        "fastunlearn.options",
        "fastunlearn.evaluation",
        "fastunlearn.plan",
        "fastunlearn.training",
        "fastunlearn.demo",
    ),
    # The root package imports nothing: every public name loads on first use (importlib), so that
    # `fastunlearn --help` does not wait for PyTorch.
    "fastunlearn.__init__": (),
    "fastunlearn.__main__": ("fastunlearn.cli",),
}
# Layers restricted to a few outside libraries (the standard library is always allowed).
EXTERNAL: dict[str, tuple[str, ...]] = {
    "fastunlearn.kernels": ("torch", "triton"),
    "fastunlearn.ops": ("torch",),
    "fastunlearn._io": (),
    "fastunlearn.engines.distributed": ("torch", "deepspeed"),
    "fastunlearn.plan.peak_memory": ("torch",),
    "fastunlearn.fisher.solver": ("torch",),
}


def module_name(path: Path, root: Path) -> tuple[str, str]:
    """``(module, package)`` of a source file; the root ``__init__``/``__main__`` keep their names to get
    layers of their own."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        package = ".".join(parts[:-1])
        return (package if len(parts) > 2 else "fastunlearn.__init__"), package
    return ".".join(parts), ".".join(parts[:-1])


def _is_module(root: Path, name: str) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path``: relative imports resolved, and
    ``from package import name`` read as the submodule ``package.name`` when there is one."""
    package = module_name(path, root)[1] if path.is_relative_to(root) else ""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if _is_module(root, sub) else base))
    return found


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or (p != "fastunlearn" and name.startswith(p + ".")) for p in prefixes)


def violations(root: Path) -> list[str]:
    """Every import under ``root/fastunlearn`` that its layer may not make."""
    tests_and_scripts = {"tests", "benchmarks", *_top_level_modules(root / "tests")}
    tests_and_scripts |= _top_level_modules(root / "benchmarks")
    found = []
    for path in sorted((root / "fastunlearn").rglob("*.py")):
        module = module_name(path, root)[0]
        rel = path.relative_to(root)
        layers = [name for name in INTERNAL if module == name or module.startswith(name + ".")]
        if not layers:
            found.append(f"{rel}: {module} belongs to no layer")
            continue
        layer = max(layers, key=len)
        for line, name in imports(path, root):
            top = name.split(".")[0]
            if top in tests_and_scripts:
                found.append(f"{rel}:{line}: {module} imports {name}, which is not part of the package")
            elif top == "fastunlearn":
                if not _matches(name, (layer, *INTERNAL[layer])):
                    found.append(f"{rel}:{line}: {module} ({layer} layer) imports {name}")
            elif layer in EXTERNAL and top not in sys.stdlib_module_names and top not in EXTERNAL[layer]:
                found.append(f"{rel}:{line}: {module} ({layer} layer) imports {name}")
    return found


def _top_level_modules(directory: Path) -> set[str]:
    """The names a script in ``directory`` (on ``sys.path``) could import its neighbours by."""
    if not directory.is_dir():
        return set()
    return {p.stem for p in directory.glob("*.py")} | {p.name for p in directory.iterdir() if p.is_dir()}


def test_the_package_follows_its_layering():
    assert violations(ROOT) == []


def _write(root: Path, relative: str, text: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    for package in (
        "fastunlearn",
        "fastunlearn/kernels",
        "fastunlearn/ops",
        "fastunlearn/evaluation",
        "fastunlearn/training",
    ):
        _write(tmp_path, f"{package}/__init__.py")
    _write(tmp_path, "fastunlearn/kernels/k.py", "import numpy\nimport triton\nimport torch\nimport math\n")
    _write(tmp_path, "fastunlearn/ops/op.py", "import transformers\nfrom fastunlearn.kernels import k\n")
    _write(tmp_path, "fastunlearn/ops/lazy.py", "def f():\n    from fastunlearn.training import run\n")
    _write(tmp_path, "fastunlearn/ops/rel.py", "from ..evaluation import e\nfrom . import op\n")
    _write(tmp_path, "fastunlearn/evaluation/e.py", "from fastunlearn.data.examples import batches\n")
    _write(tmp_path, "fastunlearn/evaluation/t.py", "from fastunlearn.training import trainer\n")
    _write(tmp_path, "fastunlearn/training/data.py")
    _write(tmp_path, "fastunlearn/training/trainer.py", "from fastunlearn import __version__\n")
    _write(tmp_path, "fastunlearn/training/r.py", "from fastunlearn import cli\nimport transformers\n")
    _write(tmp_path, "fastunlearn/fisher.py", "import oracles\nfrom helpers.models import tiny\n")
    _write(tmp_path, "tests/helpers/models.py")
    _write(tmp_path, "benchmarks/oracles.py")
    expected = {
        "fastunlearn/kernels/k.py:1: fastunlearn.kernels.k (fastunlearn.kernels layer) imports numpy",
        "fastunlearn/ops/op.py:1: fastunlearn.ops.op (fastunlearn.ops layer) imports transformers",
        "fastunlearn/ops/lazy.py:2: fastunlearn.ops.lazy (fastunlearn.ops layer) imports "
        "fastunlearn.training",
        "fastunlearn/ops/rel.py:1: fastunlearn.ops.rel (fastunlearn.ops layer) imports "
        "fastunlearn.evaluation.e",
        "fastunlearn/evaluation/t.py:1: fastunlearn.evaluation.t (fastunlearn.evaluation layer) imports "
        "fastunlearn.training.trainer",
        "fastunlearn/fisher.py:1: fastunlearn.fisher imports oracles, which is not part of the package",
        "fastunlearn/fisher.py:2: fastunlearn.fisher imports helpers.models, which is not part of the "
        "package",
    }
    assert set(violations(tmp_path)) == expected
    # `from fastunlearn import cli` read the root's names (allowed); now it loads a forbidden module.
    _write(tmp_path, "fastunlearn/cli.py")
    _write(tmp_path, "fastunlearn/stray.py")
    found = set(violations(tmp_path)) - expected
    assert found == {
        "fastunlearn/training/r.py:1: fastunlearn.training.r (fastunlearn.training layer) imports "
        "fastunlearn.cli",
        "fastunlearn/stray.py: fastunlearn.stray belongs to no layer",
    }


def test_tests_and_benchmarks_import_no_test_module():
    """Shared test code lives in tests/helpers; benchmarks import the package, never the tests."""
    test_modules = _top_level_modules(ROOT / "tests") | {"tests"}
    offenders = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        in_benchmarks = path.is_relative_to(ROOT / "benchmarks")
        for line, name in imports(path, ROOT):
            top = name.split(".")[0]
            if top.startswith("test_") or (in_benchmarks and top in test_modules):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert offenders == []


@pytest.mark.parametrize("heavy", ["torch", "triton", "transformers", "peft"])
def test_import_fastunlearn_is_light(heavy):
    """``import fastunlearn`` loads neither PyTorch nor Triton nor the HF stack (its names are lazy)."""
    code = f"import sys, fastunlearn; assert {heavy!r} not in sys.modules, {heavy!r}"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_package_data_is_installed():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "words.json" in config["package-data"]["fastunlearn.demo"]


def test_transformers_imports_from_a_checkout_root():
    """transformers ≥ 5 imports Hugging Face's ``kernels`` when it is installed: from the root it must
    get that one, and ``python -m fastunlearn`` must start."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        code = "import transformers.integrations.hub_kernels, kernels; print(kernels.__file__)"
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert not Path(run.stdout.strip()).resolve().is_relative_to(ROOT / "fastunlearn")
    cli = [sys.executable, "-m", "fastunlearn", "--help"]
    run = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_architecture_md_names_every_layer():
    """ARCHITECTURE.md explains the INTERNAL map above: each layer appears in it, by its module name,
    its name without the package prefix, or (the root modules) its file."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = []
    for layer in INTERNAL:
        short = layer.removeprefix("fastunlearn.")
        spellings = (layer, short, "fastunlearn/" + short + ".py")
        if not any(f"`{name}`" in text for name in spellings):
            missing.append(layer)
    assert missing == []
