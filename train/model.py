"""The network: MobileNetV2 backbone, global pooling, a small softmax head; and its augmentation.

The saved model takes normalised float32 crops (faceberry.preprocess.normalize) and returns softmax
probabilities. Augmentation is a separate block placed in front of it only while training, so
the exported model carries no augmentation ops into the TFLite converter.
"""

from __future__ import annotations

from pathlib import Path

import keras

from faceberry.train.errors import WeightsError

# MobileNetV2 block names, from the input to the top; fine-tuning unfreezes from a block onwards.
LAST_BLOCK = 16

__all__ = ["WeightsError", "build_augmentation", "build_backbone", "build_classifier", "set_backbone_trainable"]


def build_augmentation(seed: int = 0, rotation_deg: float = 40.0, shift: float = 0.2, shear: float = 0.2,
                       zoom: float = 0.2, brightness: float = 0.2, contrast: float = 0.2) -> keras.Sequential:
    """ImageDataGenerator-style augmentation on normalised crops (values in [-1, 1])."""
    layers = [
        keras.layers.RandomRotation(rotation_deg / 360.0, fill_mode="nearest", seed=seed),
        keras.layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomShear(x_factor=shear, y_factor=shear, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomZoom((-zoom, zoom), fill_mode="nearest", seed=seed + 3),
        keras.layers.RandomFlip("horizontal", seed=seed + 4),
    ]
    if brightness > 0:
        # Low light on a door camera: darker and brighter faces, in the normalised range.
        layers.append(keras.layers.RandomBrightness(brightness, value_range=(-1.0, 1.0), seed=seed + 5))
    if contrast > 0:
        layers.append(keras.layers.RandomContrast(contrast, value_range=(-1.0, 1.0), seed=seed + 6))
    return keras.Sequential(layers, name="augmentation")


def build_backbone(input_size: int, alpha: float, weights: str) -> keras.Model:
    """MobileNetV2 without its top. weights: "imagenet", "none", a path to a .weights.h5 file, or a
    distilled face backbone's directory (`python -m train backbone --arch mobilenetv2`): a face-aware start."""
    shape = (input_size, input_size, 3)
    if weights == "imagenet":
        try:
            return keras.applications.MobileNetV2(input_shape=shape, alpha=alpha, include_top=False, weights="imagenet")
        except Exception as exc:
            raise WeightsError(
                f"cannot get Keras' ImageNet MobileNetV2 weights (alpha {alpha}, input {input_size}): "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "check the network, or pass a weights file with --weights PATH (or --weights none)"
            ) from exc
    backbone = keras.applications.MobileNetV2(input_shape=shape, alpha=alpha, include_top=False, weights=None)
    if weights == "none":
        return backbone
    path = Path(weights)
    if path.is_dir():
        return _face_aware(backbone, path, alpha)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}; pass --weights imagenet, none, or an existing file")
    try:
        backbone.load_weights(str(path))
    except Exception as exc:
        raise WeightsError(
            f"cannot load {path} into MobileNetV2 alpha {alpha}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "the file must be a no-top MobileNetV2 .weights.h5 with the same --alpha"
        ) from exc
    return backbone


def _face_aware(backbone: keras.Model, root: Path, alpha: float) -> keras.Model:
    """`backbone` with the weights of the MobileNetV2 inside a distilled student at `root`.

    ImageNet features do not tell faces apart; a student distilled from dlib's embedder does, a little,
    and its MobileNetV2 is the same network as the fine-tune's (the input size does not change a
    convolution's weights), so the fine-tune can start from it."""
    from faceberry.train.backbone_dir import BackboneError, load_embedder

    try:
        model, config = load_embedder(root)
    except BackboneError as exc:
        raise WeightsError(f"--weights {root}: {exc}") from exc
    arch = config.get("arch", "mobilenetv2")
    inner = next((layer for layer in model.layers
                  if isinstance(layer, keras.Model) and layer.name.startswith("mobilenetv2")), None)
    if arch != "mobilenetv2" or inner is None:
        raise WeightsError(f"--weights {root}: a {arch} backbone holds no MobileNetV2 to start from; use it with "
                           "--backbone instead, or pass --weights imagenet")
    try:
        backbone.set_weights(inner.get_weights())
    except ValueError as exc:
        raise WeightsError(f"--weights {root}: its MobileNetV2 (alpha {config.get('alpha')}) does not fit alpha "
                           f"{alpha} ({str(exc).splitlines()[0]}); pass --alpha {config.get('alpha')}") from exc
    return backbone


def build_classifier(
    num_classes: int, input_size: int, alpha: float, weights: str, dropout: float = 0.3
) -> tuple[keras.Model, keras.Model]:
    """(model, backbone): model = backbone → global average pooling → dropout → dense softmax.

    With pretrained weights BatchNorm statistics stay frozen, even when the top blocks are later
    unfrozen (see set_backbone_trainable): few photos cannot re-estimate them. From random weights
    there is nothing to keep, so BatchNorm learns from the data.
    """
    backbone = build_backbone(input_size, alpha, weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    pretrained = weights != "none"
    x = backbone(inputs, training=False) if pretrained else backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="faceberry_classifier"), backbone


def set_backbone_trainable(backbone: keras.Model, from_block: int | None, freeze_bn: bool = True) -> int:
    """Freeze the backbone, or unfreeze it from `block_<from_block>` to the top; returns #trainable layers.

    from_block None freezes all; 0 unfreezes everything.
    """
    if from_block is None:
        backbone.trainable = False
        return 0
    backbone.trainable = True
    start = 0
    if from_block > 0:
        names = [layer.name for layer in backbone.layers]
        prefix = f"block_{from_block}_"
        matches = [i for i, n in enumerate(names) if n.startswith(prefix)]
        if not matches:
            raise ValueError(f"MobileNetV2 has no block {from_block} (blocks 1–{LAST_BLOCK})")
        start = matches[0]
    count = 0
    for i, layer in enumerate(backbone.layers):
        # BatchNorm stays frozen: in Keras 3 a trainable BatchNormalization uses batch statistics
        # whatever `training=` the backbone was called with, and a few dozen augmented faces per
        # batch would overwrite the ImageNet statistics (measured: validation accuracy fell 10 points).
        layer.trainable = i >= start and not (freeze_bn and isinstance(layer, keras.layers.BatchNormalization))
        count += int(layer.trainable)
    return count
