"""Workdir locks are leases: a lock whose owner died on another host is taken over.

The owner refreshes the lock's modification time while it lives; a lock not
refreshed for a lease (``locks.LOCK_LEASE_SECONDS``) is stale, whoever wrote
it. A lock is created or taken over only under a short-lived guard file, so
two processes taking over at once never both hold it; a guard left by a
crash is renamed aside and checked to be the one judged stale.
"""

import os
import threading
import time

import pytest

from resnet_jax.rundir import locks


def _write_lock(folder, owner, age):
    """A lock of ``owner``, last refreshed ``age`` seconds ago."""
    path = folder / locks.LOCK_FILE
    path.write_text(owner)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_an_expired_lease_of_another_host_is_taken_over(tmp_path):
    path = _write_lock(tmp_path, 'node-17.cluster 4242', locks.LOCK_LEASE_SECONDS + 60)
    with locks.lock(str(tmp_path)):
        assert path.read_text().split()[1] == str(os.getpid())
    assert not path.exists()


def test_a_live_lease_of_another_host_is_respected(tmp_path):
    path = _write_lock(tmp_path, 'node-17.cluster 4242', 10)
    with pytest.raises(locks.WorkdirBusy, match='node-17.cluster 4242'):
        with locks.lock(str(tmp_path)):
            pass
    assert path.read_text() == 'node-17.cluster 4242'  # Untouched.


def test_the_lease_is_refreshed_while_the_lock_is_held(tmp_path):
    lease = 0.5  # Refreshed every lease / LOCK_REFRESHES_PER_LEASE seconds.
    with locks.lock(str(tmp_path), lease_seconds=lease):
        path = tmp_path / locks.LOCK_FILE
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30
        while os.stat(path).st_mtime < old + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(path).st_mtime > old + 1  # Refreshed.
        with pytest.raises(locks.WorkdirBusy):  # So it is not stale.
            with locks.lock(str(tmp_path), lease_seconds=lease):
                pass


def test_a_guard_takeover_gives_back_a_guard_renewed_since_it_was_judged(tmp_path):
    path = _write_lock(tmp_path, 'node-17.cluster 4242', locks.LOCK_LEASE_SECONDS + 60)
    judged = os.stat(path)
    os.unlink(path)  # Meanwhile its owner's lock was replaced by a live one.
    live = _write_lock(tmp_path, 'node-18.cluster 7', 0)
    assert not locks._take_over(str(path), judged)
    assert live.read_text() == 'node-18.cluster 7'
    assert sorted(os.listdir(tmp_path)) == [locks.LOCK_FILE]


def test_a_guard_left_by_a_crash_is_taken_over(tmp_path):
    guard = tmp_path / (locks.LOCK_FILE + locks.GUARD_SUFFIX)
    guard.write_text('node-17.cluster 4242')
    old = time.time() - locks.GUARD_STALE_SECONDS - 60
    os.utime(guard, (old, old))
    with locks.lock(str(tmp_path)):
        assert not guard.exists()
    assert os.listdir(tmp_path) == []


def test_of_many_takeovers_at_once_exactly_one_wins(tmp_path):
    n = 8
    _write_lock(tmp_path, 'node-17.cluster 4242', locks.LOCK_LEASE_SECONDS + 60)
    start, done = threading.Barrier(n), threading.Barrier(n)
    outcomes = []

    def contend():
        start.wait()
        try:
            with locks.lock(str(tmp_path)):
                outcomes.append('held')
                done.wait()  # Hold it until every other one has tried.
        except locks.WorkdirBusy:
            outcomes.append('busy')
            done.wait()

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ['busy'] * (n - 1) + ['held']
    assert not (tmp_path / locks.LOCK_FILE).exists()
