"""A stage added the way a team adds one: a module that declares it and an entry point in the
``funnelrec.stages`` group (here a ``.dist-info`` folder on ``sys.path``, which is what installing a
package with that entry point leaves behind). Nothing else is edited: the CLI, ``nightly`` and the
DAGs must find it."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

MODULE = "funnelrec_count_events"
STAGE = "count_events"

SOURCE = textwrap.dedent(
    '''
    """A stage outside funnelrec's packages: counts the run date's events."""

    import json

    from infra.pipeline import DATE, Outcome, Stage, Step
    from infra.tables import events_dir


    def count_events(settings, date):
        """Count the run date's events.

        Count the events of --date and write event_counts/ds=D/counts.json.
        """
        import pyarrow.dataset as ds

        events = ds.dataset(events_dir(settings.paths.warehouse_root), partitioning="hive")
        n = events.count_rows(filter=ds.field("event_date") == date.isoformat())
        target = settings.paths.warehouse_root / "event_counts" / f"ds={date}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "counts.json").write_text(json.dumps({"events": n}))
        return Outcome(f"{n} events on {date} -> {target}", {"events": n})


    STAGES = (
        Stage(
            "count_events",
            count_events,
            options=(DATE,),
            steps=(Step(reads=("events",), writes=("event_counts",), group="etl"),),
        ),
    )
    '''
)


def install(folder: Path, monkeypatch) -> Path:
    """Put the module and its entry point on ``sys.path`` (and ``PYTHONPATH``, for subprocesses)."""
    (folder / f"{MODULE}.py").write_text(SOURCE)
    info = folder / "funnelrec_count_events-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: funnelrec-count-events\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[funnelrec.stages]\nzz_count_events = {MODULE}:STAGES\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return folder
