"""Training methods (AST, MaskLLM, dense fine-tuning) for the shared loop of `semisparse.training`.

Importing the package registers each method as a "trainer" (`semisparse.registry.lookup("trainer", name)`)
with its typed config: `DenseConfig`, `ASTConfig`, `MaskLLMConfig`.
"""

from semisparse.methods.ast import ASTConfig, ASTMethod
from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.methods.maskllm import MaskLLMConfig, MaskLLMMethod

__all__ = ["ASTConfig", "ASTMethod", "DenseConfig", "DenseMethod", "MaskLLMConfig", "MaskLLMMethod"]
