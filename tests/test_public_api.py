"""The public API follows the ecosystem's conventions: every public module says what it exports
(__all__), every exported function and class has a docstring and type hints (its own public methods
too), and the package ships a py.typed marker."""
import importlib
import inspect
import pathlib

import pytest

import sparsebert

MODULES = [
    "sparsebert", "sparsebert.registry", "sparsebert.objectives", "sparsebert.families", "sparsebert.ops",
    "sparsebert.ops.mask", "sparsebert.ops.masked_linear", "sparsebert.ops.optim_step", "sparsebert.ops.topk",
    "sparsebert.ops.sparse_linear", "sparsebert.deploy",
    "sparsebert.zeros", "sparsebert.optim", "sparsebert.sparsity", "sparsebert.distill", "sparsebert.methods",
    "sparsebert.integrations", "sparsebert.integrations.pruning", "sparsebert.integrations.hf_trainer",
]


def own_public_methods(cls):
    """Public methods a sparsebert class defines itself, except overrides of a foreign base's method
    (nn.Module.forward, Optimizer.step, TrainerCallback hooks), which keep that base's contract."""
    foreign = [b for b in cls.__mro__[1:] if not b.__module__.startswith("sparsebert")]
    for name, member in vars(cls).items():
        if name.startswith("_") or not callable(member) and not isinstance(member, (staticmethod, classmethod)):
            continue
        if any(hasattr(b, name) for b in foreign):
            continue
        yield name, inspect.unwrap(member.__func__ if isinstance(member, (staticmethod, classmethod)) else member)


def missing_hints(fn):
    sig = inspect.signature(fn)
    params = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls") and p.annotation is p.empty]
    returns = sig.return_annotation is sig.empty and fn.__name__ != "__init__"
    return params + (["return"] if returns else [])


def problems(module_name):
    module = importlib.import_module(module_name)
    if not hasattr(module, "__all__"):
        return [f"{module_name}: no __all__"]
    out = []
    for name in module.__all__:
        obj = getattr(module, name)
        where = f"{module_name}.{name}"
        if inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                out.append(f"{where}: no docstring")
            out += [f"{where}: no hint for {p}" for p in missing_hints(obj)]
        elif inspect.isclass(obj) and obj.__module__.startswith("sparsebert"):
            if not obj.__doc__ or obj.__doc__.startswith(f"{obj.__name__}("):  # dataclasses write a signature
                out.append(f"{where}: no docstring")
            if "__init__" in vars(obj) and obj.__init__.__module__.startswith("sparsebert"):
                out += [f"{where}.__init__: no hint for {p}" for p in missing_hints(obj.__init__)]
            for method_name, method in own_public_methods(obj):
                if not inspect.getdoc(method):
                    out.append(f"{where}.{method_name}: no docstring")
                out += [f"{where}.{method_name}: no hint for {p}" for p in missing_hints(method)]
    return out


@pytest.mark.parametrize("module_name", MODULES)
def test_exports_have_docstrings_and_type_hints(module_name):
    assert problems(module_name) == []


def test_the_package_is_typed():
    assert (pathlib.Path(sparsebert.__file__).parent / "py.typed").is_file()
