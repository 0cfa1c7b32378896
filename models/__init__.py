"""Model families. Importing this package registers every family (see models/registry.py)."""

from models import gpt, llama, switch, transformer  # noqa: F401  (registration side effect)
from models.registry import MODEL_FAMILIES, build_model, config_from_dict, config_to_dict, load_model_config

__all__ = ["MODEL_FAMILIES", "build_model", "config_from_dict", "config_to_dict", "load_model_config"]
