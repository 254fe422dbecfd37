"""timm model families with hyper-connection streams; importing this registers them with timm."""
from ._hc_common import CheckpointMismatchError, TorchScriptUnsupportedError, hc_model_args, load_residual_weights, \
    upcycle_residual_state_dict
from .vision_transformer_hc import VisionTransformerHC
from .convnext_hc import ConvNeXtHC
