"""BilayerConfig: the one typed description of a bi-layer model's architecture.

Defaults are the released configuration (official_bilayer.md section 2.0). Every layer count and
channel width is *derived* from these numbers with the official rules (number of up/down blocks =
log2(image_size / tensor_size); channels = min(min_channels * 2**i, max_channels)), so a smaller
image_size or fewer channels gives a consistent smaller model. Networks never see this object:
``Bilayer`` turns it into explicit constructor arguments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

NUM_KEYPOINTS = 68


def _log2_exact(numerator: int, denominator: int, what: str) -> int:
    ratio = numerator // denominator
    if denominator <= 0 or numerator % denominator or ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f"{what}: {numerator} / {denominator} must be a power of two >= 1")
    return int(math.log2(ratio))


def _width(min_channels: int, exponent: int, max_channels: int) -> int:
    return min(int(min_channels * 2**exponent), max_channels)


@dataclass(frozen=True)
class ProjectorBlockSpec:
    """How one projector block turns a (C_emb, 8, 8) embedding into rows of adaptive parameters."""

    embed_channels: int  # channels of the identity embedding that feeds this block
    pool_size: int  # embedding is average-pooled (or replicated) to pool_size x pool_size
    rows: int  # number of rows = output channels of the generator block
    row_length: int  # values per row = pool_size**2 * embed_channels / rows
    hidden: int  # width of the two hidden Linear layers of every head
    head_widths: tuple[int, ...]  # K + 1 per head: K weights and one bias per row


@dataclass(frozen=True)
class GeneratorSpec:
    """Channel plan of a 6-block (at 256) up-sampling generator."""

    input_channels: int
    block_in: tuple[int, ...]
    block_out: tuple[int, ...]
    input_size: int  # spatial size of the generator input


@dataclass
class BilayerConfig:
    """Architecture of the bi-layer model. Defaults: the released ``vc2-hq_adrianb_paper`` run."""

    image_size: int = 256
    # identity embedder (emb_*)
    embedder_min_channels: int = 64
    embedder_max_channels: int = 512
    embedder_output_size: int = 8
    # texture generator (tex_*)
    texture_min_channels: int = 64
    texture_max_channels: int = 512
    texture_input_size: int = 4
    # inference generator (inf_*)
    inference_min_channels: int = 32
    inference_max_channels: int = 256
    inference_input_size: int = 4
    # keypoints embedder (pse_*)
    keypoints_hidden_channels: int = 256
    keypoints_num_layers: int = 4
    harmonic_encoding: bool = False  # True gives the 1088-input MLP of the literal training flags
    num_harmonics: int = 4
    # texture enhancer (enh_*)
    enhancer_min_channels: int = 64
    enhancer_max_channels: int = 128
    enhancer_bottleneck_size: int = 128
    enhancer_num_blocks: int = 8
    enhancer_unrolling_depth: int = 4
    # discriminator (dis_*)
    discriminator_min_channels: int = 64
    discriminator_max_channels: int = 512
    discriminator_output_size: int = 8
    discriminator_num_blocks: int = 6
    # shared
    projector_bottleneck: int = 1024  # official Projector(bottleneck_size=1024)
    eps: float = 1e-7  # BatchNorm and spectral-norm epsilon
    # which optional networks the model has
    texture_enhancer: bool = True
    discriminator: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, image_size: int = 64, **overrides) -> "BilayerConfig":
        """A small but structurally complete model for tests and quick training (64 or 128 px)."""
        num_down = _log2_exact(image_size, 8, "tiny image_size / 8")
        values = dict(
            image_size=image_size,
            embedder_min_channels=16,
            embedder_max_channels=128,
            texture_min_channels=16,
            texture_max_channels=128,
            inference_min_channels=8,
            inference_max_channels=64,
            keypoints_hidden_channels=64,
            enhancer_min_channels=16,
            enhancer_max_channels=32,
            enhancer_bottleneck_size=image_size // 2,
            enhancer_num_blocks=2,
            discriminator_min_channels=16,
            discriminator_max_channels=128,
            discriminator_num_blocks=num_down + 1,
        )
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"BilayerConfig.{f.name} must be a positive int, got {value!r}")
        if not (isinstance(self.eps, float) and 0 < self.eps < 1):
            raise ValueError(f"BilayerConfig.eps must be a float in (0, 1), got {self.eps!r}")
        if self.texture_input_size != self.inference_input_size:
            raise ValueError(
                "BilayerConfig: texture_input_size and inference_input_size must be equal "
                "(both generators are driven by the same identity embeddings, one per block)"
            )
        self.num_generator_blocks  # noqa: B018 - validates the ratios
        self.num_embedder_down_blocks  # noqa: B018
        tex, inf = self.texture_generator_spec(), self.inference_generator_spec()
        if tex.input_channels != tex.block_in[0]:
            raise ValueError(
                f"BilayerConfig: texture generator input has {tex.input_channels} channels "
                f"(texture_max_channels) but its first block expects {tex.block_in[0]}"
            )
        if inf.input_channels != inf.block_in[0]:
            raise ValueError(
                f"BilayerConfig: keypoint embedding has {inf.input_channels} channels "
                f"(inference_max_channels) but the inference generator expects {inf.block_in[0]}"
            )
        for name in ("texture", "inference"):
            gen = tex if name == "texture" else inf
            for j, block in enumerate(self.projector_spec(name)):
                if block.rows != gen.block_out[j]:
                    raise ValueError(
                        f"BilayerConfig: {name} projector block {j} predicts {block.rows} rows but "
                        f"generator block {j} has {gen.block_out[j]} channels; adjust the channel widths"
                    )
        if self.texture_enhancer:
            self.num_enhancer_down_blocks  # noqa: B018
        if self.discriminator:
            down = self.num_discriminator_down_blocks
            if self.discriminator_num_blocks < down:
                raise ValueError(
                    f"BilayerConfig.discriminator_num_blocks ({self.discriminator_num_blocks}) must be >= "
                    f"the number of down-sampling blocks ({down})"
                )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BilayerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"BilayerConfig: unknown field(s) {unknown}")
        return cls(**values)

    # ------------------------------------------------------------------ derived architecture
    @property
    def num_generator_blocks(self) -> int:
        return _log2_exact(self.image_size, self.texture_input_size, "image_size / texture_input_size")

    @property
    def num_embedder_down_blocks(self) -> int:
        return _log2_exact(self.image_size, self.embedder_output_size, "image_size / embedder_output_size")

    @property
    def num_enhancer_down_blocks(self) -> int:
        return _log2_exact(self.image_size, self.enhancer_bottleneck_size, "image_size / enhancer_bottleneck_size")

    @property
    def num_discriminator_down_blocks(self) -> int:
        return _log2_exact(self.image_size, self.discriminator_output_size, "image_size / discriminator_output_size")

    def embedder_encoder_channels(self) -> list[int]:
        """Output channels of enc.0 and of each down block enc.1..enc.n."""
        n = self.num_embedder_down_blocks
        mn, mx = self.embedder_min_channels, self.embedder_max_channels
        return [mn] + [_width(mn, i, mx) for i in range(1, n + 1)]

    def embedding_channels(self) -> list[int]:
        """Channels of the identity embeddings, one per generator block (official: tex_* widths)."""
        n = self.num_generator_blocks
        return [_width(self.texture_min_channels, i, self.texture_max_channels) for i in range(n - 1, -1, -1)]

    def _generator_spec(self, min_channels: int, max_channels: int, input_channels: int) -> GeneratorSpec:
        n = self.num_generator_blocks
        widths = [_width(min_channels, i, max_channels) for i in range(n, -1, -1)]
        return GeneratorSpec(input_channels, tuple(widths[:-1]), tuple(widths[1:]), self.texture_input_size)

    def texture_generator_spec(self) -> GeneratorSpec:
        return self._generator_spec(self.texture_min_channels, self.texture_max_channels, self.texture_max_channels)

    def inference_generator_spec(self) -> GeneratorSpec:
        return self._generator_spec(
            self.inference_min_channels, self.inference_max_channels, self.inference_max_channels
        )

    def projector_spec(self, generator: str) -> list[ProjectorBlockSpec]:
        """Official Projector sizing: hidden width from the embedder widths, pool size from the ratio
        of the generator's input width to it, rows = generator output channels of the block."""
        if generator == "texture":
            gen, mn, mx = self.texture_generator_spec(), self.texture_min_channels, self.texture_max_channels
        elif generator == "inference":
            gen, mn, mx = self.inference_generator_spec(), self.inference_min_channels, self.inference_max_channels
        else:
            raise ValueError(f"projector_spec: generator must be 'texture' or 'inference', got {generator!r}")
        n = self.num_generator_blocks
        embeds = self.embedding_channels()
        blocks = []
        for j in range(n):
            i = n - j
            hidden = _width(self.embedder_min_channels, i, self.embedder_max_channels)
            block_in = _width(mn, i, mx)
            mult = block_in / float(hidden)
            pool = int(self.projector_bottleneck**0.5 * mult)
            rows = int(embeds[j] * mult)
            total = embeds[j] * pool * pool
            if pool < 1 or rows < 1 or total % rows:
                raise ValueError(
                    f"BilayerConfig: {generator} projector block {j} cannot split a {embeds[j]}x{pool}x{pool} "
                    f"embedding into {rows} rows"
                )
            c_out, c_in = gen.block_out[j], gen.block_in[j]
            if generator == "texture":
                heads = (c_out + 1, c_out + 1, c_in + 1, c_out + 1, c_out + 1)
            else:
                heads = (2, c_in + 1, 2)
            blocks.append(ProjectorBlockSpec(embeds[j], pool, rows, total // rows, hidden, heads))
        return blocks


__all__ = ["BilayerConfig", "GeneratorSpec", "ProjectorBlockSpec", "NUM_KEYPOINTS"]
