"""The plugin host: pluggy manager, built-in and third-party plugins, typed facade.

Built-ins are registered from :data:`BUILTIN_PLUGINS`; third parties from
the ``vmmig`` entry-point group.  ``--disable-plugin NAME`` (or the
``VMMIG_DISABLE_PLUGINS`` environment variable, comma-separated) blocks a
plugin by its registered name before it is loaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Iterable, Sequence
from types import ModuleType
from typing import Any, Final, cast

import attrs
import pluggy

from vmmig import PROJECT, __version__, hookspecs
from vmmig.config import MigrationPlan
from vmmig.core.phases import Phase
from vmmig.errors import HostRequirementError, PluginError, UnsupportedError
from vmmig.migration import Migration
from vmmig.report import Progress, RoundReport
from vmmig.technology import Technology


__all__ = ["BUILTIN_PLUGINS", "PluginHost", "PluginInfo", "TechnologyHooks"]

#: Modules registered as plugins at start-up, under their last dotted name.
BUILTIN_PLUGINS: Final = (
    "vmmig.plugins.plain",
    "vmmig.plugins.sev",
    "vmmig.plugins.sev_es",
    "vmmig.plugins.progress",
)

#: Step hooks a technology must implement; the others may be left out.
REQUIRED_STEPS: Final = (
    "vmmig_prepare_target",
    "vmmig_transfer_memory",
    "vmmig_verify_target",
    "vmmig_finalize",
    "vmmig_rollback",
)

#: The step hook that runs in each working phase.
STEP_HOOKS: Final = {
    Phase.PREPARING_TARGET: "vmmig_prepare_target",
    Phase.STARTING_HELPER: "vmmig_start_helper",
    Phase.TRANSFERRING_MEMORY: "vmmig_transfer_memory",
    Phase.STOPPING_SOURCE: "vmmig_stop_source",
    Phase.TRANSFERRING_CPU_STATE: "vmmig_transfer_cpu_state",
    Phase.VERIFYING: "vmmig_verify_target",
    Phase.FINALIZING: "vmmig_finalize",
}


@attrs.frozen
class PluginInfo:
    """One registered plugin, for ``vmmig plugins``."""

    name: str
    version: str
    distribution: str | None
    technologies: tuple[Technology, ...]
    hooks: tuple[str, ...]


@attrs.frozen
class TechnologyHooks:
    """The step hooks of one selected technology, typed.

    Pluggy's relay returns ``Any``; this facade keeps that out of the core.
    """

    technology: Technology
    _pm: pluggy.PluginManager
    _excluded: tuple[object, ...]

    def _call(self, hook: str, **kwargs: object) -> Awaitable[Any] | None:
        caller = self._pm.subset_hook_caller(hook, remove_plugins=self._excluded)
        return cast("Awaitable[Any] | None", caller(**kwargs))

    def implements(self, hook: str) -> bool:
        """True when some plugin active for this technology implements ``hook``."""
        caller = self._pm.subset_hook_caller(hook, remove_plugins=self._excluded)
        return bool(caller.get_hookimpls())

    async def run_step(self, phase: Phase, migration: Migration) -> None:
        """Run the step hook of ``phase``; optional steps left out do nothing."""
        awaitable = self._call(STEP_HOOKS[phase], migration=migration)
        if awaitable is not None:
            await awaitable

    async def rollback(self, migration: Migration, reason: str) -> None:
        """Run the technology's rollback."""
        awaitable = self._call("vmmig_rollback", migration=migration, reason=reason)
        if awaitable is not None:
            await awaitable


