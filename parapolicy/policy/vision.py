"""Vision encoders for image-conditioned Diffusion Policies, in plain torch.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample.0``, ``fc``) and
robomimic (``VisualCore.nets``, ``SpatialSoftmax.nets``, ``pos_x``) so that state dicts of Diffusion Policy
and robomimic checkpoints load by name: torchvision's own wheel does not import beside every torch build,
and nothing here needs it.

- :func:`resnet18`: ResNet-18, with batch norm or Diffusion Policy's GroupNorm replacement
  (``num_groups = channels // 16``).
- :class:`SpatialSoftmax`: robomimic's keypoint pooling: a 1x1 conv to K maps, softmax over pixels,
  the expected (x, y) of each map in [-1, 1].
- :class:`CropRandomizer`: a random crop per image in training, the centre crop in eval.
- :class:`VisualCore`: robomimic's per-camera encoder ``backbone -> SpatialSoftmax -> Flatten -> Linear``.
- :class:`ConvTrunk`: a small conv trunk sized for a CPU (our own image policies).
- :class:`MultiImageObsEncoder`: Diffusion Policy's encoder for its ResNet image policy: resize, crop,
  ImageNet normalisation, one model per camera or one shared, low-dim keys appended.
- :class:`ImageObsEncoder`: what a parapolicy image policy conditions on: per camera crop + VisualCore,
  then the normalised low-dim vector, per observation step (:class:`DPImageObsEncoder`: the same call
  around DP's MultiImageObsEncoder, for imported ResNet image policies).
- :class:`LeRobotRgbEncoder` / :class:`LeRobotObsEncoder`: LeRobot's ``DiffusionRgbEncoder`` (resize, crop,
  ResNet-18 trunk, SpatialSoftmax, Linear + ReLU) under LeRobot's module names, and its global
  conditioning (dataset-normalised images, state first), for imported LeRobot image policies.

Images enter every encoder as float ``[N, 3, H, W]`` in [-1, 1] (Diffusion Policy's image range
normaliser maps [0, 1] there; the policy does that conversion from uint8).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- ResNet
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # Diffusion Policy's replace_bn_with_gn: 16 channels per group
        return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with a residual; ``downsample`` (1x1 conv + norm) when the shape changes."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), _norm(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (``conv1 bn1 relu maxpool layer1..4 avgpool fc``).

    ``num_classes=None`` replaces ``fc`` by an identity (Diffusion Policy's ``get_resnet``): the output is
    the pooled 512-dim feature. ``trunk()`` gives the conv layers only (robomimic's ``ResNet18Conv``).
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int | None = 1000, norm: str = "batch",
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = _norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels, blocks = 64, []
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(channels, width, stride, norm)] + [BasicBlock(width, width, 1, norm) for _ in range(count - 1)]
            blocks.append(nn.Sequential(*stage))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes) if num_classes else nn.Identity()
        self.out_channels = 512
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def trunk(self) -> nn.Sequential:
        """The conv layers (no pooling, no fc), sharing this network's modules: ``[N, 3, H, W] -> [N, 512, H/32, W/32]``."""
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int | None = 1000, norm: str = "batch") -> ResNet:
    """ResNet-18: 11,689,512 parameters with the 1000-class fc, 11,176,512 without (either norm)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, norm=norm)


def trunk_output_shape(input_shape: Sequence[int]) -> list[int]:
    """``[C, H, W]`` -> the ResNet-18 trunk's ``[512, ceil(H / 32), ceil(W / 32)]`` (five stride-2 stages)."""
    _, h, w = input_shape
    return [512, math.ceil(h / 32), math.ceil(w / 32)]


