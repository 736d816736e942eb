"""Helpers for tests that read back what a flow run left on the Prefect API."""
import asyncio


def read_prefect_artifacts() -> list:
    """Every artifact on the current Prefect API."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()
    return asyncio.run(read())


def flow_run_log_text(flow_run_id) -> str:
    """The log messages of one flow run (its tasks included), after the log queue is drained: lines of
    other runs on the same server never count."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    APILogWorker.drain_all(timeout=30)

    async def read():
        out, offset = [], 0
        flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        async with get_client() as client:
            while batch := await client.read_logs(log_filter=flt, limit=200, offset=offset):
                out += [log.message for log in batch]
                offset += len(batch)
        return "\n".join(out)
    return asyncio.run(read())
