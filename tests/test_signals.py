"""Signals: a second one ends a compiled call at once; SIGTERM while loading data
stops the decoding workers and leaves no lock.

Python runs signal handlers only in the main thread between bytecodes, and
the main thread waits inside a compiled call for as long as it runs.
"""

import os
import signal
import textwrap
import time

from resnet_jax.rundir import workdir as workdir_lib
from tests import fake_data

# A child training a whole epoch per compiled call (steps_per_call=0). Its first
# call is preceded by a long compiled computation, during which a thread sends
# SIGTERM twice: the main thread is waiting inside XLA all that time.
IN_FLIGHT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import jax, jax.numpy as jnp
    data, workdir = sys.argv[1:]
    from resnet_jax.cli import main
    from resnet_jax.training import steps

    @jax.jit
    def long_call(x):  # Minutes of matrix products.
        return jax.lax.fori_loop(0, 20000, lambda i, a: jnp.tanh(a @ a), x)

    x = jnp.ones((256, 256)) / 256
    real, calls = steps.scan_updates, []

    def chunk(*args, **kwargs):
        if not calls:
            calls.append(1)
            def signal_twice():
                time.sleep(1)
                print('signals sent', file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Thread(target=signal_twice, daemon=True).start()
            jax.block_until_ready(long_call(x))
        return real(*args, **kwargs)

    steps.scan_updates = chunk
    sys.exit(main.main([
        'main', '--config', 'configs/default.py', '--workdir', workdir,
        '--config.num_epochs=2', '--config.batch_size=32', '--config.eval_batch_size=32',
        '--config.steps_per_call=0', f'--config.data.path={data}',
    ]))
""")


def test_a_second_sigterm_during_a_compiled_call_stops_at_once(cli, cifar_py, tmp_path):
    proc = cli.script(IN_FLIGHT, cifar_py.path, tmp_path, timeout=900)
    assert 'signals sent' in proc.stderr, proc.stderr[-3000:]
    # Ended by the second signal itself, not after the call by a checkpoint and exit 143.
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert not [s for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
    assert workdir_lib.read_metrics(str(tmp_path)) == []


# A child that trains on an image folder decoded by worker processes (chunks of
# 5 images), and sends itself SIGTERM once the workers are started.
DECODING = textwrap.dedent("""
    import concurrent.futures, os, signal, sys
    data, workdir = sys.argv[1:]
    from resnet_jax.datasets import image_folder
    from resnet_jax.cli import main
    image_folder._DECODE_CHUNK = 5
    real_map = concurrent.futures.ProcessPoolExecutor.map

    def map_then_terminate(self, *args, **kwargs):
        results = real_map(self, *args, **kwargs)
        pids = [p.pid for p in self._processes.values()]
        print('workers', *pids, file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return results

    concurrent.futures.ProcessPoolExecutor.map = map_then_terminate
    sys.exit(main.main([
        'main', '--config', 'configs/default.py', '--workdir', workdir,
        '--config.num_epochs=1', '--config.batch_size=10', f'--config.data.path={data}',
    ]))
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:  # A zombie is not running.
        return f.read().split(')')[-1].split()[0] != 'Z'


def test_sigterm_while_decoding_stops_the_workers_and_leaves_no_lock(cli, tmp_path):
    folder = fake_data.write_image_folder(tmp_path / 'images', 8, 4)
    workdir = tmp_path / 'run'
    env = {'RESNET_JAX_CACHE': str(tmp_path / 'cache')}
    proc = cli.script(DECODING, folder.path, workdir, env=env, timeout=300)
    workers = [line for line in proc.stderr.splitlines() if line.startswith('workers')]
    assert workers, proc.stderr[-3000:]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('interrupted'), proc.stderr[-3000:]
    deadline = time.monotonic() + 30
    pids = [int(p) for p in workers[0].split()[1:]]
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert not os.path.exists(workdir)  # Not even the lock: nothing was written.
