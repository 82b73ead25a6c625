"""The PyTorch twins of flowmap's networks live in the Python package (`python/flowmap/torch.py`, imported as
`flowmap.torch`). This shim lets the scripts beside it `import flowmap_unet` without installing the package;
`flowmap bench speed --peer` copies the real file under this name instead."""

import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "flowmap", "torch.py")
_spec = importlib.util.spec_from_file_location("flowmap_unet", _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.modules[__name__] = _module
