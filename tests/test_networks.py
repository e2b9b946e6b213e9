"""Networks: shapes from the data, learned-variance and class-conditional outputs, spec errors."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.networks import MLP, NCSN, NoiseAwareClassifier, UNet
from tests.helpers import run_cli, write_spec


def test_unet_with_ho_et_al_cifar10_settings_has_their_35_7_million_parameters():
    unet = UNet(channels=128, channel_mult=[1, 2, 2, 2], res_blocks=2,
                attention_resolutions=[16], dropout=0.1, norm_groups=32, data_shape=(3, 32, 32))
    assert round(unet.parameter_count() / 1e6, 1) == 35.7
    assert unet.describe() == f"UNet with {unet.parameter_count():,} parameters"


@pytest.mark.parametrize("make", [
    lambda lv: UNet(channels=8, channel_mult=[1, 2], attention_resolutions=[4], heads=2,
                    learned_variance=lv, data_shape=(3, 8, 8)),
    lambda lv: MLP(width=16, blocks=2, embedding="fourier", learned_variance=lv,
                   data_shape=(5,)),
])
def test_output_has_the_data_shape_or_twice_its_channels_for_a_learned_variance(make):
    torch.manual_seed(0)
    for learned in (False, True):
        network = make(learned)
        shape = network.data_shape
        x = torch.randn(4, *shape)
        out = network(x, torch.rand(4))
        assert out.shape == (4, shape[0] * (2 if learned else 1), *shape[1:])
        assert network.learned_variance is learned


def test_attention_and_resolution_levels_change_the_function():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with_attn = UNet(channels=8, attention_resolutions=[8], data_shape=(1, 8, 8))
    for p in with_attn.parameters():  # zero-initialised outputs hide the blocks: wake them up
        torch.nn.init.normal_(p, std=0.2)
    base = with_attn(x, t)
    with_attn.down[0].attention[0].proj.weight.data.zero_()
    with_attn.down[0].attention[0].proj.bias.data.zero_()
    assert not torch.allclose(base, with_attn(x, t)), "attention at 8x8 contributes"


def test_class_conditional_network_uses_the_null_class_for_no_label():
    torch.manual_seed(0)
    net = MLP(width=16, blocks=1, num_classes=3, data_shape=(2,))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(4, 2), torch.rand(4)
    null = torch.full((4,), 3)
    torch.testing.assert_close(net(x, t), net(x, t, null))
    assert not torch.allclose(net(x, t), net(x, t, torch.zeros(4, dtype=torch.long)))
    net.classes.drop_prob = 1.0
    net.train()
    torch.testing.assert_close(net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t))


def test_noise_aware_classifier_gives_logits_for_images_and_vectors():
    torch.manual_seed(0)
    images = NoiseAwareClassifier(num_classes=10, channels=8, data_shape=(1, 8, 8))
    assert images(torch.randn(3, 1, 8, 8), torch.rand(3)).shape == (3, 10)
    vectors = NoiseAwareClassifier(num_classes=4, channels=8, data_shape=(2,))
    logits = vectors(torch.randn(3, 2), torch.rand(3))
    assert logits.shape == (3, 4)
    x = torch.randn(3, 2, requires_grad=True)  # guidance needs grad_x log p(y | x_t)
    log_p = torch.log_softmax(vectors(x, torch.rand(3)), -1)[:, 1].sum()
    assert torch.autograd.grad(log_p, x)[0].shape == (3, 2)


@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    (UNet, {"data_shape": (1, 6, 6), "channel_mult": [1, 2, 2]}, "divisible by 4"),
    (UNet, {"data_shape": (1, 8, 8), "attention_resolutions": [3]},
     "attention_resolutions: expected resolutions of this network's levels (they run at [8, 4] "
     "pixels), given [3]"),
    (UNet, {"data_shape": (1, 8, 8), "channels": 12}, "norm_groups: expected a divisor of every "
     "level's width (channels x channel_mult = [12, 24]), given 8"),
    (UNet, {"data_shape": (1, 8, 8), "channels": 8, "heads": 3}, "heads: expected a divisor of "
     "every level's width ([8, 16]), given 3"),
    (UNet, {"data_shape": (2,)}, "image data"),
    (MLP, {"data_shape": (1, 8, 8)}, "vector data"),
    (NCSN, {"data_shape": (2,)}, "image data"),
    (NoiseAwareClassifier, {"data_shape": (1, 2, 3, 4)}, "images"),
])
def test_a_wrong_shape_is_a_clear_value_error(factory, kwargs, message):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    assert message in str(info.value)


def test_a_network_that_does_not_fit_the_data_is_a_spec_error_with_its_line(tmp_path, capsys):
    spec = write_spec(tmp_path).read_text().replace(
        "network: {kind: ncsn, channels: 8, blocks: 1}", "network: {kind: mlp, width: 8}")
    path = tmp_path / "bad.yaml"
    path.write_text(spec)
    code, _, err = run_cli(["run", str(path)], capsys)
    text = " ".join(err.split())
    assert code == 2
    assert f"{path}:10 network" in text and "vector data" in text
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
