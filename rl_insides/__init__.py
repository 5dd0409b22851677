"""The project installed under one name: ``pip install`` puts it in ``rl_insides/``, which mirrors the
checkout (``rl_insides/modules``, ``rl_insides/callbacks``, ``rl_insides/datamodules``,
``rl_insides/configs``, ``rl_insides/cli.py``), and nothing else in site-packages.

The code imports itself by its checkout names (``from modules.errors import UserError``), and configs
name classes the same way (``class_path: modules.ppo.PPO``). Importing ``rl_insides`` adds one import
finder that keeps both working in an installed copy:

- ``modules``, ``callbacks``, ``datamodules`` and ``cli`` are loaded from the installed copy (first
  in line, so another installed package of such a name does not take their place);
- ``rl_insides.modules.ppo`` and the like are the very modules ``modules.ppo`` and so on, one object
  under two names (classes keep their checkout names, so a run's saved config reads the same
  whether it was made from the checkout or from an installed copy).

In the checkout (``python cli.py ...``) nothing imports ``rl_insides``; where something does, the
checkout's names are found as usual and only the ``rl_insides.`` names are added.

    python -m rl_insides fit --config CONFIG     # cli.py of an installed copy
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

NAMES = ("modules", "callbacks", "datamodules", "cli")  # configs/ holds only YAML files


def _installed_spec(name: str):
    """Where an installed copy has ``name`` (as ``rl_insides.<name>``), from any other finder (an
    editable install's included), or None (the checkout: its names are found on sys.path)."""
    for finder in sys.meta_path:
        if isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(f"{__name__}.{name}", __path__)
        if spec is not None and spec.origin is not None:
            return spec
    return None


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, installed: dict[str, importlib.machinery.ModuleSpec]):
        self.installed = installed  # top-level name -> where the installed copy has it
        self.real_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.installed:
            located = self.installed[fullname]
            return importlib.util.spec_from_file_location(
                fullname, located.origin, submodule_search_locations=located.submodule_search_locations)
        head, _, rest = fullname.partition(".")
        if head == __name__ and rest.partition(".")[0] in NAMES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        """``rl_insides.X`` is module ``X`` itself."""
        module = importlib.import_module(spec.name.partition(".")[2])
        self.real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        """Nothing to run: the module ran under its own name. The import system has set its
        ``__spec__`` to this alias's: put its own back."""
        module.__spec__ = self.real_specs.pop(module.__spec__.name)


def _install() -> None:
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    installed = {name: _installed_spec(name) for name in NAMES}
    if installed["modules"] is None:  # the checkout
        installed = {}
    sys.meta_path.insert(0, _Finder({name: spec for name, spec in installed.items() if spec is not None}))


_install()
