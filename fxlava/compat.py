"""Make lava-nc 0.10.0 and lava-dl 0.6.0 import on Python >= 3.11, without editing site-packages.

Lava's last releases were written for Python 3.10 and numpy 1.x. Three things break on
newer interpreters or libraries; each is fixed here at import time, for the one module
that needs it, and only when the condition that breaks it holds (on Python 3.10 with
numpy 1.x, ``install()`` changes nothing):

1. ``lava.lib.dl.slayer`` imports its ``object_detection`` subpackage, which needs cv2 and
   torchvision. fxlava never uses it. If it cannot be imported, it is replaced by a module
   that raises ``ImportError`` (with the original reason) as soon as anything in it is used.
2. ``lava.magma.compiler.var_model`` declares dataclass fields whose defaults are dataclass
   instances (``x: ByteEncoder = ByteEncoder()``). Python 3.11 rejects mutable defaults
   (bpo-44674). Its source is compiled with those defaults rewritten to
   ``field(default_factory=ByteEncoder)``, which is what 3.10 meant.
3. ``lava.magma.core.process.ports.ports`` reshapes with
   ``functools.partial(np.reshape, newshape=...)``; numpy 2.4 removed that keyword, so any
   conv -> flatten -> dense network fails inside a Lava worker. Under numpy >= 2 the call
   goes through a module-level helper that passes the shape positionally.

4. ``lava.magma.runtime.message_infrastructure.multiprocessing`` calls
   ``mp.set_start_method('fork')`` at import time, which raises "context has already been
   set" if anything in the process asked for the start method first (``get_start_method()``
   fixes the default). It is rewritten to ``set_start_method('fork', force=True)``: the same
   method Lava needs, without the import-order trap. This one is not specific to 3.11.

5. ``lava.proc.conv.models`` stores a conv's kernel size, stride, padding, dilation and groups
   as int8 in the process model the simulator runs. 128 groups wrap to -128 (a netx conv then
   outputs nothing), 256 to 0 (division by zero), 129 made a run hang; a kernel, stride, padding
   or dilation above 127 wraps the same way. They are declared int32 instead. Neither the netx
   format nor Lava's Conv process limits these values (docs/compat.md); only this model did.

The rewritten modules are compiled in memory from the genuine source; nothing is written
to site-packages (the wheels' RECORD hashes still verify). Lava forks its workers, so the
import hook installed in the parent process is inherited by them.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["install", "uninstall", "PATCHES", "SourcePatch"]

_OBJECT_DETECTION = "lava.lib.dl.slayer.object_detection"


def _numpy_major() -> int:
    return int(np.__version__.split(".")[0])


def _rewrite_instance_defaults(source: str) -> str:
    """``name: Cls = Cls()`` -> ``name: Cls = field(default_factory=Cls)`` (3.11 dataclasses)."""
    rewritten, count = re.subn(
        r"^(\s+\w+\s*:\s*(\w+)\s*=\s*)\2\(\)\s*$",
        r"\1__import__('dataclasses').field(default_factory=\2)",
        source,
        flags=re.MULTILINE,
    )
    if count == 0:
        raise ImportError("fxlava.compat: var_model.py no longer has the dataclass defaults it patches")
    return rewritten


def _rewrite_reshape_keyword(source: str) -> str:
    """``partial(np.reshape, newshape=s)`` -> a helper that passes ``s`` positionally (numpy 2.4)."""
    rewritten, count = re.subn(r"ft\.partial\(np\.reshape, newshape=", "ft.partial(_fxlava_reshape, newshape=", source)
    if count == 0:
        raise ImportError("fxlava.compat: ports.py no longer calls np.reshape(newshape=...)")
    return rewritten + (
        "\n\ndef _fxlava_reshape(a, newshape):\n"
        "    return np.reshape(a, newshape)\n"
    )


def _rewrite_start_method(source: str) -> str:
    """``mp.set_start_method('fork')`` -> ``force=True`` (importing Lava after anything touched the method)."""
    rewritten, count = re.subn(r"mp\.set_start_method\('fork'\)", "mp.set_start_method('fork', force=True)", source)
    if count == 0:
        raise ImportError("fxlava.compat: multiprocessing.py no longer calls mp.set_start_method('fork')")
    return rewritten


_CONV_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups")


def _rewrite_conv_geometry(source: str) -> str:
    """Conv geometry vars ``LavaPyType(np.ndarray, np.int8, precision=8)`` -> int32 (wider than any real layer)."""
    rewritten, count = re.subn(
        rf"^(\s+(?:{'|'.join(_CONV_GEOMETRY)}): np\.ndarray = LavaPyType\(np\.ndarray, )np\.int8, precision=8\)",
        r"\1np.int32, precision=32)",
        source,
        flags=re.MULTILINE,
    )
    if count != len(_CONV_GEOMETRY):
        raise ImportError(f"fxlava.compat: conv/models.py no longer declares {', '.join(_CONV_GEOMETRY)} as int8 "
                          f"({count} of {len(_CONV_GEOMETRY)} found)")
    return rewritten


@dataclass(frozen=True)
class SourcePatch:
    """A source rewrite applied to one module when ``needed()`` is true."""

    module: str
    needed: Callable[[], bool]
    rewrite: Callable[[str], str]
    why: str


PATCHES = (
    SourcePatch(
        "lava.magma.compiler.var_model",
        lambda: sys.version_info >= (3, 11),
        _rewrite_instance_defaults,
        "dataclass instance defaults are rejected from Python 3.11",
    ),
    SourcePatch(
        "lava.magma.core.process.ports.ports",
        lambda: _numpy_major() >= 2,
        _rewrite_reshape_keyword,
        "numpy 2.4 removed np.reshape(newshape=...)",
    ),
    SourcePatch(
        "lava.magma.runtime.message_infrastructure.multiprocessing",
        lambda: sys.platform != "win32",
        _rewrite_start_method,
        "set_start_method('fork') at import fails once the start method is fixed",
    ),
    SourcePatch(
        "lava.proc.conv.models",
        lambda: True,
        _rewrite_conv_geometry,
        "conv groups, kernel, stride, padding and dilation stored as int8 wrap from 128",
    ),
)


class _PatchedSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the genuine source after a rewrite; never reads or writes bytecode caches."""

    def __init__(self, fullname: str, path: str, rewrite: Callable[[str], str]):
        super().__init__(fullname, path)
        self._rewrite = rewrite

    def get_code(self, fullname):
        source = self._rewrite(self.get_source(fullname))
        return compile(source, self.path, "exec", dont_inherit=True)


