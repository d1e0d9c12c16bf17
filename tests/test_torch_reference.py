"""benchmarks/torch_reference.py: the PyTorch twins of the models and the recipe.

Skipped where torch is not installed (CI): torch is a benchmark-only extra.
"""

import functools
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from resnet_jax import models
from tests.conftest import load_benchmark

torch = pytest.importorskip('torch')


tr = load_benchmark('torch_reference')

REQUIRED_KEYS = {
    'impl',
    'model',
    'batch_size',
    'dtype',
    'device',
    'torch_version',
    'num_threads',
    'num_params',
    'images_per_second',
    'step_seconds',
    'epoch_seconds',
    'epoch_seconds_estimated',
    'compile_seconds',
    'peak_memory_bytes',
}


@pytest.mark.parametrize('name,expected', [('paper', 195_738), ('resnet18', 11_173_962)])
def test_parameter_counts(name, expected):
    assert tr.count_params(tr.build_model(name)) == expected


@functools.cache
def _random_flax_variables(name, seed=0):
    """Flax variables with BatchNorm scale/bias/statistics made non-trivial (read-only)."""
    model = models.create_model(name, 10, 'float32')
    variables = models.init_variables(model, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for key, value in flat.items():
        if key[-1] in ('scale', 'var'):
            flat[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif key[-1] in ('bias', 'mean'):
            flat[key] = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    return model, traverse_util.unflatten_dict(flat)


# ResNet-18's 11M parameters compile for seconds: its case runs with the full suite.
@pytest.mark.parametrize('name', ['paper', pytest.param('resnet18', marks=pytest.mark.slow)])
def test_flax_weights_give_the_same_logits(name):
    flax_model, variables = _random_flax_variables(name)
    net = tr.build_model(name)
    tr.load_flax_variables(net, variables)
    x = np.random.default_rng(1).uniform(0.0, 1.0, (4, 32, 32, 3)).astype(np.float32)
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    net.eval()
    with torch.no_grad():
        torch_logits = net(x_torch).numpy()
    # Compiled whole: op by op, each of the many small ops would compile alone.
    apply = jax.jit(flax_model.apply, static_argnames=('train', 'mutable'))
    flax_logits = np.asarray(apply(variables, x, train=False))
    np.testing.assert_allclose(torch_logits, flax_logits, rtol=1e-4, atol=1e-4)

    # Training mode: BatchNorm normalises with the batch statistics in both.
    net.train()
    with torch.no_grad():
        torch_logits = net(x_torch).numpy()
    flax_logits, updates = apply(variables, x, train=True, mutable=('batch_stats',))
    np.testing.assert_allclose(torch_logits, np.asarray(flax_logits), rtol=1e-4, atol=1e-4)
    # Same momentum: the running means move alike (torch's running_var uses the
    # unbiased batch variance, Flax's the biased one, so only means are compared).
    np.testing.assert_allclose(
        net.stem_bn.running_mean.numpy(),
        np.asarray(updates['batch_stats']['stem_bn']['mean']),
        rtol=1e-5,
        atol=1e-5,
    )


def test_load_flax_variables_rejects_another_network():
    _, variables = _random_flax_variables('paper')
    with pytest.raises(ValueError):
        tr.load_flax_variables(tr.build_model('resnet18'), variables)


def _candidates(image, pad):
    """Every pad-``pad`` crop of the zero-padded image, unflipped and flipped."""
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for r in range(2 * pad + 1):
        for c in range(2 * pad + 1):
            crop = padded[r : r + h, c : c + w]
            yield (r, c, False), crop
            yield (r, c, True), crop[:, ::-1]


def _matches(image, out, pad=4):
    return [key for key, crop in _candidates(image, pad) if np.array_equal(crop, out)]


def test_tuned_augmentation_crops_the_padded_image():
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = tr.augment_batch(
        torch.from_numpy(images), pad=4, flip=True, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (16, 32, 32, 3) and out.dtype == torch.uint8
    found = []
    for image, augmented in zip(images, out.numpy(), strict=True):
        matches = _matches(image, augmented)
        assert len(matches) == 1  # Exactly one of the 81 offsets x 2 flips.
        found.append(matches[0])
    assert {flipped for _, _, flipped in found} == {False, True}
    assert len({(r, c) for r, c, _ in found}) > 1
    # pad=0 and no flip leave the images alone.
    same = tr.augment_batch(torch.from_numpy(images), pad=0, flip=False)
    np.testing.assert_array_equal(same.numpy(), images)


def test_study_transforms_crop_the_padded_image():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8, dtype=np.int32)
    torch.manual_seed(0)
    train = tr.StudyDataset(images, labels, train=True, pad=4, flip=True)
    for i in range(len(images)):
        x, label = train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == i
        pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert len(_matches(images[i], pixels)) == 1
    x, _ = tr.StudyDataset(images, labels, train=False, pad=4, flip=True)[3]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), images[3] / 255.0, atol=1e-7)