class ResNet18Conv(nn.Module):
    """robomimic's ``ResNet18Conv``: ResNet-18 without avgpool and fc, as ``nets`` (a Sequential whose
    children are ``conv1 bn1 relu maxpool layer1..4``, named ``nets.0`` ... ``nets.7``)."""

    def __init__(self, norm: str = "group", in_channels: int = 3):
        super().__init__()
        self.nets = ResNet((2, 2, 2, 2), num_classes=None, norm=norm, in_channels=in_channels).trunk()

    def output_shape(self, input_shape: Sequence[int]) -> list[int]:
        return trunk_output_shape(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets(x)


# --------------------------------------------------------------------------------------- small trunk
class ConvTrunk(nn.Module):
    """A small conv trunk for a CPU: 3x3 conv + GroupNorm + ReLU per entry of ``channels``, with
    ``strides``: ``[N, 3, H, W] -> [N, channels[-1], H / prod(strides), W / prod(strides)]`` (rounded up).

    Our image policies' default, (32, 64, 64) with strides (2, 2, 1) on 38x38 crops, has 56k parameters
    and gives 10x10 maps to the spatial softmax.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64), strides: Sequence[int] = (2, 2, 1), in_channels: int = 3,
                 groups: int = 8):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} differ in length")
        layers, previous = [], in_channels
        for width, stride in zip(channels, strides):
            layers += [nn.Conv2d(previous, width, 3, stride, 1, bias=False), nn.GroupNorm(groups, width), nn.ReLU(inplace=True)]
            previous = width
        self.nets = nn.Sequential(*layers)
        self.out_channels = previous
        self.strides = [int(s) for s in strides]

    def output_shape(self, input_shape: Sequence[int]) -> list[int]:
        _, h, w = input_shape
        for stride in self.strides:
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        return [self.out_channels, h, w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets(x)


# ------------------------------------------------------------------------------------ spatial softmax
class SpatialSoftmax(nn.Module):
    """robomimic's spatial softmax: ``[N, C, H, W] -> [N, K, 2]``, the expected (x, y) of K keypoint maps.

    A 1x1 conv (``nets``) maps C channels to K = ``num_kp`` maps (none if ``num_kp`` is None: K = C);
    each map's softmax over its H*W pixels (divided by ``temperature``) weighs the pixel coordinates,
    x along the width and y along the height, both from -1 to 1.
    """

    def __init__(self, input_shape: Sequence[int], num_kp: int | None = 32, temperature: float = 1.0,
                 learnable_temperature: bool = False):
        super().__init__()
        channels, self._in_h, self._in_w = (int(v) for v in input_shape)
        if num_kp is not None:
            self.nets = nn.Conv2d(channels, num_kp, kernel_size=1)
            self._num_kp = int(num_kp)
        else:
            self.nets = None
            self._num_kp = channels
        temperature = torch.ones(1) * temperature
        if learnable_temperature:
            self.temperature = nn.Parameter(temperature)
        else:
            self.register_buffer("temperature", temperature)
        pos_y, pos_x = torch.meshgrid(torch.linspace(-1.0, 1.0, self._in_h), torch.linspace(-1.0, 1.0, self._in_w),
                                      indexing="ij")
        self.register_buffer("pos_x", pos_x.reshape(1, -1).float().clone())  # own memory: meshgrid gives expanded views
        self.register_buffer("pos_y", pos_y.reshape(1, -1).float().clone())

    def output_shape(self, input_shape: Sequence[int] | None = None) -> list[int]:
        return [self._num_kp, 2]

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if tuple(feature.shape[2:]) != (self._in_h, self._in_w):
            raise ValueError(f"SpatialSoftmax built for {self._in_h}x{self._in_w} maps, got {list(feature.shape[2:])}")
        if self.nets is not None:
            feature = self.nets(feature)
        attention = F.softmax(feature.reshape(-1, self._in_h * self._in_w) / self.temperature, dim=-1)
        expected_x = torch.sum(self.pos_x * attention, dim=1, keepdim=True)
        expected_y = torch.sum(self.pos_y * attention, dim=1, keepdim=True)
        return torch.cat([expected_x, expected_y], dim=1).view(-1, self._num_kp, 2)


# ----------------------------------------------------------------------------------------------- crop
class CropRandomizer(nn.Module):
    """``[N, C, H, W] -> [N, C, crop_h, crop_w]``: an independent random crop per image in training
    (``generator`` optional, for reproducible training), the centre crop in eval. ``centre``: where an
    odd margin puts the extra row: ``"floor"`` top = (H - crop_h) // 2 (robomimic's), ``"round"`` top =
    round((H - crop_h) / 2), halves to even (torchvision's ``CenterCrop``, so LeRobot's)."""

    def __init__(self, input_shape: Sequence[int], crop_height: int, crop_width: int, centre: str = "floor"):
        super().__init__()
        _, self.height, self.width = (int(v) for v in input_shape)
        if not (0 < crop_height <= self.height and 0 < crop_width <= self.width):
            raise ValueError(f"crop {crop_height}x{crop_width} does not fit in {self.height}x{self.width}")
        if centre not in ("floor", "round"):
            raise ValueError(f"centre must be 'floor' or 'round', got {centre!r}")
        self.crop_height, self.crop_width = int(crop_height), int(crop_width)
        self.centre = centre
        self.generator: torch.Generator | None = None

    def output_shape(self, input_shape: Sequence[int]) -> list[int]:
        return [int(input_shape[0]), self.crop_height, self.crop_width]

    def centre_crop(self, images: torch.Tensor) -> torch.Tensor:
        h, w = int(images.shape[-2]), int(images.shape[-1])  # plain ints under torch.jit.trace too
        if self.centre == "round":
            top, left = int(round((h - self.crop_height) / 2.0)), int(round((w - self.crop_width) / 2.0))
        else:
            top, left = (h - self.crop_height) // 2, (w - self.crop_width) // 2
        return images[:, :, top:top + self.crop_height, left:left + self.crop_width]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        if (h, w) != (self.height, self.width):
            raise ValueError(f"CropRandomizer built for {self.height}x{self.width} images, got {h}x{w}")
        if not self.training:
            return self.centre_crop(images)
        gen_device = self.generator.device if self.generator is not None else "cpu"
        tops = torch.randint(0, h - self.crop_height + 1, (n,), generator=self.generator, device=gen_device).to(images.device)
        lefts = torch.randint(0, w - self.crop_width + 1, (n,), generator=self.generator, device=gen_device).to(images.device)
        rows = (tops[:, None] + torch.arange(self.crop_height, device=images.device))  # [N, crop_h]
        cols = (lefts[:, None] + torch.arange(self.crop_width, device=images.device))  # [N, crop_w]
        index = torch.arange(n, device=images.device)[:, None, None]
        crops = images.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [N, crop_h, crop_w, C]
        return crops.permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------------- encoders
class VisualCore(nn.Module):
    """robomimic's ``VisualCore``: ``nets = Sequential(backbone, pool, Flatten, Linear)`` -> ``[N, feature_dim]``.

    robomimic also registers the backbone as ``backbone``, so its (and Diffusion Policy's) state dicts
    hold it twice, ``backbone.nets.*`` and ``nets.0.nets.*``; here ``backbone`` and ``pool`` are views
    of ``nets`` and each weight is stored once (safetensors refuses shared tensors).
    """

    def __init__(self, input_shape: Sequence[int], backbone: nn.Module, num_kp: int | None = 32,
                 feature_dim: int = 64, temperature: float = 1.0):
        super().__init__()
        self.input_shape = list(input_shape)
        feature_shape = backbone.output_shape(input_shape)
        pool = SpatialSoftmax(feature_shape, num_kp=num_kp, temperature=temperature)
        flat = int(math.prod(pool.output_shape()))
        layers = [backbone, pool, nn.Flatten(start_dim=1, end_dim=-1)]
        if feature_dim:
            layers.append(nn.Linear(flat, feature_dim))
        self.feature_dim = int(feature_dim or flat)
        self.nets = nn.Sequential(*layers)

    @property
    def backbone(self) -> nn.Module:
        return self.nets[0]

    @property
    def pool(self) -> SpatialSoftmax:
        return self.nets[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.nets(images)


def make_backbone(kind: str, **kwargs) -> nn.Module:
    """``resnet18`` (robomimic's ResNet18Conv, GroupNorm) or ``conv`` (:class:`ConvTrunk`)."""
    if kind == "resnet18":
        return ResNet18Conv(norm=kwargs.get("norm", "group"))
    if kind == "conv":
        return ConvTrunk(tuple(kwargs.get("channels", (32, 64, 64))), tuple(kwargs.get("strides", (2, 2, 1))))
    raise ValueError(f"unknown vision backbone {kind!r}; known: conv, resnet18")


class ImageObsEncoder(nn.Module):
    """A parapolicy image policy's observation encoder (robomimic-style, one VisualCore per camera).

    ``forward(images, low_dim)``: ``images`` maps each of ``image_keys`` to float ``[N, 3, H, W]`` in
    [-1, 1] (resized to ``resize_shape`` first, if given: a cheaper policy sees fewer pixels); ``low_dim`` is the normalised low-dim vector ``[N, low_dim]``. Returns ``[N, output_dim]``:
    the cameras' features in ``image_keys`` order, then ``low_dim``. N = batch * observation steps.
    Crops are random in ``train()``, centred in ``eval()``. ``feature_activation="relu"``: each camera's
    feature goes through a ReLU (robomimic's ObservationEncoder default, so Diffusion Policy's hybrid
    image policy too).
    """

    def __init__(self, image_keys: Sequence[str], image_shape: Sequence[int], low_dim: int, backbone: str = "conv",
                 crop_shape: Sequence[int] | None = (76, 76), num_kp: int = 32, feature_dim: int = 64,
                 backbone_kwargs: Mapping | None = None, resize_shape: Sequence[int] | None = None,
                 feature_activation: str | None = None):
        super().__init__()
        self.image_keys = list(image_keys)
        self.image_shape = [int(v) for v in image_shape]
        self.low_dim = int(low_dim)
        self.resize_shape = tuple(int(v) for v in resize_shape) if resize_shape else None
        self.crops = nn.ModuleDict()
        self.obs_nets = nn.ModuleDict()
        for key in self.image_keys:
            shape = self.image_shape
            if self.resize_shape is not None:
                shape = [shape[0], *self.resize_shape]
            if crop_shape is not None:
                self.crops[key] = CropRandomizer(shape, *crop_shape)
                shape = self.crops[key].output_shape(shape)
            self.obs_nets[key] = VisualCore(shape, make_backbone(backbone, **dict(backbone_kwargs or {})),
                                            num_kp=num_kp, feature_dim=feature_dim)
        self.output_dim = sum(net.feature_dim for net in self.obs_nets.values()) + self.low_dim
        if feature_activation not in (None, "relu"):
            raise ValueError(f"feature_activation must be null or 'relu', got {feature_activation!r}")
        self.feature_activation = feature_activation  # robomimic's ObservationEncoder applies a ReLU

    def forward(self, images: Mapping[str, torch.Tensor], low_dim: torch.Tensor | None = None) -> torch.Tensor:
        features = []
        for key in self.image_keys:
            x = images[key]
            if self.resize_shape is not None and tuple(x.shape[-2:]) != self.resize_shape:
                x = F.interpolate(x, size=self.resize_shape, mode="bilinear", align_corners=False, antialias=True)
            if key in self.crops:
                x = self.crops[key](x)
            feature = self.obs_nets[key](x)
            features.append(F.relu(feature) if self.feature_activation == "relu" else feature)
        if self.low_dim:
            features.append(low_dim)
        return torch.cat(features, dim=-1)


class MultiImageObsEncoder(nn.Module):
    """Diffusion Policy's ``MultiImageObsEncoder`` (its ResNet image policy's encoder).

    For every rgb key (sorted by name): optional resize to ``resize_shape``, crop to ``crop_shape``
    (``random_crop``: random in training, centred in eval), optional ImageNet normalisation, then the
    key's model (``key_model_map.<key>``; one ``key_model_map.rgb`` if ``share_rgb_model``). Low-dim keys
    (sorted) follow as they are. ``rgb_model``: e.g. ``resnet18(num_classes=None, norm="group")``, whose
    output is its pooled 512-dim feature. Returns ``[N, sum of features]``.

    As in Diffusion Policy's code, ``random_crop=False`` crops nothing (DP builds a centre crop there but
    assigns it to the normaliser slot, which the next line replaces), so imported policies plan alike.
    """

    def __init__(self, shape_meta: Mapping[str, Mapping], rgb_model: nn.Module | Mapping[str, nn.Module],
                 resize_shape: Sequence[int] | Mapping | None = None, crop_shape: Sequence[int] | Mapping | None = None,
                 random_crop: bool = True, share_rgb_model: bool = False, imagenet_norm: bool = False):
        super().__init__()
        import copy

        self.rgb_keys, self.low_dim_keys = [], []
        self.key_model_map = nn.ModuleDict()
        self.key_shape_map: dict[str, tuple[int, ...]] = {}
        self.share_rgb_model = bool(share_rgb_model)
        self.imagenet_norm = bool(imagenet_norm)
        self.resize: dict[str, tuple[int, int] | None] = {}
        self.crops = nn.ModuleDict()
        if self.share_rgb_model:
            self.key_model_map["rgb"] = rgb_model
        for key, attr in shape_meta.items():
            shape = tuple(int(v) for v in attr["shape"])
            kind = attr.get("type", "low_dim")
            self.key_shape_map[key] = shape
            if kind == "rgb":
                self.rgb_keys.append(key)
                if not self.share_rgb_model:
                    model = rgb_model[key] if isinstance(rgb_model, Mapping) else copy.deepcopy(rgb_model)
                    self.key_model_map[key] = model
                size = _per_key(resize_shape, key)
                self.resize[key] = tuple(size) if size is not None else None
                if size is not None:
                    shape = (shape[0], *size)
                crop = _per_key(crop_shape, key)
                if crop is not None and random_crop:
                    self.crops[key] = CropRandomizer(shape, *crop)
            elif kind == "low_dim":
                self.low_dim_keys.append(key)
            else:
                raise ValueError(f"unsupported obs type {kind!r} for key {key!r}")
        self.rgb_keys.sort()
        self.low_dim_keys.sort()
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def _prepare(self, key: str, image: torch.Tensor) -> torch.Tensor:
        size = self.resize[key]
        if size is not None:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        if key in self.crops:
            image = self.crops[key](image)
        if self.imagenet_norm:
            image = (image - self.imagenet_mean) / self.imagenet_std
        return image

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = next(iter(obs.values())).shape[0]
        features = []
        if self.share_rgb_model:
            images = torch.cat([self._prepare(key, obs[key]) for key in self.rgb_keys], dim=0)  # [K*N, 3, h, w]
            feature = self.key_model_map["rgb"](images)  # [K*N, D]
            features.append(feature.reshape(len(self.rgb_keys), batch, -1).transpose(0, 1).reshape(batch, -1))
        else:
            features += [self.key_model_map[key](self._prepare(key, obs[key])) for key in self.rgb_keys]
        features += [obs[key].reshape(batch, -1) for key in self.low_dim_keys]
        return torch.cat(features, dim=-1)


class DPImageObsEncoder(MultiImageObsEncoder):
    """Diffusion Policy's ResNet image encoder as a parapolicy image policy's ``obs_encoder``: the same
    modules and state-dict names (``key_model_map.<key>.conv1.weight``, ...), called as
    ``forward(images, low_dim)``. ``low_dim`` ``[N, sum(low_dim_dims)]`` holds ``low_dim_keys`` in that
    order; the output, like DP's, is the rgb features by sorted key, then the low-dim keys sorted.
    """

    def __init__(self, image_keys: Sequence[str], image_shape: Sequence[int], low_dim_keys: Sequence[str],
                 low_dim_dims: Sequence[int], norm: str = "group", crop_shape: Sequence[int] | None = (76, 76),
                 random_crop: bool = True, share_rgb_model: bool = False, imagenet_norm: bool = True,
                 feature_dim: int = 512):
        shape_meta = {key: {"shape": list(image_shape), "type": "rgb"} for key in image_keys}
        shape_meta.update({key: {"shape": [int(dim)], "type": "low_dim"} for key, dim in zip(low_dim_keys, low_dim_dims)})
        super().__init__(shape_meta, resnet18(num_classes=None, norm=norm), crop_shape=crop_shape,
                         random_crop=random_crop, share_rgb_model=share_rgb_model, imagenet_norm=imagenet_norm)
        self.low_dim_split = (list(low_dim_keys), [int(dim) for dim in low_dim_dims])
        self.output_dim = feature_dim * len(self.rgb_keys) + sum(self.low_dim_split[1])

    def forward(self, images: Mapping[str, torch.Tensor], low_dim: torch.Tensor | None = None) -> torch.Tensor:
        obs = dict(images)
        keys, dims = self.low_dim_split
        if keys:
            obs.update(zip(keys, torch.split(low_dim, dims, dim=-1)))
        return super().forward(obs)


class LeRobotRgbEncoder(nn.Module):
    """LeRobot's ``DiffusionRgbEncoder`` under its module names: ``[N, 3, H, W]`` (dataset-normalised)
    -> ``[N, 2 * num_kp]``.

    Optional resize to ``resize_shape`` (bilinear, antialiased: torchvision's ``Resize`` on tensors; none
    when the size already matches), optional crop to ``crop_shape`` (random in training when
    ``crop_is_random``, else and in eval the centre, rounded as torchvision's ``CenterCrop``), then
    ``backbone`` (ResNet-18 without avgpool and fc, children ``0..7``; ``norm="group"`` for
    ``use_group_norm``), ``pool`` (SpatialSoftmax, ``num_kp`` keypoints), flatten, ``out`` (Linear 2K ->
    2K) and a ReLU.
    """

    def __init__(self, input_shape: Sequence[int], num_kp: int = 32, norm: str = "batch",
                 resize_shape: Sequence[int] | None = None, crop_shape: Sequence[int] | None = None,
                 crop_is_random: bool = True):
        super().__init__()
        shape = [int(v) for v in input_shape]
        self.resize_shape = tuple(int(v) for v in resize_shape) if resize_shape else None
        if self.resize_shape is not None:
            shape = [shape[0], *self.resize_shape]
        self.crop = CropRandomizer(shape, *crop_shape, centre="round") if crop_shape else None
        if self.crop is not None:
            shape = self.crop.output_shape(shape)
        self.crop_is_random = bool(crop_is_random)
        self.backbone = ResNet((2, 2, 2, 2), num_classes=None, norm=norm, in_channels=shape[0]).trunk()
        self.pool = SpatialSoftmax(trunk_output_shape(shape), num_kp=num_kp)
        self.feature_dim = 2 * int(num_kp)
        self.out = nn.Linear(self.feature_dim, self.feature_dim)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_shape is not None and tuple(x.shape[-2:]) != self.resize_shape:
            x = F.interpolate(x, size=self.resize_shape, mode="bilinear", align_corners=False, antialias=True)
        if self.crop is not None:
            x = self.crop(x) if self.training and self.crop_is_random else self.crop.centre_crop(x)
        return self.relu(self.out(torch.flatten(self.pool(self.backbone(x)), start_dim=1)))


class LeRobotObsEncoder(nn.Module):
    """A LeRobot image DiffusionPolicy's global conditioning per observation step, as a parapolicy
    image policy's ``obs_encoder``: ``forward(images, low_dim) -> [N, output_dim]``.

    ``images``: {key: ``[N, 3, H, W]`` in [-1, 1]} (the policy's range); each camera is mapped back to
    [0, 1] and normalised with its dataset statistics as LeRobot's preprocessor does, ``(x - shift) /
    scale + offset`` per channel (MEAN_STD: mean, std + eps, 0; MIN_MAX: min, (max - min) / 2, -1;
    IDENTITY: 0, 1, 0), held in the buffers ``image_shift`` / ``image_scale`` / ``image_offset`` ``[cameras,
    3, 1, 1]``. ``rgb_encoder``: one :class:`LeRobotRgbEncoder` per camera (a ``ModuleList``,
    ``separate_encoders``) or one shared by all. ``low_dim`` ``[N, state_dim + env_dim]`` is the
    normalised state then environment state; the output is LeRobot's order: state, the cameras'
    features in ``image_keys`` order, environment state.
    """

    def __init__(self, image_keys: Sequence[str], image_shape: Sequence[int], low_dim: int, state_dim: int,
                 num_kp: int = 32, norm: str = "batch", resize_shape: Sequence[int] | None = None,
                 crop_shape: Sequence[int] | None = None, crop_is_random: bool = True,
                 separate_encoders: bool = True, feature_dim: int | None = None):
        super().__init__()
        self.image_keys = list(image_keys)
        self.low_dim, self.state_dim = int(low_dim), int(state_dim)
        if not 0 <= self.state_dim <= self.low_dim:
            raise ValueError(f"state_dim {state_dim} must be within the low-dim vector's {low_dim}")
        options = dict(num_kp=num_kp, norm=norm, resize_shape=resize_shape, crop_shape=crop_shape,
                       crop_is_random=crop_is_random)
        self.separate_encoders = bool(separate_encoders)
        if self.separate_encoders:
            self.rgb_encoder = nn.ModuleList(LeRobotRgbEncoder(image_shape, **options) for _ in self.image_keys)
        else:
            self.rgb_encoder = LeRobotRgbEncoder(image_shape, **options)
        self.feature_dim = 2 * int(num_kp)
        if feature_dim is not None and int(feature_dim) != self.feature_dim:
            raise ValueError(f"feature_dim {feature_dim} != 2 * num_kp = {self.feature_dim}")
        self.output_dim = self.feature_dim * len(self.image_keys) + self.low_dim
        cameras = len(self.image_keys)
        self.register_buffer("image_shift", torch.zeros(cameras, 3, 1, 1))
        self.register_buffer("image_scale", torch.ones(cameras, 3, 1, 1))
        self.register_buffer("image_offset", torch.zeros(cameras, 1, 1, 1))

    def forward(self, images: Mapping[str, torch.Tensor], low_dim: torch.Tensor | None = None) -> torch.Tensor:
        frames = [((images[key] + 1.0) / 2.0 - self.image_shift[i]) / self.image_scale[i] + self.image_offset[i]
                  for i, key in enumerate(self.image_keys)]
        if self.separate_encoders:
            features = torch.cat([encoder(x) for encoder, x in zip(self.rgb_encoder, frames)], dim=-1)
        else:  # LeRobot's "(b s n)": every sample's cameras next to each other through the one encoder
            n = frames[0].shape[0]
            features = self.rgb_encoder(torch.stack(frames, dim=1).flatten(0, 1)).reshape(n, -1)
        if low_dim is None:
            low_dim = features.new_zeros(features.shape[0], 0)
        return torch.cat([low_dim[:, : self.state_dim], features, low_dim[:, self.state_dim :]], dim=-1)


def _per_key(value, key: str):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(key)
    return tuple(int(v) for v in value)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
