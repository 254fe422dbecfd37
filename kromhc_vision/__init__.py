"""kromhc_vision: hyper-connections (HC, mHC, mHC-lite, KromHC) for timm vision models."""
from .ops import BACKENDS
from .connections import (
    CONNECTIONS,
    HC,
    MHC,
    HyperConnection,
    KromHC,
    MHCLite,
    ResidualConnection,
    build_connection,
    connection_num_params,
)
from .ops.pytorch._once import DoubleBackwardUnsupportedError
from .residual_maps import stochasticity_error
from .streams import expand_streams, reduce_streams
from .models import (  # registers the timm models
    CheckpointFileError, CheckpointMismatchError, PretrainedWeightsUnavailableError, TorchScriptUnsupportedError,
    check_local_dir, check_weights_file, hc_model_args, load_residual_weights, upcycle_residual_state_dict,
)

__version__ = "0.1.0"
