"""A model zoo: one file per model, each exporting ``build()``, ``example_input()`` and ``EXPECT``.

``build()`` returns the model as a user writes it, with weights scaled (by ``lively``) so that
every layer fires on the example input: silent networks would make spike equality trivial.
"""
import importlib
import pkgutil

NAMES = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name):
    """The zoo module called ``name``."""
    return importlib.import_module(f"{__name__}.{name}")
