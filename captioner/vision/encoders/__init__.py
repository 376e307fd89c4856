"""Pretrained CNN backbones by name (see registry.py). Importing this package registers every backbone:
the registry itself never imports its members.
"""

from captioner.vision.encoders.registry import (  # noqa: F401
    Encoder,
    EncoderSpec,
    build_encoder,
    feature_differences,
    list_encoders,
    register,
    set_features,
    spec_key,
    spec_with_defaults,
)
from captioner.vision.encoders import lite, resnet  # noqa: F401  (registers the backbones)
from captioner.vision.encoders.lite import (  # noqa: F401
    LITE0_SPEC,
    LITE1_SPEC,
    LITE2_SPEC,
    EfficientNetLite,
    EfficientNetLite0,
    lite0_state_dict,
    lite_spec,
    lite_state_dict,
)
