"""Study faults: a config that cannot fit the data, a failure every trial shares,
the documented PostgreSQL URL, extending a study, reruns' exit codes, the
pruner's first epoch, the workers' limit and reports of a damaged workdir."""

import os
import textwrap

import pytest

from resnet_jax import datasets, validation
from resnet_jax.studies import preflight, search, search_space
from tests.conftest import make_tiny_config, one_error_line


def study_config(data_path: str, **search_options):
    """A tiny random search on ``cifar_py`` (120 train images) selecting on the test set."""
    config = make_tiny_config(data_path)
    config.num_epochs = 1
    config.search = search_space.default_section()
    config.search.space.learning_rate = search_space.float_param(1e-3, 0.1, log=True)
    config.search.sampler = 'random'
    config.search.metric = 'test_accuracy'
    config.search.num_trials = 2
    for key, value in search_options.items():
        config.search[key] = value
    return config


def config_file(tmp_path, data_path: str, body: str = '') -> str:
    """A config file: ``study_config`` then ``body``; returns its path."""
    path = tmp_path / 'study_config.py'
    path.write_text(
        'from resnet_jax.studies import search_space\n'
        'from tests.test_study_faults import study_config\n\n'
        'def get_config():\n'
        f'    config = study_config({data_path!r})\n'
        + textwrap.indent(textwrap.dedent(body).strip('\n') + '\n', '    ')
        + '    return config\n'
    )
    return str(path)


# ------------------------------------------ A: a config that cannot fit ----


def test_a_split_larger_than_the_data_is_one_line_before_any_trial(cli, tmp_path, cifar_py):
    workdir = tmp_path / 'study'
    args = [f'--config={config_file(tmp_path, cifar_py.path)}', f'--workdir={workdir}']
    result = cli.run([*args, '--config.data.validation_size=500'])
    one_error_line(result, 'validation_size=500')
    assert not workdir.exists()
    result = cli.run([*args, '--config.data.validation_size=500', '--workers=2'])
    one_error_line(result, 'validation_size=500')
    assert not workdir.exists()


def test_every_batch_size_the_study_can_draw_is_checked(cifar_py):
    config = study_config(cifar_py.path)
    config.search.space.batch_size = search_space.categorical((32, 1000))
    spec = search_space.spec_from_config(config)
    assert preflight.batch_sizes(spec) == [1000, 32]
    with pytest.raises(validation.ConfigError, match='batch_size=1000 is larger than the training'):
        preflight.check_data(spec)
    config.search.space.batch_size = search_space.int_param(8, 200)
    with pytest.raises(validation.ConfigError, match='batch_size=200'):
        preflight.check_data(search_space.spec_from_config(config))
    # Only when sgd is drawn: the base batch size is drawn too.
    config.search.space.batch_size = search_space.categorical((16,), when=('optimizer', 'sgd'))
    assert preflight.batch_sizes(search_space.spec_from_config(config)) == [32, 16]
    config.search.space.batch_size = search_space.categorical((16, 64))
    config.search.sampler = 'grid'
    del config.search.space.learning_rate
    preflight.check_data(search_space.spec_from_config(config))  # Fits: no error.
    config.data.validation_size = 500
    with pytest.raises(datasets.DataError, match='validation_size=500'):
        preflight.check_data(search_space.spec_from_config(config))


