"""``--plugin MODULE``: a user's own methods (``register_distiller``) and teacher families,
imported before the flags are built, so they are recipes and teachers like the built-in ones.

MODULE is an importable module name (looked up from the current folder first, as ``python -m``
does) or the path of a ``.py`` file. The names a run used are saved with its flags
(``config.yaml`` and the checkpoint's ``args``); a resume names the same plug-ins, or it is
refused as any changed flag is. Importing a plug-in runs its code: a ``plugin:`` key of a
``--config`` YAML does so too, as soon as the file is read (even for ``--help``).
"""
import importlib
import importlib.util
import os
import sys

import yaml

from ..errors import CakdError


class PluginError(CakdError):
    """A plug-in that cannot be imported; the message says which and why, in one line."""


def load_plugins(names):
    """Import each plug-in in ``names`` once (a repeated name is imported once)."""
    for name in dict.fromkeys(names or ()):
        load_plugin(name)


def load_plugin(name):
    try:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise FileNotFoundError(f"no file {name}")
            module_name = "cakd_plugin_" + os.path.splitext(os.path.basename(name))[0]
            if module_name in sys.modules:
                return sys.modules[module_name]
            spec = importlib.util.spec_from_file_location(module_name, os.path.abspath(name))
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
            return module
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as python -m: a module in the current folder
        return importlib.import_module(name)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        why = f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
        raise PluginError(
            f"--plugin {name}: cannot import it ({why}); give an importable module name (from the current folder or the "
            "installed packages) or the path of a .py file"
        ) from None


def plugins_in(argv, config_paths=()):
    """The ``--plugin`` values of a command line and of its ``--config`` YAML files (with the
    files they include through ``config:``), YAML's first."""
    found = []
    for path in config_paths:
        found += _yaml_plugins(path)
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def _yaml_plugins(path, _seen=()):
    """``plugin`` values of a YAML config and its ``config:`` parents (unreadable files are left
    to the full parse, which says what is wrong with them)."""
    if os.path.abspath(path) in _seen or not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    found = []
    parents = data.get("config") or []
    for parent in [parents] if isinstance(parents, str) else parents:
        found += _yaml_plugins(os.path.join(os.path.dirname(path), str(parent)), _seen + (os.path.abspath(path),))
    value = data.get("plugin") or []
    return found + ([value] if isinstance(value, str) else [str(v) for v in value])
