"""TensorBoard holds every epoch ``metrics.jsonl`` holds, after any kill and rerun.

Each epoch's scalars are written and fsynced before its record is appended
(tensorboardX's ``SummaryWriter`` queues them for a thread that a kill stops);
a resumed run writes again the epochs its event files lack.
"""

import glob
import os
import struct
import textwrap

from tensorboard.backend.event_processing import event_accumulator

from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.rundir import writers
from tests.conftest import tiny_args

# A child that trains 3 epochs and is killed (SIGKILL) right after epoch 2's
# record and checkpoint are written.
KILLED = textwrap.dedent("""
    import os, signal, sys
    from resnet_jax.training import checkpoints
    from resnet_jax.cli import main
    real_save, saves = checkpoints.save, []

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save = save
    sys.exit(main.main(['main', *sys.argv[1:]]))
""")


def _tensorboard_epochs(workdir, tag='test_accuracy'):
    acc = event_accumulator.EventAccumulator(str(workdir))
    acc.Reload()
    return sorted({e.step for e in acc.Scalars(tag)}) if tag in acc.Tags()['scalars'] else []


def _epochs(workdir):
    return [r['epoch'] for r in workdir_lib.read_metrics(str(workdir))]


def test_a_kill_after_an_epoch_loses_nothing_in_tensorboard(cli, cifar_py, tmp_path):
    args = tiny_args(cifar_py.path, tmp_path, epochs=3)
    proc = cli.script(KILLED, *args)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _epochs(tmp_path) == [1, 2]
    assert _tensorboard_epochs(tmp_path) == [1, 2]  # On disk before the kill.
    proc = cli.run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _epochs(tmp_path) == [1, 2, 3]
    for tag in ('train_loss', 'test_accuracy', 'learning_rate'):
        assert _tensorboard_epochs(tmp_path, tag) == [1, 2, 3]


def test_a_rerun_writes_again_the_epochs_tensorboard_lacks(cli, cifar_py, tmp_path):
    args = tiny_args(cifar_py.path, tmp_path, epochs=3)
    assert cli.run(args).returncode == 0
    for path in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
        os.remove(path)  # As a kill under the queued writer could leave it.
    proc = cli.run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'TensorBoard lacked epoch(s) 1, 2, 3' in proc.stdout
    assert _tensorboard_epochs(tmp_path) == [1, 2, 3]
    assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 1


def test_tensorboard_steps_reads_a_file_cut_by_a_kill(tmp_path):
    logger = writers.MetricLogger(str(tmp_path))
    for epoch in (1, 2):
        logger.write({'epoch': epoch, 'test_accuracy': 0.5, 'train_loss': 1.0}, log=False)
    logger.close()
    (path,) = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
    with open(path, 'ab') as f:
        f.write(struct.pack('<Q', 1000) + b'torn')
    assert writers.tensorboard_steps(str(tmp_path)) == {
        'test_accuracy': {1, 2},
        'train_loss': {1, 2},
    }


def test_a_logger_that_writes_nothing_creates_no_file(tmp_path):
    writers.MetricLogger(str(tmp_path)).close()
    assert os.listdir(tmp_path) == []
