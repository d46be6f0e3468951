"""Every config file in configs/ loads and says what its comment says it repeats."""

from pathlib import Path

from moeless_jax.config import load_config
from moeless_jax.demo import ModelDemoConfig
from moeless_jax.layer_demo import DemoConfig
from moeless_jax.model.train import TrainConfig
from moeless_jax.replication import ControllerConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_configs_repeat_the_embedded_defaults():
    assert load_config(ModelDemoConfig, CONFIGS / "demo.yaml") == ModelDemoConfig()
    assert load_config(DemoConfig, CONFIGS / "demo_layer.yaml") == DemoConfig()


def test_train_and_controller_configs_load():
    for name in ("mixtral_tiny", "deepseek_tiny"):
        config = load_config(TrainConfig, CONFIGS / f"train_{name}.yaml")
        assert config.model == name and config.model_config().moe.split == "balanced"
    controller = load_config(ControllerConfig, CONFIGS / "controller.yaml")
    assert controller.policy == "moeless" and controller.split == "balanced"


def test_layer_ahead_config_repeats_the_defaults():
    from moeless_jax.replication import LayerAheadConfig

    loaded = load_config(LayerAheadConfig, CONFIGS / "layer_ahead.yaml", section="layer_ahead")
    assert loaded == LayerAheadConfig()