def test_to_model_input_is_scaled_channels_last():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = tr.to_model_input(images)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, images.permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize(
    'impl,dtype', [('study', 'float32'), ('tuned', 'float32'), ('tuned', 'bfloat16')]
)
def test_timing_mode(impl, dtype):
    images, labels = tr.synthetic_split(64, seed=0)
    result = tr.run(
        impl,
        dtype=dtype,
        train_images=images,
        train_labels=labels,
        steps=2,
        warmup_steps=1,
        batch_size=8,
        num_workers=0,
        device='cpu',
    )
    assert REQUIRED_KEYS <= result.keys()
    json.dumps(result)
    assert (result['impl'], result['dtype'], result['device']) == (impl, dtype, 'cpu')
    assert result['mode'] == 'timing' and result['compile'] is False
    assert result['num_params'] == 195_738 and result['num_threads'] >= 1
    assert result['images_per_second'] > 0 and result['peak_memory_bytes'] > 0
    assert result['epoch_seconds_estimated'] is True
    assert result['epoch_seconds'] == pytest.approx(64 / result['images_per_second'])
    assert result['step_seconds'] == pytest.approx(8 / result['images_per_second'])


@pytest.mark.parametrize('impl', ['study', 'tuned'])
def test_training_mode(impl):
    train_images, train_labels = tr.synthetic_split(64, seed=0)
    test_images, test_labels = tr.synthetic_split(24, seed=1)
    result = tr.run(
        impl,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        epochs=1,
        warmup_steps=1,
        batch_size=8,
        num_workers=0,
        device='cpu',
    )
    assert REQUIRED_KEYS <= result.keys()
    json.dumps(result)
    assert result['mode'] == 'training' and result['epoch_seconds_estimated'] is False
    assert 0.0 <= result['test_accuracy'] <= 1.0
    assert result['images_per_second'] > 0
    (record,) = result['history']
    assert record['epoch'] == 1 and np.isfinite(record['train_loss'])
    assert 0.0 <= record['train_accuracy'] <= 1.0
    assert record['test_accuracy'] == result['test_accuracy']
    assert record['epoch_seconds'] == result['epoch_seconds'] > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match='float32'):
        tr.run('study', dtype='bfloat16', steps=1)
    with pytest.raises(ValueError, match='not both'):
        tr.run('tuned', steps=1, epochs=1)
    with pytest.raises(ValueError, match='impl'):
        tr.run('jax', steps=1)
    for argv in (
        ['--impl', 'nope'],
        ['--impl', 'tuned', '--steps', '1', '--epochs', '1'],
        ['--impl', 'tuned', '--steps', '0'],
        ['--impl', 'study', '--dtype', 'bfloat16'],
    ):
        with pytest.raises(SystemExit) as exit_info:
            tr.parse_args(argv)
        assert exit_info.value.code == 2


def test_cli_trains_on_a_cifar_copy(cifar_py, tmp_path, capsys):
    out = tmp_path / 'result.json'
    argv = ['--impl', 'tuned', '--epochs', '1', '--batch_size', '32', '--data', cifar_py.path]
    result = tr.main([*argv, '--device', 'cpu', '--warmup_steps', '1', '--json', str(out)])
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert printed['num_train_images'] == len(cifar_py.train_labels) == 120
    assert len(printed['history']) == 1 and 0.0 <= printed['test_accuracy'] <= 1.0
