"""The TRL members our trainers override or read still exist, with the parameters we call them with.

The RM and DPO stages subclass TRL's trainers and override some of their private methods (``_prepare_dataset``,
``_set_signature_columns_if_needed``) and read private state (``_metrics``, ``_total_train_tokens``). A TRL
release that renames one would not fail loudly: an override of a method nobody calls any more is silently
ignored. This test finds every such subclass in ``stages/`` by reading the code, so an override added later is
checked too, and fails naming the member, the file and the TRL version; pyproject.toml pins the TRL minor version
it passed on.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re

import pytest

from conftest import ROOT

pytestmark = pytest.mark.fast

TRL_CLASSES = {"RewardTrainer": "trl", "DPOTrainer": "trl", "CPOTrainer": "trl.experimental.cpo"}
"""the TRL trainers a stage subclasses, and the module each is imported from"""


def subclasses() -> list[tuple[str, str, dict[str, list[str] | None], set[str]]]:
    """(file, TRL base, the methods it defines with their parameter names (None: it takes ``*args``/``**kwargs``),
    the ``self._name`` attributes it reads) for every class in stages/ built on a TRL trainer."""
    found = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in TRL_CLASSES]
            if not bases:
                continue
            methods = {f.name: None if f.args.vararg or f.args.kwarg else [a.arg for a in f.args.args]
                       for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}
            private = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                       and n.value.id == "self" and n.attr.startswith("_") and not n.attr.startswith("__")
                       and n.attr not in methods}
            found.append((path.name, bases[0], methods, private))
    return found


def test_the_stages_subclass_trl_trainers_here():
    """The discovery itself: it sees the three trainers the RM and DPO stages build on."""
    bases = {base for _, base, _, _ in subclasses()}
    assert bases == set(TRL_CLASSES), bases


def _assigned_in_mro(cls, name: str) -> bool:
    """Whether ``self.NAME = ...`` (or ``self.NAME: T = ...``) appears in the source of any class ``cls`` inherits
    from (TRL's and transformers' Trainer)."""
    pattern = re.compile(rf"self\.{re.escape(name)}\s*(:[^=]*)?=")
    for klass in inspect.getmro(cls):
        try:
            if pattern.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


@pytest.mark.parametrize("file,base,methods,private", subclasses(), ids=lambda x: x if isinstance(x, str) else "")
def test_what_we_override_and_read_still_exists_in_trl(file, base, methods, private):
    import trl

    cls = getattr(importlib.import_module(TRL_CLASSES[base]), base)
    where = f"stages/{file} subclasses {base} of TRL {trl.__version__}"
    for name, mine in methods.items():
        assert hasattr(cls, name), (f"{where} and overrides {name}, which that TRL no longer has: the override "
                                    "is never called (pin trl in pyproject.toml to the tested minor version, or port "
                                    "the override)")
        theirs = list(inspect.signature(getattr(cls, name)).parameters)
        assert mine is None or mine == theirs, f"{where}: TRL's {name} takes {tuple(theirs)}, ours {tuple(mine)}"
    for name in sorted(private):
        assert hasattr(cls, name) or _assigned_in_mro(cls, name), (
            f"{where} and reads self.{name}, which that TRL no longer sets")
