"""What the admin endpoint's scheduler side needs of a scheduler's runtime (:class:`AdminTarget`): the
settings in force with their version and origin, this rank's place in its group, and the few named
changes admin makes to it. :class:`xshare.sglang.state.ProcessState` is the one implementation; admin
reads and changes a runtime only through these names."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from xshare.sglang.observe.metrics import Exporter
from xshare.sglang.settings import PluginSettings
from xshare.sglang.state_config import Staged


@runtime_checkable
class AdminTarget(Protocol):
    """A scheduler's runtime as the admin control path sees it."""

    @property
    def settings(self) -> PluginSettings: ...  # the settings in force

    @property
    def version(self) -> int: ...  # the config version in force (admin changes count up)

    @property
    def config_source(self) -> str: ...  # "start-up settings", "persisted" or "admin change"

    @property
    def rank(self) -> int: ...  # the TP rank

    @property
    def group_rank(self) -> int: ...  # this rank in the whole group (over nodes and DP replicas)

    @property
    def channel_key(self) -> str: ...  # the per-start key that signs config messages

    @property
    def diverged(self) -> bool: ...  # off its group's config: it does not select

    @property
    def group_view(self) -> list[dict[str, Any]] | None: ...  # every rank's status as of the last change

    @property
    def last_summary(self) -> dict[str, Any] | None: ...  # this rank's last metrics window summary

    @property
    def observe(self) -> bool: ...  # the per-call metrics window is recorded (and flushed to an exporter)

    def capture_refusal(self, new: PluginSettings) -> str | None:
        """Why ``new`` cannot be applied under the captured CUDA graphs, or None."""

    @property
    def staged(self) -> Staged | None: ...  # a config taken, in force from a later forward

    @property
    def forwards(self) -> int: ...  # the model forwards this rank ran

    @property
    def shared_rows(self) -> bool: ...  # routes rows its peers route too (attention DP over a TP MoE)

    def set_config(self, settings: PluginSettings, version: int, *, source: str = "admin change",
                   at_forward: int | None = None) -> None:
        """Apply a config (raises when it cannot be taken; nothing changes then); ``at_forward``: checked now,
        in force from that forward count on (staged until then)."""

    def flush_metrics(self, *, wait: bool = True) -> None:
        """Drain the metrics window so far into the exporter (nothing without one); ``wait``: exact."""

    def enable_observability(self, exporter: Exporter) -> None:
        """Record the per-call window and flush it to ``exporter``."""

    def count_config_change(self, result: str) -> None:
        """One config change's outcome on this rank ("applied" / "rejected") on the exporter, if any."""

    def mark_diverged(self) -> None:
        """This rank is off its group's config: it stops selecting until :meth:`mark_converged`."""

    def mark_converged(self) -> None:
        """This rank is on its group's config again: it selects."""

    def record_group_rank(self, rank: int) -> None:
        """This rank's place in the whole group."""

    def record_group_view(self, statuses: list[dict[str, Any]]) -> None:
        """Every rank's status after a change (what ``get_internal_state`` reports)."""

    def set_channel_key(self, key: str) -> None:
        """The key config messages are signed with."""

    def record_summary(self, summary: dict[str, Any]) -> None:
        """This rank's last metrics window summary (``GET /xshare/stats``)."""

    def log_once(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        """Log ``msg`` once per ``key`` in this process."""
