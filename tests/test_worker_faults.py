"""Faults of a study's workers: a paused worker that lost its trial (fencing), and
a study storage that goes away while a trial trains."""

import json
import os
import signal
import time

import pytest

from resnet_jax.rundir import locks
from tests import fake_data, postgres_server
from tests.test_search import grid_args, one_point_study, records, trials_of, wait_for_checkpoint


@pytest.fixture(scope='module')
def learnable(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 whose classes a model learns: 200 train + 50 test images."""
    root = tmp_path_factory.mktemp('learnable')
    return fake_data.write_cifar_py(root, n_train_per_batch=40, n_test=50, learnable=True)


# ------------------------------------------------------------- fencing ----


def test_a_lock_taken_over_is_noticed_by_its_old_holder(tmp_path):
    with locks.lock(str(tmp_path)) as held:
        held.check()
        owner = locks.holder(str(tmp_path))
        assert owner and str(os.getpid()) in owner
        assert not locks.take_over(str(tmp_path), 'otherhost 1')  # Not the holder judged.
        assert locks.take_over(str(tmp_path), owner)
        with pytest.raises(locks.OwnershipLost, match='removed'):
            held.check()
        (tmp_path / locks.LOCK_FILE).write_text('otherhost 1')
        with pytest.raises(locks.OwnershipLost, match="taken over by 'otherhost 1'"):
            held.check()
    # The old holder leaves the new holder's lock in place.
    assert locks.holder(str(tmp_path)) == 'otherhost 1'


def pause_outside_a_transaction(proc, database) -> None:
    """SIGSTOPs ``proc`` at a moment it holds no write lock on the SQLite ``database``.

    Its heartbeat thread writes every second; a worker frozen inside that write
    holds SQLite's lock until it wakes, which is a storage outage for every other
    worker (tested below), not the pause tested here.
    """
    import sqlite3

    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        connection = sqlite3.connect(str(database), timeout=0.5)
        try:
            connection.execute('BEGIN IMMEDIATE')
            connection.rollback()
            return
        except sqlite3.OperationalError:  # Locked: let it finish its write.
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.1)
        finally:
            connection.close()
    raise AssertionError(f'the worker held {database} at every try')


def test_a_paused_worker_that_lost_its_trial_writes_nothing_more(cli, tmp_path, learnable):
    config_file = one_point_study(tmp_path, 3)
    workdir = tmp_path / 'study'
    run_dir = workdir / 'learning_rate=0.003'
    args = grid_args(config_file, learnable.path, workdir, '')
    paused = cli.start(args)
    wait_for_checkpoint(paused, run_dir)
    pause_outside_a_transaction(paused, workdir / 'study.db')
    try:
        time.sleep(3)  # Past the grace period: the paused worker's heartbeat is stale.
        started = time.time()
        second = cli.run(args, timeout=300)
        took = time.time() - started
    finally:
        paused.send_signal(signal.SIGCONT)
    out, err = paused.communicate(timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'taken over' in second.stdout + second.stderr
    assert took < 120, took  # It did not wait out the lock's 5-minute lease.
    # The woken worker stopped that run with one line, wrote nothing, and exited cleanly.
    assert paused.returncode == 0, err[-3000:]
    assert 'Traceback' not in out + err, err[-3000:]
    lost = [line for line in (out + err).splitlines() if 'this worker stops it' in line]
    assert len(lost) == 1, out + err
    assert [r['epoch'] for r in records(run_dir)] == [1, 2, 3]
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['status'] == 'completed' and summary['epochs_completed'] == 3
    trials = trials_of(f'sqlite:///{workdir}/study.db')
    assert [t.state.name for t in trials] == ['FAIL', 'COMPLETE']


# ------------------------------------------------------- the storage ----


def test_a_read_only_study_database_says_so(tmp_path, learnable):
    import optuna

    from resnet_jax.studies import optuna_study, search_space
    from tests.test_search import search_config

    workdir = str(tmp_path / 'study')
    spec = search_space.spec_from_config(search_config(learnable.path))
    optuna_study.open_study(spec, workdir)
    url = f'sqlite:///file:{workdir}/study.db?mode=ro&uri=true'
    study = optuna.load_study(study_name=None, storage=optuna_study.open_storage(url, spec))
    retry = optuna_study.Retry(url, 30)
    started = time.time()
    with pytest.raises(optuna_study.StorageUnavailable, match='is read-only') as raised:
        retry(optuna_study.claim, study, spec)
    assert 'max length' not in str(raised.value)
    assert time.time() - started < 10  # Not retried: a read-only storage does not come back.


def assert_stopped_then_resumed(cli, args, run_dir, worker, out, err, storage) -> None:
    """The worker of a 3-epoch study stopped on a storage that stayed away 3 s: one
    ``error:`` line naming ``storage``, the run keeps its status and its last record's
    checkpoint, and a rerun once the storage is back resumes it to the end."""
    assert worker.returncode == 2, err[-3000:]
    assert 'Traceback' not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, err[-3000:]
    assert f'the study storage {storage}' in errors[0], errors
    assert 'did not answer for 3 s' in errors[0], errors
    summary = run_dir / 'summary.json'
    assert not summary.exists() or json.loads(summary.read_text())['status'] != 'failed'
    done = [r['epoch'] for r in records(run_dir)]
    saved = sorted(int(p.name) for p in (run_dir / 'checkpoints').glob('*') if p.name.isdigit())
    assert done and saved and done[-1] < 3, (done, saved)
    time.sleep(3)  # Past the grace period: the trial's heartbeat is stale.
    result = cli.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resuming after epoch {done[-1]}' in result.stdout + result.stderr
    assert [r['epoch'] for r in records(run_dir)] == [1, 2, 3]
    assert json.loads(summary.read_text())['status'] == 'completed'


def test_a_storage_that_stays_away_stops_the_worker_with_one_line(cli, tmp_path, learnable):
    import sqlite3

    config_file = one_point_study(tmp_path, 3, 'config.search.storage_retry_seconds = 3')
    workdir = tmp_path / 'study'
    run_dir = workdir / 'learning_rate=0.003'
    args = grid_args(config_file, learnable.path, workdir, '')
    worker = cli.start(args)
    wait_for_checkpoint(worker, run_dir)
    db = sqlite3.connect(workdir / 'study.db', timeout=60, isolation_level=None)
    db.execute('BEGIN EXCLUSIVE')  # The storage is away for every other process.
    try:
        out, err = worker.communicate(timeout=300)
    finally:
        db.execute('ROLLBACK')
        db.close()
    assert_stopped_then_resumed(cli, args, run_dir, worker, out, err, 'sqlite:///')


@pytest.fixture
def postgres():
    """A real PostgreSQL server started here (its ``url``, ``stop()`` and ``start()``)."""
    bin_dir = postgres_server.required_server_bin()
    server = postgres_server.PostgresServer(bin_dir)
    with server:
        yield server


def test_a_postgresql_server_that_stops_stops_the_worker_and_a_rerun_resumes(
    cli, tmp_path, learnable, postgres
):
    config_file = one_point_study(tmp_path, 3, 'config.search.storage_retry_seconds = 3')
    workdir = tmp_path / 'study'
    run_dir = workdir / 'learning_rate=0.003'
    args = grid_args(config_file, learnable.path, workdir, postgres.url)
    worker = cli.start(args)
    wait_for_checkpoint(worker, run_dir)
    postgres.stop()  # pg_ctl stop -m immediate: a crash of the server.
    try:
        out, err = worker.communicate(timeout=300)
    finally:
        postgres.start()
    assert_stopped_then_resumed(cli, args, run_dir, worker, out, err, 'postgresql+psycopg2://')


def test_a_postgresql_server_back_within_the_retry_window_changes_nothing(
    cli, tmp_path, learnable, postgres
):
    config_file = one_point_study(tmp_path, 3, 'config.search.storage_retry_seconds = 120')
    workdir = tmp_path / 'study'
    run_dir = workdir / 'learning_rate=0.003'
    worker = cli.start(grid_args(config_file, learnable.path, workdir, postgres.url))
    wait_for_checkpoint(worker, run_dir)
    postgres.stop()
    time.sleep(4)  # Heartbeats (every second) and the epoch's end meet no server.
    postgres.start()
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
    assert 'Traceback' not in out + err, err[-3000:]
    assert not [line for line in err.splitlines() if line.startswith('error:')], err[-3000:]
    assert 'does not answer' in out + err, out[-3000:]  # It was away, and retried.
    assert [r['epoch'] for r in records(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / 'summary.json').read_text())['status'] == 'completed'
    (trial,) = trials_of(postgres.url)
    assert trial.state.name == 'COMPLETE'
