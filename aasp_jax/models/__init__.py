"""Pure functional flax.linen modules: patch stems (conv, AaPE), the ViT encoder, predictors and heads."""
