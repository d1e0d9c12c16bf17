"""Faults around the processes of a run: workers whose parent is killed, the
thread layout a run trains under, the offline TFDS message, compile time, and the
files a run writes outside its workdir."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import fake_data
from tests.conftest import REPO
from tests.test_search import grid_args, records, write_config_file


@pytest.fixture(scope='module')
def learnable(tmp_path_factory) -> fake_data.FakeCifar:
    """A fake CIFAR-10 whose classes a model learns: 200 train + 50 test images."""
    root = tmp_path_factory.mktemp('learnable')
    return fake_data.write_cifar_py(root, n_train_per_batch=40, n_test=50, learnable=True)


# ------------------------------------------------- orphaned workers ----


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def start_logged(args, log_path) -> subprocess.Popen:
    """Starts the command line on the CPU, its output into ``log_path``."""
    log = open(log_path, 'w')  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [sys.executable, '-m', 'resnet_jax.main', *args],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the workers in /proc')
def test_workers_end_with_a_parent_killed_by_sigkill(cli, tmp_path, learnable):
    config_file = write_config_file(
        tmp_path,
        """
        config.num_epochs = 8
        config.batch_size = 10
        config.steps_per_call = 1
        config.search.space.learning_rate = search_space.categorical((0.003, 0.001))
        config.search.heartbeat_seconds = 1
        config.search.grace_seconds = 2
        config.search.poll_seconds = 0.5
        """,
    )
    workdir = tmp_path / 'study'
    args = grid_args(config_file, learnable.path, workdir, '')
    parent = start_logged([*args, '--workers=2'], tmp_path / 'log')
    deadline = time.time() + 300
    while not list([p for p in workdir.glob('*/checkpoints/*') if p.name.isdigit()]):
        assert time.time() < deadline and parent.poll() is None, (tmp_path / 'log').read_text()
        time.sleep(0.05)
    workers = children_of(parent.pid)
    assert len(workers) == 2, workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10  # Orphans would train on for longer.
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    log = (tmp_path / 'log').read_text()
    assert not any(map(alive, workers)), log[-3000:]
    assert log.count('interrupted: ') == 2, log[-3000:]  # Both checkpointed and stopped.
    run_dirs = sorted(p.parent for p in workdir.glob('*/checkpoints'))
    assert run_dirs, log[-3000:]
    for run_dir in run_dirs:
        assert [p for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit()], run_dir
        summary = run_dir / 'summary.json'
        assert not summary.exists() or json.loads(summary.read_text())['status'] != 'failed'
    time.sleep(3)  # Past the grace period, should a trial not have been given back.
    result = cli.run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ('learning_rate=0.003', 'learning_rate=0.001'):
        assert [r['epoch'] for r in records(workdir / name)] == list(range(1, 9))
        assert json.loads((workdir / name / 'summary.json').read_text())['status'] == 'completed'


def test_a_worker_whose_parent_is_already_gone_gets_sigterm():
    code = (
        'import signal, sys, time\n'
        'from resnet_jax.studies import workers\n'
        "signal.signal(signal.SIGTERM, lambda *a: (print('SIGTERM'), sys.exit(0)))\n"
        'workers.end_with_parent(1)\n'  # Not this process's parent.
        'time.sleep(30)\n'
    )
    started = time.time()
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == 'SIGTERM', result.stderr[-3000:]
    assert time.time() - started < 20


# ------------------------------------------------ the offline TFDS message ----


def test_offline_tfds_message_says_preparing_needs_tensorflow(tmp_path, monkeypatch):
    from resnet_jax.datasets import DataError, tfds_source
    from tests.test_datasets import _load

    for variable in ('HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy'):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(tfds_source, '_network_available', lambda: False)
    monkeypatch.setattr(tfds_source, '_tensorflow_available', lambda: False)
    with pytest.raises(DataError) as raised:
        _load(tmp_path, source='tfds', download=True)
    message = str(raised.value)
    assert 'there is no network to download it, and preparing it also needs TensorFlow' in message
    assert "pip install -e '.[tf]'" in message and 'proxy' not in message
    monkeypatch.setattr(tfds_source, '_tensorflow_available', lambda: True)
    with pytest.raises(DataError) as raised:
        _load(tmp_path, source='tfds', download=True)
    assert 'TensorFlow' not in str(raised.value)


def test_the_network_probe_goes_to_the_https_proxy(monkeypatch):
    from resnet_jax.datasets import tfds_source

    probed = []

    def connect(address, timeout):
        probed.append(address)
        raise OSError('refused')

    monkeypatch.setattr(tfds_source.socket, 'create_connection', connect)
    for variable in ('HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy'):
        monkeypatch.delenv(variable, raising=False)
    assert not tfds_source._network_available()
    assert probed == [('www.cs.toronto.edu', 443)]
    monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
    assert not tfds_source._network_available()
    assert probed[-1] == ('proxy.example', 3128)
    assert '(the proxy proxy.example:3128 of HTTPS_PROXY did not answer)' in (
        tfds_source._offline_problem()
    )
    monkeypatch.setenv('HTTPS_PROXY', 'user:secret@squid.example')  # No scheme, no port.
    assert tfds_source.probe_address() == ('squid.example', 80)
    monkeypatch.setenv('NO_PROXY', '.toronto.edu')  # The download host bypasses it.
    assert tfds_source.probe_address() == ('www.cs.toronto.edu', 443)
    monkeypatch.delenv('NO_PROXY')
    monkeypatch.setenv('HTTPS_PROXY', 'http://:3128')  # No host: nothing to probe.
    count = len(probed)
    assert tfds_source._network_available() and len(probed) == count


# ------------------------------------------------------------ compile time ----


def test_compile_time_is_reported_apart_from_the_first_epoch(training, tmp_path, cifar_py):
    from resnet_jax.rundir import workdir as workdir_lib
    from resnet_jax.training import epochs
    from tests.conftest import make_tiny_config

    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 2
    restarts = []
    real = epochs.Progress.restart

    def restart(self, step):
        took = real(self, step)
        restarts.append((step, took))
        return took

    epochs.Progress.restart = restart
    try:
        training.train_and_evaluate(config, str(tmp_path / 'run'))
    finally:
        epochs.Progress.restart = real
    first, second = workdir_lib.read_metrics(str(tmp_path / 'run'))
    assert 'compile_seconds' not in second
    assert len(restarts) == 1 and restarts[0][0] == 1  # After the first call only.
    assert first['compile_seconds'] == pytest.approx(restarts[0][1])
    assert 0 < first['compile_seconds'] < first['epoch_seconds']
    images = second['images_per_second'] * second['epoch_seconds']  # An epoch's images.
    rest = first['images_per_second'] * (first['epoch_seconds'] - first['compile_seconds'])
    assert rest + config.batch_size == pytest.approx(images)  # The first call: one batch.
    # Compiling dominates a tiny run's first call: the rate left is the later epochs'.
    assert first['images_per_second'] > images / first['epoch_seconds']


def test_the_progress_eta_starts_after_the_first_call():
    from resnet_jax.training import epochs

    now = [0.0]
    progress = epochs.Progress(1, 100, 0.0, clock=lambda: now[0])
    now[0] = 50.0  # The first call (1 step) took 50 s, compiling.
    assert progress.restart(1) == 50.0
    now[0] = 60.0  # 10 more steps in 10 s.
    line = progress.maybe_report(11, None)
    assert '1.00 steps/s, ETA 89s' in line, line


# ------------------------------------------------------- the thread layout ----


def test_a_run_records_its_layout_and_warns_when_resumed_under_another(
    training, tmp_path, cifar_py, monkeypatch, caplog
):
    from resnet_jax.training import runs
    from tests.conftest import make_tiny_config

    config = make_tiny_config(cifar_py.path)
    config.num_epochs = 1
    workdir = tmp_path / 'run'
    training.train_and_evaluate(config, str(workdir))
    layout = json.loads((workdir / 'summary.json').read_text())['layout']
    assert layout == runs.layout()
    assert layout['cpu_cores'] == len(os.sched_getaffinity(0)) and layout['device_count'] >= 1
    real = runs.layout()
    monkeypatch.setattr(runs, 'layout', lambda: dict(real, cpu_cores=real['cpu_cores'] + 1))
    config.num_epochs = 2
    with caplog.at_level('WARNING', logger='resnet_jax'):
        training.train_and_evaluate(config, str(workdir))
    warned = [r.getMessage() for r in caplog.records if 'another layout' in r.getMessage()]
    assert len(warned) == 1 and f'cpu_cores: {real["cpu_cores"]!r} -> ' in warned[0], warned


def test_a_summary_without_a_layout_still_reads_back(tmp_path):
    from resnet_jax.rundir import workdir as workdir_lib

    path = tmp_path / 'summary.json'
    path.write_text(json.dumps({'status': 'completed', 'epochs_completed': 1}))
    assert workdir_lib.read_summary(str(path))['status'] == 'completed'
    path.write_text(json.dumps({'status': 'completed', 'layout': 'cpu'}))
    with pytest.raises(workdir_lib.RecordError, match="'layout'"):
        workdir_lib.read_summary(str(path))


# ------------------------------------ nothing outside the workdir and cache ----


def files_under(root) -> dict[str, float]:
    """``{path: modification time}`` of every file under ``root``."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[path] = os.lstat(path).st_mtime_ns
    return found


