"""What the plugin reports about its selector: the counters (:mod:`.stats`, added on the device by
:mod:`.tally`, brought to the host without waiting by :mod:`.snapshot`, added up in :mod:`.totals`), the
figures' definitions (:mod:`.figures`), per-call bookkeeping (:mod:`.record`), process-level reports
(:mod:`.report`: coverage, the stats file), the Prometheus exporter (:mod:`.metrics`), the routing trace
(:mod:`.trace`) and the start-up coverage survey (:mod:`.coverage`). Depends on the process state, never
on the hooks."""
