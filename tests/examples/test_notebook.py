"""
examples/notebook.ipynb, executed cell by cell in a Jupyter kernel (nbclient)
against a real server and real workers running the Monte Carlo example.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kelpie_sdk import Client, JobStatus
from kelpie_sdk.testing import run_server
from tests.examples.helpers import EXAMPLES, load_example, start_worker, stop_workers

NOTEBOOK = EXAMPLES / "notebook.ipynb"
JOBS = 4


def _kernel_manager(tmp_path: Path) -> Any:
    """A kernel manager whose ``python3`` kernel is this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    # Unix sockets rather than TCP: nothing on the network, even on loopback.
    return KernelManager(
        kernel_name="python3",
        kernel_spec_manager=specs,
        transport="ipc",
        ip=str(tmp_path / "kernel"),
    )


@pytest.mark.slow
def test_notebook_runs_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs; every job of the sweep completes and uploads its result."""
    import nbformat
    from nbclient import NotebookClient

    for name, path in [
        ("JUPYTER_RUNTIME_DIR", tmp_path / "runtime"),
        ("JUPYTER_DATA_DIR", tmp_path / "data"),
        ("IPYTHONDIR", tmp_path / "ipython"),
    ]:
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    store = tmp_path / "store"
    (store / "nb").mkdir(parents=True)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with run_server() as server:
        # The kernel inherits this environment.
        monkeypatch.setenv("KELPIE_API_URL", server.url)
        monkeypatch.setenv("KELPIE_API_KEY", server.admin_key)
        monkeypatch.setenv("SWEEP_JOBS", str(JOBS))
        monkeypatch.setenv("SWEEP_CONTAINER_GROUP", "nb-group")
        monkeypatch.setenv("SWEEP_BUCKET", "nb")
        monkeypatch.setenv("SWEEP_NAME", "nb-sweep")
        start = functools.partial(
            start_worker,
            api_url=server.url,
            api_key=server.admin_key,
            group="nb-group",
            storage_url=f"file://{store}",
            slots=4,
        )
        workers = [start(tmp_path / "w1")]
        km = _kernel_manager(tmp_path)
        try:
            NotebookClient(
                notebook,
                km=km,
                timeout=120,
                resources={"metadata": {"path": str(EXAMPLES)}},
            ).execute()
        finally:
            stop_workers(workers)
        with Client(server.url, server.admin_key) as client:
            jobs = list(client.list_jobs(container_group_id="nb-group"))
    assert JOBS == len(jobs)
    assert {JobStatus.COMPLETED} == {job.status for job in jobs}
    assert sys.executable == km.kernel_spec.argv[0]
    last = notebook.cells[-1].outputs
    text = "".join(out.get("text", "") for out in last)
    assert f"{JOBS} jobs finished: {JOBS} completed" in text
    # The jobs ran the example with their grid point's parameters.
    mc = load_example("monte_carlo/monte_carlo.py")
    for index, (strike, seed) in enumerate([(80.0, 0), (80.0, JOBS - 1)]):
        stored = store / "nb" / "nb-sweep" / f"{index * (JOBS - 1):04d}" / "out"
        params = mc.Params(batches=20, strike=strike, seed=seed)
        assert (
            mc.dumps(mc.expected_result(params)) == (stored / "result.json").read_text()
        )
