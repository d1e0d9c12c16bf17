"""Training-speed benchmark: JAX and, in the same run, the PyTorch references.

    resnet-jax-bench                                   # paper, batch 100/500, fp32
    resnet-jax-bench --models paper,resnet18 --batch_sizes 100,500,1000 \\
        --dtypes float32,bfloat16 --torch study,tuned --lanes 6 --json bench.json

(``resnet-jax-bench`` is also ``python -m resnet_jax.cli.bench``.)

For each model x batch size x dtype it times the training path of
``train_and_evaluate`` (on-device gather and augmentation, ``config.steps_per_call``
steps per call): steady-state images/s, time per epoch (measured with ``--epochs``,
else extrapolated and marked so), compile time and peak memory. ``--torch`` runs
``benchmarks/torch_reference.py`` (study-style and tuned PyTorch, each in its own
process) on the same cases for JAX/PyTorch ratios; ``--lanes R`` also times R runs
vectorised into one program (:mod:`resnet_jax.training.loop`). Images are random uint8
unless ``--data`` names a dataset (speed does not depend on pixel values); other
settings come from ``--config``, a config file or the name of a shipped config
(default: :func:`resnet_jax.config.get_config`, the study's recipe). The PyTorch references are a script of the repository, not of
the package: ``--torch_reference`` (default ``benchmarks/torch_reference.py``,
from the working directory); without it they are reported as skipped. Timings
belong in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import config as config_lib
from resnet_jax import datasets, models, validation
from resnet_jax.cli import config_files
from resnet_jax.datasets import augment
from resnet_jax.rundir import workdir
from resnet_jax.training import checks, train
from resnet_jax.training import steps as train_steps

TORCH_REFERENCE = os.path.join('benchmarks', 'torch_reference.py')
SYNTHETIC_TRAIN = 50_000  # CIFAR-10's training set size.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # One line, exit code 2.
        sys.stderr.write(f'error: {message}\n')
        raise SystemExit(2)


def _list(kind: type, choices: Sequence[Any] | None = None):
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(',') if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f'not a list of {kind.__name__}: {text!r}') from None
        if not values or any(choices is not None and v not in choices for v in values):
            choices_text = ', '.join(map(str, choices or ()))
            raise argparse.ArgumentTypeError(f'{text!r}: choose from {choices_text}')
        return values

    return parse


# The flags, in --help order: flag -> (type, default, help).
ARGUMENTS = {
    '--config': (
        str,
        '',
        "config file (get_config()) or a shipped config's name (resnet-jax --help)",
    ),
    '--models': (_list(str, models.MODELS.names()), ['paper'], None),
    '--batch_sizes': (_list(int), [100, 500], None),
    '--dtypes': (_list(str, sorted(models.DTYPES)), ['float32'], None),
    '--steps': (int, 20, 'timed steps per case'),
    '--epochs': (int, 0, '>= 2: also time whole epochs (the mean after the first)'),
    '--steps_per_call': (int, None, 'overrides the config'),
    '--lanes': (int, 0, 'also time this many vectorised runs'),
    '--data': (str, '', 'a dataset path (default: random images)'),
    '--torch': (
        _list(str, ('study', 'tuned', 'none')),
        ['study', 'tuned'],
        'PyTorch references to run alongside (none: skip)',
    ),
    '--torch_workers': (int, 2, 'study-style DataLoader workers'),
    '--torch_reference': (str, TORCH_REFERENCE, 'the PyTorch reference script'),
    '--json': (str, '', 'write every result to this JSON file'),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog='resnet-jax-bench', description=__doc__.split('\n')[0])
    for flag, (kind, default, help_text) in ARGUMENTS.items():
        p.add_argument(flag, type=kind, default=default, help=help_text)
    args = p.parse_args(argv)
    if args.steps < 1 or args.epochs < 0 or args.lanes < 0 or args.epochs == 1:
        p.error('--steps must be >= 1, --epochs 0 or >= 2, --lanes >= 0')
    if any(b < 1 for b in args.batch_sizes):
        p.error('--batch_sizes must be positive')
    args.config = config_files.resolve(args.config) if args.config else ''
    if args.config and not os.path.isfile(args.config):
        p.error(f'--config {args.config}: no such file')
    return args


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file ('': the package's default config)."""
    return config_files.load(path) if path else config_lib.get_config()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        'platform': device.platform,
        'device': getattr(device, 'device_kind', str(device)),
        'num_devices': jax.device_count(),
        'cpu_count': os.cpu_count(),
        'processor': platform.processor() or platform.machine(),
        'python': platform.python_version(),
        'jax': jax.__version__,
    }


