"""Triton kernels and their host-side launchers, installed as ``fastunlearn.kernels``.

Each module holds the ``@triton.jit`` functions and a launcher that allocates outputs and picks the
grid; nothing here knows about autograd. Importing a submodule imports ``triton``; this package itself
imports nothing, so ``import fastunlearn`` works on machines without Triton or a GPU.
"""

if __name__ == "kernels":
    # This directory was imported as the top-level package ``kernels``: a checkout's root is on
    # ``sys.path`` (``python -m pytest`` or ``python -m fastunlearn`` run from it). That name belongs
    # to Hugging Face's ``kernels``, which transformers imports whenever it is installed, so step aside:
    # load the installed one in our place (the import system returns whatever a package leaves in
    # ``sys.modules`` under its name), or be absent, as we would be to a user of the installed package.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _checkout = Path(__file__).resolve().parent.parent
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    del sys.modules["kernels"]
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
