"""The zoo's compact architectures (one module per family), for `models.ZOO`.

`ARCHITECTURES` maps a zoo name to (factory, default number of classes, default input shape).
Each is a compact but faithful version of a published network with seeded random weights;
inputs are small (64x64 mostly) so that exporting and compiling all of them stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .dense_inception import densenet121, googlenet, inception_v3
from .dense_prediction import deeplabv3_mobilenet, fpn_detector, unet, yolov5_focus
from .hybrid import mobilevit
from .lightweight import ghostnet, shufflenet_v2, squeezenet
from .mobile import efficientnet_b0, mnasnet, mobilenet_v3_large, mobilenet_v3_small
from .more import efficientnet_v2_s, mobilenet_v1, mobileone_s0, shufflenet_v1
from .more_branches import hrnet_lite, resnet34, vovnet27_slim, wide_resnet16_4
from .resnets import convnext_atto, regnety_200mf, repvgg_a0, resnet50, resnext50, se_resnet50
from .sequence import crnn

INPUT_64 = (1, 3, 64, 64)
INPUT_96 = (1, 3, 96, 96)  # Inception-v3's unpadded stem needs at least 75x75
TEXT_LINE = (1, 3, 32, 128)

ARCHITECTURES: dict[str, tuple[Callable[[int], nn.Module], int, tuple[int, ...]]] = {
    "mobilenet_v3_small": (mobilenet_v3_small, 1000, INPUT_64),
    "mobilenet_v3_large": (mobilenet_v3_large, 1000, INPUT_64),
    "efficientnet_b0": (efficientnet_b0, 1000, INPUT_64),
    "ghostnet": (ghostnet, 1000, INPUT_64),
    "mnasnet": (mnasnet, 1000, INPUT_64),
    "shufflenet_v2": (shufflenet_v2, 1000, INPUT_64),
    "squeezenet": (squeezenet, 1000, INPUT_64),
    "densenet121": (densenet121, 1000, INPUT_64),
    "googlenet": (googlenet, 1000, INPUT_64),
    "inception_v3": (inception_v3, 1000, INPUT_96),
    "resnet50": (resnet50, 1000, INPUT_64),
    "resnext50": (resnext50, 1000, INPUT_64),
    "se_resnet50": (se_resnet50, 1000, INPUT_64),
    "regnety_200mf": (regnety_200mf, 1000, INPUT_64),
    "repvgg_a0": (repvgg_a0, 1000, INPUT_64),
    "convnext_atto": (convnext_atto, 1000, INPUT_64),
    "unet": (unet, 2, INPUT_64),
    "deeplabv3_mobilenet": (deeplabv3_mobilenet, 21, INPUT_64),
    "fpn_detector": (fpn_detector, 20, INPUT_64),
    "yolov5_focus": (yolov5_focus, 80, INPUT_64),
    "crnn": (crnn, 37, TEXT_LINE),
    "mobilevit": (mobilevit, 1000, INPUT_64),
    # models/more.py and more_branches.py
    "mobilenet_v1": (mobilenet_v1, 1000, INPUT_64),
    "resnet34": (resnet34, 1000, INPUT_64),
    "wide_resnet16_4": (wide_resnet16_4, 1000, INPUT_64),
    "shufflenet_v1": (shufflenet_v1, 1000, INPUT_64),
    "mobileone_s0": (mobileone_s0, 1000, INPUT_64),
    "efficientnet_v2_s": (efficientnet_v2_s, 1000, INPUT_64),
    "hrnet_lite": (hrnet_lite, 1000, INPUT_64),
    "vovnet27_slim": (vovnet27_slim, 1000, INPUT_64),
}