class _OptionalModuleLoader(importlib.abc.Loader):
    """Runs the real loader; if the module cannot be imported, leaves a module that says why."""

    def __init__(self, real_loader):
        self._real = real_loader

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        try:
            self._real.exec_module(module)
        except Exception as exc:  # ImportError (cv2) or RuntimeError (a torchvision built for another torch)
            for name in [m for m in sys.modules if m.startswith(module.__name__ + ".")]:
                del sys.modules[name]
            reason = f"{type(exc).__name__}: {exc}"

            def __getattr__(attr, _name=module.__name__, _reason=reason):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                raise ImportError(
                    f"{_name} is unavailable ({_reason}); it needs cv2 and a torchvision that "
                    f"matches torch. fxlava does not use it."
                )

            module.__dict__["__getattr__"] = __getattr__
            module.__dict__["__fxlava_unavailable__"] = reason


class _LavaCompatFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._patches = {p.module: p for p in PATCHES if p.needed()}

    def find_spec(self, fullname, path, target=None):
        if fullname != _OBJECT_DETECTION and fullname not in self._patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return spec
        if fullname == _OBJECT_DETECTION:
            spec.loader = _OptionalModuleLoader(spec.loader)
        else:
            spec.loader = _PatchedSourceLoader(fullname, spec.origin, self._patches[fullname].rewrite)
        return spec


def _installed_finder():
    return next((f for f in sys.meta_path if isinstance(f, _LavaCompatFinder)), None)


def install() -> None:
    """Put the import hook first on ``sys.meta_path`` (idempotent)."""
    if _installed_finder() is None:
        sys.meta_path.insert(0, _LavaCompatFinder())


def uninstall() -> None:
    """Remove the import hook (modules already imported stay as they are)."""
    finder = _installed_finder()
    if finder is not None:
        sys.meta_path.remove(finder)


def active_patches() -> list[str]:
    """Names of the modules this interpreter needs patched."""
    return [p.module for p in PATCHES if p.needed()]
