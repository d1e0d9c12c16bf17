"""Orbax checkpoints of a run: save, restore, fall back past corrupt ones.

    manager = checkpoints.checkpoint_manager(workdir, keep=3)
    checkpoints.save(manager, state, {'epoch': 3, 'position': 0}, metrics=None)
    restored = checkpoints.restore_latest_good(workdir, manager, state)  # or None
    model, variables, config = checkpoints.restore(workdir)             # for inference

Checkpoints live in ``workdir/checkpoints/<global step>``. Each holds the train
state, the running metrics of a partly trained epoch and a small JSON ``meta``
(completed epochs, position in the next one, wall time). Writes go to a
temporary folder that orbax renames when complete, so a kill never leaves a
half checkpoint; an unreadable one is moved to ``checkpoints_corrupt/`` (kept)
and the newest readable one is used instead.
"""

# No `from __future__ import annotations`: clu reads Metrics annotations at run time.
import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax import validation
from resnet_jax.rundir import workdir as workdir_lib
from resnet_jax.training import train

logger = logging.getLogger('resnet_jax')

CHECKPOINT_DIR = workdir_lib.CHECKPOINT_DIR


# What a checkpoint's JSON ``meta`` holds (see :func:`save`); a checkpoint whose meta
# fails these checks is unreadable.
META_KINDS = {
    'epoch': workdir_lib.int_at_least(0),
    'position': workdir_lib.int_at_least(0),
    'partial_seconds': validation.is_number,
    'wall_seconds': validation.is_number,
    'record': lambda x: x is None or isinstance(x, dict),
}


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be read, or one cannot be written."""


def checkpoint_manager(
    workdir: str, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager of ``workdir/checkpoints``; checkpoints are named by global step."""
    if read_only:  # (Options that only matter for saving would be warned about.)
        options = dict(read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
    else:  # Temporary folders of saves that a kill or a full disk cut short are removed.
        options = dict(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def _state_tree(state: train.TrainState) -> dict[str, Any]:
    return {k: getattr(state, k) for k in ('step', 'params', 'batch_stats', 'opt_state', 'rng')}


def _metrics_tree(metrics: train.TrainMetrics | None) -> dict[str, Any]:
    """Running metrics as host numpy scalars (the same on every process)."""
    metrics = train.TrainMetrics.empty() if metrics is None else metrics
    return jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(metrics))


def save(
    manager: ocp.CheckpointManager,
    state: train.TrainState,
    meta: Mapping[str, Any],
    metrics: train.TrainMetrics | None = None,
) -> None:
    """Saves ``state`` under its global step, with ``meta`` and partial metrics.

    ``meta['epoch']`` counts completed epochs and ``meta['position']`` the
    batches of the next epoch already trained (0 at an epoch boundary), whose
    running ``metrics`` are saved too. A failed write (full disk, ...) closes
    ``manager``, removes its temporary folder and raises :class:`CheckpointError`.
    """
    step = int(state.step)
    if step in manager.all_steps():  # Superseded (an interrupt saved this very step).
        manager.delete(step)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                train_metrics=ocp.args.StandardSave(_metrics_tree(metrics)),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
        )
        manager.wait_until_finished()
    except Exception as e:  # OSError, or TensorStore's ValueError (RESOURCE_EXHAUSTED, ...).
        close_quietly(manager)  # Its writer threads may still be creating the folder.
        raise CheckpointError(
            f'could not write the checkpoint of step {step} in {manager.directory}: '
            f'{short_error(e)}; the earlier checkpoints are intact'
        ) from e


def short_error(error: BaseException, limit: int = 200) -> str:
    """One short line for an exception (TensorStore's messages span kilobytes)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    if 'No space left on device' in text or 'RESOURCE_EXHAUSTED' in text:
        return 'No space left on device'
    text = ' '.join(text.split()).split(' [tensorstore_spec')[0] or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + '...'


def remove_partial_checkpoints(directory: str) -> None:
    """Deletes orbax's temporary folders of unfinished saves in ``directory``."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if '.orbax-checkpoint-tmp' in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def close_quietly(manager: ocp.CheckpointManager) -> None:
    """Finishes and closes ``manager``, then removes what failed saves left behind.

    A failed save was already reported; the removal comes last because orbax's
    writer threads may still create files until the manager is closed.
    """
    with contextlib.suppress(Exception):
        manager.wait_until_finished()
    with contextlib.suppress(Exception):
        manager.close()
    remove_partial_checkpoints(str(manager.directory))