class PluginHost:
    """Owns the plugin manager; typed access to every hook."""

    def __init__(self, *, disabled: Iterable[str] = (), builtins: Sequence[str] = BUILTIN_PLUGINS,
                 entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        blocked = {*disabled, *_env_disabled()}
        for name in blocked:
            self.pm.set_blocked(name)
        for dotted in builtins:
            name = dotted.rsplit(".", 1)[-1]
            if self.pm.is_blocked(name):
                continue
            self.pm.register(_import(dotted), name=name)
        if entry_points:
            try:
                self.pm.load_setuptools_entrypoints(PROJECT)
            except Exception as err:  # a broken third-party plugin: name it, don't trace back
                raise PluginError(f"a plugin of the '{PROJECT}' entry-point group failed "
                                  f"to load: {type(err).__name__}: {err}") from err
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginError(str(err)) from err

    # -- capability ----------------------------------------------------------

    def technologies(self) -> dict[str, tuple[Technology, object]]:
        """Technology name -> (its description, the plugin providing it)."""
        found: dict[str, tuple[Technology, object]] = {}
        for impl in self.pm.hook.vmmig_technology.get_hookimpls():
            tech = impl.function()
            if tech is None:
                continue
            if not isinstance(tech, Technology):
                raise PluginError(f"plugin {impl.plugin_name}: vmmig_technology must return "
                                  f"a Technology, got {type(tech).__name__}")
            if tech.name in found:
                other = self.pm.get_name(found[tech.name][1])
                raise PluginError(f"technology {tech.name!r} is provided by both plugin "
                                  f"{other!r} and plugin {impl.plugin_name!r}")
            found[tech.name] = (tech, impl.plugin)
        return found

    def default_platform(self, tech: str) -> str:
        """The platform ``tech`` runs on unless told otherwise: the first it lists
        (``qemu`` for an unknown technology, which :meth:`select` then names)."""
        found = self.technologies().get(tech)
        return found[0].platforms[0] if found is not None else "qemu"

    def check_host(self, plan: MigrationPlan) -> None:
        """Ask the plan's technology what this host lacks for it; stop if anything.

        :raises HostRequirementError: listing every missing requirement.
        """
        found = self.technologies().get(plan.tech)
        if found is None:
            return  # select() names the unknown technology
        caller = self.pm.subset_hook_caller(
            "vmmig_host_problems",
            remove_plugins=[p for _, p in self.technologies().values() if p is not found[1]])
        problems = caller(plan=plan) or []
        if problems:
            raise HostRequirementError(
                f"technology {plan.tech!r} cannot run on {plan.platform} here; missing: "
                + "; ".join(problems))

    def select(self, name: str, platform: str, features: Iterable[str] = ()) -> TechnologyHooks:
        """The hooks of technology ``name`` on ``platform``, checked before any VM starts.

        :param features: the optional features the plan asks for.
        :raises UnsupportedError: unknown technology, wrong platform, a feature
            it lacks there, missing required hooks, or a technology that says it
            is not available.
        """
        techs = self.technologies()
        if name not in techs:
            known = ", ".join(sorted(techs)) or "none"
            raise UnsupportedError(f"unknown technology {name!r}; available: {known}")
        tech, plugin = techs[name]
        if tech.unavailable:
            raise UnsupportedError(f"technology {name!r}: {tech.unavailable}")
        if platform not in tech.platforms:
            raise UnsupportedError(f"technology {name!r} does not run on platform {platform!r}; "
                                   f"it runs on: {', '.join(tech.platforms)}")
        lacking = [feature for feature in features if not tech.supports(feature, platform)]
        if lacking:
            raise UnsupportedError(f"technology {name!r} on {platform} does not support "
                                   f"{', '.join(lacking)}")
        excluded = tuple(p for t, p in techs.values() if p is not plugin)
        hooks = TechnologyHooks(tech, self.pm, excluded)
        missing = [hook for hook in REQUIRED_STEPS if not hooks.implements(hook)]
        if missing:
            raise PluginError(f"technology {name!r} lacks required hooks: {', '.join(missing)}")
        return hooks

    # -- observers -------------------------------------------------------------

    def phase_changed(self, migration: Migration, old: Phase, new: Phase) -> None:
        """Tell every plugin that the phase changed."""
        self.pm.hook.vmmig_phase_changed(migration=migration, old=old, new=new)

    def round_done(self, migration: Migration, round_: RoundReport) -> None:
        """Tell every plugin that a round finished."""
        self.pm.hook.vmmig_round_done(migration=migration, round_=round_)

    def progress(self, migration: Migration, progress: Progress) -> None:
        """Tell every plugin about transfer progress."""
        self.pm.hook.vmmig_progress(migration=migration, progress=progress)

    # -- listing -------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its version, technologies and hooks."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        techs = self.technologies()
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            dist = dists.get(id(plugin))
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))
            infos.append(PluginInfo(
                name=name,
                version=str(dist.version) if dist is not None else __version__,
                distribution=str(dist.project_name) if dist is not None else None,
                technologies=tuple(t for t, p in techs.values() if p is plugin),
                hooks=hooks,
            ))
        return infos


def _env_disabled() -> list[str]:
    return [name.strip() for name in os.environ.get("VMMIG_DISABLE_PLUGINS", "").split(",")
            if name.strip()]


def _import(dotted: str) -> ModuleType:
    try:
        return importlib.import_module(dotted)
    except ImportError as err:
        raise PluginError(f"built-in plugin {dotted} failed to import: {err}") from err