def test_the_same_failure_in_a_row_stops_the_worker(tmp_path, cifar_py, monkeypatch, capsys):
    from resnet_jax.cli import main as cli_main
    from resnet_jax.training import loop

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError('the accelerator is gone')

    monkeypatch.setattr(loop, 'train_runs', broken)
    workdir = tmp_path / 'study'
    path = config_file(tmp_path, cifar_py.path, 'config.search.num_trials = 10')
    code = cli_main.main(['main', f'--config={path}', f'--workdir={workdir}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith('error: 3 trials in a row failed'), err
    assert 'the accelerator is gone' in err[0]
    assert len(calls) == search.SAME_FAILURES_TO_STOP


# ------------------------------------------- B: the documented PostgreSQL URL ----


@pytest.fixture
def postgres_url():
    """The URL form the docs show, ``postgresql://user@/db?host=...``, of a real server."""
    from tests import postgres_server

    bin_dir = postgres_server.required_server_bin()
    with postgres_server.PostgresServer(bin_dir) as url:
        yield 'postgresql://' + url.split('://', 1)[1]


def test_the_documented_postgresql_url_opens_the_study(tmp_path, cifar_py, postgres_url):
    from resnet_jax.reports import study_report
    from resnet_jax.studies import optuna_study

    assert postgres_url.startswith('postgresql://') and '?host=' in postgres_url
    config = study_config(cifar_py.path, storage=postgres_url)
    workdir = str(tmp_path / 'study')
    study = optuna_study.open_study(search_space.spec_from_config(config), workdir)
    study.enqueue_trial({'learning_rate': 0.01})
    # The report reads the same URL back from search.json.
    described = study_report.read_description(workdir)
    assert described['storage'] == search_space.redact(postgres_url)
    assert len(study_report.load_study(workdir, described).get_trials()) == 1


# ------------------------------------------------ C: smaller surprises ----


def _main(*args) -> int:
    from resnet_jax.cli import main as cli_main

    return cli_main.main(['main', *map(str, args)])


def test_a_larger_num_trials_extends_the_study(tmp_path, cifar_py):
    from resnet_jax.studies import optuna_study

    workdir = str(tmp_path / 'study')
    config = study_config(cifar_py.path, num_trials=2)
    study = optuna_study.open_study(search_space.spec_from_config(config), workdir)
    config.search.num_trials = 5
    optuna_study.open_study(search_space.spec_from_config(config), workdir)
    config.search.num_trials = 1
    optuna_study.open_study(search_space.spec_from_config(config), workdir)
    # A study recorded by earlier versions holds its whole key, which held num_trials.
    key = optuna_study._study_key(search_space.spec_from_config(config))
    study.set_user_attr('spec', {**key, 'num_trials': 2})
    config.search.num_trials = 5
    optuna_study.open_study(search_space.spec_from_config(config), workdir)


def test_a_diverged_studys_rerun_exits_as_the_first_run(tmp_path, cifar_py, monkeypatch, capsys):
    from resnet_jax.training import loop

    def diverging(configs, workdirs, **kwargs):
        return None, [{'status': 'diverged', 'error': 'the loss is nan'} for _ in configs]

    monkeypatch.setattr(loop, 'train_runs', diverging)
    path = config_file(tmp_path, cifar_py.path, 'config.search.num_trials = 1')
    args = (f'--config={path}', f'--workdir={tmp_path / "study"}')
    assert _main(*args) == 1
    first = [line for line in capsys.readouterr().err.splitlines() if line.startswith('run ')]
    assert _main(*args) == 1
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith('run ')]
    assert first == again and len(first) == 1 and first[0].endswith(': diverged'), first


def test_min_epochs_beyond_num_epochs_is_a_config_error(cifar_py):
    config = study_config(cifar_py.path, pruner='median', min_epochs=2)
    with pytest.raises(search_space.SearchError, match='min_epochs=2 is larger than num_epochs=1'):
        search_space.spec_from_config(config)
    config.search.space.num_epochs = search_space.categorical((1, 2))
    search_space.spec_from_config(config)  # Some trial trains 2 epochs.


def test_workers_beyond_the_machine_or_without_a_study_are_one_line(tmp_path, cifar_py, capsys):
    from resnet_jax.studies import workers

    workdir = tmp_path / 'study'
    path = config_file(tmp_path, cifar_py.path)
    most, _ = workers.max_workers()
    assert _main(f'--config={path}', f'--workdir={workdir}', f'--workers={most + 1}') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'at most {most}' in err[0], err
    assert not workdir.exists()
    path = tmp_path / 'run_config.py'
    path.write_text(
        'from tests.conftest import make_tiny_config\n\n'
        f'def get_config():\n    return make_tiny_config({cifar_py.path!r})\n'
    )
    assert _main(f'--config={path}', f'--workdir={workdir}', '--workers=2') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no sweep or search section' in err[0], err
    assert not workdir.exists()


def test_a_report_without_its_study_database_is_one_line(tmp_path, cifar_py, capsys):
    from resnet_jax.studies import optuna_study

    workdir = tmp_path / 'study'
    optuna_study.open_study(search_space.spec_from_config(study_config(cifar_py.path)), workdir)
    os.remove(workdir / 'study.db')
    assert _main(f'--workdir={workdir}', '--mode=report') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'study.db is missing' in err[0]
    assert not (workdir / 'study.db').exists()


def test_a_best_trial_whose_folder_was_deleted_is_reported_with_a_warning(tmp_path, cifar_py):
    from resnet_jax.reports import study_report
    from resnet_jax.studies import optuna_study

    workdir = tmp_path / 'study'
    study = optuna_study.open_study(
        search_space.spec_from_config(study_config(cifar_py.path)), workdir
    )
    trial = study.ask({'learning_rate': optuna_distribution()})
    trial.set_user_attr('run', 'learning_rate=0.01')
    study.tell(trial, 0.5)
    study_report.write_study_report(str(workdir))
    text = (workdir / 'search.md').read_text()
    assert 'the run folder of the best trial, learning_rate=0.01, was deleted' in text


def optuna_distribution():
    import optuna

    return optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)
