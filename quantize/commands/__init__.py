"""Thin Click wrappers, one module per stage; each calls a typed library function."""
