"""timm model families with hyper-connection streams; importing this registers them with timm."""
from ._hc_common import CheckpointFileError, CheckpointMismatchError, PretrainedWeightsUnavailableError, \
    TorchScriptUnsupportedError, check_local_dir, check_weights_file, hc_model_args, load_residual_weights, \
    upcycle_residual_state_dict
from .vision_transformer_hc import VisionTransformerHC
from .convnext_hc import ConvNeXtHC
from .vision_transformer_plain import OrthogonalLinear, VisionTransformerPlain
from .terminator import Terminator