@pytest.mark.slow
def test_train_and_report_write_only_the_workdir_and_the_caches(tmp_path):
    """The image cache, JAX's compilation cache and matplotlib's: nothing else."""
    places = {n: tmp_path / n for n in ('home', 'xdg', 'cache', 'mpl', 'tmp', 'cwd', 'data')}
    for folder in places.values():
        folder.mkdir()
    folder_data = fake_data.write_image_folder(
        places['data'] / 'images', n_train_per_class=2, n_test_per_class=1
    )
    workdir = places['cwd'] / 'run'
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
    env.update(
        HOME=str(places['home']),
        XDG_CACHE_HOME=str(places['xdg']),
        RESNET_JAX_CACHE=str(places['cache']),
        MPLCONFIGDIR=str(places['mpl']),
        TMPDIR=str(places['tmp']),
        JAX_PLATFORMS='cpu',
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])),
    )
    before = files_under(tmp_path)
    for args in (
        ['--config', 'default', '--workdir', str(workdir), '--config.num_epochs=1',
         '--config.batch_size=10', '--config.eval_batch_size=10',
         f'--config.data.path={folder_data.path}'],
        ['--workdir', str(workdir), '--mode=report'],
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, '-m', 'resnet_jax.main', *args],
            cwd=places['cwd'],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    compiled = places['xdg'] / 'resnet_jax' / 'jax'  # JAX's compilation cache, by default.
    allowed = (str(workdir), str(places['cache']), str(places['mpl']), str(compiled))
    changed = sorted(
        path
        for path, mtime in files_under(tmp_path).items()
        if before.get(path) != mtime and not path.startswith(allowed)
    )
    assert not changed, changed
    assert files_under(workdir) and files_under(places['cache'])  # Both were written.
    assert files_under(compiled)
