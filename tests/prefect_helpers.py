"""Helpers for tests that read back what a flow run left on the Prefect API."""
import asyncio


def read_prefect_artifacts() -> list:
    """Every artifact on the current Prefect API."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_artifacts()
    return asyncio.run(read())