def quiet_orbax_noise() -> None:
    """Drops orbax's noise after a failed read or write (once; other unraisables still print).

    A restore that fails part-way leaves TensorStore callbacks that fire into
    orbax's closed event loop, and a failed save leaves coroutines that die at
    interpreter exit: hundreds of traceback lines about nothing actionable. A
    failed read also abandons orbax coroutines, each reported as a
    ``RuntimeWarning`` when it is collected.
    """
    warnings.filterwarnings(
        'ignore', message=r'coroutine .* was never awaited', category=RuntimeWarning
    )
    previous = sys.unraisablehook
    if getattr(previous, 'quiet_orbax', False):
        return

    def hook(unraisable: Any) -> None:
        text = str(unraisable.exc_value)
        if 'Event loop is closed' not in text and 'Python is likely shutting down' not in text:
            previous(unraisable)

    hook.quiet_orbax = True
    sys.unraisablehook = hook


def _restore_items(manager: ocp.CheckpointManager, step: int, state_tree: Any) -> Any:
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_tree),
            train_metrics=ocp.args.StandardRestore(_metrics_tree(None)),
            meta=ocp.args.JsonRestore(),
        ),
    )


def restore_state(
    manager: ocp.CheckpointManager, state: train.TrainState, step: int | None = None
) -> tuple[train.TrainState, dict[str, Any], train.TrainMetrics]:
    """Restores ``step`` (default: the latest) into the structure of ``state``.

    Returns the state, the checkpoint's ``meta`` and the running metrics of a
    partly trained epoch. Checkpoints of earlier optimiser-state layouts (the
    learning rate not yet optimiser state, or not yet the scheduled rate too)
    are read into today's layout: :func:`_upgrade_opt_state`.
    """
    step = manager.latest_step() if step is None else step
    target = _state_tree(state)
    try:
        restored = _restore_items(manager, step, target)
    except Exception as error:  # pylint: disable=broad-except  # Maybe an older layout.
        try:
            raw = _restore_items(manager, step, None)  # As saved, then placed like target.
            tree = dict(raw['state'])
            opt_state = _upgrade_opt_state(tree.pop('opt_state'), state.opt_state, tree['step'])
            tree = jax.tree_util.tree_map(_put_like, {k: target[k] for k in tree}, tree)
            restored = {k: raw[k] for k in ('train_metrics', 'meta')}
            restored['state'] = dict(tree, opt_state=opt_state)
        except Exception:  # pylint: disable=broad-except
            raise error from None
    metrics = flax.serialization.from_state_dict(
        train.TrainMetrics.empty(), restored['train_metrics']
    )
    where = os.path.join(str(manager.directory), str(step), 'meta')
    meta = workdir_lib.check_object(where, restored['meta'], META_KINDS, ('epoch',))
    return state.replace(**restored['state']), dict(meta), metrics


def _put_like(like: jax.Array, value: Any) -> jax.Array:
    """``value`` as an array of the dtype and sharding of ``like``."""
    return jax.device_put(np.asarray(value, like.dtype), like.sharding)


