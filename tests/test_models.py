import pytest
import torch
import torch.fx

from vpsurgery.models import MODELS, default_input_shape, get_model, list_models


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_reference_network():
    assert list_models() == [
        "lenet300_100",
        "lenet5",
        "vgg16",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
    ]
    assert set(MODELS) == set(list_models())


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="resnet56"):
        get_model("resnet57")
    with pytest.raises(KeyError, match="lenet5"):
        default_input_shape("alexnet")


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name):
    model = get_model(name, num_classes=7).eval()
    x = torch.randn(2, *default_input_shape(name)[1:])
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_symbolic_trace_reproduces_output(name):
    torch.manual_seed(0)
    model = get_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *default_input_shape(name)[1:])
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_lenet300_100_accepts_images_and_flat_vectors():
    model = get_model("lenet300_100").eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), model(images.flatten(1)))


def test_vgg16_accepts_larger_inputs():
    model = get_model("vgg16").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    "name, expected",
    [
        # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet300_100", 266_610),
        # conv1 1*20*25+20=520, conv2 20*50*25+50=25,050, fc1 800*500+500=400,500, fc2 500*10+10=5,010
        ("lenet5", 431_080),
        # 13 bias-free convs 14,710,464 + BN 8,448 + Linear(512,512) 262,656 + Linear(512,10) 5,130
        ("vgg16", 14_986_698),
        # By hand, convs bias-free, BN = 2 params/channel:
        #   stem conv 3*16*9=432 + BN 32                                      =     464
        #   stage 1: 9 blocks * (2*16*16*9 + 2*32)                            =  42,048
        #   stage 2: first (16*32*9 + 32*32*9 + 16*32 + 3*64) = 14,528
        #            + 8 * (2*32*32*9 + 2*64) = 148,480                       = 163,008
        #   stage 3: first (32*64*9 + 64*64*9 + 32*64 + 3*128) = 57,728
        #            + 8 * (2*64*64*9 + 2*128) = 591,872                      = 649,600
        #   fc 64*10+10                                                       =     650
        # Total 855,770 = the usual option-A count 853,018 + the two projections (512+64, 2,048+128).
        ("resnet56", 855_770),
    ],
)
def test_canonical_parameter_counts(name, expected):
    assert count_params(get_model(name)) == expected


def test_resnet_depths_have_6n_plus_2_layers():
    for depth in (20, 32, 44, 56, 110):
        model = get_model(f"resnet{depth}")
        convs = [
            m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "downsample" not in name
        ]
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(convs) + len(linears) == depth


def test_resnet_uses_projection_only_where_shape_changes():
    model = get_model("resnet20")
    projected = [name for name, block in model.named_modules() if getattr(block, "downsample", None) is not None]
    assert projected == ["layer2.0", "layer3.0"]


def test_width_multiplier_scales_layers():
    half = get_model("lenet300_100", width=0.5)
    assert (half.fc1.out_features, half.fc2.out_features) == (150, 50)
    lenet5 = get_model("lenet5", width=0.5)
    assert (lenet5.conv1.out_channels, lenet5.conv2.out_channels, lenet5.fc1.out_features) == (10, 25, 250)
    resnet = get_model("resnet20", width=2.0)
    assert (resnet.conv1.out_channels, resnet.fc.in_features) == (32, 128)
    vgg = get_model("vgg16", width=0.25)
    assert vgg.features[0].out_channels == 16 and vgg.classifier[0].in_features == 128
    tiny = get_model("lenet5", width=0.01)  # rounds to zero, clamped to one channel
    assert tiny.conv1.out_channels == 1
    for name in list_models():
        assert count_params(get_model(name, width=0.5)) < count_params(get_model(name))


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="width"):
        get_model("resnet20", width=0)


def test_registry_metadata_sits_beside_each_builder():
    from vpsurgery.models import model_info
    from vpsurgery.models.registry import register

    info = model_info("lenet5")
    assert info.input_shape == (1, 1, 28, 28) and info.dataset == "MNIST"
    assert default_input_shape("resnet56") == (1, 3, 32, 32)
    assert isinstance(MODELS["vgg16"](num_classes=3), torch.nn.Module)
    with pytest.raises(ValueError, match="registered twice"):
        register(name="lenet5", input_shape=(1, 1), dataset="x", reference="y")(lambda: None)
    with pytest.raises(KeyError, match="valid names"):
        model_info("nope")
