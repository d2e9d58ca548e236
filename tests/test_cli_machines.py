"""
``kelpie machines`` and the unserved-group footer of ``kelpie jobs list``.
"""

from __future__ import annotations

from kelpie_sdk.client import Client
from kelpie_sdk.models import WorkerReport
from tests.test_cli import Run, submit
from tests.test_cli import kelpie as kelpie


def test_machines_lists_the_record_and_flags_unserved_groups(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """The table shows each machine's counts; groups without a machine are flagged."""
    container_group_id = f"cg-{container_group_id[:8]}"  # not folded in the table
    assert 0 == kelpie("machines")
    assert "No machines yet." in kelpie.out
    submit(client, container_group_id, 3)
    job = client.claim_work(machine_id="gpu-1", container_group_id=container_group_id)
    assert job is not None
    client.report_completed(
        job.id,
        WorkerReport(machine_id="gpu-1", container_group_id=container_group_id),
    )
    assert 0 == kelpie("machines")
    for text in ("gpu-1", container_group_id, "Claims", "Interrupted", "live"):
        assert text in kelpie.out
    # gpu-1 is live (seen just now): the group is served.
    assert "no live machine" not in kelpie.out
    other = f"{container_group_id}-idle"
    submit(client, other, 2)
    assert 0 == kelpie("machines")
    assert f"! container group {other}: 2 pending jobs and no live machine" in (
        kelpie.out
    )
    assert 0 == kelpie("machines", "--json")
    data = kelpie.json()
    assert ["gpu-1"] == [m["machine_id"] for m in data["machines"]]
    assert (1, 1) == (data["machines"][0]["claims"], data["machines"][0]["completions"])
    assert [{"container_group_id": other, "pending": 2}] == data["unserved_groups"]


def test_jobs_list_ends_with_the_unserved_groups(
    kelpie: Run, client: Client, container_group_id: str
) -> None:
    """`jobs list` adds a footer line per group with pending jobs and no machine."""
    submit(client, container_group_id, 1)
    assert 0 == kelpie("jobs", "list")
    assert (
        f"! container group {container_group_id}: 1 pending job and no live machine"
        in kelpie.out
    )
    assert 0 == kelpie("jobs", "list", "--container-group-id", "elsewhere")
    assert "no live machine" not in kelpie.out
    assert 0 == kelpie("jobs", "list", "--json")
    assert "no live machine" not in kelpie.out
