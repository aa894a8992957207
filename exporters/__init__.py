"""Exporters: one package per target format, each exposing ``export(model_dir, out_dir, config)``."""