def peak_memory_bytes() -> tuple[int, str]:
    """The accelerator's peak allocation, or the process's peak RSS on CPUs."""
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'device_peak_bytes_in_use'
    # VmHWM, unlike ru_maxrss, is not inherited from a parent across exec.
    with contextlib.suppress(OSError), open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024, 'vm_hwm'
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'max_rss'


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def bench_jax(
    config: ml_collections.ConfigDict,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    epochs: int = 0,
    runs: int = 1,
) -> dict[str, Any]:
    """Times ``steps`` training steps of ``runs`` runs trained together (twice: the
    first call compiles) through the loop's own :func:`resnet_jax.training.steps.train_epoch`,
    and with ``epochs`` >= 2 whole epochs."""
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    sharding = NamedSharding(mesh, P('data'))
    prep = augment.Preprocess.from_config(config)
    bs, n = config.batch_size, len(labels)
    steps = min(steps, n // bs)
    x = jax.device_put(images, replicated)
    y = jax.device_put(labels, replicated)
    state = train.create_train_state(config, jax.random.PRNGKey(0), max(n // bs, 1))
    states = jax.device_put(train.stack([state] * runs), replicated)
    orders = jnp.stack(
        [augment.epoch_order(jax.random.PRNGKey(r), 1, n, True) for r in range(runs)]
    )

    def run(states, sizes):
        states, total, _ = train_steps.train_epoch(
            states, x, y, orders, sizes, prep, sharding, steps_per_call=config.steps_per_call
        )
        return states, total

    (states, _), first = _timed(run, states, [bs] * steps)
    (states, _), steady = _timed(run, states, [bs] * steps)
    ips = runs * steps * bs / steady  # All runs together.
    result = {
        'framework': 'jax',
        'impl': 'jax' if runs == 1 else 'jax-vectorized',
        'model': config.model,
        'batch_size': bs,
        'dtype': config.dtype,
        **({} if runs == 1 else {'lanes': runs}),
        'steps_per_call': config.steps_per_call,
        'steps': steps,
        'images_per_second': ips,
        'step_seconds': steady / steps,
        'compile_seconds': max(first - steady, 0.0),
        'epoch_seconds': n * runs / ips,  # One epoch of every run.
        'epoch_seconds_estimated': True,
        'num_train_images': n,
    }
    if epochs >= 2:
        sizes = augment.train_batch_sizes(n, bs, config.drop_remainder, mesh.devices.size)
        result.update(_time_epochs(run, states, sizes, epochs, n * runs))
    result['peak_memory_bytes'], result['peak_memory_kind'] = peak_memory_bytes()
    result['train_tflops_per_second'] = _train_tflops(config, state, ips)
    return result


def _time_epochs(run, states, sizes: list[int], epochs: int, images: int) -> dict[str, Any]:
    """Times ``epochs`` whole epochs of ``images`` images; the first one's time apart."""
    times = []
    for _ in range(epochs):
        (states, _), seconds = _timed(run, states, sizes)
        times.append(seconds)
    mean = float(np.mean(times[1:]))
    return {
        'epoch_seconds': mean,
        'epoch_seconds_estimated': False,
        'first_epoch_seconds': times[0],
        'images_per_second_epoch': images / mean,
    }


def _train_tflops(config: ml_collections.ConfigDict, state: Any, images_per_second: float) -> float:
    """Training TFLOP/s: forward and backward are about 3x the forward's multiply-adds."""
    model, _ = train.cached_model(config.model, config.num_classes, config.dtype, config.image_size)
    flops = models.flops_per_image(model, state.variables(), config.image_size)
    return 3 * flops * images_per_second / 1e12


def bench_torch(
    impl: str,
    model: str,
    batch_size: int,
    dtype: str,
    steps: int,
    data: str,
    workers: int,
    epochs: int = 0,
    script: str = TORCH_REFERENCE,
) -> dict[str, Any]:
    """Runs the PyTorch reference ``script`` in its own process; its JSON result."""
    if impl == 'study' and dtype != 'float32':
        return {'framework': 'torch', 'impl': impl, 'skipped': 'the study ran in float32'}
    if not os.path.exists(script):
        return {'framework': 'torch', 'impl': impl, 'skipped': f'{script} not found'}
    command = [sys.executable, script, '--impl', impl, '--model', model]
    command += ['--batch_size', str(batch_size), '--dtype', dtype, '--num_workers', str(workers)]
    command += ['--epochs', str(epochs)] if epochs else ['--steps', str(steps)]
    if data:
        command += ['--data', data]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode or not lines:
        reason = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'framework': 'torch', 'impl': impl, 'skipped': reason}
    result = json.loads(lines[-1])
    result['framework'] = 'torch'
    return result


def _load_data(path: str, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    if not path:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (SYNTHETIC_TRAIN, 32, 32, 3), dtype=np.uint8)
        return images, rng.integers(0, 10, SYNTHETIC_TRAIN).astype(np.int32)
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.path = path
    data_config.image_size = config.image_size
    data = datasets.load_dataset(data_config, config.seed)
    return data.train_images, data.train_labels.astype(np.int32)


def _row(r: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    if 'skipped' in r:
        return f'| {r["impl"]} | | | | | | skipped: {r["skipped"]} |'
    epoch = f'{r["epoch_seconds"]:.1f}' + (' (est.)' if r.get('epoch_seconds_estimated') else '')
    mem = r.get('peak_memory_bytes')
    ratio = ''
    if reference is not None and 'images_per_second' in reference:
        ratio = f'{reference["images_per_second"] / r["images_per_second"]:.2f}x'
    lanes = f' x{r["lanes"]}' if r.get('lanes') else ''
    return (
        f'| {r["impl"]}{lanes} | {r["model"]} | {r["batch_size"]} | {r["dtype"]} | '
        f'{r["images_per_second"]:.0f} | {epoch} | {r.get("compile_seconds", 0):.1f} | '
        f'{(mem or 0) / 2**20:.0f} | {ratio} |'
    )


HEADER = (
    '| impl | model | batch | dtype | images/s | epoch s | compile s | peak MiB | JAX speed-up |\n'
    '|---|---|---|---|---|---|---|---|---|'
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        base = load_config(args.config)
        images, labels = _load_data(args.data, base)
    except (validation.ConfigError, datasets.DataError, OSError) as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
    info = machine()
    print(f'# {json.dumps(info)}', flush=True)
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    for model, dtype, bs in itertools.product(args.models, args.dtypes, args.batch_sizes):
        config = ml_collections.ConfigDict(base.to_dict())
        config.model, config.batch_size, config.dtype = model, bs, dtype
        if args.steps_per_call is not None:
            config.steps_per_call = args.steps_per_call
        try:
            checks.validate_config(config)
        except validation.ConfigError as e:
            sys.stderr.write(f'error: {e}\n')
            return 2
        mine = bench_jax(config, images, labels, args.steps, args.epochs)
        results.append(mine)
        print(_row(mine), flush=True)
        ips = mine['images_per_second']
        for impl in (i for i in args.torch if i != 'none'):
            theirs = bench_torch(
                impl,
                model,
                bs,
                dtype,
                args.steps,
                args.data,
                args.torch_workers,
                args.epochs,
                args.torch_reference,
            )
            theirs.update(model=model, batch_size=bs, dtype=dtype)
            if 'images_per_second' in theirs:
                theirs['jax_speedup'] = ips / theirs['images_per_second']
            results.append(theirs)
            print(_row(theirs, mine), flush=True)
        if args.lanes:
            together = bench_jax(config, images, labels, args.steps, runs=args.lanes)
            together['speedup_vs_one_run'] = together['images_per_second'] / ips
            results.append(together)
            print(_row(together), f'{together["speedup_vs_one_run"]:.2f}x vs 1 run')
    if args.json:
        workdir.write_json(args.json, {'machine': info, 'results': results})
    return 0


if __name__ == '__main__':
    sys.exit(main())
