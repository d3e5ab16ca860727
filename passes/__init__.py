"""Graph passes of fmcompress (importable as `fmcompress.passes`), one pass a module."""

from fmcompress.featuremaps import Projection

from .base import Pass, PassContext, PassResult, Pipeline, PipelineError
from .fold import FoldProjectionsPass
from .fold_bn import FoldBatchNormPass
from .graph import Model
from .insert import InsertProjectionsPass
from .runtime import RuntimeMemoryPass
from .runtime_plan import RuntimePlanPass, TileToCeilingPass
from .sink_concat import SinkConcatPass
from .split_conv import SplitConvPass
from .tile import TilePass, bands_for_budget, tile_region, tileable_region

__all__ = ["Model", "Pass", "PassContext", "PassResult", "Pipeline", "PipelineError"]
__all__ += ["FoldBatchNormPass", "FoldProjectionsPass", "InsertProjectionsPass", "Projection"]
__all__ += ["RuntimeMemoryPass", "RuntimePlanPass", "SinkConcatPass", "SplitConvPass", "TilePass", "TileToCeilingPass"]
__all__ += ["bands_for_budget", "tile_region", "tileable_region"]
