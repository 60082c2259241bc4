"""Tests of aires.scheduler, one module per module of the package."""
