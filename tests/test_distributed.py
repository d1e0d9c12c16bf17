"""Two processes with one CPU device each (jax.distributed, gloo) match one process
with two devices, and resume in that setting."""

import os
import socket
import textwrap

import pytest

from configs import default
from resnet_jax.rundir import workdir as workdir_lib
from tests.conftest import assert_within_float_noise, tiny_args, train_nudged

KEYS = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# SGD: Adam's first steps (about lr * sign(g)) would amplify the float noise of a
# different reduction order across processes.
SGD = ('--config.optimizer=sgd', '--config.learning_rate=0.1')


def _args(data, workdir, epochs):
    return tiny_args(data, workdir, *SGD, epochs=epochs)


def _launch(cli, args, devices=1):
    return cli.start(args, env={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})


def _two_processes(cli, args):
    port = _free_port()
    procs = [
        _launch(
            cli,
            [
                *args,
                '--config.distributed.enabled=True',
                f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                '--config.distributed.num_processes=2',
                f'--config.distributed.process_id={i}',
            ],
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def _metrics(workdir):
    return workdir_lib.read_metrics(str(workdir))


def _close(got, want, nudged):
    """Within the float noise of 2 epochs of 4 steps (another reduction order across
    processes); one of the 50 test images may flip."""
    assert_within_float_noise(got, want, nudged[: len(want)], 8, KEYS, flip=1 / 50)


@pytest.fixture(scope='module')
def two_devices(cli, tmp_path_factory, cifar_py):
    """One process with two devices trained for 2 epochs: what two processes must match.

    Returns its stdout and metrics.
    """
    workdir = tmp_path_factory.mktemp('single')
    single = _launch(cli, _args(cifar_py.path, workdir, 2), devices=2)
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]
    return out, _metrics(workdir)


@pytest.fixture(scope='module')
def nudged(training, tmp_path_factory, cifar_py):
    """The records of the same 2 epochs trained from nudged weights, in this process on
    one device (so their distance to the two-device run holds that noise too)."""
    config = default.get_config()  # As _args on the command line.
    config.num_epochs, config.batch_size, config.eval_batch_size = 2, 32, 32
    config.optimizer, config.learning_rate = 'sgd', 0.1
    config.data.path = cifar_py.path
    return train_nudged(training, config, tmp_path_factory.mktemp('nudged'))


def test_two_processes_match_two_devices_and_resume(cli, two_devices, nudged, cifar_py, tmp_path):
    out, single_metrics = two_devices
    assert '4 steps/epoch on 2 device(s)' in out

    # One epoch on two processes, then the same command extended to two epochs
    # (it resumes from the first epoch's checkpoint).
    outs = _two_processes(cli, _args(cifar_py.path, tmp_path / 'multi', 1))
    assert '4 steps/epoch on 2 device(s)' in outs[0][0]  # One global mesh.
    assert 'epoch   1' in outs[0][0] and 'epoch   1' not in outs[1][0]  # Process 0 logs.
    _close(_metrics(tmp_path / 'multi'), single_metrics[:1], nudged)
    outs = _two_processes(cli, _args(cifar_py.path, tmp_path / 'multi', 2))
    assert 'resuming after epoch 1' in outs[0][0]
    _close(_metrics(tmp_path / 'multi'), single_metrics, nudged)
    assert sorted(os.listdir(tmp_path / 'multi' / 'checkpoints')) == ['4', '8']


# A process of a two-process run that sends itself SIGTERM at its 6th step
# (epoch 2, step 2) when its process id is 1; the other one gets no signal.
SIGNALLED = textwrap.dedent("""
    import os, signal, sys
    from resnet_jax.cli import main
    from resnet_jax.training import steps
    if '--config.distributed.process_id=1' in sys.argv:
        real, calls = steps.update_runs, [0]
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 6:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        steps.update_runs = step
    sys.exit(main.main(['main', *sys.argv[1:]]))
""")


def test_a_signal_to_one_process_stops_both_at_the_same_step(
    cli, two_devices, nudged, cifar_py, tmp_path
):
    port = _free_port()
    args = [*_args(cifar_py.path, tmp_path, 2), '--config.steps_per_call=1']
    procs = [
        cli.start_script(
            SIGNALLED,
            *args,
            '--config.distributed.enabled=True',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2',
            f'--config.distributed.process_id={i}',
        )
        for i in range(2)
    ]
    try:  # Without agreement they would save at different steps and hang.
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 143, err[-3000:]
        assert 'interrupted: stopped in epoch 2 after 2/4 steps' in err
    assert 'another process received SIGTERM' in outs[0][1] + outs[0][0]
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '6']

    _two_processes(cli, args)  # Resumes at the saved batch and finishes.
    _close(_metrics(tmp_path), two_devices[1], nudged)
