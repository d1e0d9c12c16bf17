"""Where a study's time goes: the same study as before and with today's defaults.

    python benchmarks/study_compute.py --data data/cifar10-jpeg [--config cpu_search] \
        [--work runs/study_compute]

Runs the study of ``--config`` (one worker) twice, one after the other, into
fresh workdirs under ``--work``:

- ``before``: the test set evaluated after every epoch of every trial and no
  compilation cache (``--config.eval_test=every_epoch --compilation_cache=none``),
  what every study did before those options existed;
- ``after``: the defaults (the trials of a study that selects on validation
  evaluate the test set once, when they end; JAX's persistent compilation
  cache, here in a folder that starts empty, so that only what the study's own
  trials share is reused).

Prints a Markdown table: wall time, images trained, training images per second
of wall time, and whether both drew the same trials and picked the same one.
Run it on an otherwise idle machine; the decoded-image cache should be warm
(run any command on the data once first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import search_vs_grid  # The sibling script: how a study workdir is read.

from resnet_jax.reports import study_report

ARMS = {
    'before': ['--config.eval_test=every_epoch', '--compilation_cache=none'],
    'after': [],  # The defaults; the cache folder is added below.
}


def run_arm(name: str, args: argparse.Namespace) -> float:
    """Runs one arm's study into ``work/name``; its wall time in seconds."""
    workdir = os.path.join(args.work, name)
    extra = list(ARMS[name])
    if name == 'after':
        cache = os.path.join(args.work, 'compilation_cache')
        shutil.rmtree(cache, ignore_errors=True)
        extra.append(f'--compilation_cache={cache}')
    command = [
        sys.executable, '-m', 'resnet_jax.main', '--config', args.config,
        '--workdir', workdir, f'--config.data.path={args.data}', *extra,
    ]  # fmt: skip
    with open(workdir + '.log', 'w') as log:
        start = time.perf_counter()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
        return time.perf_counter() - start


def pick(study: search_vs_grid.Study) -> str:
    """The run folder of the study's best completed trial."""
    return str(search_vs_grid.pick_of(study)['run'])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', required=True)
    parser.add_argument('--config', default='cpu_search')
    parser.add_argument('--work', default='runs/study_compute')
    args = parser.parse_args(argv)
    for name in ARMS:
        if os.path.exists(os.path.join(args.work, name)):
            print(f'error: {os.path.join(args.work, name)} exists: choose another --work')
            return 2
    os.makedirs(args.work, exist_ok=True)
    walls = {}
    for name in ARMS:
        walls[name] = run_arm(name, args)
        print(f'{name}: {walls[name]:.1f} s', flush=True)
    studies = {name: search_vs_grid.read_study(os.path.join(args.work, name)) for name in ARMS}
    frames = {name: study.trials for name, study in studies.items()}
    params = [c for c in frames['before'].columns if c.startswith('param.')]
    same_trials = frames['before'][params].equals(frames['after'][params])
    same_pick = pick(studies['before']) == pick(studies['after'])
    rows = []
    for name in ARMS:
        images = study_report.images_trained(frames[name])
        rows.append(
            {
                'study': name,
                'trials': len(frames[name]),
                'wall (s)': round(walls[name], 1),
                'images trained': images,
                'training images/s of wall time': round(images / walls[name], 1),
                'wall vs before': round(walls[name] / walls['before'], 3),
                'pick': pick(studies[name]),
            }
        )
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f'\nsame trials drawn: {same_trials}; same pick: {same_pick}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
