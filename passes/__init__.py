"""Graph passes of fmcompress (importable as `fmcompress.passes`), one pass a module."""

from fmcompress.featuremaps import Projection

from .base import Pass, PassContext, PassResult, Pipeline
from .fold import FoldProjectionsPass
from .fold_bn import FoldBatchNormPass
from .insert import InsertProjectionsPass

__all__ = ["Pass", "PassContext", "PassResult", "Pipeline"]
__all__ += ["FoldBatchNormPass", "FoldProjectionsPass", "InsertProjectionsPass", "Projection"]
