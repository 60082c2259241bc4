"""Tests of aires.tiling, one module per module of the package."""
