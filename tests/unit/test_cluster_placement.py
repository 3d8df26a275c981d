"""Placement (emberbox/cluster/placement.py): which host takes a new sandbox."""

from __future__ import annotations

import httpx
import pytest

from emberbox.api.cluster.sandboxes import host_was_full
from emberbox.cluster.hosts import HostStatus
from emberbox.cluster.placement import MEMORY_MARGIN_MIB, place, with_placed
from emberbox.errors import NoCapacity


def host(
    name: str,
    *,
    alive: bool = True,
    draining: bool = False,
    sandboxes: int = 0,
    max_sandboxes: int = 4,
    free_mib: int = 8192,
    images: tuple[str, ...] = ("default",),
) -> HostStatus:
    url = f"http://{name}:1" if alive else None
    return HostStatus(name, alive, draining, url, sandboxes, max_sandboxes, free_mib, images)


def test_most_free_memory_wins() -> None:
    """The host with the most free memory takes the sandbox."""
    hosts = [host("a", free_mib=4000), host("b", free_mib=9000), host("c", free_mib=6000)]
    assert place(hosts, image="default", memory_mib=512) == "b"


def test_ties_go_to_fewer_sandboxes_then_name() -> None:
    """Equal memory: fewer sandboxes first; then the name, so the choice is stable."""
    assert (
        place([host("a", sandboxes=2), host("b", sandboxes=1)], image="default", memory_mib=512)
        == "b"
    )
    assert place([host("b"), host("a")], image="default", memory_mib=512) == "a"


def test_hosts_with_the_image_first() -> None:
    """A host that holds the image beats one with more memory that would have to build it."""
    hosts = [host("a", free_mib=9000, images=()), host("b", free_mib=3000, images=("py",))]
    assert place(hosts, image="py", memory_mib=512) == "b"


def test_no_host_has_the_image_any_host_with_room() -> None:
    """When no host holds the image, the best host with room takes it (it builds/pulls)."""
    hosts = [host("a", free_mib=3000), host("b", free_mib=5000)]
    assert place(hosts, image="new", memory_mib=512) == "b"


def test_image_holder_without_room_is_skipped() -> None:
    """The only host with the image is full: another host with room takes it."""
    hosts = [host("a", sandboxes=4, images=("py",)), host("b", images=())]
    assert place(hosts, image="py", memory_mib=512) == "b"


@pytest.mark.parametrize(
    "skipped",
    [
        host("x", alive=False, free_mib=0),
        host("x", draining=True, free_mib=99999),
        host("x", sandboxes=4, max_sandboxes=4, free_mib=99999),
        host("x", free_mib=512 + MEMORY_MARGIN_MIB - 1),
    ],
    ids=["dead", "draining", "at-max-sandboxes", "short-of-memory"],
)
def test_hosts_without_room_are_skipped(skipped: HostStatus) -> None:
    """Dead, draining, full or short of memory: never chosen while another has room."""
    assert place([skipped, host("y", free_mib=1024)], image="default", memory_mib=512) == "y"
    with pytest.raises(NoCapacity):
        place([skipped], image="default", memory_mib=512)


def test_exactly_enough_memory_fits() -> None:
    """memory + margin free is enough."""
    only = host("a", free_mib=512 + MEMORY_MARGIN_MIB)
    assert place([only], image="default", memory_mib=512) == "a"


@pytest.mark.parametrize(
    ("hosts", "words"),
    [
        ([], "no host is registered"),
        ([host("a", alive=False)], "no host is reachable"),
        ([host("a", draining=True)], "draining"),
        ([host("a", sandboxes=4)], "full"),
    ],
)
def test_no_capacity_is_a_503_with_retry_after(hosts: list[HostStatus], words: str) -> None:
    """No host fits: NoCapacity, HTTP 503 with a retry delay, and a message saying why."""
    with pytest.raises(NoCapacity) as caught:
        place(hosts, image="default", memory_mib=512)
    assert caught.value.status_code == 503
    assert caught.value.retry_after_s > 0
    assert words in str(caught.value)


def test_the_index_counts_sandboxes_the_hosts_have_not_reported_yet() -> None:
    """Creates in a row: the index holds two sandboxes on "a" that its last report
    (one) has not caught up with, so "a" is full and has less memory than it said."""
    hosts = [host("a", sandboxes=1, max_sandboxes=2, free_mib=9000), host("b", free_mib=5000)]
    adjusted = with_placed(hosts, {"a": 2, "b": 0}, memory_mib=512)
    assert [(h.sandboxes, h.free_memory_mib) for h in adjusted] == [(2, 8488), (0, 5000)]
    assert place(adjusted, image="default", memory_mib=512) == "b"
    behind = with_placed(hosts, {"a": 0}, memory_mib=512)  # the index never lowers a count
    assert behind[0].sandboxes == 1 and behind[0].free_memory_mib == 9000


def test_hosts_that_refused_the_create_are_passed_over() -> None:
    """A host that turned this create down is not asked again; none left is a 503."""
    hosts = [host("a", free_mib=9000), host("b", free_mib=5000)]
    assert place(hosts, image="default", memory_mib=512, refused={"a"}) == "b"
    with pytest.raises(NoCapacity):
        place(hosts, image="default", memory_mib=512, refused={"a", "b"})


@pytest.mark.parametrize(
    ("status", "body", "full"),
    [
        (403, {"error": {"type": "QuotaExceeded", "message": "max_sandboxes=2"}}, True),
        (503, {"error": {"type": "HostError", "message": "no memory"}}, True),
        (507, {"error": {"type": "StorageFull", "message": "disk"}}, True),
        (403, {"error": {"type": "Forbidden", "message": "x"}}, False),
        (400, {"error": {"type": "InvalidRequest", "message": "bad image"}}, False),
        (201, {"id": "x"}, False),
    ],
)
def test_which_host_answers_mean_it_was_full(status: int, body: object, full: bool) -> None:
    """Only refusals for want of room send a create on to another host."""
    assert host_was_full(httpx.Response(status, json=body)) is full
