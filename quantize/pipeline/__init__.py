"""Recipes and `quantize run`: merge -> sample -> quantize -> eval, chained by manifests."""
