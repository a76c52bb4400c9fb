"""NAE-style person-search model (CONTRACTS section 4)."""
from pretrain.model.backbones import BACKBONES, BackboneParts, build_backbone
from pretrain.model.config import ModelConfig, tiny_config
from pretrain.model.search_model import SearchModel, build_search_model

__all__ = ["ModelConfig", "tiny_config", "SearchModel", "build_search_model", "build_backbone",
           "BackboneParts", "BACKBONES"]
