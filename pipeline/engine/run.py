"""The one place that picks the driver: realtime, batch (``[model] mode = "batch"``), Ray, settled.

Settled (:mod:`pipeline.engine.drivers.settled`): a realtime run with nothing
to send, such as the rerun of a finished job, ends without opening a transport.

:func:`run_plan` holds the session's frame (the lock and the open journal)
around the driver it picks. The drivers never import each other.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.engine.drivers.settled import run_settled, settled_rows
from pipeline.engine.plan import Plan
from pipeline.engine.session import Controls, RunOptions, RunResult, opened
from pipeline.store.batches import refuse_if_batches_pending

if TYPE_CHECKING:
    from pipeline.engine.drivers.ray.cluster import RaySettings


async def run_plan(
    plan: Plan, options: RunOptions, controls: Controls | None = None, ray: RaySettings | None = None
) -> RunResult:
    """Lock, open the journal, send what is not done with the job's driver, write the output.

    ``ray``: send the rows from Ray workers (``--engine ray``) with these settings.
    Ray is imported only then. With ``options.sample``, the summary carries the
    dry-run estimate for the whole job, from the rows the sample answered.
    """
    result = await _drive(plan, options, controls, ray)
    if options.sample:
        from pipeline.engine.estimate import dry_run

        # After the lock is released: the estimate only reads the journal.
        result = replace(result, summary=replace(result.summary, estimate=dry_run(plan)))
    return result


async def _drive(plan: Plan, options: RunOptions, controls: Controls | None, ray: RaySettings | None) -> RunResult:
    if ray is not None:
        from pipeline.engine.drivers.ray.cluster import check_ray

        check_ray(plan)  # before the lock and the journal: a user error sends nothing
    with opened(plan, options) as journal:
        # Each driver is imported when picked: the realtime and batch ones load aiohttp,
        # which a rerun with nothing to send (the settled driver) never needs.
        if plan.job.model.mode == "batch":
            from pipeline.engine.drivers.batch import run_batch

            return await run_batch(plan, journal, options, controls or Controls())
        refuse_if_batches_pending(journal)
        if ray is not None:
            from pipeline.engine.drivers.ray.driver import run_ray

            return await run_ray(plan, journal, options, controls, ray)
        settled = settled_rows(plan, journal, options)
        if settled is not None:
            return await run_settled(plan, journal, options, controls, settled)
        from pipeline.engine.drivers.realtime import run_realtime

        return await run_realtime(plan, journal, options, controls)
