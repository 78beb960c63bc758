"""The admin side of a scheduler's process state (:class:`xshare.sglang.state.ProcessState` inherits it): the
named changes :mod:`xshare.sglang.admin` makes to a runtime (the :class:`~xshare.sglang.admin.target.AdminTarget`
protocol): a config put in force now or staged for a forward count (ranks that route shared rows switch at
the same step), this rank on or off its group's config, the group's view, the channel key, the last summary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from xshare.sglang.settings import PluginSettings

if TYPE_CHECKING:
    from xshare.sglang.observe.stats import SelectorStats

log = logging.getLogger("xshare.sglang")


class Staged(NamedTuple):
    """A config checked and taken, in force from forward ``at_forward`` on."""

    settings: PluginSettings
    version: int
    source: str
    at_forward: int


class ConfigChanges:
    """What the admin control path changes on a process state (attributes the state sets up)."""

    settings: PluginSettings
    stats: SelectorStats
    rank: int
    version: int
    config_source: str
    group_rank: int
    group_view: list[dict[str, Any]] | None
    channel_key: str
    last_summary: dict[str, Any] | None
    staged: Staged | None  # a config taken, not in force yet

    @property
    def forwards(self) -> int:
        """The model forwards this rank ran (ranks of a DP group run theirs in lockstep)."""
        return self.stats.forwards

    def set_config(self, settings: PluginSettings, version: int, *, source: str = "admin change",
                   at_forward: int | None = None) -> None:
        """Apply a config from the admin endpoint (at a forward-batch boundary) and report it. Raises
        when the device knobs cannot take it (the caller goes back to the previous config). ``at_forward``:
        checked now, staged (``staged``) and put in force by :meth:`sync_knobs` at the boundary of that
        forward count, where ranks sharing rows all switch; a rank already past it switches now (logged)."""
        self.staged = None
        if at_forward is not None and self.stats.forwards < at_forward:
            self.check_settings(settings)
            self.staged = Staged(settings, version, source, int(at_forward))
            return
        if at_forward is not None and self.stats.forwards > at_forward:
            log.warning("xshare: config v%d reached rank %d %d forwards after the step its group switches at",
                        version, self.rank, self.stats.forwards - at_forward)
        self.update_settings(settings)
        self.version = version
        self.config_source = source
        if self.metrics is not None:
            try:
                self.metrics.config_changed(self)
            except Exception as exc:  # noqa: BLE001 - metrics never decide a change
                self.log_once("metrics_config", logging.ERROR, "xshare: config metrics failed: %s", exc)

    def promote_staged(self) -> None:
        """At a forward boundary: the staged config, once this rank reaches its forward count."""
        staged = self.staged
        if staged is not None and self.stats.forwards >= staged.at_forward:  # the step its group switches at
            self.set_config(staged.settings, staged.version, source=staged.source)

    def mark_diverged(self) -> None:
        self.diverged = True

    def mark_converged(self) -> None:
        self.diverged = False

    def record_group_rank(self, rank: int) -> None:
        self.group_rank = int(rank)

    def record_group_view(self, statuses: list[dict[str, Any]]) -> None:
        self.group_view = statuses

    def set_channel_key(self, key: str) -> None:
        self.channel_key = key

    def record_summary(self, summary: dict[str, Any]) -> None:
        self.last_summary = summary

    def count_config_change(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.config_change(result)
