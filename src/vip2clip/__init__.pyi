# What type checkers see of `vip2clip`: the names that `__init__.py` loads lazily (its `__getattr__`), each from the
# module that defines it (a name imported "as itself" is exported). tests/test_typing.py keeps this file, `__all__`
# and `_LAZY_ATTRIBUTES` the same.

from vip2clip import metrics as metrics
from vip2clip.config import ModelConfig as ModelConfig
from vip2clip.factory import create_model as create_model
from vip2clip.inference.predictor import Predictor as Predictor
from vip2clip.model.preprocessing import preprocess as preprocess
from vip2clip.model.presets import list_models as list_models
from vip2clip.model.pretrained import download_pretrained as download_pretrained
from vip2clip.model.pretrained import list_pretrained as list_pretrained
from vip2clip.onnx.engine import load_onnx as load_onnx
from vip2clip.onnx.export import export_onnx as export_onnx
from vip2clip.outputs import ImageBatch as ImageBatch
from vip2clip.outputs import ImageItem as ImageItem
from vip2clip.scoring.mutual import predict_mutual as predict_mutual
from vip2clip.scoring.mutual_rule import MutualRule as MutualRule

__version__: str
