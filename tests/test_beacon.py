"""The heartbeats that name the late ranks of a hung collective: real UDP sockets, one process."""
import time

from hvd_sparse.beacon import MAX_NAMED, Beacon, describe, late_ranks


def beacons(size, poll=0.5):
    ranks = [Beacon(r, size, poll) for r in range(size)]
    for b in ranks[1:]:
        b.connect(ranks[0].listen_at())
    return ranks


def exchange(ranks, now, entered, waits):
    """Every rank beats once, rank 0 answers, and the others read the answer."""
    for b in ranks[1:]:
        b.beat(entered[b.rank], waits[b.rank], now)
    time.sleep(0.05)
    ranks[0].beat(entered[0], waits[0], now)
    time.sleep(0.05)
    for b in ranks[1:]:
        b.beat(entered[b.rank], waits[b.rank], now)
    time.sleep(0.05)
    ranks[0].beat(entered[0], waits[0], now)  # takes in those too, heard at ``now``


def test_every_rank_names_the_busy_and_the_silent_ranks_and_rank_0_when_it_goes_quiet():
    ranks = beacons(3)
    try:
        exchange(ranks, 100.0, entered=[7, 7, 6], waits=[True, True, False])
        busy = "rank 2 (alive, not in the collective: busy or stuck elsewhere)"
        assert ranks[0].late(100.0) == busy and ranks[1].late(100.0) == busy
        for b in ranks[:2]:  # rank 2 stops: only ranks 0 and 1 go on beating
            b.beat(7, True, 110.0)
        time.sleep(0.05)
        ranks[0].beat(7, True, 110.0)
        time.sleep(0.05)
        ranks[1].beat(7, True, 110.0)
        silent = "rank 2 (silent for 10 s: frozen or lost)"
        assert ranks[0].late(110.0) == silent and ranks[1].late(110.0) == silent
        assert ranks[0].someone_silent(110.0) and not ranks[1].someone_silent(110.0)
        assert ranks[1].late(125.0) == "rank 0 (silent for 15 s: frozen or lost)"  # rank 0 stopped answering
        assert ranks[1].someone_silent(125.0)
        ranks[1].pause(15.0)  # ... unless it was this rank that was stopped for those 15 s
        assert ranks[1].late(125.0) == silent
    finally:
        for b in ranks:
            b.close()


def test_a_rank_in_the_newest_collective_is_not_late_and_nothing_known_says_nothing():
    ranks = beacons(2)
    try:
        assert ranks[0].late(1.0) is None and ranks[1].late(1.0) is None  # no heartbeat got through (UDP filtered)
        exchange(ranks, 5.0, entered=[3, 3], waits=[True, True])
        assert ranks[0].late(5.0) is None and ranks[1].late(5.0) is None
    finally:
        for b in ranks:
            b.close()


def test_late_ranks_and_their_description():
    table = {0: (10.0, 4, True), 1: (10.0, 3, True), 2: (1.0, 4, True), 3: (10.0, 4, True)}
    assert late_ranks(table, 5, 10.0, 2.0) == [
        [1, "alive, not in the collective: busy or stuck elsewhere"],  # still in the collective before
        [2, "silent for 9 s: frozen or lost"], [4, "never heard from"]]
    many = [[r, "never heard from"] for r in range(20)]
    text = describe(many[:MAX_NAMED + 1], 20)
    assert text.count("rank ") == MAX_NAMED and text.endswith(f"and {20 - MAX_NAMED} more")


def test_silent_for_names_only_the_ranks_quiet_longer_than_asked_on_every_rank():
    """The world watchdog of a packed job (``dist._watch_the_world``) ends the job only for a rank
    silent longer than the collective timeout; a rank that is merely busy, or was quiet briefly, is
    not one."""
    ranks = beacons(3)
    try:
        exchange(ranks, 100.0, entered=[0, 0, 0], waits=[True, False, False])
        for b in ranks[:2]:  # rank 2 freezes at 100
            b.beat(0, b.rank == 0, 104.0)
        time.sleep(0.05)
        ranks[0].beat(0, True, 104.0)
        time.sleep(0.05)
        ranks[1].beat(0, False, 104.0)
        assert ranks[0].silent_for(5.0, 104.0) is None and ranks[1].silent_for(5.0, 104.0) is None  # 4 s: not yet
        assert ranks[0].silent_for(5.0, 106.0) == "silent: rank 2 (silent for 6 s: frozen or lost)"
        assert ranks[1].silent_for(5.0, 106.0) == "silent: rank 2 (silent for 6 s: frozen or lost)"  # from rank 0's word
        assert ranks[1].silent_for(5.0, 110.0) == "silent: rank 0 (silent for 6 s: frozen or lost)"  # rank 0 unheard
        ranks[1].pause(6.0)  # ... unless it was this rank that was stopped
        assert "rank 0" not in (ranks[1].silent_for(5.0, 110.0) or "")
    finally:
        for b in ranks:
            b.close()


def test_a_watchdog_sleep_that_overran_by_more_than_the_margin_is_this_process_stopped():
    """dist._own_stop, which both watchdogs use: a sleep of ``poll`` that took longer by more than the
    margin is this process stopped itself (SIGSTOP, a suspended job); its beacon pauses for that time,
    so what it heard before the stop is not news of silence. Within the margin it is a busy machine."""
    from hvd_sparse.dist import STOPPED_MARGIN, _own_stop

    ranks = beacons(2)
    try:
        exchange(ranks, 100.0, entered=[3, 3], waits=[True, True])
        assert ranks[1].late(110.0) == "rank 0 (silent for 10 s: frozen or lost)"
        assert _own_stop(ranks[1], 1.0 + STOPPED_MARGIN, 1.0) == 0.0  # late by the margin: not paused
        assert ranks[1].late(110.0) == "rank 0 (silent for 10 s: frozen or lost)"
        assert _own_stop(ranks[1], 1.0 + 9.0, 1.0) == 9.0  # stopped for 9 of those 10 s
        assert ranks[1].late(110.0) is None and not ranks[1].someone_silent(110.0)  # heard 1 s before
        assert _own_stop(None, 8.0, 1.0) == 7.0  # a job of one rank has no beacon
    finally:
        for b in ranks:
            b.close()
