"""Models: backbones (timm, offline pretrained default), neck, heads (registry), the model."""

from .backbones import OFFLINE_DEFAULT, Backbone, create_backbone
from .heads import Head, create_head, head_options, list_heads, register_head
from .model import TaxonomistModel, create_model
from .neck import Neck, create_neck

__all__ = ["OFFLINE_DEFAULT", "Backbone", "create_backbone", "Head", "create_head", "head_options", "list_heads",
           "register_head", "TaxonomistModel", "create_model", "Neck", "create_neck"]
