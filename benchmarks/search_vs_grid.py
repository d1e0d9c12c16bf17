"""Compares a search with the grid it should match: compute to reach the grid's best.

    python benchmarks/search_vs_grid.py runs/cpu_grid runs/cpu_search [--within 0.005]

Both workdirs are studies (resnet_jax.studies.search) selecting on the same validation
split. For each it prints, as a Markdown table: the images it trained in all,
the images it had trained when its best validation accuracy so far first came
within ``--within`` (a fraction: 0.005 is half a point) of the grid's best, its
pick (the best trial on validation) and that pick's test accuracy.
"""

import argparse
import sys

import pandas as pd

from resnet_jax.reports import study_report as search_report


def study_frames(workdir: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    described = search_report.read_description(workdir)
    study = search_report.load_study(workdir, described)
    trials = search_report.trials_frame(study, workdir)
    return described, trials, search_report.history_frame(trials, described['direction'])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('grid')
    parser.add_argument('search')
    parser.add_argument('--within', type=float, default=0.005)
    args = parser.parse_args(argv)
    frames = {
        name: study_frames(path) for name, path in (('grid', args.grid), ('search', args.search))
    }
    grid_trials = frames['grid'][1]
    best = grid_trials.loc[grid_trials['state'] == 'complete', 'value'].max()
    target = best - args.within
    rows = []
    for name, (described, trials, history) in frames.items():
        done = trials[trials['state'] == 'complete']
        pick = done.loc[done['value'].idxmax()]
        params = ', '.join(
            f'{k[len("param.") :]}={pick[k]:.4g}'
            if isinstance(pick[k], float)
            else f'{k[len("param.") :]}={pick[k]}'
            for k in trials.columns
            if k.startswith('param.')
        )
        reached = search_report.images_to_reach(history, target, described['direction'])
        rows.append(
            {
                'study': name,
                'trials': len(trials),
                'images trained': search_report.images_trained(trials),
                f'images to reach {100 * target:.2f}% val': reached,
                'pick': params,
                'pick val %': round(100 * pick['value'], 2),
                'pick test %': round(100 * pick['test_accuracy'], 2),
            }
        )
    table = pd.DataFrame(rows)
    print(
        f"grid's best validation accuracy {100 * best:.2f}%; target: within "
        f'{100 * args.within:.1f} points ({100 * target:.2f}%)\n'
    )
    print(table.to_markdown(index=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