def _upgrade_opt_state(raw: Any, template: Any, step: jax.Array) -> Any:
    """An optimiser state read without a target (``raw``) in the layout of ``template``.

    Earlier layouts: the optimiser's own chain with its schedule inside (before
    the learning rate was optimiser state), and that chain wrapped with the
    base rate. The chain's arrays keep their places; the counts are the
    checkpoint's; the rate of the last update is the base rate until the next
    update sets it.
    """
    wrapped = isinstance(raw, Mapping) and 'hyperparams' in raw
    chain = raw['inner_state'] if wrapped else raw
    count = np.asarray(raw['count'] if wrapped else step, np.int32)
    base = raw['hyperparams']['learning_rate'] if wrapped else template.hyperparams['learning_rate']
    inner = template.inner_state

    def lookup(path, like):
        node = chain
        for key in path:  # Attribute names, dict keys and sequence indices alike.
            node = node[getattr(key, 'name', getattr(key, 'key', getattr(key, 'idx', None)))]
        return _put_like(like, node)

    put = lambda value, like: _put_like(like, value)
    schedule_state = inner.hyperparams_states['learning_rate']
    return template._replace(
        count=put(count, template.count),
        hyperparams={'learning_rate': put(base, template.hyperparams['learning_rate'])},
        inner_state=inner._replace(
            count=put(count, inner.count),
            hyperparams={'learning_rate': put(base, inner.hyperparams['learning_rate'])},
            hyperparams_states={
                'learning_rate': schedule_state._replace(count=put(count, schedule_state.count))
            },
            inner_state=jax.tree_util.tree_map_with_path(lookup, inner.inner_state),
        ),
    )


def restore_latest_good(
    workdir: str, manager: ocp.CheckpointManager, state: train.TrainState
) -> tuple[train.TrainState, dict[str, Any], train.TrainMetrics] | None:
    """Restores the newest readable checkpoint; None if there are none.

    Unreadable newer checkpoints are moved to ``workdir/checkpoints_corrupt/``
    (kept, not deleted) with a warning. If no checkpoint is readable,
    :class:`CheckpointError` names the folder and nothing is moved.
    """
    step, restored, bad = _newest_readable(manager, lambda s: restore_state(manager, state, s))
    if step is None and not bad:
        return None
    for b, error in bad:
        target = _quarantine(workdir, b) if step is not None else None
        moved = f'; moved to {target}' if target else ''
        logger.warning('checkpoint %d is unreadable (%s)%s', b, error, moved)
    if bad and step is not None:
        manager.reload()
        logger.warning('resuming from the older checkpoint of step %d', step)
    return restored


def _newest_readable(
    manager: ocp.CheckpointManager, read: Callable[[int], Any]
) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """``(step, read(step), [(unreadable step, why), ...])`` trying newest first.

    Raises :class:`CheckpointError` when checkpoints exist but none is readable.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
        try:
            return step, read(step), bad
        except Exception as e:  # pylint: disable=broad-except  # Any corruption.
            quiet_orbax_noise()
            bad.append((step, short_error(e)))
    if steps:
        raise CheckpointError(
            f'no readable checkpoint in {manager.directory} (steps {", ".join(map(str, steps))}: '
            f'{bad[0][1]}); fix or remove them, or rerun with --overwrite to start over'
        )
    return None, None, bad


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (kept); returns where."""
    source = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    target_dir = os.path.join(workdir, CHECKPOINT_DIR + '_corrupt')
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f'{step}-{int(time.time())}')
    os.rename(source, target)
    return target


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{workdir} holds no run ({workdir_lib.CONFIG_FILE} not found)')
    return ml_collections.ConfigDict(workdir_lib.read_run_config(path))


def _read_variables(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The model variables of a checkpoint, whatever its optimiser state."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    restored = manager.restore(step, args=args)['state']
    return {'params': restored['params'], 'batch_stats': restored['batch_stats']}


def restore(
    workdir: str, step: int | None = None
) -> tuple[flax.linen.Module, dict[str, Any], ml_collections.ConfigDict]:
    """Returns ``(model, variables, config)`` from a workdir's latest checkpoint.

    ``step`` picks another checkpoint (they are named by global step); without
    it an unreadable latest checkpoint is skipped with a warning for the newest
    readable one, and nothing is moved (this may be read-only use).

    ``model.apply(variables, x, train=False)`` gives logits for float NHWC ``x``
    preprocessed like the training data (see ``config.data``).
    """
    config = load_config(workdir)
    manager = checkpoint_manager(workdir, read_only=True)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}')
        if step is not None:
            variables = _read_variables(manager, step)
        else:
            found, variables, bad = _newest_readable(manager, lambda s: _read_variables(manager, s))
            for b, error in bad:
                logger.warning(
                    'checkpoint %d is unreadable (%s); using checkpoint %d', b, error, found
                )
    finally:
        manager.close()
    model, _ = train.cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    return model, variables, config
